"""`cube bench exec`: a command's round trip through the E2B SDK, beside a serial-console peer.

Issue 4 asks how long `sbx.commands.run("true")` takes end to end, compared with the same
command run on a peer we can run side by side. One run measures both:

- Cube: the unmodified E2B SDK against a running `cube serve` (HTTP to the daemon, the proxy,
  vsock into the guest, the agent spawning the process, the result streamed back);
- peer: QEMU `-M microvm` with KVM booting the same guest kernel, the same template's root
  filesystem (attached with snapshot=on, so it is never written), the same vCPU count and memory
  as the template, with a shell as init on its serial console. A sample writes a command line
  followed by `echo @@$((N-1+1))@@` and waits for `@@N@@`: the console echoes what is typed, and
  only the shell's arithmetic produces the digits between the @@, so the echo cannot be mistaken
  for the answer.

What is fair to compare. The SDK does not run `true` as such: it asks envd for `/bin/bash -l -c
true`, so every Cube sample starts a login bash. The peer therefore runs that same command line,
and that row gives the headline ratio: both sides do the same work in the guest and differ only
in how the request gets there and the answer back. The literal `true` (a builtin of the serial
shell, no process at all) is printed too, as the floor of a serial round trip, so the cost of
the bash start-up can be told apart from the transport. The peer's shell runs as root with the
sandbox user's HOME (the same profile files are read); the agent also switches to that user. The
serial peer has no authentication, no HTTP, no multiplexing and no output streaming; the ratio is
the price of those, not of KVM.

Interleaving. Samples alternate (Cube, peer bash, peer builtin), so drift in a noisy machine
(the lab is TCG-emulated) lands on all rows alike instead of on whichever ran first. The sandbox
is created before the peer boots: `cube serve`'s warm pool restores a replacement right after a
create, and the peer's boot (seconds in the lab) covers that background work instead of the
timed rounds.

Warm-up. The first rounds of each kind are run and discarded (default 5): they pay one-off costs
that are not the steady state being compared: the SDK's first connection, the clone's first
touches of copy-on-write snapshot pages, and on the peer the first reads of bash and
/etc/profile from its disk into the guest page cache.

Samples. 50 by default: enough for a stable p50 and a meaningful p95 in a couple of minutes of
lab time; the p99 of 50 samples is their maximum, read it as such.

Boot versus create are printed as context only, clearly apart: the peer's figure is a cold boot
of the kernel to a shell prompt (overlapping the pool's refill, see above), Cube's is
`Sandbox.create` (a clone of a memory snapshot through the API). They are different operations;
the pair shows what a user waits for before the first command on either path.

A failed SDK command is counted and quoted, not fatal (see CubeSide).

On PVM hosts this runs only inside the lab (the template's rootfs cached on the host first with
`cube template build-defaults --rootfs-only`): build `base` in the lab's shape, start `cube
serve` with a fresh key, wait for its port, measure. The data dir is in the shared cache, so the
template's disk is a hard link to the cached rootfs:

    cube lab run --timeout 2400 -- 'export PYTHONUNBUFFERED=1
      export CUBE_DATA_DIR=$CUBE_CACHE_DIR/bench-exec && rm -rf $CUBE_DATA_DIR &&
      python3 -m cube template build base --cpus 1 --memory 512 &&
      KEY=$(python3 -m cube apikey create bench | tail -n 1) || exit 1
      python3 -m cube serve --listen 127.0.0.1:3000 >$CUBE_DATA_DIR/serve.log 2>&1 &
      until (exec 3<>/dev/tcp/127.0.0.1/3000) 2>/dev/null; do kill -0 $! || exit 1; sleep 1; done
      python3 -m cube bench exec --url http://127.0.0.1:3000 --key $KEY ||
        { tail -n 40 $CUBE_DATA_DIR/serve.log; exit 1; }'
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from e2b import Sandbox
from e2b.exceptions import SandboxException

from cube.bench.vmm import Latency
from cube.guestkernel import find_kernel
from cube.pool.rootfs import USER_HOME
from cube.pool.template import TemplateStore

# The serial shell's prompt, set through the kernel command line (unknown NAME=value parameters
# become init's environment): its first appearance is the peer's "boot to shell" moment. The
# shell expands it, so the kernel quoting its command line cannot be mistaken for it.
PROMPT_SETTING = "cube-peer-$((6*7))>"
PROMPT = "cube-peer-42>"
MARK = "@@"
# What the E2B SDK asks envd to run for `commands.run("true")` (e2b's Commands._start).
SDK_COMMAND = "/bin/bash -l -c true"
BOOT_TIMEOUT = 300.0  # nested TCG: the peer's kernel and shell take seconds, allow minutes
COMMAND_TIMEOUT = 60.0
SDK_TIMEOUT = 120  # seconds per SDK request, as the lab tests allow
SANDBOX_TIMEOUT = 3600  # seconds: longer than any run, so expiry never cuts one short
TAIL_BYTES = 2000


class PeerError(RuntimeError):
    """The peer's console did not answer as expected; the message quotes its output."""


class SerialShell:
    """A shell at the other end of a byte stream: QEMU's serial console on pipes, or a pty.

    Output is kept only until what was waited for is found, so text from an earlier command
    can never satisfy a later wait.
    """

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._write_fd = write_fd
        self._read_fd = read_fd
        self._pending = bytearray()
        self._count = 0

    def wait_for(self, text: str, timeout: float) -> None:
        """Read until `text` appears; PeerError on timeout or end of output."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout
        while (found := self._pending.find(wanted)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"no {text!r} within {timeout:.0f} s{self._tail()}")
            if select.select([self._read_fd], [], [], remaining)[0] and not self._read():
                raise PeerError(f"the console closed while waiting for {text!r}{self._tail()}")
        del self._pending[: found + len(wanted)]

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> float:
        """Milliseconds from writing `command` to the shell printing the marker after it."""
        self._count += 1
        line = f"{command}; echo {MARK}$(({self._count - 1}+1)){MARK}\n".encode()
        started = time.perf_counter()
        self._write(line)
        self.wait_for(f"{MARK}{self._count}{MARK}", timeout)
        return (time.perf_counter() - started) * 1e3

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self._write_fd, data) :]

    def _read(self) -> bool:
        """Append what is readable; False at end of output (a pty's master reports EIO)."""
        try:
            chunk = os.read(self._read_fd, 65536)
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            chunk = b""
        self._pending += chunk
        return bool(chunk)

    def _tail(self) -> str:
        text = bytes(self._pending[-TAIL_BYTES:]).decode(errors="replace")
        return f"\n--- console tail ---\n{text}"


@dataclass(frozen=True)
class Peer:
    """What the peer boots: Cube's guest kernel and a template's rootfs and shape."""

    kernel: Path
    rootfs: Path
    cpus: int
    memory_mb: int

    def qemu_argv(self) -> list[str]:
        """QEMU microvm (no ACPI: devices are on the command line, as in Cube's VMM), the serial
        console on stdio, the rootfs copy-on-write in a throwaway overlay (snapshot=on). HOME is
        the sandbox user's, as the agent sets it, so `bash -l` reads the same profile files."""
        cmdline = (
            "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda rw rootfstype=ext4 "
            f"init=/bin/sh PS1={PROMPT_SETTING} HOME={USER_HOME}"
        )
        return [
            "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host",
            "-smp", str(self.cpus), "-m", f"{self.memory_mb}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
            "-kernel", str(self.kernel), "-append", cmdline,
            "-drive", f"id=root,file={self.rootfs},format=raw,if=none,snapshot=on",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip


@contextlib.contextmanager
def booted_shell(argv: list[str]) -> Iterator[tuple[SerialShell, float]]:
    """Start the peer and wait for its prompt: (its shell, ms from start to the prompt)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        shell = SerialShell(process.stdin.fileno(), process.stdout.fileno())
        shell.wait_for(PROMPT, BOOT_TIMEOUT)
        yield shell, (time.perf_counter() - started) * 1e3
    finally:
        process.kill()
        process.wait()


@dataclass
class CubeSide:
    """The sandbox under test. A failed command is recorded (with when it happened) rather than
    ending the run, as `cube bench api` counts failed creates: the report says how many failed
    and why, and one bad round does not cost a lab run all its figures."""

    sandbox: Sandbox
    create_ms: float
    created_at: float  # perf_counter() when the create returned
    failures: list[str] = field(default_factory=list)

    def round_trip(self) -> float | None:
        """Milliseconds of one `commands.run("true")` as the SDK's caller sees it; None if it
        failed."""
        started = time.perf_counter()
        try:
            self.sandbox.commands.run("true")
        except SandboxException as error:
            self.failures.append(f"{started - self.created_at:.1f} s after the create: {error}")
            return None
        return (time.perf_counter() - started) * 1e3


@contextlib.contextmanager
def cube_sandbox(url: str, key: str, template: str) -> Iterator[CubeSide]:
    """A sandbox made through the SDK, killed afterwards."""
    started = time.perf_counter()
    sandbox = Sandbox.create(
        template=template, timeout=SANDBOX_TIMEOUT, api_key=key, api_url=url, sandbox_url=url,
        request_timeout=SDK_TIMEOUT,
    )  # fmt: skip
    created_at = time.perf_counter()
    try:
        yield CubeSide(sandbox, (created_at - started) * 1e3, created_at)
    finally:
        sandbox.kill()


def find_peer(template: str, data_dir: Path | None) -> Peer:
    """The peer for a template in the daemon's store, with the guest kernel Cube boots."""
    kernel = find_kernel()
    if kernel is None:
        raise PeerError("no guest kernel in the cache: run `cube kernel build` on the host")
    store = TemplateStore(data_dir / "templates" if data_dir else None)
    built = store.get(template)
    return Peer(kernel, Path(built.rootfs), built.cpus, built.memory_mb)


@dataclass
class Rounds:
    """Samples of the three kinds, taken in alternation."""

    cube: list[float]
    peer_sdk_command: list[float]
    peer_builtin: list[float]

    @classmethod
    def take(cls, cube: CubeSide, shell: SerialShell, count: int) -> Rounds:
        rounds = cls([], [], [])
        for _ in range(count):
            if (elapsed := cube.round_trip()) is not None:
                rounds.cube.append(elapsed)
            rounds.peer_sdk_command.append(shell.run(SDK_COMMAND))
            rounds.peer_builtin.append(shell.run("true"))
        return rounds


def report(rounds: Rounds, cube: CubeSide, boot_ms: float) -> list[str]:
    """The table, the ratios, failures if any, and the create/boot context."""
    peer_sdk = Latency(rounds.peer_sdk_command)
    peer_builtin = Latency(rounds.peer_builtin)
    cube_name = 'cube: SDK commands.run("true")'
    peer_rows = [
        peer_sdk.row(f"peer serial: {SDK_COMMAND}"),
        peer_builtin.row("peer serial: true (shell builtin)"),
    ]
    lines = [f"{'measurement (ms)':<34} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}"]
    if rounds.cube:
        cube_p50 = Latency(rounds.cube).pct(50)
        lines += [
            Latency(rounds.cube).row(cube_name),
            *peer_rows,
            f"cube/peer p50: {cube_p50 / peer_sdk.pct(50):.2f}x against the same command "
            f"({SDK_COMMAND}), {cube_p50 / peer_builtin.pct(50):.2f}x against the builtin",
        ]
    else:
        lines += [f"{cube_name:<34} every command failed", *peer_rows]
    if cube.failures:
        first = cube.failures[0]
        lines.append(
            f"cube: {len(cube.failures)} commands failed (warm-up included); first {first}"
        )
    return [
        *lines,
        "context only, different operations:",
        f"  cube Sandbox.create {cube.create_ms:.0f} ms (a snapshot clone, through the API)",
        f"  peer QEMU start to shell prompt {boot_ms:.0f} ms (a cold boot of kernel and shell)",
    ]


def run(url: str, key: str, template: str, samples: int, warmup: int, data_dir: Path | None) -> str:
    peer = find_peer(template, data_dir)
    # Create first: the pool refills while the peer boots, not during the timed rounds.
    with (
        cube_sandbox(url, key, template) as cube,
        booted_shell(peer.qemu_argv()) as (shell, boot_ms),
    ):
        Rounds.take(cube, shell, warmup)
        rounds = Rounds.take(cube, shell, samples)
    return "\n".join([
        f"cube bench exec: {url}, template {template}",
        f"peer: QEMU microvm + KVM, {peer.cpus} vCPU, {peer.memory_mb} MiB, a shell on ttyS0",
        f"  kernel {peer.kernel}",
        f"  rootfs {peer.rootfs} (snapshot=on)",
        f"rounds alternate cube / peer / peer; {warmup} warm-up rounds of each excluded",
        *report(rounds, cube, boot_ms),
    ])  # fmt: skip
