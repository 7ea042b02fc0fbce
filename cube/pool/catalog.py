"""What the daemon needs to know about templates, as a Protocol the template store satisfies.

The template store (cube/pool/template*.py) owns building and the on-disk catalog; the daemon
only asks "what is this name or id, and can I start it?". Snapshots taken from sandboxes are
templates too, so the daemon chains the store with its snapshot store behind the same lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec

from cube.pool.backend import Image


class TemplateInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A template as create sees it. ``image`` is None until the template is ready;
    ``alias`` is the name reported back to clients (E2B's ``alias``)."""

    template_id: str
    alias: str | None
    image: Image | None
    status: str = "ready"


class Catalog(Protocol):
    def lookup(self, name_or_id: str) -> TemplateInfo | None:
        """The template with this id or name, or None."""
        ...


class MemoryCatalog:
    """A fixed set of templates held in memory: tests and `--backend process` development."""

    def __init__(self, templates: Iterable[TemplateInfo]) -> None:
        self._by_key: dict[str, TemplateInfo] = {}
        for info in templates:
            self._by_key[info.template_id] = info
            if info.alias:
                self._by_key[info.alias] = info

    def lookup(self, name_or_id: str) -> TemplateInfo | None:
        return self._by_key.get(name_or_id)


class ChainCatalog:
    """Asks each catalog in turn; the first answer wins."""

    def __init__(self, *catalogs: Catalog) -> None:
        self._catalogs = catalogs

    def lookup(self, name_or_id: str) -> TemplateInfo | None:
        for catalog in self._catalogs:
            info = catalog.lookup(name_or_id)
            if info is not None:
                return info
        return None
