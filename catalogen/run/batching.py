"""Run items through a batched function: halve the batch on out-of-memory, isolate bad items.

A crash of one batch must cost neither its neighbours' results nor the run: out-of-memory shrinks
the batch and retries the same items (and the smaller size is kept for what follows); any other
error retries the batch's items one by one, so only the item at fault is marked failed.

`fn(items, size)` gets the batch size in force as well as the items (possibly fewer), so it can
pad every call to that size: see tasks/generate.py for why an image must not see its batch's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import torch

from catalogen import stopping
from catalogen.models.loading import WorkTimer

T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Outcome(Generic[T, R]):
    item: T
    batch_size: int
    result: R | None = None
    error: BaseException | None = None


@dataclass
class AdaptiveBatcher(Generic[T, R]):
    fn: Callable[[list[T], int], list[R]]
    size: int

    def run(self, items: list[T]) -> Iterator[list[Outcome[T, R]]]:
        """Yield the outcomes batch by batch, in the items' order."""
        start = 0
        while start < len(items):
            stopping.check()
            batch = items[start:start + self.size]
            try:
                results = self.fn(batch, self.size)
            except stopping.Abandoned:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is recorded per item
                if is_out_of_memory(exc) and self.size > 1:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self.size = max(1, self.size // 2)
                    continue
                yield self._one_by_one(batch) if len(batch) > 1 else [Outcome(batch[0], self.size, error=exc)]
            else:
                yield [Outcome(item, self.size, result) for item, result in zip(batch, results)]
            start += len(batch)

    def _one_by_one(self, batch: list[T]) -> list[Outcome[T, R]]:
        outcomes = []
        for item in batch:
            try:
                outcomes.append(Outcome(item, self.size, self.fn([item], self.size)[0]))
            except stopping.Abandoned:
                raise
            except Exception as exc:  # noqa: BLE001
                outcomes.append(Outcome(item, self.size, error=exc))
        return outcomes


def record_batches(
    groups: Iterable[list[T]],
    batcher: AdaptiveBatcher,
    records: Callable[[list[Outcome]], list[dict[str, Any]]],
    results: list[dict[str, Any] | None],
    common: dict[str, Any],
    progress: Callable[[int], None],
) -> None:
    """Run each group of jobs through `batcher` and put one result row per job into `results`.

    A job has `position` (its index in `results`) and `row` (its planned values). `records` turns a
    batch's outcomes into their rows' outcome columns (status, error, image, ...); the batch's time
    is shared by its rows (model loads left out: `WorkTimer`), and the batch size each ran at is recorded.
    """
    done = sum(result is not None for result in results)
    for jobs in groups:
        timer = WorkTimer()
        for outcomes in batcher.run(jobs):
            found = records(outcomes)
            seconds = timer.elapsed() / len(outcomes)
            finished = datetime.now(timezone.utc)
            for outcome, record in zip(outcomes, found):
                results[outcome.item.position] = {
                    **outcome.item.row, **common, **record,
                    "seconds": seconds, "batch_size": outcome.batch_size, "finished_at": finished,
                }
            done += len(outcomes)
            progress(done)
            timer.restart()
