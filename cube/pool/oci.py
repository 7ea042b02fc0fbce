"""Import a container image into a root filesystem tree: `docker save` tarballs and OCI layouts.

Both forms are read the same way through an `Archive` (a tar file or a folder): a `docker save`
tarball has `manifest.json` (config and layer paths), an OCI image layout has `index.json`
pointing at manifests by digest under `blobs/`. Newer Docker versions write both; then
manifest.json is used. Blobs named by digest are checked against it while they are read.

Layers may be plain tar, gzip or zstd. Python 3.11 has no zstd module and Cube takes no extra
dependency for it: zstd layers are piped through the `zstd` command, and refused with a clear
message when it is not installed. Each layer is decompressed into the build folder and applied
with `cube.pool.layers` (whiteouts, and refusal of anything that reaches outside the tree).

From the image config, Env, WorkingDir and User are kept (`ImageConfig`): the template records
them so that the agent uses them as default env vars, working directory and user.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from cube.pool.layers import LayerError, apply_layer, clean_parts

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]{64}|[0-9a-f]{128})$")
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MAX_JSON = 16 << 20
CHUNK = 1 << 20


class ImageError(ValueError):
    """The image cannot be imported; the message says why."""


class ImageConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What a container image says about how its processes run."""

    env: dict[str, str] = {}
    workdir: str | None = None
    user: str | None = None


class Archive:
    """Named files of an image, from a tar file or from a folder."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if source.is_file():
            try:
                self._tar = tarfile.open(source, "r:*")  # noqa: SIM115 (closed by close())
            except tarfile.TarError as error:
                raise ImageError(f"{source}: not a tar archive ({error})") from None
            for member in self._tar.getmembers():
                if member.isfile():
                    self._members["/".join(p for p in member.name.split("/") if p != ".")] = member
        elif not source.is_dir():
            raise ImageError(f"{source}: no such file or folder")

    def has(self, name: str) -> bool:
        if self._tar is not None:
            return name in self._members
        return (self.source / name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        try:
            parts = clean_parts(name)
        except LayerError as error:
            raise ImageError(f"the image names a file outside itself: {error}") from None
        name = "/".join(parts)
        if self._tar is not None:
            member = self._members.get(name)
            stream = self._tar.extractfile(member) if member else None
            if stream is None:
                raise ImageError(f"{self.source}: {name} is missing")
            yield stream
            return
        path = self.source.joinpath(*parts)
        if not path.is_file():
            raise ImageError(f"{self.source}: {name} is missing")
        with open(path, "rb") as f:
            yield f

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageError(f"{name} is larger than {MAX_JSON} bytes")
        _check_digest(name, data)
        try:
            return json.loads(data)
        except ValueError as error:
            raise ImageError(f"{name} is not valid JSON: {error}") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def blob_name(digest: str) -> str:
    match = DIGEST.match(digest if isinstance(digest, str) else "")
    if not match:
        raise ImageError(f"bad digest {digest!r}")
    return f"blobs/{match[1]}/{match[2]}"


def _expected_digest(name: str) -> tuple[str, str] | None:
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and DIGEST.match(f"{parts[1]}:{parts[2]}"):
        return parts[1], parts[2]
    return None


def _check_digest(name: str, data: bytes) -> None:
    expected = _expected_digest(name)
    if expected and hashlib.new(expected[0], data).hexdigest() != expected[1]:
        raise ImageError(f"{name}: content does not match its digest")


def _pick_manifest(archive: Archive, index: dict[str, Any]) -> dict[str, Any]:
    """The linux/amd64 manifest of an index (or its only one), following nested indexes."""
    for _ in range(8):
        entries = index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise ImageError("the image index lists no manifests")
        wanted = [
            e
            for e in entries
            if isinstance(e, dict)
            and e.get("platform", {}).get("os", "linux") == "linux"
            and e.get("platform", {}).get("architecture", "amd64") == "amd64"
        ]
        if not wanted:
            raise ImageError("the image has no linux/amd64 manifest")
        document = archive.json(blob_name(wanted[0].get("digest", "")))
        if document.get("mediaType") not in INDEX_TYPES and "manifests" not in document:
            return document
        index = document
    raise ImageError("image indexes nest too deeply")


def read_manifest(archive: Archive) -> tuple[str, list[str]]:
    """The config file's name and the layer files' names, bottom layer first."""
    if archive.has("manifest.json"):
        entries = archive.json("manifest.json")
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise ImageError("manifest.json must describe exactly one image")
        config, layers = entries[0].get("Config"), entries[0].get("Layers")
        if not isinstance(config, str) or not isinstance(layers, list):
            raise ImageError("manifest.json lacks Config or Layers")
        if not all(isinstance(layer, str) for layer in layers):
            raise ImageError("manifest.json has a layer that is not a path")
        return config, layers
    if archive.has("index.json"):
        manifest = _pick_manifest(archive, archive.json("index.json"))
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not isinstance(manifest.get("config"), dict):
            raise ImageError("the image manifest lacks config or layers")
        return blob_name(manifest["config"].get("digest", "")), [
            blob_name(layer.get("digest", "") if isinstance(layer, dict) else "")
            for layer in layers
        ]
    raise ImageError(f"{archive.source}: neither manifest.json (docker save) nor index.json (OCI)")


def parse_config(document: Any) -> ImageConfig:
    """Env, WorkingDir and User of an image config (`config` object of the JSON)."""
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        return ImageConfig()
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        if not isinstance(item, str) or "=" not in item:
            raise ImageError(f"image config has a malformed Env entry {item!r}")
        key, _, value = item.partition("=")
        env[key] = value
    workdir = config.get("WorkingDir") or None
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
        raise ImageError(f"image WorkingDir {workdir!r} is not an absolute path")
    user = config.get("User") or None
    if user is not None and not isinstance(user, str):
        raise ImageError(f"image User {user!r} is not a string")
    return ImageConfig(env=env, workdir=workdir, user=user.split(":")[0] if user else None)


class _Blob:
    """A blob being read once: hashed on the way (when named by digest), its head peekable."""

    def __init__(self, source: IO[bytes], name: str) -> None:
        self.source = source
        self.name = name
        self.expected = _expected_digest(name)
        self.hasher = hashlib.new(self.expected[0]) if self.expected else None
        self.head = source.read(4)
        self._pending = self.head

    def read(self, size: int = -1) -> bytes:
        size = size if size and size > 0 else CHUNK
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
        else:
            data = self.source.read(size)
        if self.hasher:
            self.hasher.update(data)
        return data

    def check(self) -> None:
        while self.read(CHUNK):
            pass
        if self.hasher and self.expected and self.hasher.hexdigest() != self.expected[1]:
            raise ImageError(f"{self.name}: content does not match its digest")


def decompress(source: IO[bytes], target: Path, name: str) -> None:
    """Copy a layer blob to `target` as plain tar, checking its digest when it is named by one."""
    blob = _Blob(source, name)
    with open(target, "wb") as out:
        if blob.head.startswith(GZIP_MAGIC):
            try:
                with gzip.GzipFile(fileobj=blob, mode="rb") as unpacked:  # type: ignore[arg-type]
                    shutil.copyfileobj(unpacked, out, CHUNK)
            except (OSError, EOFError) as error:
                raise ImageError(f"{name}: broken gzip layer ({error})") from None
        elif blob.head.startswith(ZSTD_MAGIC):
            _unzstd(blob, out)
        else:
            shutil.copyfileobj(blob, out, CHUNK)  # type: ignore[misc]
    blob.check()


def _unzstd(blob: _Blob, out: IO[bytes]) -> None:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ImageError(f"{blob.name} is zstd-compressed: install the zstd command to import it")
    with subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=out) as child:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            while data := blob.read(CHUNK):
                child.stdin.write(data)
        child.stdin.close()
    if child.returncode != 0:
        raise ImageError(f"{blob.name}: broken zstd layer (zstd exit {child.returncode})")


def import_image(source: Path, tree: Path, scratch: Path, log: Any = print) -> ImageConfig:
    """Build `tree` (an empty folder) from the image at `source`; its runtime config.

    `scratch` is a folder in the build area for decompressed layers (one at a time).
    """
    archive = Archive(source)
    try:
        config_name, layers = read_manifest(archive)
        config = parse_config(archive.json(config_name))
        for number, name in enumerate(layers, 1):
            log(f"layer {number}/{len(layers)}: {name}")
            plain = scratch / "layer.tar"
            with archive.open(name) as blob:
                decompress(blob, plain, name)
            try:
                skipped = apply_layer(tree, plain)
            except LayerError as error:
                raise ImageError(f"layer {name}: {error}") from None
            finally:
                plain.unlink()
            if skipped:
                log(f"  skipped {skipped} device nodes (the guest's /dev is devtmpfs)")
    finally:
        archive.close()
    return config
