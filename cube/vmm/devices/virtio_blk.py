"""virtio-blk over a `LayeredDisk` (virtio 1.2 §5.2).

Requests are served in the order the driver queued them, synchronously on whichever thread
delivered the queue notification. Sizes come from the guest and are checked against the disk and
a per-request cap before any I/O; a bad request completes with IOERR (the guest sees an I/O
error on that request) rather than breaking the device, because a filesystem in the guest can
recover from one failed request but not from a reset disk.
"""

from __future__ import annotations

import struct

from cube.vmm.devices.request_queue import RequestQueueDevice
from cube.vmm.disk import DiskError, LayeredDisk
from cube.vmm.virtqueue import Buffer, Chain, GuestMemoryAccess, QueueError

DEVICE_ID = 2
SECTOR = 512
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
SEG_MAX = 126
MAX_REQUEST = 16 << 20

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

_HEADER = struct.Struct("<IIQ")


class VirtioBlk(RequestQueueDevice):
    device_id = DEVICE_ID

    def __init__(self, disk: LayeredDisk, disk_id: str = "cube", read_only: bool = False) -> None:
        super().__init__()
        self.disk = disk
        self.read_only = read_only
        self._id = disk_id.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")

    def features(self) -> int:
        return F_SEG_MAX | F_BLK_SIZE | F_FLUSH | (F_RO if self.read_only else 0)

    def _config(self) -> bytes:
        # capacity, size_max, seg_max, geometry (unused), blk_size
        return struct.pack("<QII4sI", self.disk.size // SECTOR, 0, SEG_MAX, bytes(4), SECTOR)

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config()[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # nothing in the config we expose is writable

    def serve(self, mem: GuestMemoryAccess, chain: Chain) -> int:
        """Do one request; returns the bytes written into the guest's buffers (status included)."""
        readable, writable = chain.readable, chain.writable
        if not readable or readable[0].length < _HEADER.size or not writable:
            raise QueueError("block request without a header or a status byte")
        rtype, _reserved, sector = _HEADER.unpack(mem.read(readable[0].addr, _HEADER.size))
        status_buf = writable[-1]
        status_addr = status_buf.addr + status_buf.length - 1
        data_in = list(writable[:-1])
        if status_buf.length > 1:
            data_in.append(Buffer(status_buf.addr, status_buf.length - 1, True))
        data_out = list(readable[1:])
        if readable[0].length > _HEADER.size:
            head = readable[0]
            data_out.insert(0, Buffer(head.addr + _HEADER.size, head.length - _HEADER.size, False))
        status, written = S_OK, 0
        try:
            if rtype == T_IN:
                written = self._read(mem, sector, data_in)
            elif rtype == T_OUT:
                status = S_IOERR if self.read_only else S_OK
                if status == S_OK:
                    self._write(mem, sector, data_out)
            elif rtype == T_FLUSH:
                self.disk.flush()
            elif rtype == T_GET_ID:
                written = self._copy_out(mem, self._id, data_in)
            else:
                status = S_UNSUPP
        except (DiskError, _BadRequest):
            status = S_IOERR
        mem.write(status_addr, bytes((status,)))
        return written + 1

    @staticmethod
    def _span(sector: int, buffers: list[Buffer]) -> tuple[int, int]:
        total = sum(b.length for b in buffers)
        if total % SECTOR or total > MAX_REQUEST:
            raise _BadRequest
        return sector * SECTOR, total

    def _read(self, mem: GuestMemoryAccess, sector: int, buffers: list[Buffer]) -> int:
        offset, total = self._span(sector, buffers)
        return self._copy_out(mem, self.disk.read(offset, total), buffers)

    def _write(self, mem: GuestMemoryAccess, sector: int, buffers: list[Buffer]) -> None:
        offset, _ = self._span(sector, buffers)
        self.disk.write(offset, b"".join(mem.read(b.addr, b.length) for b in buffers))

    @staticmethod
    def _copy_out(mem: GuestMemoryAccess, data: bytes, buffers: list[Buffer]) -> int:
        pos = 0
        for b in buffers:
            if pos >= len(data):
                break
            piece = data[pos : pos + b.length]
            mem.write(b.addr, piece)
            pos += len(piece)
        return pos


class _BadRequest(Exception):
    """A request whose size or alignment no disk could serve."""
