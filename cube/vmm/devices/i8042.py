"""The i8042 keyboard controller, kept for one job: the guest's reset line.

With `reboot=k` Linux reboots by writing 0xFE (pulse reset) to the command port; the VMM turns
that into a clean stop of the VM (vmm-facts.md §3.2). Everything else is the least a driver needs
to find a controller with no keyboard behind it.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

DATA_PORT_OFFSET = 0  # port 0x60
COMMAND_PORT_OFFSET = 4  # port 0x64
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_RESET_CPU = 0xFE
STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_COMMAND = 0x08
ACK = 0xFA


class I8042State(msgspec.Struct, frozen=True):
    status: int = 0x10
    ctr: int = 0x05
    output: int | None = None
    expect_ctr: bool = False


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.restore(I8042State())

    def restore(self, state: I8042State) -> None:
        self._status, self._ctr = state.status, state.ctr
        self._output, self._expect_ctr = state.output, state.expect_ctr

    def state(self) -> I8042State:
        return I8042State(self._status, self._ctr, self._output, self._expect_ctr)

    def _put_output(self, value: int) -> None:
        self._output = value
        self._status |= STATUS_OUTPUT_FULL

    def read(self, offset: int, size: int) -> bytes:
        if offset == DATA_PORT_OFFSET:
            value = self._output or 0
            self._output = None
            self._status &= ~STATUS_OUTPUT_FULL
        elif offset == COMMAND_PORT_OFFSET:
            value = self._status
        else:
            value = 0
        return bytes((value,)) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == COMMAND_PORT_OFFSET:
            self._status |= STATUS_COMMAND
            if value == CMD_RESET_CPU:
                self._on_reset()
            elif value == CMD_READ_CTR:
                self._put_output(self._ctr)
            elif value == CMD_WRITE_CTR:
                self._expect_ctr = True
        elif offset == DATA_PORT_OFFSET:
            self._status &= ~STATUS_COMMAND
            if self._expect_ctr:
                self._ctr, self._expect_ctr = value, False
            else:
                self._put_output(ACK)
