"""Run one command inside the lab's L1 guest and stream its output back live.

Each run boots the cached image under QEMU TCG with emulated AMD-V (see shared/docs/kvm-here.md)
with writes thrown away (snapshot=on), so every run starts from the same pristine L1. The
checkout and the artifact cache are shared over virtio-9p at the same absolute paths they have
on the host, so paths in code, test output and cached artifacts mean the same on both sides. A
third, per-run share carries the command in and its exit status out.

The command's output travels on L1's second serial port, which QEMU writes to its stdout and
this module copies to ours; the first serial port (the kernel console) goes to a log file that is
printed when something goes wrong. Every wait has a deadline: a lab that does not come up, or a
command that hangs, fails the run with the console log instead of hanging CI, and QEMU never
outlives the runner.

Before it stops a hung command, the runner asks L1 for dumps (a file DUMP_REQUEST in the run
folder): l1-init.sh's watcher then has `cube serve` and pytest write their threads' stacks (and
serve its trio tasks), L1's kernel its CPUs' and blocked tasks' backtraces (to the console log),
copies serve's log into the run folder and answers with DUMP_DONE. The runner waits for that a
bounded time, since L1's kernel may be what hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from cube.lab.image import (
    IMAGE_NAME,
    INIT_PATH,
    INITRD_NAME,
    KERNEL_NAME,
    SITE_DIR,
    build_image,
    l1_kernel,
)
from cube.lab.qemu import OuterQemu, outer_qemu
from cube.paths import CHECKOUT_DIR, cache_dir

READY_MARKER = b"CUBE-LAB-READY\n"  # printed by l1-init.sh
EXIT_TIMEOUT = 124  # as coreutils' timeout
EXIT_LAB_FAILURE = 125  # L1 did not come up or did not report the command's status
# L1's own kernel (Debian 6.1 running nested SVM under QEMU 7.2's TCG) has been seen to
# overflow its stack while a vCPU thread of ours was in KVM_RUN, about once in eight lab runs:
# a fault of the emulation stack, which real hardware does not have. Such a run is repeated
# (loudly); a command that fails on its own is never repeated.
L1_PANIC = "Kernel panic - not syncing"
PANIC_ATTEMPTS = 3

RUN_TAG = "labrun"  # l1-init.sh mounts this share at /run/lab
SHARES_FILE = "shares"
COMMAND_FILE = "command.sh"
STATUS_FILE = "exit-status"
DUMP_REQUEST = "dump-request"  # l1-init.sh's watcher polls for it every 2 s
DUMP_DONE = "dump-done"
DUMP_WAIT = 30.0  # seconds for L1 to answer a dump request
DUMP_POLL = 0.5
SLOT_POLL = 1.0  # seconds between looks for free lab slots
SERVE_LOGS = "serve-*.log"  # l1-init.sh's copies of `cube serve` logs, with their dumps
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
CONSOLE_TAIL_LINES = 60
QEMU_TAIL_LINES = 20
QEMU_NOISE = "TCG doesn't support requested feature"

# One CPU: with two, L1 (nested SVM under QEMU's TCG) loses interrupts around VMRUN, which
# shows as panics (an IPI taken before the host state is back) and as livelocks (a CPU that never
# answers an IPI) under load; with one there are no cross-CPU IPIs, and on a two-CPU host the
# lab tier is even faster (README, "Lab candidates and the soak").
L1_CPUS = 1
KERNEL_CMDLINE = (
    f"root=/dev/vda rw console=ttyS0 init={INIT_PATH} "
    # a dying init panics, the kernel then reboots, and -no-reboot turns that into QEMU exiting
    "panic=-1 net.ifnames=0 "
    # the CPU is emulated; speculative-execution mitigations only cost time here
    "mitigations=off"
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PR_SET_PDEATHSIG = 1


class LabFailure(Exception):
    """The lab itself failed (as opposed to the command): no boot, a timeout, no exit status."""

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class CommandTimeout(LabFailure):
    """The command ran past its timeout; `answered` is whether L1 then wrote its dumps (None
    before they were asked for)."""

    def __init__(self, timeout: float, *, answered: bool | None = None) -> None:
        super().__init__(f"the command ran past its timeout of {timeout:g} s", EXIT_TIMEOUT)
        self.timeout = timeout
        self.answered = answered


@dataclass(frozen=True)
class LabImage:
    rootfs: Path
    kernel: Path
    initrd: Path

    @classmethod
    def in_dir(cls, folder: Path) -> LabImage:
        return cls(folder / IMAGE_NAME, folder / KERNEL_NAME, folder / INITRD_NAME)


@dataclass(frozen=True)
class Share:
    """A host folder shared into L1 as a 9p tag, mounted there at the same absolute path."""

    tag: str
    path: Path


def lab_shares() -> list[Share]:
    """The checkout and the cache, parents first so that a share nested in another still shows."""
    cache = cache_dir().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    shares = [Share("checkout", CHECKOUT_DIR), Share("cache", cache)]
    return sorted(shares, key=lambda share: len(share.path.parts))


def lab_env(shares: Sequence[Share], extra: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: Cube importable from the shared checkout, the same cache."""
    by_tag = {share.tag: share.path for share in shares}
    return {
        "PYTHONPATH": f"{SITE_DIR}:{by_tag['checkout']}",
        "CUBE_CACHE_DIR": str(by_tag["cache"]),
        **extra,
    }


def terminal_env(is_tty: bool, term: str | None, columns: int) -> dict[str, str]:
    """How the command should treat its output, which in L1 is always a terminal (ttyS1).

    It must stay a terminal so that programs flush line by line and output streams live, but
    colours and width should follow where the output ends up on the host: a CI log gets none.
    """
    if is_tty:
        return {"TERM": term or "dumb", "COLUMNS": str(columns)}
    return {"TERM": "dumb", "NO_COLOR": "1"}


def command_script(command: Sequence[str] | str, env: Mapping[str, str], cwd: Path) -> str:
    """The bash script L1 runs: a string is shell code as is, a list is one quoted command."""
    if not command:
        raise ValueError("no command given")
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"not a valid environment variable name: {name!r}")
    line = command if isinstance(command, str) else shlex.join(command)
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    return f"{exports}cd {shlex.quote(str(cwd))} || exit 1\n{line}\n"


def write_run_folder(
    run_dir: Path, command: Sequence[str] | str, shares: Sequence[Share], env: Mapping[str, str]
) -> None:
    (run_dir / SHARES_FILE).write_text("".join(f"{s.tag}\t{s.path}\n" for s in shares))
    script = command_script(command, lab_env(shares, env), CHECKOUT_DIR)
    (run_dir / COMMAND_FILE).write_text(script)


def _qemu_value(value: object) -> str:
    """QEMU option values escape a comma by doubling it."""
    return str(value).replace(",", ",,")


def qemu_command(
    image: LabImage,
    run_dir: Path,
    shares: Sequence[Share],
    forwards: Sequence[tuple[int, int]],
    *,
    memory_mb: int,
    cpus: int,
    qemu: Sequence[str] = OuterQemu("host").argv,
) -> list[str]:
    """The QEMU command line for one run: L1 with emulated AMD-V, the shares, two serial ports;
    `qemu` is how to start the outer QEMU (cube.lab.qemu)."""
    argv = [
        *qemu,
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "EPYC,+svm,+npt",
        "-smp",
        str(cpus),
        "-m",
        f"{memory_mb}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        KERNEL_CMDLINE,
        "-drive",
        f"file={_qemu_value(image.rootfs)},if=virtio,format=raw,snapshot=on",
        # the guest's random pool fills at once instead of stalling early getrandom() calls
        "-device",
        "virtio-rng-pci",
        # ttyS0: the kernel console, to a log; ttyS1: the command's output, to our pipe
        "-serial",
        f"file:{run_dir / CONSOLE_LOG}",
        "-chardev",
        "stdio,id=cmdout,signal=off",
        "-serial",
        "chardev:cmdout",
    ]
    for share in [Share(RUN_TAG, run_dir), *shares]:
        argv += [
            "-virtfs",
            f"local,path={_qemu_value(share.path)},mount_tag={share.tag},security_model=none",
        ]
    if forwards:
        rules = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards)
        argv += ["-nic", f"user,model=virtio-net-pci,{rules}"]
    return argv


def _die_with_parent() -> None:
    """Runs in QEMU's process before exec: the kernel kills QEMU if the runner dies, however."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so cleanup runs as it does for Ctrl-C (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read(fd: int, deadline: float) -> bytes | None:
    """QEMU's next output: b"" once it has exited, None if the deadline comes first."""
    while (remaining := deadline - time.monotonic()) > 0:
        # Waiting in slices lets an infinite timeout work (select rejects inf).
        if select.select([fd], [], [], min(remaining, 1.0))[0]:
            return os.read(fd, 65536)
    return None


def _follow(fd: int, out: BinaryIO, *, timeout: float, boot_timeout: float) -> None:
    """Wait for L1's ready marker, then copy the command's output until QEMU exits."""
    started = time.monotonic()
    received = b""
    while READY_MARKER not in received:
        chunk = _read(fd, started + boot_timeout)
        if chunk is None:
            raise LabFailure(f"L1 was not ready within {boot_timeout:g} s", EXIT_LAB_FAILURE)
        if not chunk:
            raise LabFailure("L1 stopped before it was ready", EXIT_LAB_FAILURE)
        received += chunk
    ready = time.monotonic()
    print(f"cube lab: L1 ready after {ready - started:.1f} s", file=sys.stderr, flush=True)
    out.write(received.partition(READY_MARKER)[2])
    out.flush()
    if not _copy(fd, out, ready + timeout):
        raise CommandTimeout(timeout)


def _copy(fd: int, out: BinaryIO, deadline: float) -> bool:
    """Copy QEMU's output to `out` until QEMU exits (True) or the deadline passes (False)."""
    while chunk := _read(fd, deadline):
        out.write(chunk)
        out.flush()
    return chunk is not None


def _request_dumps(fd: int, out: BinaryIO, run_dir: Path, wait: float) -> bool:
    """Ask L1 for its dumps and wait at most `wait` seconds for them; True if L1 answered.

    The command's output is still copied meanwhile: pytest's dump, and serve's when serve is
    the command, travel on it."""
    print(
        f"cube lab: the command ran past its timeout; asking L1 for dumps (up to {wait:g} s)",
        file=sys.stderr,
        flush=True,
    )
    (run_dir / DUMP_REQUEST).touch()
    deadline = time.monotonic() + wait
    while not (run_dir / DUMP_DONE).exists():
        now = time.monotonic()
        if now >= deadline or _copy(fd, out, min(deadline, now + DUMP_POLL)):
            return False  # no answer in time, or QEMU is gone
    _copy(fd, out, time.monotonic() + DUMP_POLL)  # what is still on its way from the UART
    return True


def supervise(
    argv: Sequence[str],
    run_dir: Path,
    out: BinaryIO,
    *,
    timeout: float,
    boot_timeout: float,
    dump_wait: float = DUMP_WAIT,
) -> int:
    """Run QEMU (argv) to completion and return the command's exit status from run_dir.

    Raises LabFailure on a boot or command timeout, or when L1 stops without a status; a
    command timeout (CommandTimeout) first asks L1 for dumps, waiting at most `dump_wait`
    seconds. QEMU is killed on every way out of here, exceptions and signals included.
    """
    with open(run_dir / QEMU_LOG, "wb") as qemu_log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=qemu_log,
            preexec_fn=_die_with_parent,
        )
    assert proc.stdout is not None
    try:
        with _sigterm_exits():
            fd = proc.stdout.fileno()
            try:
                _follow(fd, out, timeout=timeout, boot_timeout=boot_timeout)
            except CommandTimeout as hung:
                answered = _request_dumps(fd, out, run_dir, dump_wait)
                raise CommandTimeout(hung.timeout, answered=answered) from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    try:
        return int((run_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        raise LabFailure(
            "L1 stopped without reporting the command's exit status", EXIT_LAB_FAILURE
        ) from None


def _tail(path: Path, lines: int) -> list[str]:
    """The last lines of a log, without TCG's harmless warnings about CPUID bits it lacks."""
    try:
        text = path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if QEMU_NOISE not in line][-lines:]


def report_failure(failure: LabFailure, run_dir: Path) -> None:
    """Tell why the lab failed, with the end of the L1 console and of QEMU's own messages, and
    for a hung command where L1's dumps are."""
    say = sys.stderr.write
    say(f"cube lab: {failure}\n")
    for name, lines, what in (
        (CONSOLE_LOG, CONSOLE_TAIL_LINES, "L1 console"),
        (QEMU_LOG, QEMU_TAIL_LINES, "QEMU's messages"),
    ):
        tail = _tail(run_dir / name, lines)
        if tail:
            say(f"cube lab: --- last {len(tail)} lines of the {what} ---\n")
            say("".join(f"  {line}\n" for line in tail))
        else:
            say(f"cube lab: ({what}: nothing)\n")
    if isinstance(failure, CommandTimeout) and failure.answered is not None:
        say(_dumps_note(failure.answered, run_dir))
    say(f"cube lab: logs kept in {run_dir}\n")
    sys.stderr.flush()


def _dumps_note(answered: bool, run_dir: Path) -> str:
    if not answered:
        return "cube lab: L1 did not answer the dump request (its kernel may be hung itself)\n"
    where = [f"L1's CPUs and blocked tasks in {run_dir / CONSOLE_LOG}"]
    where += [
        f"`cube serve`'s threads and trio tasks in {log}"
        for log in sorted(run_dir.glob(SERVE_LOGS))
    ]
    where.append("pytest's (or a serving command's) threads in the command's output above")
    return f"cube lab: L1 answered the dump request: {'; '.join(where)}\n"


def run_in_lab(
    command: Sequence[str] | str,
    *,
    forwards: Sequence[tuple[int, int]] = (),
    timeout: float,
    boot_timeout: float,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 6144,
    cpus: int = L1_CPUS,
) -> int:
    """Run `command` in a fresh L1 from the checkout's folder; return its exit status.

    `forwards` maps host ports (on 127.0.0.1) to L1 ports. Lab failures print the console log
    and return EXIT_TIMEOUT or EXIT_LAB_FAILURE; their logs are kept in the run folder.
    """
    image = LabImage.in_dir(build_image())
    qemu = outer_qemu()
    print(f"cube lab: L1 kernel {l1_kernel()}, outer QEMU {qemu.name}", file=sys.stderr)
    with _lab_slots(cpus):
        run = partial(_run_once, image, qemu, command, forwards, timeout, boot_timeout, env,
                      memory_mb, cpus)  # fmt: skip
        code, panicked = run()
        for attempt in range(2, PANIC_ATTEMPTS + 1):
            if not panicked:
                break
            print(
                "cube lab: L1's kernel panicked (a fault of the emulated lab, not a result of "
                f"the command); running the command again ({attempt} of {PANIC_ATTEMPTS})",
                file=sys.stderr,
                flush=True,
            )
            code, panicked = run()
        return code


@contextlib.contextmanager
def _lab_slots(cpus: int) -> Iterator[None]:
    """Hold one slot per L1 CPU, out of one per host CPU, waiting while too few are free.

    Each L1 CPU is one busy TCG thread on the host, so labs beyond the host's CPUs starve each
    other (and a starved L1 looks like a hung one); on a two-CPU host, two one-CPU labs fit.
    """
    slots = os.cpu_count() or 1
    paths = [
        cache_dir() / ("lab.lock" if slot == 0 else f"lab-{slot}.lock") for slot in range(slots)
    ]
    need = min(cpus, slots)
    said = False
    while (held := _lock_some(paths, need)) is None:
        if not said:
            print("cube lab: waiting for another lab run to finish", file=sys.stderr, flush=True)
            said = True
        time.sleep(SLOT_POLL)
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)


def _lock_some(paths: Sequence[Path], need: int) -> list[int] | None:
    """Open descriptors holding the locks of `need` of `paths`, or None (holding none)."""
    held: list[int] = []
    for path in paths:
        if len(held) == need:
            break
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
        except BlockingIOError:
            os.close(fd)
    if len(held) == need:
        return held
    for fd in held:
        os.close(fd)
    return None


def _run_once(
    image: LabImage,
    qemu: OuterQemu,
    command: Sequence[str] | str,
    forwards: Sequence[tuple[int, int]],
    timeout: float,
    boot_timeout: float,
    env: Mapping[str, str] | None,
    memory_mb: int,
    cpus: int,
) -> tuple[int, bool]:
    """The command's exit status, and whether L1's kernel panicked."""
    shares = lab_shares()
    run_dir = Path(tempfile.mkdtemp(prefix="cube-lab-run-"))
    keep = False
    tty = terminal_env(
        sys.stdout.isatty(), os.environ.get("TERM"), shutil.get_terminal_size().columns
    )
    try:
        write_run_folder(run_dir, command, shares, {**tty, **(env or {})})
        argv = qemu_command(
            image, run_dir, shares, forwards, memory_mb=memory_mb, cpus=cpus, qemu=qemu.argv
        )
        return supervise(
            argv, run_dir, sys.stdout.buffer, timeout=timeout, boot_timeout=boot_timeout
        ), False
    except LabFailure as failure:
        keep = True
        report_failure(failure, run_dir)
        return failure.exit_code, L1_PANIC in "\n".join(_tail(run_dir / CONSOLE_LOG, 200))
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
