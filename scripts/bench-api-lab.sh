#!/bin/bash
# `cube bench api` in the nested lab, where microVMs boot: run it with
#   cube lab run --timeout 3000 -- bash scripts/bench-api-lab.sh [cube bench api options]
# after the host has built the base template's root filesystem (`cube template build-defaults
# --rootfs-only`). Two daemons run in L1: `cube serve` with the VMM backend (measured) and with
# the process backend (the peer beside it, same machine, same run), and the bench runs beside
# them, so that idle density reads the MemAvailable of the machine the sandboxes live on.
# Data dirs are on L1's own disk, so pauses write there and not through 9p to the host.
# The VMM serve runs with sandbox networking, as users run it (a tap, filter and NAT per
# sandbox); L1 has no NIC of its own, so a dummy interface with a default route is its uplink.
set -euo pipefail
export PYTHONUNBUFFERED=1 # the tables reach the host as they are measured

work=/var/tmp/cube-bench
vmm=$work/vmm
process=$work/process
mkdir -p "$vmm" "$process"
pids=()
stop() {
    local status=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait
    [ "$status" = 0 ] || tail -n 80 "$vmm/serve.log" "$process/serve.log" 2>/dev/null || true
}
trap stop EXIT

# The lab is a 2-vCPU TCG guest: the shape the lab tests use, not the default 2 vCPUs / 1 GiB.
started=$SECONDS
CUBE_DATA_DIR=$vmm python3 -m cube template build base --cpus 1 --memory 512
echo "template base (1 vCPU, 512 MiB): boot + snapshot $((SECONDS - started)) s"

if ! ip route show default | grep -q .; then
    ip link add labup0 type dummy # not "cube…": that is the taps' prefix
    ip addr add 192.0.2.1/24 dev labup0
    ip link set labup0 up
    ip route add default via 192.0.2.254
fi

key() { python3 -m cube apikey ensure --data-dir "$1" | tail -n 1; }
vmm_key=$(key "$vmm")
process_key=$(key "$process")

serve() { # DATA_DIR PORT [serve options]
    local data=$1 port=$2
    shift 2
    python3 -m cube serve --data-dir "$data" --listen "127.0.0.1:$port" "$@" >"$data/serve.log" 2>&1 &
    pids+=($!)
}
serve "$vmm" 3000
serve "$process" 3001 --backend process
for i in 0 1; do
    until (exec 3<>"/dev/tcp/127.0.0.1/300$i") 2>/dev/null; do
        kill -0 "${pids[$i]}" || { echo "cube serve on port 300$i exited"; exit 1; }
        sleep 1
    done
done

python3 -m cube bench api --url http://127.0.0.1:3000 --key "$vmm_key" --label vmm \
    --data-dir "$vmm" --peer http://127.0.0.1:3001 --peer-key "$process_key" \
    --peer-label process --peer-data-dir "$process" "$@"

echo
python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:3000/metrics").read().decode())' |
    grep cube_vm_exits_total || echo "no cube_vm_exits_total in the VMM serve's /metrics"
