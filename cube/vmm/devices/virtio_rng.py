"""virtio-rng: entropy for the guest's kernel RNG from the host's.

Clones of one snapshot start with identical RNG state; the guest agent reseeds on identity
refresh, and this device keeps feeding fresh host entropy after that. A request is served
synchronously when the driver kicks the queue: it is small and never blocks.
"""

from __future__ import annotations

import os

from cube.vmm.devices.request_queue import RequestQueueDevice
from cube.vmm.virtqueue import Chain, GuestMemoryAccess

DEVICE_ID = 4
MAX_REQUEST = 64 * 1024  # bound what one guest request can make us read and copy


class VirtioRng(RequestQueueDevice):
    device_id = DEVICE_ID

    def features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def serve(self, mem: GuestMemoryAccess, chain: Chain) -> int:
        budget, written = MAX_REQUEST, 0
        for buf in chain.writable:
            n = min(buf.length, budget)
            mem.write(buf.addr, os.urandom(n))
            written, budget = written + n, budget - n
        return written
