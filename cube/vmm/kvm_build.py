"""cffi builder for `cube.vmm._kvm`: the KVM ABI, taken from <linux/kvm.h> by the C compiler.

Out-of-line API mode means no struct layout or ioctl number is trusted from here: the cdef names
the fields the VMM touches, most structs end in `...;`, and the compiler supplies sizes, offsets
and `#define` values from the system headers (structs listed in full are checked against them).
A struct whose fields the VMM never reads (vCPU events, irqchip) is declared opaque, so snapshot
code handles it as bytes of the right size.

`setup.py` hands `ffibuilder` to setuptools, so `pip install -e .` builds the module in place
(as `_kvm.abi3.so`); rerun it after changing this file.

The ioctl wrappers return `-errno` instead of setting errno so the result is self-contained on
whichever thread made the call. cffi releases the GIL around every call in API mode, so a vCPU
thread blocked in KVM_RUN does not stop the rest of the process.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef int32_t __s32;

long cube_ioctl(int fd, unsigned long request, void *arg);
long cube_ioctl_val(int fd, unsigned long request, unsigned long arg);
void cube_fence(void);

void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
#define MAP_NORESERVE ...

#define KVM_API_VERSION ...

/* system ioctls (on /dev/kvm) */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...

/* VM ioctls */
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_GET_DIRTY_LOG ...

/* vCPU ioctls */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_XSAVE ...
#define KVM_GET_XSAVE2 ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_CPUID2 ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_TSC_KHZ ...
#define KVM_KVMCLOCK_CTRL ...

/* capabilities */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_PIT_STATE2 ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XSAVE2 ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_TSC_CONTROL ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_KVMCLOCK_CTRL ...
#define KVM_CAP_IMMEDIATE_EXIT ...

/* exit reasons and their sub-codes */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

/* flags and enumerations */
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_CLOCK_REALTIME ...
#define KVM_CLOCK_HOST_TSC ...
#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX ...
#define KVM_MAX_XCRS ...
#define KVM_APIC_REG_SIZE ...

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[...];
};

struct kvm_fpu {
    __u8 fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8 ftwx;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8 xmm[16][16];
    __u32 mxcsr;
    ...;
};

struct kvm_msr_entry {
    __u32 index;
    __u64 data;
    ...;
};

struct kvm_msrs {
    __u32 nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
    ...;
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    ...;
};

struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_xsave {
    __u32 region[1024];
    __u32 extra[];
    ...;
};

struct kvm_xcr {
    __u32 xcr;
    __u64 value;
    ...;
};

struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[...];
    ...;
};

struct kvm_lapic_state {
    char regs[...];
};

struct kvm_mp_state {
    __u32 mp_state;
};

struct kvm_debugregs {
    __u64 db[4];
    __u64 dr6;
    __u64 dr7;
    __u64 flags;
    ...;
};

struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    __u64 realtime;
    __u64 host_tsc;
    ...;
};

struct kvm_pit_config {
    __u32 flags;
    ...;
};

struct kvm_irq_level {
    __u32 irq;
    __u32 level;
    ...;
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    ...;
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    ...;
};

struct kvm_dirty_log {
    __u32 slot;
    void *dirty_bitmap;
    ...;
};

struct kvm_pit_channel_state {
    __u32 count;
    __u8 mode;
    __s64 count_load_time;
    ...;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    __u32 flags;
    ...;
};

/* Saved and restored whole; a crash report reads the pending and injected events. */
struct kvm_vcpu_events {
    struct {
        __u8 injected;
        __u8 nr;
        __u8 has_error_code;
        __u8 pending;
        __u32 error_code;
    } exception;
    struct {
        __u8 injected;
        __u8 nr;
        __u8 soft;
        __u8 shadow;
    } interrupt;
    struct {
        __u8 injected;
        __u8 pending;
        __u8 masked;
        __u8 pad;
    } nmi;
    __u32 sipi_vector;
    __u32 flags;
    ...;
};
struct kvm_irqchip {
    __u32 chip_id;
    ...;
};

/* The members of kvm_run's exit union that the VMM handles. They are anonymous structs in the
   header; SOURCE names them with __typeof__ so the compiler checks these layouts too. */
typedef struct {
    __u64 hardware_exit_reason;
} kvm_exit_hw;
typedef struct {
    __u64 hardware_entry_failure_reason;
    __u32 cpu;
    ...;
} kvm_exit_fail_entry;
typedef struct {
    __u8 direction;
    __u8 size;
    __u16 port;
    __u32 count;
    __u64 data_offset;
} kvm_exit_io;
typedef struct {
    __u64 phys_addr;
    __u8 data[8];
    __u32 len;
    __u8 is_write;
    ...;
} kvm_exit_mmio;
typedef struct {
    __u32 suberror;
    __u32 ndata;
    __u64 data[16];
} kvm_exit_internal;
typedef struct {
    __u32 type;
    __u32 ndata;
    __u64 data[16];
    ...;
} kvm_exit_system_event;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    kvm_exit_hw hw;
    kvm_exit_fail_entry fail_entry;
    kvm_exit_io io;
    kvm_exit_mmio mmio;
    kvm_exit_internal internal;
    kvm_exit_system_event system_event;
    ...;
};
"""

SOURCE = """
#include <errno.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

#define CUBE_EXIT(member) __typeof__(((struct kvm_run *)0)->member)
typedef CUBE_EXIT(hw) kvm_exit_hw;
typedef CUBE_EXIT(fail_entry) kvm_exit_fail_entry;
typedef CUBE_EXIT(io) kvm_exit_io;
typedef CUBE_EXIT(mmio) kvm_exit_mmio;
typedef CUBE_EXIT(internal) kvm_exit_internal;
typedef CUBE_EXIT(system_event) kvm_exit_system_event;

static long cube_ioctl(int fd, unsigned long request, void *arg)
{
    int ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

static long cube_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    int ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

static void cube_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("cube.vmm._kvm", SOURCE)
