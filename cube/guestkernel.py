"""The guest kernel: where the built `vmlinux` lives, how it is built, what its config must hold.

The kernel is built from `guest-kernel/` (a Kconfig fragment over `make tinyconfig`, and
`build.sh`) into the artifact cache. Its key hashes only those two files, not the version of
Debian's `linux-source-6.12` package: the lab's L1 guest sees the checkout and the cache at the
host's paths but has no dpkg database or kernel source, and it must compute the same key to find
the kernel the host built. The source version is recorded inside the artifact (`source-version`)
instead, so it stays visible. The price: a Debian point release of the source does not by itself
trigger a rebuild; delete the cache entry (or touch the fragment) to pick one up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import typer

from cube.artifacts import artifact_dir, digest, ensure_built
from cube.paths import GUEST_KERNEL_SRC

FRAGMENT = GUEST_KERNEL_SRC / "config.fragment"
BUILD_SCRIPT = GUEST_KERNEL_SRC / "build.sh"
SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


class KernelError(RuntimeError):
    """The guest kernel cannot be found or built; the message says what to do."""


def kernel_key() -> str:
    """Cache key of the guest kernel: a hash of the fragment and build.sh (see the module doc)."""
    if not FRAGMENT.is_file() or not BUILD_SCRIPT.is_file():
        raise KernelError(f"{GUEST_KERNEL_SRC} not found: the guest kernel needs a checkout")
    return digest([FRAGMENT, BUILD_SCRIPT])


def installed_source_version() -> str:
    """Version of the installed linux-source-6.12 package, or "" if it (or dpkg) is absent."""
    if shutil.which("dpkg-query") is None:
        return ""
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def find_kernel() -> Path | None:
    """The built `vmlinux` (its `.config` is `config` beside it), or None if not built yet."""
    try:
        vmlinux = artifact_dir("kernel", kernel_key()) / "vmlinux"
    except KernelError:
        return None
    return vmlinux if vmlinux.is_file() else None


def build_kernel() -> Path:
    """Build the guest kernel unless it is cached, streaming build.sh's output; return vmlinux."""
    key = kernel_key()
    if not SOURCE_TARBALL.is_file():
        raise KernelError(
            f"{SOURCE_PACKAGE} is not installed ({SOURCE_TARBALL} missing): "
            f"apt-get install {SOURCE_PACKAGE} (`make deps` installs it)"
        )

    def build(out: Path) -> None:
        done = subprocess.run([str(BUILD_SCRIPT), str(out)], check=False)
        if done.returncode != 0:
            raise KernelError(f"guest kernel build failed (build.sh exit {done.returncode})")
        (out / "source-version").write_text(installed_source_version() + "\n")

    return ensure_built("kernel", key, build) / "vmlinux"


def parse_config(text: str) -> dict[str, str]:
    """Options of a kernel .config (or fragment): `CONFIG_X=v` gives v, `# ... is not set` "n"."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            options[m[1]] = m[2]
        elif m := _UNSET.match(line):
            options[m[1]] = "n"
    return options


def required_options() -> dict[str, str]:
    """What the fragment asks for, option by option ("n" means it must not be built in)."""
    return parse_config(FRAGMENT.read_text())


def missing_options(config_text: str) -> list[str]:
    """The fragment's requirements that a built kernel's .config does not meet, as fragment lines.

    This repeats build.sh's check so that tests can verify a kernel they did not build (for
    example in the lab, or /proc/config.gz of a running guest).
    """
    config = parse_config(config_text)
    missing = []
    for name, wanted in required_options().items():
        got = config.get(name, "n")
        if wanted == "n":
            if got in ("y", "m"):
                missing.append(f"# {name} is not set")
        elif got != wanted:
            missing.append(f"{name}={wanted}")
    return missing


kernel_app = typer.Typer(no_args_is_help=True, help="The guest kernel (vmlinux) sandboxes boot.")


@kernel_app.command("build")
def build_command() -> None:
    """Build the guest kernel if it is not cached yet, then print its path."""
    try:
        print(build_kernel())
    except KernelError as e:
        typer.echo(f"cube kernel build: {e}", err=True)
        raise typer.Exit(1) from None


@kernel_app.command("path")
def path_command() -> None:
    """Print the built guest kernel's path; exit 1 if it is not built."""
    kernel = find_kernel()
    if kernel is None:
        typer.echo("guest kernel not built: run `cube kernel build` (or `make kernel`)", err=True)
        raise typer.Exit(1)
    print(kernel)
