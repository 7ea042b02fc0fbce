"""virtio-rng: entropy for the guest's kernel RNG from the host's.

Clones of one snapshot start with identical RNG state; the guest agent reseeds on identity
refresh, and this device keeps feeding fresh host entropy after that. A request is served
synchronously when the driver kicks the queue: it is small and never blocks.
"""

from __future__ import annotations

import os

from cube.vmm.devices.virtio_mmio import VirtioMmio
from cube.vmm.virtqueue import QueueError

DEVICE_ID = 4
MAX_REQUEST = 64 * 1024  # bound what one guest request can make us read and copy


class VirtioRng:
    device_id = DEVICE_ID
    queue_sizes = (256,)

    def __init__(self) -> None:
        self._transport: VirtioMmio | None = None

    def features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, transport: VirtioMmio) -> None:
        self._transport = transport
        self.notify(0)

    def reset(self) -> None:
        self._transport = None

    def notify(self, queue_index: int) -> None:
        transport = self._transport
        if transport is None:
            return
        queue, mem = transport.queues[0], transport.memory
        try:
            while (chain := queue.pop(mem)) is not None:
                budget, written = MAX_REQUEST, 0
                for buf in chain.writable:
                    n = min(buf.length, budget)
                    mem.write(buf.addr, os.urandom(n))
                    written, budget = written + n, budget - n
                queue.add_used(mem, chain.head, written)
        except (QueueError, ValueError) as error:
            transport.fail(QueueError(str(error)))
            return
        transport.signal_used(queue)
