"""The virtio-mmio transport (version 2, "modern"; virtio 1.2 §4.2.2).

The transport owns the register file, feature negotiation and the queues' configuration; a
backend (`VirtioBackend`: block, vsock, rng, net) owns what the queues carry. The backend sees
its queues only once the driver sets DRIVER_OK, and is told to drop everything on reset.

A queue error raised by a backend (a malformed chain from the guest) marks the device
NEEDS_RESET and raises a config-change interrupt, as the spec asks; the guest's driver resets
the device and the VM goes on.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Protocol

import msgspec

from cube.vmm.virtqueue import GuestMemoryAccess, QueueError, QueueState, Virtqueue

MAGIC = 0x74726976
VERSION = 2
VENDOR_ID = 0x4542_5543  # "CUBE"

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

CONFIG_SPACE = 0x100
QUEUE_NOTIFY = 0x050

_U32 = struct.Struct("<I")


class VirtioBackend(Protocol):
    device_id: int
    queue_sizes: tuple[int, ...]

    def features(self) -> int:
        """Device-specific feature bits; the transport adds VERSION_1, EVENT_IDX, INDIRECT."""
        ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def activate(self, transport: VirtioMmio) -> None:
        """The driver is ready: start serving `transport.queues`."""
        ...

    def notify(self, queue_index: int) -> None:
        """The driver made buffers available on a queue."""
        ...

    def reset(self) -> None: ...


class MmioState(msgspec.Struct, frozen=True):
    queues: list[QueueState]
    device_features_sel: int = 0
    driver_features_sel: int = 0
    acked_features: int = 0
    queue_sel: int = 0
    status: int = 0
    config_generation: int = 0
    interrupt_status: int = 0


class VirtioMmio:
    def __init__(
        self, backend: VirtioBackend, memory: GuestMemoryAccess, irq: Callable[[], None]
    ) -> None:
        self.backend = backend
        self.memory = memory
        self._irq = irq
        self._lock = threading.RLock()
        self.queues = [Virtqueue(size) for size in backend.queue_sizes]
        self.offered = backend.features() | F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.acked_features = self.status = self.config_generation = self.interrupt_status = 0
        for q in self.queues:
            q.reset()

    @property
    def activated(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and not self.status & STATUS_NEEDS_RESET

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & bit)

    # Snapshots.

    def state(self) -> MmioState:
        with self._lock:
            return MmioState(
                [q.state() for q in self.queues], self.device_features_sel,
                self.driver_features_sel, self.acked_features, self.queue_sel, self.status,
                self.config_generation, self.interrupt_status,
            )  # fmt: skip

    def restore(self, s: MmioState) -> None:
        """Restore registers and queues; the caller re-activates the backend if it was live."""
        with self._lock:
            if len(s.queues) != len(self.queues):
                raise ValueError("snapshot has a different number of queues for this device")
            for q, qs in zip(self.queues, s.queues, strict=True):
                q.restore(qs)
                q.event_idx = bool(s.acked_features & F_EVENT_IDX)
            self.device_features_sel = s.device_features_sel
            self.driver_features_sel = s.driver_features_sel
            self.acked_features, self.queue_sel, self.status = (
                s.acked_features,
                s.queue_sel,
                s.status,
            )
            self.config_generation, self.interrupt_status = s.config_generation, s.interrupt_status

    # Interrupts, raised by backends from any thread.

    def signal_used(self, queue: Virtqueue) -> None:
        """Interrupt the driver if it wants to hear about what `queue` just published."""
        if queue.needs_notification(self.memory):
            self._raise(INT_USED_BUFFER)

    def signal_config_change(self) -> None:
        with self._lock:
            self.config_generation += 1
        self._raise(INT_CONFIG_CHANGE)

    def fail(self, error: QueueError) -> None:
        """A backend met a malformed request: the device needs a reset by the driver."""
        with self._lock:
            self.status |= STATUS_NEEDS_RESET
        self.signal_config_change()

    def _raise(self, bit: int) -> None:
        with self._lock:
            self.interrupt_status |= bit
        self._irq()

    # Bus side.

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_SPACE:
            return self.backend.read_config(offset - CONFIG_SPACE, size)
        if size != 4 or offset % 4:
            return bytes(size)
        with self._lock:
            return _U32.pack(self._read_register(offset))

    def _read_register(self, offset: int) -> int:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        match offset:
            case 0x000:
                return MAGIC
            case 0x004:
                return VERSION
            case 0x008:
                return self.backend.device_id
            case 0x00C:
                return VENDOR_ID
            case 0x010:
                return (self.offered >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
            case 0x034:
                return q.max_size if q else 0
            case 0x044:
                return int(q.ready) if q else 0
            case 0x060:
                return self.interrupt_status
            case 0x070:
                return self.status
            case 0x0FC:
                return self.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE:
            if self.status & STATUS_DRIVER:
                self.backend.write_config(offset - CONFIG_SPACE, data)
            return
        if len(data) != 4 or offset % 4:
            return
        (value,) = _U32.unpack(data)
        if offset == QUEUE_NOTIFY:
            if self.activated and value < len(self.queues):
                self.backend.notify(value)
            return
        with self._lock:
            activate = self._write_register(offset, value)
        if activate:
            self.backend.activate(self)

    def _write_register(self, offset: int, value: int) -> bool:
        """Apply a register write; True when it just made the device live."""
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        configuring_queue = q is not None and not q.ready and not self.status & STATUS_DRIVER_OK
        match offset:
            case 0x014:
                self.device_features_sel = value
            case 0x020:
                negotiating = self.status & STATUS_DRIVER and not self.status & STATUS_FEATURES_OK
                if negotiating and self.driver_features_sel < 2:
                    shift = 32 * self.driver_features_sel
                    kept = self.acked_features & ~(0xFFFF_FFFF << shift)
                    self.acked_features = kept | ((value & self.offered >> shift) << shift)
            case 0x024:
                self.driver_features_sel = value
            case 0x030:
                self.queue_sel = value
            case 0x038 if configuring_queue:
                q.size = value
            case 0x044 if q is not None:
                q.ready = bool(value)
            case 0x064:
                self.interrupt_status &= ~value
            case 0x070:
                return self._write_status(value)
            case 0x080 if configuring_queue:
                q.desc_addr = (q.desc_addr & ~0xFFFF_FFFF) | value
            case 0x084 if configuring_queue:
                q.desc_addr = (q.desc_addr & 0xFFFF_FFFF) | (value << 32)
            case 0x090 if configuring_queue:
                q.avail_addr = (q.avail_addr & ~0xFFFF_FFFF) | value
            case 0x094 if configuring_queue:
                q.avail_addr = (q.avail_addr & 0xFFFF_FFFF) | (value << 32)
            case 0x0A0 if configuring_queue:
                q.used_addr = (q.used_addr & ~0xFFFF_FFFF) | value
            case 0x0A4 if configuring_queue:
                q.used_addr = (q.used_addr & 0xFFFF_FFFF) | (value << 32)
        return False

    def _write_status(self, value: int) -> bool:
        if value == 0:
            self.backend.reset()
            self._reset_registers()
            return False
        setting_features_ok = value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK
        if setting_features_ok and not self.acked_features & F_VERSION_1:
            value &= ~STATUS_FEATURES_OK  # the driver re-reads the status and sees the refusal
        becoming_live = value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK
        self.status = value
        if not becoming_live:
            return False
        if not all(q.is_valid() for q in self.queues if q.ready):
            self.status |= STATUS_NEEDS_RESET
            return False
        for q in self.queues:
            q.event_idx = self.has_feature(F_EVENT_IDX)
        return True
