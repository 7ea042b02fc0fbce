"""All contexts of this interpreter, and the default context of each language.

``/execute`` with a ``language`` (or with neither language nor context) runs in that language's
default context, created on first use; python's (and javascript's, when its kernel is
installed) are created at start-up as upstream does, so the first ``run_code`` does not pay
for a kernel start. Every context is listed, defaults included, each once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from cube.guest.interpreter.envs import GlobalEnvs
from cube.guest.interpreter.kernel import KernelContext
from cube.guest.interpreter.languages import kernel_spec

log = logging.getLogger(__name__)

MAX_CONTEXTS = 64  # each is a kernel process; more than this is a runaway client


class TooManyContexts(Exception):
    pass


class Registry:
    def __init__(self, envs: GlobalEnvs, default_cwd: str) -> None:
        self.envs = envs
        self.default_cwd = default_cwd
        self._contexts: dict[str, KernelContext] = {}
        self._defaults: dict[str, str] = {}
        self._default_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        """Pre-create the default contexts; a language whose kernel is missing is skipped."""
        await self.default("python")
        try:
            await self.default("javascript")
        except Exception as e:
            log.warning("no default javascript context: %s", e)

    async def create(self, language: str, cwd: str | None = None) -> KernelContext:
        kernel_spec(language)  # raises UnsupportedLanguage before any process is started
        if len(self._contexts) >= MAX_CONTEXTS:
            raise TooManyContexts(f"at most {MAX_CONTEXTS} contexts; remove some first")
        context = KernelContext(str(uuid.uuid4()), language, cwd or self.default_cwd, self.envs)
        await context.start()
        self._contexts[context.id] = context
        return context

    async def default(self, language: str) -> KernelContext:
        lock = self._default_locks.setdefault(language, asyncio.Lock())
        async with lock:
            context = self._contexts.get(self._defaults.get(language, ""))
            if context is None:
                context = await self.create(language)
                self._defaults[language] = context.id
            return context

    def get(self, context_id: str) -> KernelContext | None:
        return self._contexts.get(context_id)

    def all(self) -> list[KernelContext]:
        return list(self._contexts.values())

    async def remove(self, context_id: str) -> bool:
        context = self._contexts.pop(context_id, None)
        if context is None:
            return False
        await context.shutdown()
        return True

    async def close(self) -> None:
        contexts = list(self._contexts.values())
        self._contexts.clear()
        await asyncio.gather(*(c.shutdown() for c in contexts), return_exceptions=True)
