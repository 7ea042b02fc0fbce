"""What every other lab test relies on: hardware-style KVM, the shares, local networking.

These run inside L1 (`cube lab run -- python3 -m pytest -m lab tests/lab`); elsewhere the
top-level conftest skips them.
"""

from __future__ import annotations

import fcntl
import http.server
import os
import threading
import urllib.request
from pathlib import Path

import pytest

from cube.paths import CHECKOUT_DIR, cache_dir

pytestmark = pytest.mark.lab

KVM_GET_API_VERSION = 0xAE00


def _mount_types() -> dict[str, str]:
    """Mount point -> file system type, from the kernel's own table."""
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _source, target, fstype, *_ = line.split()
        mounts[target.replace("\\040", " ")] = fstype
    return mounts


def test_kvm_is_hardware_style() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    finally:
        os.close(fd)
    # kvm_amd over emulated SVM, not the PVM flavour of the host
    assert Path("/sys/module/kvm_amd").is_dir()
    assert not Path("/sys/module/kvm_pvm").exists()


def test_checkout_and_cache_are_shared_at_their_host_paths() -> None:
    mounts = _mount_types()
    cache = cache_dir()
    assert mounts[str(CHECKOUT_DIR)] == "9p"
    assert mounts[str(cache)] == "9p"
    assert (CHECKOUT_DIR / "pyproject.toml").is_file()
    probe = cache / f".lab-probe-{os.getpid()}"
    probe.write_text("written in L1")
    try:
        assert probe.read_text() == "written in L1"
    finally:
        probe.unlink()


def test_a_server_in_l1_is_reachable_on_loopback() -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from L1"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == b"hello from L1"
    finally:
        server.shutdown()
        server.server_close()
