"""An 8250/16550A UART on COM1: the guest's console.

Output is kept in a bounded log (the tail of the console is what an operator or an error report
needs, and a chatty guest must not grow the daemon's memory) and optionally copied to a sink such
as the terminal of `cube vm run`. Input is a 64-byte FIFO like the real chip's; a caller that
feeds faster than the guest reads is told how much was taken.

Behaviour follows the 16550A as Linux's 8250 driver uses it (vmm-facts.md §3.1): LSR always
reports the transmitter empty, so the driver never waits on us, and IIR is a one-shot report.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import msgspec

FIFO_SIZE = 64
DEFAULT_LOG_BYTES = 256 * 1024

# Register offsets from the base port.
DATA, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DATA_READY = 0x01
LSR_IDLE = 0x60  # THR empty | transmitter empty
IER_RX = 0x01
IER_TX = 0x02
IIR_NONE = 0x01
IIR_TX_EMPTY = 0x02
IIR_RX_DATA = 0x04
IIR_FIFO_BITS = 0xC0


class SerialState(msgspec.Struct, frozen=True):
    ier: int = 0
    iir: int = IIR_NONE
    lcr: int = 0x03
    mcr: int = 0x08
    msr: int = 0xB0
    scr: int = 0
    divisor: int = 12
    rx_fifo: bytes = b""


class Serial:
    def __init__(
        self,
        irq: Callable[[], None],
        sink: Callable[[bytes], None] | None = None,
        log_bytes: int = DEFAULT_LOG_BYTES,
    ) -> None:
        self._irq = irq
        self._sink = sink
        self._lock = threading.Lock()
        self._log: deque[bytes] = deque()
        self._log_len = 0
        self._log_max = log_bytes
        self._rx: deque[int] = deque()
        self._restore(SerialState())

    def _restore(self, state: SerialState) -> None:
        self._ier, self._iir, self._lcr = state.ier, state.iir, state.lcr
        self._mcr, self._msr, self._scr = state.mcr, state.msr, state.scr
        self._divisor = state.divisor
        self._rx = deque(state.rx_fifo[:FIFO_SIZE])

    def restore(self, state: SerialState) -> None:
        with self._lock:
            self._restore(state)

    def state(self) -> SerialState:
        with self._lock:
            return SerialState(
                self._ier, self._iir, self._lcr, self._mcr, self._msr, self._scr,
                self._divisor, bytes(self._rx),
            )  # fmt: skip

    # Console side.

    def feed(self, data: bytes) -> int:
        """Queue input for the guest; returns how many bytes fit in the FIFO."""
        with self._lock:
            taken = min(len(data), FIFO_SIZE - len(self._rx))
            self._rx.extend(data[:taken])
            raise_irq = taken > 0 and self._ier & IER_RX
            if raise_irq:
                self._iir = IIR_RX_DATA
        if raise_irq:
            self._irq()
        return taken

    def log_tail(self, max_bytes: int | None = None) -> bytes:
        with self._lock:
            data = b"".join(self._log)
        return data if max_bytes is None else data[-max_bytes:]

    def _emit(self, byte: int) -> None:
        chunk = bytes((byte,))
        self._log.append(chunk)
        self._log_len += 1
        while self._log_len > self._log_max:
            self._log_len -= len(self._log.popleft())
        if self._sink is not None:
            self._sink(chunk)

    # Bus side.

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
        return bytes((value,)) + bytes(size - 1)

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._divisor & 0xFF
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return (self._divisor >> 8) if dlab else self._ier
        if offset == IIR_FCR:
            value = self._iir | IIR_FIFO_BITS
            self._iir = IIR_NONE
            return value
        if offset == LSR:
            return LSR_IDLE | (LSR_DATA_READY if self._rx else 0)
        return {LCR: self._lcr, MCR: self._mcr, MSR: self._msr, SCR: self._scr}.get(offset, 0)

    def write(self, offset: int, data: bytes) -> None:
        raise_irq = False
        with self._lock:
            value = data[0]
            dlab = self._lcr & LCR_DLAB
            if offset == DATA and dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            elif offset == DATA:
                raise_irq = self._transmit(value)
            elif offset == IER and dlab:
                self._divisor = (self._divisor & 0xFF) | (value << 8)
            elif offset == IER:
                self._ier = value & 0x0F
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._mcr = value
            elif offset == SCR:
                self._scr = value
        if raise_irq:
            self._irq()

    def _transmit(self, value: int) -> bool:
        if self._mcr & MCR_LOOP:
            if len(self._rx) < FIFO_SIZE:
                self._rx.append(value)
            if self._ier & IER_RX:
                self._iir = IIR_RX_DATA
                return True
            return False
        self._emit(value)
        if self._ier & IER_TX:
            self._iir = IIR_TX_EMPTY
            return True
        return False
