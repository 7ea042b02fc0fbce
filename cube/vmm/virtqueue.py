"""The device side of a split virtqueue (virtio 1.2 §2.7).

Everything a queue reads from guest memory is guest-controlled: descriptor chains may loop, point
outside RAM, nest indirect tables or claim absurd lengths. Every such case raises `QueueError`,
which the transport turns into the NEEDS_RESET status of that device: a misbehaving guest breaks
its own device, never the VMM.

Ordering: on x86 only two store-to-load points need a full fence (vmm-facts.md §4): after
publishing used.idx before reading used_event, and after writing avail_event before re-reading
avail.idx. Memory objects supply `fence()` for those.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import msgspec

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class QueueError(Exception):
    """The guest put something invalid in a queue."""


class GuestMemoryAccess(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | memoryview) -> None: ...

    def fence(self) -> None: ...


@dataclass(frozen=True)
class Buffer:
    """One guest buffer of a chain: device-readable, or device-writable when `writable`."""

    addr: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    head: int
    buffers: tuple[Buffer, ...]

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]


class QueueState(msgspec.Struct, frozen=True):
    max_size: int
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    next_avail: int = 0
    next_used: int = 0
    # Used entries published since the driver was last considered for a notification.
    num_added: int = 0


class Virtqueue:
    """Configuration registers (written by the transport) plus the ring logic."""

    def __init__(self, max_size: int = 256) -> None:
        self.restore(QueueState(max_size=max_size, size=max_size))
        self.event_idx = False

    def restore(self, s: QueueState) -> None:
        self.max_size, self.size, self.ready = s.max_size, s.size, s.ready
        self.desc_addr, self.avail_addr, self.used_addr = s.desc_addr, s.avail_addr, s.used_addr
        self.next_avail, self.next_used, self.num_added = s.next_avail, s.next_used, s.num_added

    def state(self) -> QueueState:
        return QueueState(
            self.max_size, self.size, self.ready, self.desc_addr, self.avail_addr,
            self.used_addr, self.next_avail, self.next_used, self.num_added,
        )  # fmt: skip

    def reset(self) -> None:
        self.restore(QueueState(max_size=self.max_size, size=self.max_size))

    def is_valid(self) -> bool:
        size_ok = 0 < self.size <= self.max_size and self.size & (self.size - 1) == 0
        aligned = not (self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4)
        return self.ready and size_ok and aligned

    # Ring access.

    def avail_idx(self, mem: GuestMemoryAccess) -> int:
        return _U16.unpack(mem.read(self.avail_addr + 2, 2))[0]

    def pending(self, mem: GuestMemoryAccess) -> int:
        """How many chains the driver has made available that we have not taken."""
        pending = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"avail index ran {pending} entries ahead of a {self.size}-entry ring")
        return pending

    def pop(self, mem: GuestMemoryAccess) -> Chain | None:
        """The next available chain, or None once the ring is drained.

        Draining re-arms notifications: with EVENT_IDX the driver only kicks when its avail
        index passes the avail_event we publish, so we publish where we stopped, then look once
        more for a chain that raced with the publication.
        """
        if not self.pending(mem) and not self.enable_notifications(mem):
            return None
        slot = self.next_avail % self.size
        (head,) = _U16.unpack(mem.read(self.avail_addr + 4 + 2 * slot, 2))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return Chain(head, tuple(self._walk(mem, head)))

    def unpop(self) -> None:
        """Give back the chain just popped, unused: the next pop returns it again."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _walk(self, mem: GuestMemoryAccess, head: int) -> list[Buffer]:
        buffers: list[Buffer] = []
        table, table_size, index = self.desc_addr, self.size, head
        seen_indirect = False
        budget = self.size  # a chain longer than the ring is a loop
        while True:
            if index >= table_size:
                raise QueueError(f"descriptor index {index} outside a {table_size}-entry table")
            addr, length, flags, nxt = _DESC.unpack(mem.read(table + 16 * index, 16))
            if flags & DESC_F_INDIRECT:
                if seen_indirect or flags & DESC_F_NEXT:
                    raise QueueError("nested or chained indirect descriptor table")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise QueueError(f"indirect table of {length} bytes")
                seen_indirect = True
                table, table_size, index = addr, length // 16, 0
                budget = table_size
                continue
            buffers.append(Buffer(addr, length, bool(flags & DESC_F_WRITE)))
            budget -= 1
            if not flags & DESC_F_NEXT:
                return buffers
            if budget <= 0:
                raise QueueError("descriptor chain loops")
            index = nxt

    def add_used(self, mem: GuestMemoryAccess, head: int, written: int) -> None:
        """Return a chain to the driver; `written` is how many bytes the device wrote into it."""
        slot = self.next_used % self.size
        mem.write(self.used_addr + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.num_added += 1
        mem.fence()  # the element must be visible before the index that publishes it
        mem.write(self.used_addr + 2, _U16.pack(self.next_used))

    def needs_notification(self, mem: GuestMemoryAccess) -> bool:
        """Whether the driver wants an interrupt for what was published since the last call."""
        added, self.num_added = self.num_added, 0
        if not added:
            return False
        mem.fence()
        if not self.event_idx:
            flags = _U16.unpack(mem.read(self.avail_addr, 2))[0]
            return not flags & AVAIL_F_NO_INTERRUPT
        (used_event,) = _U16.unpack(mem.read(self.avail_addr + 4 + 2 * self.size, 2))
        new, old = self.next_used, (self.next_used - added) & 0xFFFF
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    def kick_on_next_avail(self, mem: GuestMemoryAccess) -> None:
        """Ask for a kick when the driver adds its next chain, even with chains still pending.

        Draining (`pop`) only re-arms at the point where we stopped; a device that waits for
        the driver to give back one particular buffer, while others sit unused, needs this.
        """
        if self.event_idx:
            mem.write(self.used_addr + 4 + 8 * self.size, _U16.pack(self.avail_idx(mem)))
            mem.fence()

    def enable_notifications(self, mem: GuestMemoryAccess) -> bool:
        """Ask to be kicked for the next chain; True if one arrived meanwhile (check again)."""
        if self.event_idx:
            mem.write(self.used_addr + 4 + 8 * self.size, _U16.pack(self.next_avail))
            mem.fence()
        return self.pending(mem) > 0
