"""`cube bench api`: create latency through a running `cube serve`, as a client sees it.

Each create is `POST /v2/sandboxes` (the SDK's call) timed to its 201; the sandbox is then
killed outside the timing. Creates run in rounds of `concurrency` at once, so at 1 they come
from the warm pool when it keeps up, and at 50 they show how creation behaves under a burst
(the pool empties and restores run concurrently). Whatever backend the daemon runs is what is
measured: compare figures only within one run or against a peer measured beside it.
"""

from __future__ import annotations

import time

import httpx
import trio

from cube.bench.vmm import Latency


async def _create_and_kill(
    client: httpx.AsyncClient, template: str, samples: list[float], errors: list[str]
) -> None:
    started = time.perf_counter()
    answer = await client.post("/v2/sandboxes", json={"templateID": template, "timeout": 300})
    elapsed = time.perf_counter() - started
    if answer.status_code != 201:
        errors.append(f"{answer.status_code} {answer.text[:200]}")
        return
    samples.append(elapsed * 1e3)
    await client.delete(f"/sandboxes/{answer.json()['sandboxID']}")


async def _measure(url: str, key: str, template: str, creates: int, concurrency: int) -> str:
    samples: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": key}, timeout=600, limits=limits
    ) as client:
        started = time.perf_counter()
        for first in range(0, creates, concurrency):
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, creates - first)):
                    nursery.start_soon(_create_and_kill, client, template, samples, errors)
        wall = time.perf_counter() - started
    if not samples:
        return f"concurrency {concurrency}: every create failed, e.g. {errors[:1]}"
    rate = len(samples) / wall
    row = Latency(samples).row(f"create, concurrency {concurrency}")
    failed = f", {len(errors)} failed (e.g. {errors[0]})" if errors else ""
    return f"{row}   {rate:.1f} creates/s (incl. kills){failed}"


def run(url: str, key: str, template: str, creates: int, concurrency: list[int]) -> str:
    header = f"{'measurement (ms)':<34} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}"
    rows = [trio.run(_measure, url, key, template, creates, c) for c in concurrency]
    return "\n".join([f"cube bench api: {url}, template {template}", header, *rows])
