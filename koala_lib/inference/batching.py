"""Static batching: one worker thread owns the model and decodes waiting requests together, to the end of the
longest answer of the batch (`koala serve --set generate.batching=static`; the server's default is the continuous
batching of koala_lib/inference/scheduler.py, which shares `Job` and `QueueFull` with this module).

    batcher = Batcher(generator, max_batch=16, max_queue=64)
    job = batcher.submit(ids, Sampling(...), on_event)      # raises QueueFull when max_queue jobs wait
    ...    # from the worker thread: on_event(TokenEvent) per piece of text, then on_event(None) when the
    ...    # batch is over (job.result or job.error is set by then)
    batcher.close()

The worker takes the first waiting job, then every job that arrives within `window` seconds (up to
`max_batch`), and runs them through one `Generator.generate` call: concurrent requests share each decode
step. A job whose `cancelled` flag is set (its client went away) ends at its next token.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from koala_lib.inference.generate import Completion, Generator, Sampling, TokenEvent


class QueueFull(RuntimeError):
    """More than `max_queue` requests are waiting."""


@dataclass
class Job:
    ids: list[int]
    sampling: Sampling
    on_event: Callable[[TokenEvent | None], bool | None]  # return True to end the job (e.g. a moderation hit)
    cancelled: bool = False
    result: Completion | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def enqueue(jobs: queue.Queue, generator: Generator, ids: list[int], sampling: Sampling, on_event) -> Job:
    """A new job on `jobs`; PromptTooLong before queueing, QueueFull when the queue is full."""
    generator.check_prompt(ids)
    job = Job(ids, sampling, on_event)
    try:
        jobs.put_nowait(job)
    except queue.Full:
        raise QueueFull(f"{jobs.maxsize} requests are already waiting; try again shortly") from None
    return job


class Batcher:
    def __init__(self, generator: Generator, max_batch: int = 16, max_queue: int = 64, window: float = 0.01):
        self.generator = generator
        self.max_batch = max_batch
        self.window = window
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.batches: list[int] = []  # sizes of the batches decoded, for tests and metrics
        self.busy = 0  # requests in the batch being decoded
        self.received = self.finished = self.cancelled = self.tokens = 0  # received: jobs taken from the queue
        self._lock = threading.Lock()  # guards generate() when the worker and a direct caller share the model
        self._thread = threading.Thread(target=self._run, name="koala-batcher", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], sampling: Sampling, on_event: Callable[[TokenEvent | None], bool | None]) -> Job:
        return enqueue(self.jobs, self.generator, ids, sampling, on_event)

    def metrics(self) -> dict:
        return {"batching": "static", "slots": self.max_batch, "busy": self.busy, "free": self.max_batch - self.busy,
                "waiting": self.jobs.qsize(), "received": self.received, "finished": self.finished, "cancelled": self.cancelled, "tokens": self.tokens}

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # close after this batch
                break
            batch.append(job)
        self.received += len(batch)
        for job in batch:
            if job.cancelled:
                self.cancelled += 1
                job.done.set()
                job.on_event(None)
        return [j for j in batch if not j.cancelled]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            self.batches.append(len(batch))
            self.busy = len(batch)

            def route(event: TokenEvent) -> bool:
                job = batch[event.row]
                return bool(job.on_event(event)) or job.cancelled

            try:
                with self._lock:
                    results = self.generator.generate([j.ids for j in batch], [j.sampling for j in batch], on_token=route)
                for job, result in zip(batch, results):
                    job.result = result
                    self.tokens += len(result.tokens)
                    self.cancelled += job.cancelled
                    self.finished += not job.cancelled
            except BaseException as exc:  # reported to every waiting client; the worker keeps serving
                for job in batch:
                    job.error = exc
            self.busy = 0
            for job in batch:
                job.done.set()
                job.on_event(None)
