"""`cube serve`: the daemon. Wires the backend, templates, warm pool, lifecycle, API keys and
the ASGI app together in one trio process and serves them with Hypercorn on one port.

With the VMM backend and networking on (the default), the daemon also owns the host side of
every sandbox's network (cube/net): it reconciles what a crashed predecessor left, installs
NAT, keeps a pool of taps, and removes its nft table on the way out. That needs root
(CAP_NET_ADMIN and CAP_BPF); `[network] enabled = false` runs without, and sandboxes then have
no network at all, never an unfiltered one.

Shutdown (SIGTERM or SIGINT) is graceful: Hypercorn stops accepting and lets requests finish
(up to its graceful timeout), then every running sandbox is paused or killed as configured, so
that the records on disk are final; the warm pool's spare sandboxes are freed last.

SIGUSR1 dumps every thread's stack and the trio task tree to stderr (the log) and changes
nothing else (cube.dump): what a hung daemon is doing, asked without stopping it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated

import hypercorn.config
import hypercorn.trio
import msgspec
import trio
import typer
from pyroute2.netlink.exceptions import NetlinkError

from cube import data_lock, logjson, paths
from cube.api.app import CubeApp
from cube.api.context import ApiContext
from cube.api.prom import DaemonMetrics
from cube.apikeys import ApiKeyStore
from cube.config import Config, load
from cube.dump import dump_on_signal
from cube.net.manager import NetworkManager
from cube.pool.backend import Backend, Image
from cube.pool.catalog import Catalog, ChainCatalog, MemoryCatalog, TemplateInfo
from cube.pool.process_backend import ProcessBackend, ProcessTemplate, write_template
from cube.pool.records import PAUSED_DIR, SANDBOXES_DIR, RecordStore
from cube.pool.sandboxes import Sandboxes, Settings
from cube.pool.snapshots import IMAGE_DIR, SNAPSHOTS_DIR, SnapshotStore
from cube.pool.template import TemplateStore
from cube.pool.vmm_backend import VmmBackend
from cube.pool.warm import WarmPool
from cube.vmm.snapshot import SnapshotError, read_state

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("base", "code-interpreter-v1")  # the names the SDKs default to
FALLBACK_ENVD_VERSION = "0.1.0"  # used only if an agent does not report its version


def data_dir_of(config: Config) -> Path:
    return Path(config.data_dir) if config.data_dir else paths.data_dir()


def process_catalog(config: Config) -> MemoryCatalog:
    """The stand-in backend's templates: the SDK's default names, with the code interpreter
    running next to the agent in ``code-interpreter-v1`` (there is no image to build: the agent
    runs on the host)."""
    root = data_dir_of(config) / "process-backend" / "templates"
    infos = []
    for name in DEFAULT_TEMPLATES:
        write_template(root / name, ProcessTemplate(interpreter=name != "base"))
        image = Image(
            template_id=name,
            resources=config.sandbox.resources(),
            folder=root / name,
            envd_version=FALLBACK_ENVD_VERSION,
        )
        infos.append(TemplateInfo(template_id=name, alias=name, image=image))
    return MemoryCatalog(infos)


async def run_daemon(
    config: Config,
    backend: Backend,
    catalog: Catalog,
    *,
    network: NetworkManager | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns; reports the bound addresses when listening."""
    data = data_dir_of(config)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    snapshots = SnapshotStore(data / SNAPSHOTS_DIR)
    templates = ChainCatalog(catalog, snapshots)
    pool = WarmPool(backend, config.pool)
    settings = Settings(
        default_timeout=config.sandbox.default_timeout,
        max_timeout=config.sandbox.max_timeout,
        on_shutdown=config.on_shutdown,
    )
    keys = ApiKeyStore(data)
    if not any(not k.revoked for k in keys.records()):
        log.warning("no API keys yet: every request will get 401; run `cube apikey create`")
    records = RecordStore(data / SANDBOXES_DIR)
    sandboxes = Sandboxes(backend, templates, snapshots, pool, records, settings, network)
    ctx = ApiContext(
        sandboxes=sandboxes,
        backend=backend,
        keys=keys,
        metrics=DaemonMetrics(sandboxes, pool, _vm_exits_of(backend)),
        domain=config.domain,
        max_sandboxes_per_key=config.limits.max_sandboxes_per_key,
        max_body_bytes=config.limits.max_body_bytes,
    )
    http = hypercorn.config.Config()
    http.bind = [config.listen]
    http.accesslog = None
    http.errorlog = logging.getLogger("hypercorn.error")  # through our handlers, once
    http.graceful_timeout = config.graceful_timeout
    app = CubeApp(ctx)

    async with trio.open_nursery() as nursery:
        await nursery.start(sandboxes.run)
        nursery.start_soon(pool.run, templates)

        async def serve_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn.trio.serve(
                app, http, shutdown_trigger=shutdown_trigger, task_status=task_status
            )
            log.info("stopped accepting; settling running sandboxes")
            with trio.CancelScope(shield=True):
                await sandboxes.shutdown()
            nursery.cancel_scope.cancel()

        binds = await nursery.start(serve_then_stop)
        log.info("listening", extra={"binds": ",".join(binds)})
        task_status.started(binds)


def _vm_exits_of(backend: Backend) -> Callable[[], Mapping[str, int]] | None:
    """Only the VMM backend runs VMs, so only it has exits to export."""
    return backend.vm_exits if isinstance(backend, VmmBackend) else None


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            return


def _network(config: Config) -> NetworkManager | None:
    """The sandbox network, started (reconciled, NAT installed), or None when it is off."""
    if config.backend != "vmm" or not config.network.enabled:
        return None
    try:
        network = NetworkManager(config.network)
        network.start()
    except (OSError, RuntimeError, NetlinkError) as exc:  # NetworkError, NatError, BuildError
        raise SystemExit(
            f"cube serve: cannot set up sandbox networking: {exc}\n"
            "It needs root (CAP_NET_ADMIN, CAP_BPF) and nftables; or set [network] "
            "enabled = false in the config file to run sandboxes without a network."
        ) from exc
    return network


def _backend(
    config: Config, network: NetworkManager | None
) -> tuple[ProcessBackend | VmmBackend, Catalog]:
    """`vmm` (the product: microVMs restored from the template store's snapshots) or
    `process` (the stand-in for development: agents as host processes, no isolation)."""
    data = data_dir_of(config)
    if config.backend == "vmm":
        return VmmBackend(data / "vms", network), TemplateStore(data / "templates")
    return ProcessBackend(data / "process-backend" / "sandboxes"), process_catalog(config)


def _prune_template_builds(data: Path, store: TemplateStore) -> None:
    """Delete template builds that nothing needs any more. Runs before any sandbox does, so
    only paused sandboxes and sandbox snapshots can need an old build (as their parent). Their
    folders are found on disk, not through their records: a record that cannot be read must
    not cost its sandbox the parent it needs."""
    folders = [
        *(data / SANDBOXES_DIR).glob(f"*/{PAUSED_DIR}"),
        *(data / SNAPSHOTS_DIR).glob(f"*/{IMAGE_DIR}"),
    ]
    needed = set()
    for folder in folders:
        try:
            parent = read_state(folder).parent
        except SnapshotError:
            continue  # unreadable: it will fail on resume whatever we keep
        if parent:
            needed.add(Path(parent))
    for build in store.prune(needed):
        log.info("removed an old template build", extra={"build": str(build)})


async def _serve(config: Config) -> None:
    network = _network(config)
    backend, catalog = _backend(config, network)
    if isinstance(catalog, TemplateStore):
        _prune_template_builds(data_dir_of(config), catalog)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dump_on_signal)
            if network is not None:
                await nursery.start(network.maintain)
            await nursery.start(backend.run)
            await run_daemon(
                config, backend, catalog, network=network, shutdown_trigger=_until_signal
            )
            nursery.cancel_scope.cancel()
    finally:
        if network is not None:
            network.close()


def serve_command(
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML settings.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State: keys, sandboxes.")] = None,
    listen: Annotated[str | None, typer.Option(help="host:port (default 127.0.0.1:3000).")] = None,
    backend: Annotated[str | None, typer.Option(help="vmm (default) or process.")] = None,
    pool: Annotated[list[str] | None, typer.Option(help="TEMPLATE=N warm (repeatable).")] = None,
    on_shutdown: Annotated[str | None, typer.Option(help="pause or kill.")] = None,
) -> None:
    """Serve the E2B API and sandbox traffic on one port."""
    config = load(config_file)
    overrides: dict[str, object] = {
        "data_dir": str(data_dir) if data_dir else None,
        "listen": listen,
        "backend": backend,
        "on_shutdown": on_shutdown,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    if pool:
        sizes = dict(config.pool)
        for item in pool:
            name, _, size = item.partition("=")
            if not size.isdigit():
                raise typer.BadParameter(f"expected TEMPLATE=N, got {item!r}", param_hint="--pool")
            sizes[name] = int(size)
        changes["pool"] = sizes
    config = msgspec.convert({**msgspec.to_builtins(config), **changes}, Config)
    logjson.setup()
    try:
        with data_lock.exclusive(data_dir_of(config)):
            trio.run(_serve, config)
    except data_lock.DataDirBusy as exc:
        raise SystemExit(f"cube serve: {exc}") from None
