#!/usr/bin/env bash
# Installs the Debian packages Cube needs to build and test, skipping apt entirely when all are
# present (a warm machine re-runs this in well under a second).
set -euo pipefail

packages=(
  # Python venv and headers for the cffi KVM bindings (the host python may be Debian's)
  python3 python3-venv python3-dev build-essential
  # guest kernel: Debian's 6.12 source and what its build needs
  linux-source-6.12 flex bison bc libelf-dev libssl-dev cpio xz-utils
  # the nested lab and template images
  qemu-system-x86 qemu-utils debootstrap e2fsprogs
  # eBPF egress filter and sandbox networking
  clang llvm libbpf-dev bpftool iproute2 nftables
  # `sysctl` (the net tests and benches set it inside namespaces) and `zstd` (cube/lab/image.py
  # unpacks zstd-compressed kernels; OCI layers): procps is in a default Debian 12 or 13 install
  # (priority important), but a minimal root (debootstrap minbase, a container) has neither
  procps zstd
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: need root for apt-get (run: sudo $0)" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
