#!/usr/bin/env bash
# Builds the Cube guest kernel: build.sh OUTDIR  ->  OUTDIR/vmlinux, OUTDIR/config
#
# Source is Debian's linux-source-6.12 tarball; configuration is `make tinyconfig` plus
# config.fragment (beside this script). Kconfig silently drops options whose dependencies are
# unmet, so after merging we check that every line of the fragment holds in the final .config and
# fail with the list of those that do not. The source tree lives in a scratch folder that is
# removed on exit, success or not. Output is kept short (it streams into terminals and CI logs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/config.fragment"
tarball=/usr/src/linux-source-6.12.tar.xz

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
outdir=$(cd "$1" && pwd)

if [[ ! -f $tarball ]]; then
  echo "guest-kernel: $tarball not found (apt-get install linux-source-6.12)" >&2
  exit 1
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/cube-kernel.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

start=$SECONDS
step() { printf 'guest-kernel: [%4ds] %s\n' $((SECONDS - start)) "$*"; }

step "extracting $(basename "$tarball")"
tar -xJf "$tarball" -C "$scratch"
src=$(find "$scratch" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
[[ -n $src ]] || { echo "guest-kernel: no linux-source-* folder in $tarball" >&2; exit 1; }
cd "$src"

step "configuring: tinyconfig + $(basename "$fragment")"
log="$scratch/config.log"
if ! { make -s tinyconfig &&
  scripts/kconfig/merge_config.sh -m .config "$fragment" &&
  make -s olddefconfig; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "guest-kernel: configuration failed" >&2
  exit 1
fi

# Every `CONFIG_X=value` line must appear verbatim; every `# CONFIG_X is not set` must not have
# become =y or =m (absent counts as not set).
missing=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF -- "$line" .config || missing+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" .config || echo absent))")
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    if grep -qE "^${BASH_REMATCH[1]}=[ym]$" .config; then
      missing+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" .config))")
    fi
  fi
done <"$fragment"
if ((${#missing[@]})); then
  echo "guest-kernel: these fragment options did not survive Kconfig (unmet dependencies?):" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

step "building vmlinux with $(nproc) jobs"
make -s -j"$(nproc)" vmlinux

cp vmlinux "$outdir/vmlinux"
cp .config "$outdir/config"
step "done: $outdir/vmlinux ($(($(stat -c %s vmlinux) >> 20)) MiB)"
