"""A small cffi (ABI mode) binding to Debian's libbpf.so.1: just what the egress loader uses.

ABI mode needs no compiler at run time. The two option structs are declared with their padding
spelled out because the 1.1 headers end them with `size_t :0`, which cffi cannot express; their
sizes (24 and 32 bytes) were checked against the 1.1.2 headers (docs/ebpf-here.md §4).
libbpf 1.x returns -errno from int functions and NULL with errno set from constructors; `check`
and `check_ptr` turn both into OSError.
"""

from __future__ import annotations

import errno
import os
from functools import cache
from typing import Any

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct bpf_object; struct bpf_program; struct bpf_map; struct ring_buffer;
    struct bpf_tc_hook { size_t sz; int ifindex; int attach_point; uint32_t parent;
                         uint32_t _pad; };
    struct bpf_tc_opts { size_t sz; int prog_fd; uint32_t flags, prog_id, handle, priority;
                         uint32_t _pad; };
    typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
    typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *args);

    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
    struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                         const char *name);
    int bpf_map__fd(const struct bpf_map *map);
    int bpf_program__fd(const struct bpf_program *prog);
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
    int bpf_tc_hook_create(struct bpf_tc_hook *hook);
    int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
    int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
    struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                         const void *opts);
    int ring_buffer__consume(struct ring_buffer *rb);
    void ring_buffer__free(struct ring_buffer *rb);
    int libbpf_num_possible_cpus(void);
    """
)

BPF_TCX_INGRESS = 46  # newer than the 6.1 UAPI headers Debian ships; kernel >= 6.6
BPF_TC_INGRESS = 1
BPF_ANY = 0


@cache
def lib() -> Any:
    """The loaded library, with libbpf's own stderr chatter silenced (errors come back as codes)."""
    library = ffi.dlopen("libbpf.so.1")
    library.libbpf_set_print(ffi.NULL)
    return library


def check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def check_ptr(ptr: Any, what: str) -> Any:
    if ptr == ffi.NULL:
        code = ffi.errno or errno.EINVAL
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ptr
