"""Progress of the rows in flight, for whoever is watching (the CLI's bar; nothing by default).

Shards report absolute counts ("shard X has finished N rows"), never increments, so a report from
inside a stage and the flow's report when the shard's task completes can both arrive without
anything being counted twice.
"""

from __future__ import annotations

import threading
from typing import Protocol


class Reporter(Protocol):
    def begin(self, stage: str, total: int) -> None: ...

    def advance(self, stage: str, done: int) -> None: ...

    def end(self, stage: str) -> None: ...


class _Tracker:
    def __init__(self) -> None:
        self.reporter: Reporter | None = None
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], int] = {}

    def begin(self, stage: str, total: int) -> None:
        with self._lock:
            self._done = {k: v for k, v in self._done.items() if k[0] != stage}
        if self.reporter:
            self.reporter.begin(stage, total)

    def shard(self, stage: str, shard: str, done: int) -> None:
        with self._lock:
            key = (stage, shard)
            if done <= self._done.get(key, 0):
                return
            self._done[key] = done
            total = sum(v for k, v in self._done.items() if k[0] == stage)
        if self.reporter:
            self.reporter.advance(stage, total)

    def end(self, stage: str) -> None:
        if self.reporter:
            self.reporter.end(stage)


tracker = _Tracker()


def set_reporter(reporter: Reporter | None) -> None:
    tracker.reporter = reporter
