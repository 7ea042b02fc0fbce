"""The warm pool: per template, a few sandboxes already restored and waiting for an identity.

Creating a sandbox is then a hand-out plus one Refresh round trip instead of a restore. Each
configured template has one refill task (owned by the pool's nursery) that tops its shelf up to
the target depth whenever something is taken. A hand-out never waits on a lock: it pops from the
shelf, and when the shelf is empty it starts a sandbox on demand, concurrently with any other
creates.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from cube.guest.wire import Reply
from cube.pool.backend import Backend, BackendError, Image, Instance
from cube.pool.catalog import Catalog

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0


class _Shelf:
    def __init__(self, size: int) -> None:
        self.size = size
        self.ready: deque[Instance] = deque()
        self.taken = trio.Event()


class WarmPool:
    def __init__(self, backend: Backend, sizes: dict[str, int]) -> None:
        """``sizes`` maps a template name or id to the number of sandboxes to keep ready."""
        self._backend = backend
        self._sizes = {key: size for key, size in sizes.items() if size > 0}
        self._shelves: dict[str, _Shelf] = {}

    def depth(self) -> dict[str, int]:
        """Ready sandboxes per template id (for /metrics)."""
        return {template_id: len(shelf.ready) for template_id, shelf in self._shelves.items()}

    async def run(self, catalog: Catalog) -> None:
        """Keep every configured shelf full until cancelled; then free what is still shelved."""
        try:
            async with trio.open_nursery() as nursery:
                for key, size in self._sizes.items():
                    nursery.start_soon(self._keep_full, catalog, key, size)
        finally:
            with trio.CancelScope(shield=True):
                for shelf in self._shelves.values():
                    while shelf.ready:
                        await self._backend.kill(shelf.ready.popleft())

    async def take(
        self, image: Image, adopt: Callable[[Instance], Awaitable[Reply]]
    ) -> tuple[Instance, Reply]:
        """A running sandbox of ``image``, made someone's by ``adopt`` (which kills it and
        raises BackendError if it will not take its identity): from the shelf when one is
        ready, falling back to a fresh start if the shelved one fails."""
        shelf = self._shelves.get(image.template_id)
        if shelf is not None and shelf.ready:
            instance = shelf.ready.popleft()
            shelf.taken.set()
            try:
                return instance, await adopt(instance)
            except BackendError as exc:
                log.warning("pooled sandbox refused its identity", extra={"error": str(exc)})
        instance = await self._backend.start(image)
        return instance, await adopt(instance)

    async def _keep_full(self, catalog: Catalog, key: str, size: int) -> None:
        delay = RETRY_MIN_S
        while True:
            info = catalog.lookup(key)
            if info is None or info.image is None:
                await trio.sleep(RETRY_MAX_S)  # not built yet: look again later
                continue
            shelf = self._shelves.setdefault(info.template_id, _Shelf(size))
            try:
                while len(shelf.ready) < shelf.size:
                    shelf.ready.append(await self._backend.start(info.image))
            except BackendError as exc:
                log.warning("warm pool refill failed", extra={"template": key, "error": str(exc)})
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            shelf.taken = trio.Event()
            await shelf.taken.wait()
