"""Compile the egress classifier with clang into the artifact cache.

The key hashes the C source, the generated layout header, the exact compiler flags and clang's
version line, so a change to any of them builds a new object and an old one is never loaded
against a new loader. No binary is ever committed.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from cube.artifacts import digest, ensure_built
from cube.net import layout

SOURCE = Path(__file__).resolve().parent / "bpf" / "egress.bpf.c"
OBJECT = "egress.bpf.o"

# Debian keeps <asm/types.h> under the multiarch folder, which `-target bpf` does not search.
_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}


class BuildError(RuntimeError):
    """clang is missing or rejected the source; the message carries its output."""


def _flags() -> list[str]:
    arch = _MULTIARCH.get(platform.machine(), f"{platform.machine()}-linux-gnu")
    return ["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", f"-I/usr/include/{arch}"]


def _clang() -> str:
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError("clang not found: apt-get install clang libbpf-dev (`make deps`)")
    return clang


def object_path() -> Path:
    """The compiled classifier, built first if the cache does not hold it yet."""
    clang = _clang()
    version = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True)
    flags = _flags()
    header = layout.header()
    key = digest([SOURCE, header, " ".join(flags), version.stdout.splitlines()[0]])

    def build(out: Path) -> None:
        (out / "cube_layout.h").write_text(header)
        cmd = [clang, *flags, f"-I{out}", "-c", str(SOURCE), "-o", str(out / OBJECT)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"clang failed:\n{done.stderr}")

    return ensure_built("bpf-egress", key, build) / OBJECT
