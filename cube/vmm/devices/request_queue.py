"""The shape shared by virtio devices with one request queue served as soon as it is kicked.

virtio-blk and virtio-rng answer each descriptor chain synchronously on the thread that
delivered the notification, in the order the driver queued them; nothing is in flight between
kicks, so there is no device state to snapshot beyond the transport's. A chain too malformed to
answer (QueueError, or an address outside guest memory) fails the device through the transport,
which is how virtio reports a broken driver; a request that is only wrong (a bad sector range)
is the subclass's to answer with an error status instead.
"""

from __future__ import annotations

from cube.vmm.devices.virtio_mmio import VirtioMmio
from cube.vmm.virtqueue import Chain, GuestMemoryAccess, QueueError


class RequestQueueDevice:
    queue_sizes = (256,)

    def __init__(self) -> None:
        self._transport: VirtioMmio | None = None

    def serve(self, mem: GuestMemoryAccess, chain: Chain) -> int:
        """Answer one request; returns the bytes written into the chain's writable buffers."""
        raise NotImplementedError

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
                queue.add_used(mem, chain.head, self.serve(mem, chain))
        except (QueueError, ValueError) as error:
            transport.fail(QueueError(str(error)))
            return
        transport.signal_used(queue)
