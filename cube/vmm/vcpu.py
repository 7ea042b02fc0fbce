"""The vCPU run loop: one OS thread per vCPU in KVM_RUN, dispatching exits to the buses.

KVM_RUN releases the GIL (cffi does that for every C call), so vCPUs run in parallel with each
other and with the daemon's trio thread; the GIL is only taken for the short exit handlers.

Stopping and pausing use KVM's documented kick: set `immediate_exit` in the shared `kvm_run`
page, then signal the thread. A thread about to enter KVM_RUN sees the flag and returns at
once; one already inside is interrupted by the signal. Either way it comes back to the loop,
which then parks (pause) or returns (stop). The signal's handler does nothing: Python installs
it, and its only job is to make the kernel interrupt the ioctl instead of killing the process.

Every return from KVM_RUN is counted by exit reason (the daemon's `cube_vm_exits_total`). These
are the exits that reach the VMM; exits KVM handles in the kernel (EPT faults, in-kernel APIC and
PIT, HLT with an in-kernel irqchip) never come back to us and are not counted. The last few
are also kept, with their port or address, for the report of a guest that dies
(cube.vmm.crash_report).

Guest work runs below the daemon. At equal priority a guest that spins its vCPUs takes a full
share of a CPU from the daemon's trio thread for each of them, so the API slows in step with how
many vCPUs are busy. Each vCPU thread lowers its own nice value by VCPU_NICE (CFS weight 110
against the daemon's 1024 at nice 10): a busy vCPU then yields most of a contended CPU to the
daemon when it has work, while vCPUs still share fairly among themselves and take all of an idle
CPU. Lowering a thread's priority needs no privilege but raising it again does, so every vCPU
runs on a thread of its own that ends with it (`run_in_own_thread`), not on one of trio's reused
worker threads.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import outcome
import trio

from cube.vmm.bus import Bus
from cube.vmm.kvm import Vcpu, ffi, lib

KICK_SIGNAL = signal.SIGRTMIN + 2
VCPU_NICE = 10  # added to the daemon's nice value for vCPU threads; see the module docstring
# Exits each vCPU remembers for a crash report: (reason, port or address, 1 for out/write).
RECENT_EXITS = 16
TRIPLE_FAULT = "triple fault"  # a KVM_EXIT_SHUTDOWN's detail
RecentExit = tuple[int, int, int]

# Labels for the exit reasons our bindings declare; any other reason is labelled by its number.
EXIT_NAMES = {
    lib.KVM_EXIT_UNKNOWN: "unknown",
    lib.KVM_EXIT_EXCEPTION: "exception",
    lib.KVM_EXIT_IO: "io",
    lib.KVM_EXIT_HYPERCALL: "hypercall",
    lib.KVM_EXIT_DEBUG: "debug",
    lib.KVM_EXIT_HLT: "hlt",
    lib.KVM_EXIT_MMIO: "mmio",
    lib.KVM_EXIT_IRQ_WINDOW_OPEN: "irq_window_open",
    lib.KVM_EXIT_SHUTDOWN: "shutdown",
    lib.KVM_EXIT_FAIL_ENTRY: "fail_entry",
    lib.KVM_EXIT_INTR: "intr",
    lib.KVM_EXIT_INTERNAL_ERROR: "internal_error",
    lib.KVM_EXIT_SYSTEM_EVENT: "system_event",
}


def install_kick_handler() -> None:
    """Must run once on the main thread before any vCPU starts (Python installs handlers there)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class StopReason(enum.Enum):
    RESET = "reset"  # the guest rebooted (i8042 reset line, or a KVM reset event)
    SHUTDOWN = "shutdown"  # the guest powered off, or triple-faulted
    CRASH = "crash"  # KVM reported an error it cannot continue from
    REQUESTED = "requested"  # the host asked


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    detail: str = ""


class VcpuRunner:
    """Runs one vCPU until the VM stops; `on_stop` tells the VM why, from this thread."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, on_stop: Callable[[Stop], None]) -> None:
        self.vcpu = vcpu
        self._pio, self._mmio = pio, mmio
        self._on_stop = on_stop
        self._thread_id: int | None = None
        self._wanted = threading.Condition()
        self._stop = False
        self._pause = False
        self._paused = False
        # Written only by this vCPU's thread, one dict increment per exit; no lock, because a
        # reader's dict() copy is one C call that no increment can interleave with.
        self._exits: Counter[int] = Counter()
        self._recent: deque[RecentExit] = deque(maxlen=RECENT_EXITS)

    def recent_exits(self) -> list[RecentExit]:
        """The last exits, oldest first; meant for after the vCPU has stopped."""
        return list(self._recent)

    def exit_counts(self) -> Counter[str]:
        """Exits so far by reason name; safe to call from any thread, while running or after."""
        return Counter({EXIT_NAMES.get(r, f"reason_{r}"): n for r, n in dict(self._exits).items()})

    async def run_in_own_thread(self, name: str) -> None:
        """Run the vCPU until the VM stops, on a new thread named `name` that ends with it.

        Cancellation does not abandon the thread: the VM stops it with `request_stop`, and this
        waits, shielded, for it to return, so that no vCPU outlives its VM's memory.
        """
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        result: list[outcome.Outcome[None]] = []

        def body() -> None:
            result.append(outcome.capture(self.run))
            token.run_sync_soon(finished.set)

        threading.Thread(target=body, name=name, daemon=True).start()
        with trio.CancelScope(shield=True):
            await finished.wait()
        result[0].unwrap()

    def run(self) -> None:
        """The thread's body; returns when the VM stops."""
        os.nice(VCPU_NICE)  # on Linux, this thread's alone
        with self._wanted:
            self._thread_id = threading.get_ident()
        try:
            self._loop()
        finally:
            with self._wanted:
                self._thread_id = None  # no more kicks: the id may be reused by another thread
                self._wanted.notify_all()

    def _loop(self) -> None:
        run, exits = self.vcpu.kvm_run, self._exits
        while True:
            with self._wanted:
                while self._pause and not self._stop:
                    self._paused = True
                    self._wanted.notify_all()
                    self._wanted.wait()
                self._paused = False
                if self._stop:
                    return
                run.immediate_exit = 0  # under the lock: a kick after this point is not lost
            reason = self.vcpu.run()
            exits[reason] += 1
            stop = self._dispatch(reason)
            if stop is not None:
                self._on_stop(stop)

    def _dispatch(self, reason: int) -> Stop | None:
        run = self.vcpu.kvm_run
        if reason == lib.KVM_EXIT_IO:
            io, data = run.io, self.vcpu.io_data()
            self._recent.append((reason, io.port, io.direction == lib.KVM_EXIT_IO_OUT))
            for i in range(io.count):
                chunk = slice(i * io.size, (i + 1) * io.size)
                if io.direction == lib.KVM_EXIT_IO_OUT:
                    self._pio.write(io.port, bytes(data[chunk]))
                else:
                    data[chunk] = self._pio.read(io.port, io.size)
            return None
        if reason == lib.KVM_EXIT_MMIO:
            m = run.mmio
            self._recent.append((reason, m.phys_addr, m.is_write))
            if m.is_write:
                self._mmio.write(m.phys_addr, bytes(ffi.buffer(m.data, m.len)))
            else:
                ffi.buffer(m.data, m.len)[:] = self._mmio.read(m.phys_addr, m.len)
            return None
        if reason == lib.KVM_EXIT_INTR:
            return None
        self._recent.append((reason, 0, 0))
        if reason == lib.KVM_EXIT_HLT:
            return Stop(StopReason.SHUTDOWN, "halted with interrupts off")
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return Stop(StopReason.SHUTDOWN, TRIPLE_FAULT)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == lib.KVM_SYSTEM_EVENT_RESET:
                return Stop(StopReason.RESET, "reset event")
            if kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                return Stop(StopReason.SHUTDOWN, "shutdown event")
            return Stop(StopReason.CRASH, f"system event {kind}")
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            return Stop(StopReason.CRASH, f"KVM internal error, suberror {run.internal.suberror}")
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            code = run.fail_entry.hardware_entry_failure_reason
            return Stop(StopReason.CRASH, f"VM entry failed, reason {code:#x}")
        return Stop(StopReason.CRASH, f"unhandled exit {reason} on vCPU {self.vcpu.index}")

    def _kick(self) -> None:
        """Call with `_wanted` held, so the thread cannot exit between the check and the kill.
        A closed vCPU (its VM stopped by itself and was released; the daemon may still ask it
        to stop) has no `kvm_run` page and no thread: nothing to kick."""
        if self.vcpu.kvm_run == ffi.NULL:
            return
        self.vcpu.kvm_run.immediate_exit = 1
        if self._thread_id is not None:
            signal.pthread_kill(self._thread_id, KICK_SIGNAL)

    def request_stop(self) -> None:
        with self._wanted:
            self._stop = True
            self._wanted.notify_all()
            self._kick()

    def pause(self) -> None:
        """Stop running guest code and wait until this vCPU is parked outside KVM_RUN."""
        with self._wanted:
            self._pause = True
            self._kick()
            while not self._paused and not self._stop and self._thread_id is not None:
                self._wanted.wait(timeout=0.05)
                if not self._paused:
                    self._kick()  # the first kick may have landed just before KVM_RUN

    def resume(self) -> None:
        with self._wanted:
            self._pause = False
            self._wanted.notify_all()
