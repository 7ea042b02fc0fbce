"""Template root filesystems as build-once artifacts, and the spec that says what goes in one.

Three cached layers, each keyed by a hash of its own inputs (cube.artifacts):

- `debian-tree`: debootstrap's output for the suite and package list (minutes, networked);
- `guest-wheels`: pip's output for a requirement list, for the guest's CPython 3.11 (networked);
- `template-rootfs`: the finished ext4 image (and image.json), keyed by everything that goes
  into it: this module and the ones it drives, Cube's guest modules, requirements, the spec.

So a rerun with the same inputs is instant, a change to the guest code redoes only the guest
layer and mkfs (seconds), and a host that cannot boot guests (PVM) can make the rootfs for a lab
run to boot: the lab finds it at the same path by the same key. Booting and snapshotting live in
cube.pool.template_build, whose changes therefore never invalidate a rootfs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from cube import artifacts
from cube.paths import PACKAGE_DIR
from cube.pool import layers, oci, rootfs
from cube.pool.buildlog import BuildError, BuildLog
from cube.pool.template import ROOTFS_FILE

IMAGE_INFO = "image.json"
ROOTFS_KIND = "template-rootfs"
TREE_KIND = "debian-tree"
TREE_FORMAT = "2"  # bump when debian_tree changes what it makes
WHEELS_KIND = "guest-wheels"
WHEELS_FORMAT = "1"  # bump when pip_install changes what it makes


@dataclass(frozen=True)
class BuildSpec:
    """What `cube template build` was asked for."""

    name: str
    oci: Path | None = None
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    interpreter: bool = False
    cpus: int = 2
    memory_mb: int = 1024
    disk_mb: int | None = None
    start_cmd: str | None = None
    ready_cmd: str | None = None

    @property
    def source(self) -> str:
        return f"oci:{self.oci}" if self.oci else "debian"


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Kept beside a cached rootfs: what a cache hit must still tell the template."""

    disk_mb: int
    config: oci.ImageConfig


def _image_identity(source: Path) -> list[str | Path]:
    """What identifies an image cheaply: its manifests' contents for a folder (they name every
    blob by digest), path, size and mtime for a tarball (hashing gigabytes would cost more than
    importing it)."""
    if source.is_dir():
        return [p for p in (source / "index.json", source / "manifest.json") if p.is_file()]
    stat = source.stat()
    return [f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"]


def rootfs_key(spec: BuildSpec) -> str:
    """Hash of everything that goes into the rootfs: code, guest modules, requirements, spec."""
    code = [Path(__file__), *(Path(m.__file__) for m in (rootfs, oci, layers) if m.__file__)]
    guest = [PACKAGE_DIR.parent / rel for rel in rootfs.guest_modules()]
    options = [
        spec.source if spec.oci is None else "oci",
        rootfs.SUITE if spec.oci is None else "",
        *spec.apt, "|", *spec.pip, "|", str(spec.interpreter), spec.start_cmd or "",
        spec.ready_cmd or "", str(spec.disk_mb or 0),
        *rootfs.agent_requirements(), *rootfs.interpreter_requirements(),
    ]  # fmt: skip
    image = _image_identity(spec.oci) if spec.oci else []
    return artifacts.digest([*code, *guest, *options, *image])


def debian_base(apt: tuple[str, ...], log: BuildLog) -> Path:
    """The debootstrapped tree (the slow, networked part), cached by suite and packages so
    that a change to Cube's guest code only redoes the guest layer and the ext4 image."""
    key = artifacts.digest(
        [TREE_FORMAT, rootfs.SUITE, rootfs.MIRROR, *sorted({*rootfs.DEBIAN_PACKAGES, *apt})]
    )

    def build(out: Path) -> None:
        log.step("debootstrap " + rootfs.SUITE)
        rootfs.debian_tree(out / "tree", apt, log)

    return artifacts.ensure_built(TREE_KIND, key, build) / "tree"


def user_requirements(spec: BuildSpec) -> list[str]:
    """Packages user code imports: the code interpreter's, then `--pip`."""
    return [*(rootfs.interpreter_requirements() if spec.interpreter else []), *spec.pip]


def wheels(requirements: list[str], log: BuildLog) -> Path:
    """pip's output for the guest's Python (a folder to copy into a tree), cached by the
    requirements: with the Debian tree cached too, a rootfs builds without the network (as in
    the lab, where the guest code under test changes but the packages do not)."""
    key = artifacts.digest([WHEELS_FORMAT, *rootfs.WHEEL_PLATFORMS, *requirements])

    def build(out: Path) -> None:
        log.step("pip: " + " ".join(requirements))
        rootfs.pip_install(out / "site", requirements, log)

    return artifacts.ensure_built(WHEELS_KIND, key, build) / "site"


def build_rootfs(spec: BuildSpec, log: BuildLog) -> Path:
    """The cached artifact folder holding rootfs.ext4 and image.json, built if missing."""
    key = rootfs_key(spec)
    if artifacts.is_built(ROOTFS_KIND, key):
        log.step(f"rootfs {key} is cached")

    def build(out: Path) -> None:
        tree = out / "tree"
        tree.mkdir()
        started = time.monotonic()
        if spec.oci is None:
            base = debian_base(spec.apt, log)
            log.run(["cp", "-a", "--reflink=auto", f"{base}/.", str(tree)])
            config = oci.ImageConfig()
        else:
            log.step(f"importing {spec.oci}")
            try:
                config = oci.import_image(spec.oci, tree, out, log.line)
            except oci.ImageError as error:
                raise BuildError(str(error)) from None
        log.step(f"tree ready in {time.monotonic() - started:.1f} s; adding Cube's guest layer")
        config = msgspec.structs.replace(config, user=rootfs.user_name(tree, config.user))
        user_packages = user_requirements(spec)
        rootfs.install_guest(
            tree, log, agent_site=wheels(rootfs.agent_requirements(), log),
            user_site=wheels(user_packages, log) if user_packages else None,
            interpreter=spec.interpreter,
            config={"start_cmd": spec.start_cmd, "ready_cmd": spec.ready_cmd,
                    "env": config.env, "user": config.user, "workdir": config.workdir},
        )  # fmt: skip
        started = time.monotonic()
        disk_mb = rootfs.make_ext4(tree, out / ROOTFS_FILE, spec.disk_mb, log)
        log.step(f"ext4 image ({disk_mb} MiB) made in {time.monotonic() - started:.1f} s")
        shutil.rmtree(tree)
        info = ImageInfo(disk_mb=disk_mb, config=config)
        (out / IMAGE_INFO).write_bytes(msgspec.json.encode(info))

    return artifacts.ensure_built(ROOTFS_KIND, key, build)


def read_image_info(folder: Path) -> ImageInfo:
    """What a cached rootfs recorded about its image (disk size, config)."""
    return msgspec.json.decode((folder / IMAGE_INFO).read_bytes(), type=ImageInfo)
