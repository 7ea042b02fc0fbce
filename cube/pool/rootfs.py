"""Template root filesystems: a Debian tree from debootstrap, Cube's guest layer, an ext4 image.

A tree comes either from `debian_tree` (bookworm, minbase, plus the tools E2B's base image has)
or from an OCI image (`cube.pool.oci`). `install_guest` then adds what every sandbox needs on
top, the same for both:

- users `root` and `user` (uid 1000, home /home/user, passwordless sudo), as E2B templates have;
- Cube's guest code (cube/__init__.py, cube/guest/** and whatever they import from cube, never
  a compiled module) in GUEST_LIB, and the agent's Python dependencies in GUEST_SITE, both
  private to Cube's services (PYTHONPATH), so user packages cannot break the agent or the reverse;
- user-visible pip packages (the code interpreter's, `--pip`) in the guest Python's own
  site-packages, where `python3` in the sandbox finds them;
- init (`cube.guest.init`) at INIT_PATH with its config, started by the kernel (KERNEL_ARGS).

Packages are installed with the host's pip for the guest's Python: `--target` with cp311 and
manylinux tags, binary wheels only, as the lab image does. So the guest must run CPython 3.11
(Debian bookworm's python3, or an image based on python:3.11). An OCI image without it is
refused with a message saying so: the agent cannot run without Python, and a second Python
copied in would not match the image's libc reliably.

The tree may come from an untrusted image, so every write into it goes through
`cube.pool.layers.in_root` (symlinks in the image are read as the guest reads them, never
followed out of the tree) and nothing from the tree is ever executed on the host.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

from cube.guest.init import CONFIG_PATH, InitConfig, Service
from cube.guest.wire import CONTROL_PORT, ENVD_PORT, INTERPRETER_PORT, RELAY_PORT
from cube.paths import CHECKOUT_DIR, PACKAGE_DIR
from cube.pool.buildlog import BuildError, BuildLog
from cube.pool.layers import LayerError, dir_in_root, in_root, remove

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = (
    "python3",
    "python3-pip",
    "python3-venv",
    "bash",
    "coreutils",
    "iproute2",
    "iputils-ping",
    "ca-certificates",
    "procps",
    "curl",
    "wget",
    "git",
    "sudo",
    "less",
    "netbase",
    "unzip",
)
# Every manylinux tag bookworm's glibc (2.36) can load, newest first: pip does not widen a
# --platform to the older tags below it, and wheels are published for any of them (deno's for
# manylinux_2_17 only, for example).
WHEEL_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in (36, 35, 34, 31, 28, 27, 24, 17)),
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
HOST_ONLY_REQUIREMENTS = {"cffi", "typer"}  # the VMM and the CLI; never imported in a guest

GUEST_ROOT = "opt/cube"
GUEST_LIB = "/opt/cube/lib"
GUEST_SITE = "/opt/cube/site"
INIT_PATH = "/opt/cube/init"
KERNEL_ARGS = f"root=/dev/vda rw rootfstype=ext4 init={INIT_PATH}"
STATE_DIR = "/run/cube"
USER_NAME, USER_UID, USER_HOME = "user", 1000, "/home/user"
# (interpreter path in the guest, where its site-packages is): Debian's, then python.org's
PYTHONS = (
    ("/usr/bin/python3.11", "/usr/local/lib/python3.11/dist-packages"),
    ("/usr/local/bin/python3.11", "/usr/local/lib/python3.11/site-packages"),
)
SYSTEM_FILES = {
    "etc/hostname": "cube\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    # the agent writes the sandbox's resolvers here on every identity refresh
    "etc/resolv.conf": "nameserver 1.1.1.1\n",
    "etc/sudoers.d/cube-user": f"{USER_NAME} ALL=(ALL:ALL) NOPASSWD: ALL\n",
}
EXT4_HEADROOM_MB = 1024
PREFIX_DIRS = {"bin": "/usr/local/bin", "share": "/usr/local/share"}  # pip --target's extras
# init's launcher: isolated mode (-I) ignores PYTHON* variables, so only Cube's lib is added.
INIT_SCRIPT = f"""import sys
sys.path.insert(0, "{GUEST_LIB}")
from cube.guest.init import main
main()
"""
MB = 1 << 20


def _project() -> dict:
    return tomllib.loads((CHECKOUT_DIR / "pyproject.toml").read_text())["project"]


def agent_requirements() -> list[str]:
    """The agent's dependencies: Cube's runtime ones minus those only the host uses."""
    return [
        req
        for req in _project()["dependencies"]
        if req.split(">")[0].split("=")[0].split("<")[0].strip() not in HOST_ONLY_REQUIREMENTS
    ]


def interpreter_requirements() -> list[str]:
    """What the code interpreter needs in the guest: pyproject's `guest` extra."""
    return list(_project()["optional-dependencies"]["guest"])


def debian_tree(tree: Path, apt: Iterable[str], log: BuildLog) -> None:
    """debootstrap bookworm (minbase) with the base tools and `apt` extras into `tree`."""
    packages = sorted({*DEBIAN_PACKAGES, *apt})
    log.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
         str(tree), MIRROR]
    )  # fmt: skip
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (tree / folder).iterdir():
            if path.is_file():
                path.unlink()
    # E2B sandboxes let users `pip install` system-wide; Debian's PEP 668 marker forbids it.
    (tree / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    # The guest's /dev is devtmpfs; debootstrap's device nodes would only stop the tree being
    # copied where mknod is not allowed (9p in the lab).
    for node in (tree / "dev").iterdir():
        remove(node)


def guest_python(tree: Path) -> tuple[str, str]:
    """(interpreter, site-packages) of the tree's CPython 3.11; BuildError if it has none."""
    for python, site in PYTHONS:
        with contextlib.suppress(LayerError):
            if os.path.lexists(in_root(tree, python.strip("/").split("/"), create=False)):
                return python, site
    raise BuildError(
        "the image has no CPython 3.11 (looked for "
        + ", ".join(p for p, _ in PYTHONS)
        + "); Cube's agent runs on it: base the image on python:3.11-* or Debian bookworm "
        "with python3 installed"
    )


def write_file(tree: Path, path: str, text: str, mode: int = 0o644) -> Path:
    """Create or replace one file in the tree (a symlink there is replaced, not followed)."""
    target = in_root(tree, path.strip("/").split("/"))
    _replace(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(target, mode)
    return target


def read_file(tree: Path, path: str) -> str:
    """A text file of the tree, "" if absent; never follows a symlink out of the tree."""
    try:
        target = in_root(tree, path.strip("/").split("/"), create=False)
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except (OSError, LayerError):
        return ""
    with os.fdopen(fd) as f:
        return f.read()


def user_name(tree: Path, user: str | None) -> str | None:
    """An image's User as a name: a numeric uid is looked up in the tree's /etc/passwd (the
    agent and E2B's API speak of users by name); unknown uids stay numeric."""
    if user is None or not user.isdigit():
        return user
    for line in read_file(tree, "etc/passwd").splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2] == user:
            return fields[0]
    return user


def add_user(tree: Path) -> int:
    """Make sure `user` exists with a home and passwordless sudo; its uid.

    The account files are edited as text rather than with useradd in a chroot: that would run
    the image's own binaries on the host as root.
    """
    passwd = read_file(tree, "etc/passwd")
    users = {line.split(":")[0]: line.split(":") for line in passwd.splitlines() if ":" in line}
    if USER_NAME in users:
        uid, gid = int(users[USER_NAME][2]), int(users[USER_NAME][3])
    else:
        taken = {int(fields[2]) for fields in users.values() if fields[2].isdigit()}
        uid = next(u for u in range(USER_UID, 60000) if u not in taken)
        gid = uid
        if "root:" not in passwd:
            passwd = "root:x:0:0:root:/root:/bin/sh\n" + passwd
        shell = "/bin/bash" if os.path.lexists(in_root(tree, ["bin", "bash"])) else "/bin/sh"
        passwd += f"{USER_NAME}:x:{uid}:{gid}::{USER_HOME}:{shell}\n"
        write_file(tree, "etc/passwd", passwd)
        group = read_file(tree, "etc/group")
        group += f"{USER_NAME}:x:{gid}:\n"
        write_file(tree, "etc/group", group)
        shadow = read_file(tree, "etc/shadow")
        if shadow:
            write_file(tree, "etc/shadow", shadow + f"{USER_NAME}:*:19000:0:99999:7:::\n", 0o640)
    home_path = users[USER_NAME][5] if USER_NAME in users else USER_HOME
    home = dir_in_root(tree, home_path.strip("/").split("/"))
    skel = dir_in_root(tree, ["etc", "skel"])
    for item in skel.iterdir():
        if item.is_file() and not item.is_symlink() and not (home / item.name).exists():
            shutil.copyfile(item, home / item.name)
            os.chown(home / item.name, uid, gid)
    os.chown(home, uid, gid)
    os.chmod(home, 0o755)
    for path, text in SYSTEM_FILES.items():
        write_file(tree, path, text, 0o440 if "sudoers" in path else 0o644)
    return uid


def guest_modules(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Cube's files a guest needs, relative to the folder holding `cube/`: cube/__init__.py,
    cube/guest/** and, transitively, every cube module they import. BuildError for a
    compiled module, which would be built for the host, not the guest."""
    base = package_dir.parent
    todo = [package_dir / "__init__.py", *sorted((package_dir / "guest").rglob("*.py"))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        parents = path.relative_to(base).parents[:-1]
        todo += [base / p / "__init__.py" for p in parents if (base / p / "__init__.py").is_file()]
        for module in _cube_imports(path, base):
            found = _module_file(base, module)
            if found is None:
                raise BuildError(f"{path.relative_to(base)} imports {module}: not a .py module")
            todo.append(found)
    return sorted(p.relative_to(base) for p in seen)


def _cube_imports(path: Path, base: Path) -> set[str]:
    package = ".".join(path.relative_to(base).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            modules.add(module)
            # `from cube.x import y` may name the submodule cube.x.y
            modules.update(
                f"{module}.{alias.name}"
                for alias in node.names
                if _module_file(base, f"{module}.{alias.name}")
            )
    return {m for m in modules if m == "cube" or m.startswith("cube.")}


def _module_file(base: Path, module: str) -> Path | None:
    folder = base.joinpath(*module.split("."))
    for candidate in (folder.with_suffix(".py"), folder / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def copy_guest_package(tree: Path, log: BuildLog) -> None:
    """Copy the guest modules and byte-compile them, so the agent's first start in the guest
    does not pay for compiling. Only a host Python 3.11 can write the guest's .pyc files (on a
    Debian 13 host it is 3.13, whose cpython-313 files the guest would never read); elsewhere
    the agent compiles its modules when it first starts, before the template is snapshotted,
    so restored sandboxes still pay nothing."""
    lib = dir_in_root(tree, GUEST_LIB.strip("/").split("/"))
    for rel in guest_modules():
        target = lib / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR.parent / rel, target)
    if sys.version_info[:2] == (3, 11):
        log.run([sys.executable, "-m", "compileall", "-q", "-d", GUEST_LIB, str(lib)])


def pip_install(target: Path, requirements: list[str], log: BuildLog) -> None:
    """Install binary wheels for CPython 3.11 on x86-64 Linux into the folder `target`."""
    log.run(
        [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
            "--no-warn-script-location", "--target", str(target),
            "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
            *(arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)),
            "--only-binary=:all:", *requirements,
        ]
    )  # fmt: skip


def merge_into(tree: Path, source: Path, site: str, python: str, prefix_dirs: bool) -> None:
    """Copy pip's `--target` output (a cached folder, left unchanged) into the tree.

    Packages replace any of the same name in `site`. pip also puts `bin/` (scripts) and
    `share/` (e.g. Jupyter kernel specs) there: with `prefix_dirs` they are merged into
    /usr/local, scripts with the guest's Python in their #! line (pip wrote the host's);
    without it (the agent's private packages) they are left out, off the users' PATH.
    """
    for item in source.iterdir():
        if item.name in PREFIX_DIRS and item.is_dir():
            if prefix_dirs:
                shebang = python if item.name == "bin" else None
                _copy_into(tree, item, PREFIX_DIRS[item.name], shebang)
            continue
        target = f"{site}/{item.name}"
        _replace(in_root(tree, target.strip("/").split("/")))
        _copy_into(tree, item, target)


def _copy_into(tree: Path, source: Path, dest: str, shebang: str | None = None) -> None:
    """Copy a file or folder to `dest` in the tree, merging folders, resolving every path in
    the tree with in_root (the tree may already hold symlinks there)."""
    base = dest.strip("/").split("/")
    if source.is_symlink() or not source.is_dir():
        _copy_file(source, in_root(tree, base), shebang)
        return
    for folder, dirs, files in os.walk(source):
        here = Path(folder)
        target = dir_in_root(tree, [*base, *here.relative_to(source).parts])
        for name in [*files, *(d for d in dirs if (here / d).is_symlink())]:
            _copy_file(here / name, target / name, shebang)


def _copy_file(source: Path, target: Path, shebang: str | None) -> None:
    _replace(target)
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
        return
    shutil.copy2(source, target)
    if shebang:
        data = target.read_bytes()
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            target.write_bytes(f"#!{shebang}".encode() + data[data.index(b"\n") :])


def _replace(target: Path) -> None:
    """Clear the way for a new file at `target` (the image may already have one there)."""
    if target.is_symlink() or target.exists():
        remove(target)


def init_config(
    python: str,
    *,
    interpreter: bool,
    start_cmd: str | None,
    ready_cmd: str | None,
    env: dict[str, str],
    user: str | None,
    workdir: str | None,
) -> InitConfig:
    """What init starts: the agent, the code interpreter if wanted, the start command."""
    private = {"PYTHONPATH": f"{GUEST_LIB}:{GUEST_SITE}"}
    services = [
        Service(
            name="agent",
            argv=[python, "-m", "cube.guest.agent", "--relay", f"vsock:{RELAY_PORT}",
                  "--control", f"vsock:{CONTROL_PORT}", "--envd", f"127.0.0.1:{ENVD_PORT}",
                  "--state-dir", STATE_DIR],
            env=private,
        )
    ]  # fmt: skip
    if interpreter:
        services.append(
            Service(
                name="interpreter",
                argv=[python, "-m", "cube.guest.interpreter", "--listen",
                      f"127.0.0.1:{INTERPRETER_PORT}", "--state-dir", STATE_DIR,
                      "--cwd", USER_HOME],
                env=private,
            )
        )  # fmt: skip
        # snapshot the interpreter warm: its kernel started, not starting in every clone
        health = f"http://127.0.0.1:{INTERPRETER_PORT}/health"
        probe = f"{python} -c 'import urllib.request as u; u.urlopen(\"{health}\", timeout=5)'"
        ready_cmd = f"{probe} && ({ready_cmd})" if ready_cmd else probe
    run_as = user or USER_NAME
    cwd = workdir or USER_HOME
    if start_cmd:
        services.append(
            Service(name="start", argv=["/bin/sh", "-c", start_cmd], user=run_as, cwd=cwd)
        )
    return InitConfig(
        env=env, services=services, ready_cmd=ready_cmd, ready_user=run_as, ready_cwd=cwd
    )


def install_guest(
    tree: Path,
    log: BuildLog,
    *,
    agent_site: Path,
    user_site: Path | None,
    interpreter: bool,
    config: dict,
) -> None:
    """Add users, Cube's guest code, the agent's dependencies (`agent_site`, pip's output for
    agent_requirements()), user packages (`user_site`) and init to `tree`.

    `config` holds init_config's keyword arguments other than the interpreter path.
    """
    python, site = guest_python(tree)
    log.step(f"guest Python: {python}")
    add_user(tree)
    _replace(in_root(tree, GUEST_ROOT.split("/")))
    copy_guest_package(tree, log)
    merge_into(tree, agent_site, GUEST_SITE, python, prefix_dirs=False)
    if user_site is not None:
        merge_into(tree, user_site, site, python, prefix_dirs=True)
    write_file(tree, INIT_PATH, f"#!{python} -I\n{INIT_SCRIPT}", 0o755)
    write_file(
        tree, CONFIG_PATH, init_config(python, interpreter=interpreter, **config).dump(), 0o644
    )


def make_ext4(tree: Path, image: Path, disk_mb: int | None, log: BuildLog) -> int:
    """An ext4 image of the tree; its size in MiB (the tree plus headroom unless `disk_mb`)."""
    du = subprocess.run(
        ["du", "-s", "--block-size=1", str(tree)], check=True, capture_output=True, text=True
    )
    used_mb = -(-int(du.stdout.split()[0]) // MB)
    size_mb = disk_mb or used_mb + EXT4_HEADROOM_MB
    if size_mb < used_mb * 11 // 10 + 16:
        raise BuildError(f"--disk {size_mb} MiB is too small: the files take {used_mb} MiB")
    with open(image, "wb") as f:
        f.truncate(size_mb * MB)
    log.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "cube-root", "-d", str(tree), str(image)])
    return size_mb
