"""The agent's own recent log lines, kept in memory for the control port's GetLogs.

The guest has no log shipping; when something goes wrong inside a sandbox the host asks the agent
for its last lines. Bounded, so a chatty agent never grows without limit.
"""

from __future__ import annotations

import collections
import logging

MAX_LINES = 1000
MAX_LINE = 2000  # characters kept of one record


class RingHandler(logging.Handler):
    def __init__(self, capacity: int = MAX_LINES) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record)[:MAX_LINE])
        except Exception:
            self.handleError(record)

    def tail(self, limit: int) -> list[str]:
        if limit <= 0:
            return []
        return list(self._lines)[-limit:]
