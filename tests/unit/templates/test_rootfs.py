"""The guest layer of a template rootfs, on small fake trees: users, files written without
following the tree's symlinks, Cube's guest modules, init's services, the ext4 image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cube.guest.init import InitConfig
from cube.guest.wire import CONTROL_PORT, RELAY_PORT
from cube.pool import rootfs
from cube.pool.buildlog import BuildError, BuildLog


@pytest.fixture
def log(tmp_path: Path) -> BuildLog:
    return BuildLog(tmp_path / "build.log", terminal=None)


def _tree(tmp_path: Path, passwd: str) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_text(passwd)
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (tree / "etc/skel").mkdir()
    (tree / "etc/skel/.bashrc").write_text("# bashrc\n")
    return tree


def test_add_user_with_home_and_sudo(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "root:x:0:0:root:/root:/bin/bash\n")
    assert rootfs.add_user(tree) == 1000
    assert "user:x:1000:1000::/home/user:/bin/sh" in (tree / "etc/passwd").read_text()
    assert "user:x:1000:" in (tree / "etc/group").read_text()
    assert "user:*:" in (tree / "etc/shadow").read_text()
    assert (tree / "home/user/.bashrc").read_text() == "# bashrc\n"
    assert (tree / "home/user").stat().st_uid == 1000
    sudoers = tree / "etc/sudoers.d/cube-user"
    assert sudoers.read_text() == "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    assert sudoers.stat().st_mode & 0o777 == 0o440


def test_add_user_picks_a_free_uid_and_keeps_an_existing_user(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n")
    assert rootfs.add_user(tree) == 1001
    again = rootfs.add_user(tree)
    assert again == 1001
    assert (tree / "etc/passwd").read_text().count("user:x:") == 1


def test_writes_never_follow_symlinks_out_of_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hosts").write_text("host file")
    tree = _tree(tmp_path, "root:x:0:0::/root:/bin/sh\n")
    os.symlink(outside / "hosts", tree / "etc/hosts")
    os.symlink(str(outside), tree / "opt")
    os.symlink(outside / "hosts", tree / "etc/shadow2")
    rootfs.write_file(tree, "/etc/hosts", "guest\n")
    rootfs.write_file(tree, "/opt/cube/x", "guest\n")
    assert (outside / "hosts").read_text() == "host file"
    assert sorted(p.name for p in outside.iterdir()) == ["hosts"]
    assert (tree / "etc/hosts").read_text() == "guest\n"
    assert rootfs.read_file(tree, "etc/shadow2") == ""  # a symlink is not read through
    assert (tree.joinpath(*str(outside).strip("/").split("/"), "cube", "x")).is_file()


def test_guest_python(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(BuildError, match=r"CPython 3\.11"):
        rootfs.guest_python(tree)
    (tree / "usr/local/bin").mkdir(parents=True)
    os.symlink("python3.11-real", tree / "usr/local/bin/python3.11")
    assert rootfs.guest_python(tree) == (
        "/usr/local/bin/python3.11",
        "/usr/local/lib/python3.11/site-packages",
    )


def test_guest_modules_are_pure_python_and_closed_under_imports() -> None:
    modules = {str(p) for p in rootfs.guest_modules()}
    assert {"cube/__init__.py", "cube/guest/__init__.py", "cube/guest/wire.py",
            "cube/guest/init.py"} <= modules  # fmt: skip
    assert all(m.endswith(".py") for m in modules)
    assert not any(m.startswith(("cube/vmm/", "cube/pool/")) for m in modules)


def test_guest_modules_follow_imports_and_refuse_compiled_ones(tmp_path: Path) -> None:
    package = tmp_path / "cube"
    (package / "guest").mkdir(parents=True)
    (package / "util").mkdir()
    (package / "__init__.py").write_text("")
    (package / "guest/__init__.py").write_text("")
    (package / "util/__init__.py").write_text("")
    (package / "util/text.py").write_text("from . import helper\n")
    (package / "util/helper.py").write_text("")
    (package / "guest/a.py").write_text("from cube.util import text\nimport os\n")
    found = {str(p) for p in rootfs.guest_modules(package)}
    assert {"cube/util/text.py", "cube/util/helper.py", "cube/util/__init__.py"} <= found
    (package / "guest/b.py").write_text("from cube.util import _native\n")
    (package / "util/_native.abi3.so").write_bytes(b"\x7fELF")
    (package / "guest/c.py").write_text("import cube.util._native\n")
    with pytest.raises(BuildError, match=r"not a \.py module"):
        rootfs.guest_modules(package)


def test_init_config_services() -> None:
    plain = rootfs.init_config("/usr/bin/python3.11", interpreter=False, start_cmd=None,
                               ready_cmd=None, env={}, user=None, workdir=None)  # fmt: skip
    assert [s.name for s in plain.services] == ["agent"]
    agent = plain.services[0]
    assert agent.argv[:3] == ["/usr/bin/python3.11", "-m", "cube.guest.agent"]
    assert f"vsock:{RELAY_PORT}" in agent.argv and f"vsock:{CONTROL_PORT}" in agent.argv
    assert agent.env["PYTHONPATH"] == f"{rootfs.GUEST_LIB}:{rootfs.GUEST_SITE}"
    full = rootfs.init_config("/usr/bin/python3.11", interpreter=True, start_cmd="serve",
                              ready_cmd="curl -f localhost:8000", env={"A": "1"},
                              user="app", workdir="/srv")  # fmt: skip
    assert [s.name for s in full.services] == ["agent", "interpreter", "start"]
    start = full.services[2]
    assert (start.argv, start.user, start.cwd) == (["/bin/sh", "-c", "serve"], "app", "/srv")
    assert (full.ready_user, full.ready_cwd, full.env) == ("app", "/srv", {"A": "1"})
    assert "127.0.0.1:49999/health" in full.ready_cmd  # type: ignore[operator]
    assert full.ready_cmd.endswith("&& (curl -f localhost:8000)")  # type: ignore[union-attr]
    assert plain.ready_cmd is None
    assert InitConfig.load(full.dump()) == full


def test_merge_into_places_packages_scripts_and_data(tmp_path: Path) -> None:
    tree, source = tmp_path / "tree", tmp_path / "pip"
    for folder in ("bin", "pkg", "share/jupyter/kernels/bash"):
        (source / folder).mkdir(parents=True)
    (source / "pkg/__init__.py").write_text("")
    (source / "bin/tool").write_text("#!/host/venv/bin/python3\nimport pkg\n")
    (source / "bin/binary").write_bytes(b"\x7fELF")
    (source / "share/jupyter/kernels/bash/kernel.json").write_text("{}")
    site = "/usr/local/lib/python3.11/dist-packages"
    (tree / site.strip("/") / "pkg").mkdir(parents=True)
    (tree / site.strip("/") / "pkg/stale.py").write_text("")
    rootfs.merge_into(tree, source, site, "/usr/bin/python3.11", prefix_dirs=True)
    assert (tree / "usr/local/bin/tool").read_text() == "#!/usr/bin/python3.11\nimport pkg\n"
    assert (tree / "usr/local/bin/binary").read_bytes() == b"\x7fELF"
    assert (tree / "usr/local/share/jupyter/kernels/bash/kernel.json").is_file()
    assert sorted(p.name for p in (tree / site.strip("/") / "pkg").iterdir()) == ["__init__.py"]
    assert (source / "bin/tool").read_text().startswith("#!/host")  # the cache is untouched


def test_merge_into_leaves_private_scripts_out(tmp_path: Path) -> None:
    tree, source = tmp_path / "tree", tmp_path / "pip"
    (source / "bin").mkdir(parents=True)
    (source / "bin/hypercorn").write_text("#!/host/python\n")
    (source / "trio").mkdir()
    (source / "trio/__init__.py").write_text("")
    tree.mkdir()
    rootfs.merge_into(tree, source, rootfs.GUEST_SITE, "/usr/bin/python3.11", prefix_dirs=False)
    assert (tree / "opt/cube/site/trio/__init__.py").is_file()
    assert not (tree / "usr/local/bin").exists()


def test_make_ext4(tmp_path: Path, log: BuildLog) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hello").write_text("hi\n")
    image = tmp_path / "rootfs.ext4"
    assert rootfs.make_ext4(tree, image, 64, log) == 64
    assert image.stat().st_size == 64 << 20
    listing = subprocess.run(["debugfs", "-R", "cat /etc/hello", str(image)],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert listing.stdout == "hi\n"
    (tree / "big").write_bytes(os.urandom(4 << 20))
    with pytest.raises(BuildError, match="too small"):
        rootfs.make_ext4(tree, tmp_path / "small.ext4", 8, log)


def test_numeric_image_users_become_names(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n")
    assert rootfs.user_name(tree, "1000") == "node"
    assert rootfs.user_name(tree, "0") == "root"
    assert rootfs.user_name(tree, "4242") == "4242"
    assert rootfs.user_name(tree, "app") == "app"
    assert rootfs.user_name(tree, None) is None
