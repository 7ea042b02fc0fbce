"""PID 1 of every sandbox guest: mount the kernel filesystems, start Cube's services, keep them up.

It runs with the rootfs's own Python (Debian's python3.11, or the OCI image's) before anything
else exists, so it imports only the standard library: no msgspec, no trio. What to start is not
decided here but read from CONFIG_PATH, which the template builder writes (`InitConfig.dump`):
the agent always, the code interpreter when the template has it, the template's start command.

Duties, in order: mount /proc, /sys, /dev (devtmpfs, normally mounted by the kernel already),
/dev/pts, /dev/shm, /tmp, /run and cgroup2; set the hostname; bring up loopback (the agent and
the interpreter listen on 127.0.0.1); start every service with a login-like environment; then
loop forever reaping children (PID 1 inherits every orphan), restarting dead services with
exponential backoff, and running the readiness probe until it first succeeds, at which point
READY_MARKER goes to the console for the template builder. SIGTERM, SIGINT (Ctrl-Alt-Del) or
SIGPWR power the guest off: services get SIGTERM, then everything SIGKILL, then sync and
reboot(2), which the VMM turns into the VM's exit (`reboot=k`: the i8042 reset line).

The root filesystem is mounted read-write by the kernel (`root=/dev/vda rw`): the VMM shows the
guest one writable disk whose writes land in a per-sandbox copy-on-write overlay, so the shared
base image is never touched and init has nothing to remount.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import pwd
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

CONFIG_PATH = "/etc/cube/init.json"
READY_MARKER = "cube-init: template ready"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BACKOFF_FIRST = 0.5  # seconds before the first restart of a service that died
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a service that ran this long gets its backoff reset
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 30.0
SHUTDOWN_GRACE = 5.0

# (source, target, fstype, flags, data); flags are MS_NOSUID|MS_NODEV|MS_NOEXEC combinations.
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MOUNTS = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
)
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP, IFF_RUNNING = 0x1, 0x40
RB_AUTOBOOT = 0x01234567  # with reboot=k on the command line, the VMM sees a reset and stops
RB_DISABLE_CAD = 0  # Ctrl-Alt-Del then sends SIGINT to init instead of rebooting at once
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGPWR)


@dataclass(frozen=True)
class Service:
    """A long-running process init keeps alive. `user` None runs it as root."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: str = "/"


@dataclass(frozen=True)
class InitConfig:
    """What the template builder tells init; written as JSON at CONFIG_PATH in the rootfs."""

    hostname: str = "cube"
    env: dict[str, str] = field(default_factory=dict)  # the template's env, under every service
    services: list[Service] = field(default_factory=list)
    ready_cmd: str | None = None
    ready_user: str | None = None
    ready_cwd: str = "/"

    def dump(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, text: str) -> InitConfig:
        """Parse CONFIG_PATH's text; ValueError (with the reason) for anything malformed."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("the top level is not an object")
            services = [Service(**s) for s in raw.pop("services", [])]
            config = cls(services=services, **raw)
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"bad init config: {error}") from None
        names = [s.name for s in config.services]
        if len(set(names)) != len(names):
            raise ValueError(f"bad init config: duplicate service names in {names}")
        if any(not s.argv for s in config.services):
            raise ValueError("bad init config: a service has an empty argv")
        return config


def log(message: str) -> None:
    """One line on the console (init's stdout is /dev/console)."""
    with contextlib.suppress(OSError):
        sys.stdout.write(f"cube-init: {message}\n")
        sys.stdout.flush()


def backoff(failures: int) -> float:
    """Seconds to wait before restarting a service that has died `failures` times in a row."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


def user_env(base: dict[str, str], entry: pwd.struct_passwd | None) -> dict[str, str]:
    """The environment of a process run as `entry` (None: root without a passwd entry)."""
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **base}
    name, home = (entry.pw_name, entry.pw_dir) if entry else ("root", "/root")
    env.update(USER=name, LOGNAME=name, HOME=home)
    return env


def service_env(config: InitConfig, service: Service, entry: pwd.struct_passwd | None) -> dict:
    return {**user_env(config.env, entry), **service.env}


# Effects on the running guest below: not unit tested, exercised by the lab's template boot.


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_all() -> None:
    """Mount what the kernel does not; one failure is logged and the rest still happen."""
    libc = _libc()
    for source, target, fstype, flags, data in MOUNTS:
        if os.path.ismount(target):
            continue
        if fstype == "cgroup2" and "cgroup2" not in _read("/proc/filesystems"):
            continue
        with contextlib.suppress(OSError):
            os.makedirs(target, exist_ok=True)
        if libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()):
            log(f"mount {fstype} on {target} failed: {os.strerror(ctypes.get_errno())}")
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/ptmx", "pts/ptmx")):
        if not os.path.lexists(link):
            with contextlib.suppress(OSError):
                os.symlink(target, link)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def loopback_up() -> None:
    """`ip link set lo up` without iproute2: SIOCSIFFLAGS on a throwaway socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP | IFF_RUNNING))


def lookup(user: str | None) -> pwd.struct_passwd | None:
    if user is None:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return pwd.getpwuid(int(user)) if user.isdigit() else None


class Supervisor:
    """Keeps the services running; the one loop PID 1 lives in."""

    def __init__(self, config: InitConfig) -> None:
        self.config = config
        # Popen objects are kept until reaped (and get their returncode from reap): one dropped
        # while its process runs joins subprocess's list of zombies to collect, and the next
        # Popen would reap it behind our back.
        self.running: dict[int, tuple[Service, subprocess.Popen[bytes]]] = {}
        self.started_at: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.due: dict[str, float] = {s.name: 0.0 for s in config.services}
        self.probe: subprocess.Popen[bytes] | None = None
        self.probe_started = 0.0
        self.ready = config.ready_cmd is None

    def spawn(self, service: Service) -> None:
        entry = lookup(service.user)
        if service.user is not None and entry is None:  # never fall back to root
            log(f"cannot start {service.name}: no user {service.user!r}")
            self._died(service, time.monotonic())
            return
        try:
            child = subprocess.Popen(
                service.argv,
                env=service_env(self.config, service, entry),
                cwd=service.cwd if os.path.isdir(service.cwd) else "/",
                user=entry.pw_uid if entry else None,
                group=entry.pw_gid if entry else None,
                extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid) if entry else None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as error:
            log(f"cannot start {service.name}: {error}")
            self._died(service, time.monotonic())
            return
        self.running[child.pid] = (service, child)
        self.started_at[service.name] = time.monotonic()
        log(f"started {service.name} (pid {child.pid})")

    def _died(self, service: Service, now: float) -> None:
        if now - self.started_at.get(service.name, now) >= STABLE_AFTER:
            self.failures[service.name] = 0
        self.failures[service.name] = self.failures.get(service.name, 0) + 1
        delay = backoff(self.failures[service.name])
        self.due[service.name] = now + delay
        log(f"{service.name} will restart in {delay:.1f} s")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.probe is not None and pid == self.probe.pid:
                self.probe.returncode = os.waitstatus_to_exitcode(status)
                continue
            entry = self.running.pop(pid, None)
            if entry is not None:
                service, child = entry
                child.returncode = os.waitstatus_to_exitcode(status)
                log(f"{service.name} exited ({child.returncode})")
                self._died(service, time.monotonic())

    def start_due(self) -> None:
        now = time.monotonic()
        by_name = {s.name: s for s in self.config.services}
        for name, when in list(self.due.items()):
            if when <= now:
                del self.due[name]
                self.spawn(by_name[name])

    def check_probe(self) -> None:
        """Run the readiness probe until it succeeds once, then announce readiness."""
        if self.ready:
            return
        now = time.monotonic()
        if self.probe is not None:
            if self.probe.returncode is None and now - self.probe_started < PROBE_TIMEOUT:
                return
            if self.probe.returncode == 0:
                self.ready = True
                log("readiness probe passed")
                print(READY_MARKER, flush=True)
                return
            if self.probe.returncode is None:
                with contextlib.suppress(OSError):
                    os.killpg(self.probe.pid, signal.SIGKILL)
                return
            if now - self.probe_started < PROBE_INTERVAL:
                return
        entry = lookup(self.config.ready_user)
        if self.config.ready_user is not None and entry is None:
            log(f"readiness probe never runs: no user {self.config.ready_user!r}")
            self.ready = True  # not ready, but nothing more to try: stop the retries
            return
        self.probe_started = now
        self.probe = subprocess.Popen(
            ["/bin/sh", "-c", self.config.ready_cmd or "true"],
            env=user_env(self.config.env, entry),
            cwd=self.config.ready_cwd if os.path.isdir(self.config.ready_cwd) else "/",
            user=entry.pw_uid if entry else None,
            group=entry.pw_gid if entry else None,
            stdin=subprocess.DEVNULL,
            # failures are expected until the service is up; their output would flood the console
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def next_wakeup(self) -> float:
        now = time.monotonic()
        waits = [when - now for when in self.due.values()]
        if not self.ready:
            waits.append(PROBE_INTERVAL)
        return max(0.05, min(waits, default=60.0))

    def run(self) -> None:
        """Supervise until a shutdown signal arrives.

        Signals are caught, not blocked: children inherit a blocked mask across exec, and the
        agent's processes must stay killable. The handlers do nothing; the wake-up fd carries
        the signal numbers to the select() this loop sleeps in.
        """
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGCHLD, *SHUTDOWN_SIGNALS):
            signal.signal(signum, lambda *_: None)
        self.start_due()
        if self.ready:
            print(READY_MARKER, flush=True)
        while True:
            self.check_probe()
            select.select([wake_r], [], [], self.next_wakeup())
            with contextlib.suppress(BlockingIOError):
                if any(n in SHUTDOWN_SIGNALS for n in os.read(wake_r, 256)):
                    return
            self.reap()
            self.start_due()


def power_off() -> None:
    """Stop every process, flush the disk and end the VM."""
    log("powering off")
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.05)
        except ChildProcessError:
            break
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)
    os.sync()
    _libc().reboot(RB_AUTOBOOT)


def main() -> None:
    if os.getpid() != 1:
        sys.exit("cube-init must run as PID 1 (the kernel's init=)")
    os.environ.clear()
    os.environ.update(PATH=DEFAULT_PATH, HOME="/root", LANG="C.UTF-8")
    mount_all()
    _libc().reboot(RB_DISABLE_CAD)
    try:
        with open(CONFIG_PATH) as f:
            config = InitConfig.load(f.read())
    except (OSError, ValueError) as error:
        log(f"{CONFIG_PATH}: {error}; starting no services")
        config = InitConfig()
    try:
        socket.sethostname(config.hostname)
        loopback_up()
    except OSError as error:
        log(f"network set-up failed: {error}")
    os.makedirs("/run/cube", mode=0o700, exist_ok=True)
    try:
        Supervisor(config).run()
    except BaseException as error:  # PID 1 must never exit: that panics the kernel
        log(f"supervisor failed: {error!r}")
    power_off()


if __name__ == "__main__":
    main()
