"""Small synthetic container images for the importer's tests, built in memory.

A layer is a list of `Entry`; `docker_save` and `oci_layout` wrap layers and a config into the
two forms Cube imports, so every test states exactly which members a layer holds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, fifo, chr
    data: bytes = b""
    link: str = ""
    mode: int = 0o644


def layer_tar(entries: list[Entry]) -> bytes:
    kinds = {
        "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE,
    }  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = kinds[entry.kind]
            info.mode = entry.mode if entry.kind != "dir" else 0o755
            info.linkname = entry.link
            info.size = len(entry.data) if entry.kind == "file" else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                              check=True).stdout  # fmt: skip
    return data


def image_config(env: list[str] | None = None, workdir: str = "", user: str = "") -> bytes:
    config = {"Env": env or [], "WorkingDir": workdir, "User": user}
    return json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()


def docker_save(path: Path, layers: list[bytes], config: bytes) -> Path:
    """A `docker save` tarball: manifest.json, the config and one folder per layer."""
    members = {"config.json": config}
    names = []
    for index, layer in enumerate(layers):
        names.append(f"layer{index}/layer.tar")
        members[names[-1]] = layer
    manifest = [{"Config": "config.json", "RepoTags": ["test:latest"], "Layers": names}]
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


def _blob(folder: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (folder / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(folder: Path, layers: list[bytes], config: bytes, nested: bool = False) -> Path:
    """An OCI image layout; `nested` puts a multi-platform index between index.json and the
    manifest, with an arm64 manifest listed first that must not be chosen."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": CONFIG_TYPE, **_blob(folder, config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(folder, layer)}
                   for layer in layers],
    }  # fmt: skip
    entry = {"mediaType": manifest["mediaType"], **_blob(folder, json.dumps(manifest).encode())}
    if nested:
        other = _blob(folder, b'{"schemaVersion": 2, "layers": [], "config": {}}')
        platforms = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {**other, "platform": {"os": "linux", "architecture": "arm64"}},
                {**entry, "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }
        entry = {
            "mediaType": platforms["mediaType"],
            **_blob(folder, json.dumps(platforms).encode()),
        }
    (folder / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return folder
