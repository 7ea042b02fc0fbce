"""KVM's three kinds of file descriptor (system, VM, vCPU) and guest memory, as objects with
explicit lifetimes.

Every kernel resource here (fd or mapping) has one owner that releases it in `close()`, and the
owners nest the way KVM does: a `Vm` closes its vCPUs and the guest memory it was given, so a
sandbox torn down by closing its `Vm` leaks nothing. Objects are context managers for tests and
short-lived uses; the VMM closes them explicitly.

Structures are cffi cdata allocated to the header's layout (`cube.vmm.kvm_build`). Getters return
fresh cdata that callers read or pass back to the matching setter; snapshot code saves them as
`bytes(ffi.buffer(x))`. Nothing here checks for use after close beyond what the kernel reports
(EBADF): pointers into unmapped memory are the caller's to drop first.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterable, Mapping
from typing import Any, Self

from cube.vmm._kvm import ffi, lib

CData = Any  # cffi cdata; cffi ships no finer static types
PAGE_SIZE = mmap.PAGESIZE
MAX_CPUID_ENTRIES = 256  # the kernel's KVM_MAX_CPUID_ENTRIES; a shorter buffer gives E2BIG
XSAVE_LEGACY_SIZE = 4096  # struct kvm_xsave without extra, for KVM_GET_XSAVE


class KvmError(OSError):
    """An ioctl failed. The message names it, since EINVAL or EEXIST alone rarely says which
    step of VM set-up went wrong."""

    def __init__(self, code: int, ioctl: str, detail: str | None = None) -> None:
        super().__init__(code, f"{ioctl}: {detail or os.strerror(code)}")
        self.ioctl = ioctl


def ioctl(fd: int, name: str, arg: CData | int = 0) -> int:
    """Issue the KVM ioctl called `name` (as in the header); return its non-negative result."""
    request = getattr(lib, name)
    if isinstance(arg, int):
        ret = lib.cube_ioctl_val(fd, request, arg)
    else:
        ret = lib.cube_ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(-ret, name)
    return ret


def fence() -> None:
    """A full memory barrier. Device code shares virtqueues with guest vCPUs on other CPUs, and
    Python has no way to order its stores to guest memory against the guest's."""
    lib.cube_fence()


def _mmap(size: int, flags: int, fd: int = -1, offset: int = 0) -> CData:
    ptr = lib.mmap(ffi.NULL, size, lib.PROT_READ | lib.PROT_WRITE, flags, fd, offset)
    if ptr == ffi.cast("void *", -1):
        raise OSError(ffi.errno, f"mmap of {size} bytes: {os.strerror(ffi.errno)}")
    return ffi.cast("char *", ptr)


def _munmap(ptr: CData, size: int) -> None:
    if lib.munmap(ptr, size) < 0:
        raise OSError(ffi.errno, f"munmap: {os.strerror(ffi.errno)}")


class _Resource:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _KvmFd(_Resource):
    """One of KVM's file descriptors; closing twice is harmless."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        """0 if unsupported, else a positive (sometimes meaningful) value. The system fd answers
        for the host; a VM fd answers for that VM, and some capabilities (XSAVE2) only there."""
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    def _get(self, ctype: str, name: str) -> CData:
        out = ffi.new(ctype)
        ioctl(self.fd, name, out)
        return out


class GuestMemory(_Resource):
    """A host mapping that backs one guest RAM region.

    `anonymous` is fresh zeroed RAM; `from_file` maps a memory snapshot, privately by default so
    that clones share the file's page cache and copy only the pages they write. `ptr` and
    `view()` are valid until `close()`.
    """

    def __init__(self, ptr: CData, size: int) -> None:
        self.ptr = ptr
        self.size = size

    @classmethod
    def anonymous(cls, size: int) -> GuestMemory:
        _check_page_multiple(size)
        # NORESERVE: untouched guest RAM costs nothing and must not count against overcommit.
        flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE
        return cls(_mmap(size, flags), size)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], size: int, *, offset: int = 0, shared: bool = False
    ) -> GuestMemory:
        """Map `size` bytes of `path` from `offset`; `shared` makes guest stores reach the file."""
        _check_page_multiple(size)
        fd = os.open(path, (os.O_RDWR if shared else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            flags = lib.MAP_SHARED if shared else lib.MAP_PRIVATE | lib.MAP_NORESERVE
            return cls(_mmap(size, flags, fd, offset), size)
        finally:
            os.close(fd)  # the mapping keeps the file alive

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ptr))

    def view(self) -> memoryview:
        return memoryview(ffi.buffer(self.ptr, self.size))

    def close(self) -> None:
        if self.ptr != ffi.NULL:
            _munmap(self.ptr, self.size)
            self.ptr = ffi.NULL


def _check_page_multiple(size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"guest memory size {size:#x} is not a positive multiple of a page")


class Kvm(_KvmFd):
    """The system fd, /dev/kvm: host capabilities and the factory for VMs."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def api_version(self) -> int:
        return ioctl(self.fd, "KVM_GET_API_VERSION")

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> CData:
        """`struct kvm_cpuid2 *` with what this host can offer a guest, `nent` entries long."""
        cpuid = _cpuid_buffer()
        ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return cpuid

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", probe)
        except KvmError as e:  # E2BIG, with nmsrs set to the length needed
            if e.errno != errno.E2BIG:
                raise
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": probe.nmsrs, "indices": probe.nmsrs})
        ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", msrs)
        return list(msrs.indices[0 : msrs.nmsrs])

    def create_vm(self) -> Vm:
        mmap_size = self.vcpu_mmap_size()  # first, so a failure cannot strand the VM fd
        return Vm(ioctl(self.fd, "KVM_CREATE_VM"), mmap_size)


class Vm(_KvmFd):
    """A VM fd. It owns the vCPUs it creates and the memory registered with it."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self._vcpu_mmap_size = vcpu_mmap_size
        self.vcpus: list[Vcpu] = []
        self.memory: dict[int, GuestMemory] = {}  # by slot

    def close(self) -> None:
        """vCPUs first, then the VM (the kernel frees it with its last fd), then guest RAM."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        super().close()
        for memory in self.memory.values():
            memory.close()
        self.memory.clear()

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory: GuestMemory, flags: int = 0
    ) -> None:
        """Back [guest_phys_addr, +memory.size) with `memory`, which the VM now owns."""
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": memory.size,
                "userspace_addr": memory.address,
            },
        )
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)
        self.memory[slot] = memory

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """Only before the first vCPU exists; unlike SET_TSS_ADDR it takes a pointer to a u64."""
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", addr))

    def create_irqchip(self) -> None:
        """PIC pair, IOAPIC and per-vCPU LAPICs in the kernel; only before the first vCPU."""
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = lib.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: bool) -> None:
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)})
        ioctl(self.fd, "KVM_IRQ_LINE", line)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Let a write to eventfd `fd` raise `gsi` without going through this process."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        irqfd = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags})
        ioctl(self.fd, "KVM_IRQFD", irqfd)

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Turn guest writes to `addr` into a signal on eventfd `fd` instead of a vCPU exit."""
        flags = (
            (lib.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
            | (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
            | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        )
        event = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        ioctl(self.fd, "KVM_IOEVENTFD", event)

    def get_clock(self) -> CData:
        return self._get("struct kvm_clock_data *", "KVM_GET_CLOCK")

    def set_clock(self, clock: CData) -> None:
        ioctl(self.fd, "KVM_SET_CLOCK", clock)

    def get_irqchip(self, chip_id: int) -> CData:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: CData) -> None:
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> CData:
        return self._get("struct kvm_pit_state2 *", "KVM_GET_PIT2")

    def set_pit2(self, state: CData) -> None:
        ioctl(self.fd, "KVM_SET_PIT2", state)

    def get_dirty_log(self, slot: int) -> bytes:
        """One bit per page of the slot, set for pages written since the last call (the slot
        needs KVM_MEM_LOG_DIRTY_PAGES)."""
        pages = self.memory[slot].size // PAGE_SIZE
        bitmap = ffi.new("__u64[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, index: int) -> Vcpu:
        fd = ioctl(self.fd, "KVM_CREATE_VCPU", index)
        try:
            xsave_size = self.check_extension(lib.KVM_CAP_XSAVE2)
            vcpu = Vcpu(fd, index, self._vcpu_mmap_size, xsave_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu


class Vcpu(_KvmFd):
    """A vCPU fd and its shared `kvm_run` page. `run()` belongs on the vCPU's own thread; the
    state getters and setters are only meaningful while it is not running."""

    def __init__(self, fd: int, index: int, mmap_size: int, xsave_size: int) -> None:
        super().__init__(fd)
        self.index = index
        self._mmap_size = mmap_size
        self._run_page = _mmap(mmap_size, lib.MAP_SHARED, fd)
        self.kvm_run: CData = ffi.cast("struct kvm_run *", self._run_page)
        # 0 means no KVM_CAP_XSAVE2: only the legacy 4 KiB KVM_GET_XSAVE exists.
        self._xsave_size = xsave_size

    def close(self) -> None:
        if self._run_page != ffi.NULL:
            _munmap(self._run_page, self._mmap_size)
            self._run_page = self.kvm_run = ffi.NULL
        super().close()

    def run(self) -> int:
        """Enter the guest until it exits to us; return `kvm_run.exit_reason`.

        A signal (the VMM's kick) or `immediate_exit` returns KVM_EXIT_INTR rather than raising;
        so does EAGAIN, which KVM returns when it woke a secondary vCPU that is still waiting for
        its INIT/SIPI from the boot CPU (the caller just enters again).
        """
        ret = lib.cube_ioctl_val(self.fd, lib.KVM_RUN, 0)
        if ret in (-errno.EINTR, -errno.EAGAIN):
            return lib.KVM_EXIT_INTR
        if ret < 0:
            raise KvmError(-ret, "KVM_RUN")
        return self.kvm_run.exit_reason

    def io_data(self) -> memoryview:
        """The bytes of the current KVM_EXIT_IO: filled by the guest on OUT, by us on IN."""
        io = self.kvm_run.io
        return memoryview(ffi.buffer(self._run_page + io.data_offset, io.size * io.count))

    def get_regs(self) -> CData:
        return self._get("struct kvm_regs *", "KVM_GET_REGS")

    def set_regs(self, regs: CData) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> CData:
        return self._get("struct kvm_sregs *", "KVM_GET_SREGS")

    def set_sregs(self, sregs: CData) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> CData:
        return self._get("struct kvm_fpu *", "KVM_GET_FPU")

    def set_fpu(self, fpu: CData) -> None:
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    def get_xsave(self) -> CData:
        """XSAVE2 at the size the VM reports when it can, so dynamic features (AMX) fit."""
        size = max(self._xsave_size, XSAVE_LEGACY_SIZE)
        extra = (size - XSAVE_LEGACY_SIZE) // 4
        xsave = ffi.new("struct kvm_xsave *", {"extra": extra})
        ioctl(self.fd, "KVM_GET_XSAVE2" if self._xsave_size else "KVM_GET_XSAVE", xsave)
        return xsave

    def set_xsave(self, xsave: CData) -> None:
        ioctl(self.fd, "KVM_SET_XSAVE", xsave)

    def get_xcrs(self) -> CData:
        return self._get("struct kvm_xcrs *", "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: CData) -> None:
        ioctl(self.fd, "KVM_SET_XCRS", xcrs)

    def get_lapic(self) -> CData:
        return self._get("struct kvm_lapic_state *", "KVM_GET_LAPIC")

    def set_lapic(self, lapic: CData) -> None:
        ioctl(self.fd, "KVM_SET_LAPIC", lapic)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Values of the MSRs KVM could read, in the order asked; KVM stops at the first it
        cannot, so a short answer names the culprit (the first index missing)."""
        msrs = _msr_buffer((index, 0) for index in indices)
        count = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        msrs = _msr_buffer(values.items())
        count = ioctl(self.fd, "KVM_SET_MSRS", msrs)
        if count != msrs.nmsrs:
            refused = msrs.entries[count].index
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", f"MSR {refused:#x} refused")

    def get_cpuid2(self) -> CData:
        cpuid = _cpuid_buffer()
        ioctl(self.fd, "KVM_GET_CPUID2", cpuid)
        return cpuid

    def set_cpuid2(self, cpuid: CData) -> None:
        """Before the first run: KVM forbids changing CPUID once the vCPU has run."""
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_mp_state(self) -> int:
        return self._get("struct kvm_mp_state *", "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def get_vcpu_events(self) -> CData:
        return self._get("struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: CData) -> None:
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_debugregs(self) -> CData:
        return self._get("struct kvm_debugregs *", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs: CData) -> None:
        ioctl(self.fd, "KVM_SET_DEBUGREGS", debugregs)

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, "KVM_SET_TSC_KHZ", khz)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest it was paused, so its soft-lockup watchdog ignores the gap. EINVAL
        means the guest has not enabled kvm-clock yet."""
        ioctl(self.fd, "KVM_KVMCLOCK_CTRL")


def _cpuid_buffer() -> CData:
    return ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})


def _msr_buffer(entries: Iterable[tuple[int, int]]) -> CData:
    pairs = list(entries)
    return ffi.new(
        "struct kvm_msrs *",
        {"nmsrs": len(pairs), "entries": [{"index": i, "data": d} for i, d in pairs]},
    )
