"""`cube serve` with the VMM backend as a lab test fixture, and the fake internet beside it.

The host builds the default templates' root filesystems first (`cube template build-defaults
--rootfs-only`, which `make test-lab` runs); L1 boots them once to make the template
snapshots, starts `cube serve` as a real subprocess and the tests talk to it over HTTP exactly
as a user's agent would, with only the API URL, sandbox URL and API key set. Every sandbox is
a microVM restored from those snapshots, with its own tap, filter and NAT.

The daemon's uplink is a veth into a namespace that plays the internet: test servers listen
there on TEST-NET addresses (never an outside address), and sandboxes reach them only
through their egress filters and the NAT, as they would reach the internet.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from e2b import Sandbox

from cube.apikeys import ApiKeyStore
from cube.paths import cache_dir
from cube.pool.template import TemplateStore
from cube.pool.template_build import BuildSpec, build_template, missing_in_lab

# The SDKs' default templates, with the default root filesystems; smaller than the default VM
# shape because the lab is a 2-vCPU TCG guest.
SPEC = BuildSpec(name="base", cpus=1, memory_mb=512)
INTERPRETER_SPEC = BuildSpec(name="code-interpreter-v1", interpreter=True, cpus=1, memory_mb=1024)
READY_TIMEOUT = 300.0
DATA_PREFIX = "lab-serve-"
# A lab run ends within hours (make test-lab's LAB_TIMEOUT, three attempts); a data folder older
# than this was left by an L1 that was stopped before it could remove it.
ABANDONED_AFTER = 24 * 3600.0
SDK_TIMEOUT = 120  # seconds per SDK request: nested TCG is slow

INTERNET_NS = "cube-lab-internet"
UPLINK, UPLINK4, WAN4 = "labnet0", "192.0.2.1", "192.0.2.2"  # not "cube…": taps' prefix
SERVERS = ("198.51.100.1", "198.51.100.2", "203.0.113.1")  # on the internet's loopback
SERVER_PORT = 8080


@dataclass(frozen=True)
class Daemon:
    url: str
    key: str
    log: Path
    port: int
    data: Path
    # SIGKILL `cube serve` and start it again on the same data dir; returns the new pid
    kill_and_restart: Callable[[], int]
    pid: Callable[[], int]  # the serving process's, now

    def sdk(self) -> dict[str, object]:
        return {"api_key": self.key, "api_url": self.url, "sandbox_url": self.url,
                "request_timeout": SDK_TIMEOUT}  # fmt: skip

    def create(self, **kwargs: object) -> Sandbox:
        return Sandbox.create(template=SPEC.name, timeout=600, **self.sdk(), **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@contextmanager
def fake_internet() -> Iterator[None]:
    """The internet namespace, its veth to L1 and an HTTP server on every SERVERS address."""
    subprocess.run(["ip", "netns", "del", INTERNET_NS], capture_output=True, check=False)
    _ip("netns", "add", INTERNET_NS)
    server = None
    try:
        _ip("-n", INTERNET_NS, "link", "set", "lo", "up")
        _ip("link", "add", UPLINK, "type", "veth", "peer", "name", "wan0", "netns", INTERNET_NS)
        _ip("addr", "add", f"{UPLINK4}/24", "dev", UPLINK)
        _ip("link", "set", UPLINK, "up")
        _ip("-n", INTERNET_NS, "addr", "add", f"{WAN4}/24", "dev", "wan0")
        _ip("-n", INTERNET_NS, "link", "set", "wan0", "up")
        for address in SERVERS:
            _ip("-n", INTERNET_NS, "addr", "add", f"{address}/32", "dev", "lo")
            _ip("route", "add", f"{address}/32", "via", WAN4)
        server = subprocess.Popen(
            ["ip", "netns", "exec", INTERNET_NS, sys.executable, "-m", "http.server",
             str(SERVER_PORT), "--bind", "0.0.0.0", "--directory", "/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        yield
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for address in SERVERS:
            subprocess.run(["ip", "route", "del", f"{address}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", UPLINK], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", INTERNET_NS], capture_output=True, check=False)


@contextmanager
def running_daemon() -> Iterator[Daemon]:
    """Build the default templates, then run `cube serve` on every address of L1 (so that
    sandboxes have a host API port to be refused), its uplink the fake internet's veth."""
    specs = (SPEC, INTERPRETER_SPEC)
    for spec in specs:
        if (missing := missing_in_lab(spec)) is not None:
            raise AssertionError(missing)
    # In the shared cache, beside the cached rootfs, so the template's disk is a hard link; a
    # folder of this run's own, since labs run side by side on one cache (and 9p carries no
    # locks between their L1s).
    _remove_abandoned(cache_dir())
    data = Path(tempfile.mkdtemp(prefix=DATA_PREFIX, dir=cache_dir()))
    for spec in specs:
        started = time.monotonic()
        build_template(spec, TemplateStore(data / "templates"))
        print(f"\ntemplate {spec.name}: boot + snapshot {time.monotonic() - started:.1f} s")
    key, _ = ApiKeyStore(data).create("lab")
    port = _free_port()
    config = data / "cube.toml"
    config.write_text(
        f'listen = "0.0.0.0:{port}"\nbackend = "vmm"\ndata_dir = "{data}"\n'
        f'graceful_timeout = 1.0\n[pool]\nbase = 1\n[network]\nuplink = "{UPLINK}"\n'
    )
    log = data / "serve.log"
    with fake_internet(), open(log, "w") as out:

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "cube", "serve", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def kill_and_restart() -> int:
            servers[0].kill()
            servers[0].wait()
            servers[0] = start()
            _wait_listening(daemon, servers[0])
            return servers[0].pid

        servers = [start()]
        daemon = Daemon(f"http://127.0.0.1:{port}", key, log, port, data, kill_and_restart,
                        lambda: servers[0].pid)  # fmt: skip
        try:
            _wait_listening(daemon, servers[0])
            yield daemon
        finally:
            server = servers[0]
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            print(f"\n--- cube serve log (tail) ---\n{log.read_text()[-4000:]}")
            shutil.rmtree(data, ignore_errors=True)


def _remove_abandoned(cache: Path) -> None:
    for folder in cache.glob(f"{DATA_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - folder.stat().st_mtime > ABANDONED_AFTER:
                shutil.rmtree(folder, ignore_errors=True)


def _wait_listening(daemon: Daemon, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, f"cube serve exited:\n{daemon.log.read_text()[-4000:]}"
        try:
            answer = httpx.get(f"{daemon.url}/v2/sandboxes", headers={"X-API-Key": daemon.key})
            if answer.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"cube serve did not listen:\n{daemon.log.read_text()[-4000:]}")
