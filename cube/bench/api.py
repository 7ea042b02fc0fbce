"""`cube bench api`: a running `cube serve` measured as a client sees it.

Three tables, each with the same rows for a peer serve when one is given (`--peer`):

- create latency: `POST /v2/sandboxes` (the SDK's call) timed to its 201, the sandbox killed
  outside the timing. Creates run in rounds of `concurrency` at once, so at 1 they come from the
  warm pool when it keeps up, and at 50 they show a burst (the pool empties and restores run
  concurrently).
- pause and resume against dirty memory: one sandbox per size; a guest process (started with
  the E2B SDK's `commands.run`) writes that many MiB and stays alive, then `POST
  /sandboxes/{id}/pause` and `POST /v2/sandboxes/{id}/connect` (the SDK's resume) are timed,
  cycle after cycle. With the serve's data dir, the paused folder's allocated size is shown.
- idle sandboxes per GiB: the drop of the host's MemAvailable while K sandboxes sit idle, so
  the bench must run on the serve's machine (and other load there shows up in the figure).

Whatever backend the daemon runs is what is measured: compare figures only within one run.
The process backend (agents as host processes) is a useful reference for the API, proxy and
lifecycle costs around a sandbox, but it has no VM: its pause is SIGSTOP and keeps the memory,
so its pause/resume figures do not follow dirty memory, and its memory per sandbox is a host
Python process's, not a microVM's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from cube.bench.vmm import Latency
from cube.pool.records import SANDBOXES_DIR, RecordStore

SANDBOX_TIMEOUT_S = 900  # outlives any one measurement, so nothing expires midway
REQUEST_TIMEOUT_S = 600.0  # nested labs are slow
GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    """One running `cube serve`: the one measured, or the peer measured beside it."""

    label: str
    url: str
    key: str
    data_dir: Path | None = None  # its data dir, to size paused sandboxes (same machine only)

    def client(self, connections: int = 4) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"X-API-Key": self.key},
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=connections),
        )


@dataclass(frozen=True)
class Plan:
    template: str
    creates: int
    concurrency: list[int]
    dirty_mib: list[int]
    cycles: int
    idle: int
    settle_s: float


class BenchError(RuntimeError):
    """A call the measurement depends on failed; the message has the daemon's answer."""


async def _create(client: httpx.AsyncClient, template: str) -> str:
    answer = await client.post(
        "/v2/sandboxes", json={"templateID": template, "timeout": SANDBOX_TIMEOUT_S}
    )
    if answer.status_code != 201:
        raise BenchError(f"create: {answer.status_code} {answer.text[:200]}")
    return str(answer.json()["sandboxID"])


# Create latency.


async def _create_and_kill(
    client: httpx.AsyncClient, template: str, samples: list[float], errors: list[str]
) -> None:
    """A failure is counted, not raised: under a burst some creates may fail and the rest
    still make the figure."""
    started = time.perf_counter()
    try:
        sandbox_id = await _create(client, template)
        samples.append((time.perf_counter() - started) * 1e3)
        await client.delete(f"/sandboxes/{sandbox_id}")
    except (BenchError, httpx.HTTPError) as exc:
        errors.append(str(exc) or type(exc).__name__)


async def _create_latency(target: Target, plan: Plan, concurrency: int) -> str:
    samples: list[float] = []
    errors: list[str] = []
    async with target.client(concurrency * 2) as client:
        started = time.perf_counter()
        for first in range(0, plan.creates, concurrency):
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, plan.creates - first)):
                    nursery.start_soon(_create_and_kill, client, plan.template, samples, errors)
        wall = time.perf_counter() - started
    name = f"{target.label}, concurrency {concurrency}"
    if not samples:
        return f"{name:<34} every create failed, e.g. {errors[:1]}"
    failed = f", {len(errors)} failed (e.g. {errors[0]})" if errors else ""
    rate = len(samples) / wall
    return f"{Latency(samples).row(name)}   {rate:.1f} creates/s (incl. kills){failed}"


# Pause and resume against dirty memory.


def _dirty(target: Target, sandbox_id: str, mib: int) -> None:
    """Through the E2B SDK, as a user would: a guest process writes `mib` MiB and sleeps."""
    from e2b import Sandbox  # the SDK comes with the test extra, like httpx

    sandbox = Sandbox.connect(
        sandbox_id,
        api_key=target.key,
        api_url=target.url,
        sandbox_url=target.url,
        request_timeout=REQUEST_TIMEOUT_S,
    )
    ready = f"/tmp/cube-bench-dirty-{sandbox_id}"  # the process backend's /tmp is the host's
    hold = (
        f"import time; b = bytearray(b'x') * ({mib} << 20); "
        f"open('{ready}', 'w').close(); time.sleep(1e6)"
    )
    sandbox.commands.run(f'python3 -c "{hold}"', background=True).disconnect()  # it stays up
    sandbox.commands.run(
        f"until [ -e {ready} ]; do sleep 0.1; done; rm {ready}", timeout=REQUEST_TIMEOUT_S
    )


def _allocated_bytes(folder: Path) -> int:
    """What the files under `folder` take on disk (snapshot memory files are sparse)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


async def _timed(client: httpx.AsyncClient, path: str, expect: int) -> float:
    started = time.perf_counter()
    answer = await client.post(path, json={})
    elapsed = (time.perf_counter() - started) * 1e3
    if answer.status_code != expect:
        raise BenchError(f"{path}: {answer.status_code} {answer.text[:200]}")
    return elapsed


async def _pause_resume(target: Target, plan: Plan, mib: int) -> str:
    pause_ms: list[float] = []
    resume_ms: list[float] = []
    sizes: list[int] = []
    paused = RecordStore(target.data_dir / SANDBOXES_DIR) if target.data_dir else None
    async with target.client() as client:
        sandbox_id = await _create(client, plan.template)
        try:
            if mib:
                await trio.to_thread.run_sync(_dirty, target, sandbox_id, mib)
            for _ in range(plan.cycles):
                pause_ms.append(await _timed(client, f"/sandboxes/{sandbox_id}/pause", 204))
                if paused is not None:
                    folder = paused.pause_folder(sandbox_id)
                    sizes.append(await trio.to_thread.run_sync(_allocated_bytes, folder))
                resume_ms.append(await _timed(client, f"/v2/sandboxes/{sandbox_id}/connect", 201))
        finally:
            await client.delete(f"/sandboxes/{sandbox_id}")
    pause, resume = Latency(pause_ms), Latency(resume_ms)
    size = f"{max(sizes) / (1 << 20):10.1f}" if sizes else f"{'-':>10}"
    return (
        f"{f'{target.label}, dirty {mib} MiB':<34} {pause.pct(50):8.1f} {pause.pct(95):8.1f} "
        f"{resume.pct(50):8.1f} {resume.pct(95):8.1f} {size}   n={plan.cycles}"
    )


# Idle sandboxes per GiB.


def _mem_available() -> int:
    """The host's MemAvailable in bytes (/proc/meminfo)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("no MemAvailable in /proc/meminfo")


async def _idle_density(target: Target, plan: Plan) -> str:
    """Creates one at a time: density does not depend on create speed, and a burst can outlast
    the agent's answer timeout in a slow nested lab."""
    ids: list[str] = []
    async with target.client() as client:
        before = _mem_available()
        try:
            for _ in range(plan.idle):
                ids.append(await _create(client, plan.template))
            await trio.sleep(plan.settle_s)
            used = before - _mem_available()
        finally:
            for sandbox_id in ids:
                await client.delete(f"/sandboxes/{sandbox_id}")
    per_sandbox = used / len(ids)
    per_gib = GiB / per_sandbox if per_sandbox > 0 else float("inf")
    return (
        f"{target.label:<34} {len(ids):8d} {used / (1 << 20):10.0f} "
        f"{per_sandbox / (1 << 20):12.1f} {per_gib:14.1f}"
    )


# Tables.


def _peer_note(targets: list[Target]) -> str:
    if len(targets) < 2:
        return "peer: none in this run"
    return f"peer: {targets[1].label} at {targets[1].url}, measured in the same run"


def run(targets: list[Target], plan: Plan) -> Iterator[str]:
    """The report's lines, each yielded as soon as it is measured; raises BenchError (or
    httpx.HTTPError) when a call the measurement needs fails."""
    yield f"cube bench api: {targets[0].label} at {targets[0].url}, template {plan.template}"
    yield _peer_note(targets)
    yield ""
    yield f"{'create latency (ms)':<34} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}"
    for target in targets:
        for concurrency in plan.concurrency:
            yield trio.run(_create_latency, target, plan, concurrency)
    if plan.dirty_mib:
        yield ""
        yield (
            f"{'pause / resume (ms)':<34} {'pause50':>8} {'pause95':>8} {'resume50':>8} "
            f"{'resume95':>8} {'paused MiB':>10}"
        )
        for target in targets:
            for mib in plan.dirty_mib:
                yield trio.run(_pause_resume, target, plan, mib)
    if plan.idle:
        yield ""
        yield (
            f"{f'idle, after {plan.settle_s:g} s (this host)':<34} {'count':>8} "
            f"{'MiB used':>10} {'MiB/sandbox':>12} {'sandboxes/GiB':>14}"
        )
        for target in targets:
            yield trio.run(_idle_density, target, plan)
