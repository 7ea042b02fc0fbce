#!/bin/bash
# PID 1 of the lab's L1 guest, installed in the image as /usr/local/sbin/cube-lab-init.
#
# The host runner (cube/lab/runner.py) shares a per-run folder as the 9p tag "labrun". It holds
#   shares      lines "TAG<TAB>PATH": more 9p shares to mount at PATH (the checkout, the cache)
#   command.sh  the command to run, with its environment and working directory
# This script sets L1 up, prints the ready marker on ttyS1, runs command.sh with its output on
# ttyS1 (which the host streams live), writes its status to exit-status and powers off. Its own
# messages go to the console (ttyS0, a log file on the host). A set-up failure powers off without
# writing exit-status, which the runner reports as a lab failure along with the console log.
# While the command runs, a watcher answers the runner's request for dumps (dump_when_asked).

RUN=/run/lab
OUT=/dev/ttyS1
READY_MARKER=CUBE-LAB-READY # runner.py's READY_MARKER
NINEP_OPTS=trans=virtio,version=9p2000.L,msize=262144

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 CUBE_LAB=1

# Through the kernel log, so the console shows our steps with the kernel's timestamps.
log() { echo "cube-lab-init: $*" >/dev/kmsg || echo "cube-lab-init: $*"; }

power_off() {
    sync
    echo o >/proc/sysrq-trigger
    # Power-off is asynchronous and PID 1 must not exit before it lands (the kernel would panic;
    # with panic=-1 and QEMU's -no-reboot that also ends the run, just less tidily).
    sleep 60
}

fail() {
    log "FAILED: $*"
    power_off
}

# Hang dumps. When the command runs past its timeout the runner creates dump-request in the run
# folder and waits a while for dump-done before it stops L1. Meanwhile every `cube serve` and
# pytest here dumps its threads (SIGUSR1: cube/dump.py, tests/lab/conftest.py), L1's kernel its
# CPUs' and blocked tasks' backtraces (to the console log), and serve's logs are copied into the
# run folder. The bracketed first letters keep each pattern from matching a command line that
# contains the pattern itself.
DUMP_REQUEST=dump-request DUMP_DONE=dump-done # runner.py's DUMP_REQUEST, DUMP_DONE
SERVE_PATTERN='(^|[ /])[c]ube serve( |$)'
PYTEST_PATTERN='(^|[ /])[p]y\.?test( |$)'
LOG_TAIL_BYTES=2000000

dump_when_asked() {
    until [ -e "$RUN/$DUMP_REQUEST" ]; do sleep 2; done
    log "dump requested"
    local serves pid
    # pgrep reads every process's command line, which waits on a process stuck holding its mmap
    # lock: a time limit, so that the kernel's part still comes out
    serves=$(timeout 5 pgrep -f "$SERVE_PATTERN")
    for pid in $serves $(timeout 5 pgrep -f "$PYTEST_PATTERN"); do
        catches_usr1 "$pid" && kill -USR1 "$pid"
    done
    echo 8 >/proc/sys/kernel/printk # every level to the console, for the backtraces
    echo l >/proc/sysrq-trigger
    echo w >/proc/sysrq-trigger
    sleep 5 # for the daemons' trio tasks to write their part, if their loops are alive
    copy_serve_logs $serves
    sync
    touch "$RUN/$DUMP_DONE"
    log "dumps written"
}

# Whether PID has a handler for SIGUSR1 (bit 9 of SigCgt): its default action ends a process,
# so one that would not dump (a serve still starting, a shell whose command line names serve)
# is left alone.
catches_usr1() {
    local caught
    caught=$(awk '/^SigCgt:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "$caught" ] && (((0x$caught >> 9) & 1))
}

copy_serve_logs() { # PID...: each serve's log (where its stderr goes) as serve-PID.log
    local pid file
    for pid in "$@"; do
        file=$(readlink "/proc/$pid/fd/2") && [ -f "$file" ] || continue
        tail -c "$LOG_TAIL_BYTES" "$file" >"$RUN/serve-$pid.log"
    done
}

ensure_mount() { # TYPE SOURCE DIR [OPTIONS]
    mountpoint -q "$3" && return
    mkdir -p "$3" && mount -t "$1" ${4:+-o "$4"} "$2" "$3"
}

# The initramfs hands over /dev, /proc, /sys and /run already mounted; the rest is ours.
ensure_mount proc proc /proc
ensure_mount sysfs sys /sys
ensure_mount devtmpfs dev /dev
ensure_mount devpts devpts /dev/pts
ensure_mount tmpfs shm /dev/shm
ensure_mount tmpfs run /run
ensure_mount tmpfs tmp /tmp
hostname -F /etc/hostname

log "setting up L1"
modprobe kvm_amd || fail "modprobe kvm_amd"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd"

{ modprobe 9pnet_virtio && modprobe 9p; } || fail "modprobe 9p"
modprobe tun && [ -c /dev/net/tun ] || fail "no /dev/net/tun after loading tun (sandbox taps)"
ensure_mount 9p labrun "$RUN" "$NINEP_OPTS" || fail "mount the run folder"
# Shares are read mostly; loose caching makes Python's many stats and reads much cheaper.
while IFS=$'\t' read -r tag path; do
    ensure_mount 9p "$tag" "$path" "$NINEP_OPTS,cache=loose" || fail "mount $tag at $path"
done <"$RUN/shares"

# User networking: the runner adds a NIC only when ports are forwarded; QEMU's slirp serves
# 10.0.2.0/24 with the host side at 10.0.2.2.
ip link set lo up || fail "bring up lo"
modprobe virtio_net
for dev in /sys/class/net/*; do
    nic=${dev##*/}
    [ "$nic" = lo ] && continue
    { ip addr add 10.0.2.15/24 dev "$nic" && ip link set "$nic" up &&
        ip route add default via 10.0.2.2; } || fail "configure $nic"
done

log "ready"
stty -F "$OUT" raw -echo || fail "set up $OUT"
echo "$READY_MARKER" >"$OUT"
dump_when_asked &
watcher=$!
bash "$RUN/command.sh" </dev/null >"$OUT" 2>&1
status=$?
kill "$watcher" 2>/dev/null # gone already if it answered a dump request
# stty sets the mode with TCSETSW, which first waits until all output has left the UART, so the
# command's last lines are not lost to the power-off.
stty -F "$OUT" raw -echo
echo "$status" >"$RUN/exit-status"
log "command exited with status $status"
power_off
