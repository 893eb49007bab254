"""Continuous batching: a fixed set of KV-cache slots that requests enter and leave between decode steps.

    batcher = ContinuousBatcher(generator, slots=16, max_queue=64)
    job = batcher.submit(ids, Sampling(...), on_event)    # QueueFull when max_queue requests already wait
    batcher.metrics()                                     # busy and free slots, waiting, finished, cancelled, ...
    batcher.close()

One worker thread owns the model. Each turn of its loop it first prefills waiting requests into free slots (one
request per prefill call, its prompt left-padded to its own bucket, `prompt_bucket`), then runs one decode step
for every slot: a row that ends (EOS, a stop string, its token limit, a client that left) frees its slot at once,
and the next waiting request takes it before the following step. So a short answer returns as soon as it ends,
and a new request starts within a step or two instead of waiting for a whole batch.

Shapes stay static for jit: the decode step always runs all `slots` rows (free ones are masked and do not
advance), each row writing its new token at its own cache slot (`Llama.extend` with one index per row). The
cache's length is the power of two (above 1,024: the multiple of 512) that holds the longest running request
(prompt bucket + token limit), at least `min_cache`; it grows when a longer request is admitted and halves when the longest one leaves, so one
decode step is compiled per cache length in use (usually one). A request's greedy output is token-identical
whether it runs alone or among others: its prefill has the same shape either way, and a decode step computes
each row on its own.

Faults stay with their request: an error in one row's text (the tokenizer, a callback) ends that request with
the error; an error of the device step ends the requests then running, and the worker goes on with the next.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koala_lib.inference.batching import Job, enqueue
from koala_lib.inference.generate import WIDE_DECODE_ROWS, Generator, bucket, prompt_bucket, wide_decode_options

CACHE_STEP = 512  # cache lengths above 2 * CACHE_STEP grow by this much, not by doubling


def cache_bucket(n: int, minimum: int) -> int:
    """The cache length for n slots: a power of two up to 2 * CACHE_STEP, then the next multiple of CACHE_STEP (a
    1,000-token prompt with 1,048 new tokens in a 2,048 context gets 2,560 slots, not 4,096)."""
    if n <= 2 * CACHE_STEP:
        return bucket(n, minimum)
    return max(minimum, -(-int(n) // CACHE_STEP) * CACHE_STEP)
from koala_lib.inference.rows import Row, TokenLogprob
from koala_lib.inference.sampling import Sampling, hold_eos, penalize, row_settings, sample, score


@dataclass
class _Slot:
    job: Job
    row: Row
    sampling: Sampling
    need: int  # cache slots the request can use: its prompt bucket + token limit


@dataclass
class Counters:
    received: int = 0  # requests the worker has taken from the queue
    admitted: int = 0  # ... and prefilled into a slot
    finished: int = 0  # ended by EOS, a stop string, the token limit or a content filter
    cancelled: int = 0  # the client left (before or during generation)
    failed: int = 0
    tokens: int = 0
    steps: int = 0
    resizes: int = 0
    compiled: set = field(default_factory=set)  # (function, shape) pairs, for tests and benchmarks


class ContinuousBatcher:
    def __init__(self, generator: Generator, slots: int = 16, max_queue: int = 64, *, min_cache: int = 256,
                 prefill_budget: int = 1024):
        """`prefill_budget`: prompt tokens prefilled before the next decode step (at least one request), so that a
        burst of arrivals delays the running answers by a bounded amount."""
        self.gen = generator
        self.slots = slots
        self.min_cache = min_cache
        self.prefill_budget = prefill_budget
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.running: list[_Slot | None] = [None] * slots
        self.counters = Counters()
        self.cache_len = 0
        self.dev: dict | None = None  # the device state: cache, valid, lengths, write, token, steps, counts
        self._closing = False
        self._lock = threading.Lock()  # held for each device call: a direct caller of the generator waits for it
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
        options = wide_decode_options(generator.backend) if slots >= WIDE_DECODE_ROWS else {}
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), compiler_options=options)
        self._thread = threading.Thread(target=self._run, name="koala-scheduler", daemon=True)
        self._thread.start()

    def _compiling(self, function: str, shape: tuple[int, int], what: str) -> None:
        if (function, shape) not in self.counters.compiled:
            self.counters.compiled.add((function, shape))
            self.gen.announce_compile(function, what)

    # -- the public side (any thread)

    def submit(self, ids: list[int], sampling: Sampling, on_event) -> Job:
        return enqueue(self.jobs, self.gen, ids, sampling, on_event)

    def metrics(self) -> dict:
        busy = sum(s is not None for s in self.running)
        c = self.counters
        return {"batching": "continuous", "slots": self.slots, "busy": busy, "free": self.slots - busy,
                "waiting": self.jobs.qsize(), "received": c.received, "admitted": c.admitted, "finished": c.finished, "cancelled": c.cancelled,
                "failed": c.failed, "tokens": c.tokens, "steps": c.steps, "cache_len": self.cache_len}

    def close(self) -> None:
        """Stop after the current step; running and waiting requests end (finish reason "abort", or an error)."""
        self._closing = True
        try:
            self.jobs.put_nowait(None)  # wakes a worker that waits for work
        except queue.Full:  # a full queue: the worker is busy and sees `_closing` after its step
            pass
        self._thread.join(timeout=30)

    # -- jitted pieces

    def _prefill_fn(self, state, dev, row, tokens, positions, valid, knobs, scored):
        """Prefill one prompt (tokens [1, T], left-padded) in a cache of its own, sample its first token and move
        both into slot `row` of the running state."""
        model = nnx.merge(self.gen.graphdef, state)
        t = tokens.shape[1]
        logits, own = model.extend(tokens, positions, valid, self.gen.init_cache(1, t), 0, last_only=True)
        held = hold_eos(logits[:, 0], self.gen.eos_order, 0, knobs["min_new"])
        first = sample(held, knobs["keys"], 0, knobs["temperature"], knobs["top_p"], knobs["top_k"])
        put = lambda full, part: jax.lax.dynamic_update_slice(full, part, (row,) + (0,) * (full.ndim - 1))
        vocab = dev["counts"].shape[1]
        dev = {
            "cache": tuple((put(k, ok), put(v, ov)) for (k, v), (ok, ov) in zip(dev["cache"], own)),
            "valid": put(dev["valid"], jnp.zeros((1, dev["valid"].shape[1]), bool).at[:, :t].set(valid)),
            "lengths": dev["lengths"].at[row].set(jnp.sum(valid, dtype=jnp.int32)),
            "write": dev["write"].at[row].set(t),
            "token": dev["token"].at[row].set(first[0]),
            "steps": dev["steps"].at[row].set(1),
            "counts": put(dev["counts"], (jnp.arange(vocab) == first[0])[None].astype(jnp.int32)),
        }
        return first, score(logits[:, 0], first, scored), dev

    def _decode_fn(self, state, dev, active, knobs, scored):
        """One token for every active row, each written at its own cache slot; free rows stay as they are."""
        model = nnx.merge(self.gen.graphdef, state)
        rows = jnp.arange(active.shape[0])
        valid = dev["valid"].at[rows, dev["write"]].set(active | dev["valid"][rows, dev["write"]])
        logits, cache = model.extend(dev["token"][:, None], dev["lengths"][:, None], valid, dev["cache"], dev["write"], last_only=True)
        chosen = penalize(logits[:, 0], dev["counts"], knobs["frequency"], knobs["presence"])
        chosen = hold_eos(chosen, self.gen.eos_order, dev["steps"], knobs["min_new"])
        token = sample(chosen, knobs["keys"], dev["steps"], knobs["temperature"], knobs["top_p"], knobs["top_k"])
        token = jnp.where(active, token, dev["token"])
        step = active.astype(jnp.int32)
        dev = {"cache": cache, "valid": valid, "lengths": dev["lengths"] + step, "write": dev["write"] + step,
               "token": token, "steps": dev["steps"] + step, "counts": dev["counts"].at[rows, token].add(step)}
        return token, score(logits[:, 0], token, scored), dev

    # -- the worker

    def _run(self) -> None:
        while not self._closing:
            try:
                self._admit()
                if any(s is not None for s in self.running):
                    with self._lock:
                        self._step()
            except Exception as exc:  # a device step failed: the running requests end with it; the worker goes on
                self._fail_running(exc)
        for slot in self.running:  # closing: nothing more will be generated
            if slot is not None:
                self._release(slot, "abort")
        while True:  # nor for what still waits
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = RuntimeError("the server is shutting down")
                self._done(job)

    def _admit(self) -> None:
        budget = self.prefill_budget
        while not self._closing and None in self.running:
            idle = all(s is None for s in self.running)
            try:
                job = self.jobs.get() if idle else self.jobs.get_nowait()  # block only when nothing runs
            except queue.Empty:
                return
            if job is None:
                self._closing = True
                return
            self.counters.received += 1
            if job.cancelled:
                self.counters.cancelled += 1
                self._done(job)
                continue
            try:
                with self._lock:
                    budget -= self._prefill_one(job, self.running.index(None))
            except Exception as exc:  # the device call failed: this request ends with the error, then the rest
                job.error = exc
                self.counters.failed += 1
                self._done(job)
                raise
            if budget <= 0:
                return

    def _prefill_one(self, job: Job, index: int) -> int:
        gen, ids, sampling = self.gen, job.ids, job.sampling
        t = prompt_bucket(len(ids), gen.min_prompt_bucket)
        limit = min(sampling.max_new_tokens, gen.context - len(ids))
        slot = _Slot(job, Row(len(ids), limit, sampling.stop, sampling.logprobs), sampling, t + limit)
        self._fit_cache(max([slot.need] + [s.need for s in self.running if s is not None]))
        tokens = np.full((1, t), gen.pad_id, np.int32)
        tokens[0, t - len(ids):] = ids
        positions = np.zeros((1, t), np.int32)
        positions[0, t - len(ids):] = np.arange(len(ids))
        valid = np.zeros((1, t), bool)
        valid[0, t - len(ids):] = True
        self._compiling("prefill", (t, self.cache_len), f"a prompt of up to {t} tokens, cache {self.cache_len}")
        first, scores, self.dev = self._prefill(gen.state, self.dev, np.int32(index), tokens, positions, valid,
                                                row_settings([sampling], 1), np.bool_(sampling.logprobs is not None))
        first = int(np.asarray(first)[0])  # a device error surfaces here, before the request holds a slot
        self.running[index] = slot
        self.counters.admitted += 1
        self._take(slot, first, self._scores(scores, 0) if slot.row.top is not None else None)
        return len(ids)

    def _step(self) -> None:
        active = np.array([s is not None for s in self.running])
        params = [s.sampling if s is not None else Sampling() for s in self.running]
        scored = any(s is not None and s.row.top is not None for s in self.running)
        self._compiling("decode", (self.slots, self.cache_len), f"{self.slots} slots, cache {self.cache_len}")
        tokens, scores, self.dev = self._decode(self.gen.state, self.dev, active, row_settings(params, self.slots), np.bool_(scored))
        tokens = np.asarray(tokens)
        scores = [np.asarray(a) for a in scores] if scored else None
        self.counters.steps += 1
        for i, slot in enumerate(self.running):
            if slot is not None:
                self._take(slot, int(tokens[i]), None if slot.row.top is None else self._scores(scores, i))
        need = [s.need for s in self.running if s is not None]
        if need and cache_bucket(max(need), self.min_cache) <= self.cache_len // 2:
            self._fit_cache(max(need))

    @staticmethod
    def _scores(scores, i: int) -> tuple:
        """Row i's (log-probability of the chosen token, top ids, top log-probabilities) from a step's scores."""
        return tuple(np.asarray(a)[i] for a in scores)

    def _take(self, slot: _Slot, token: int, scores: tuple | None) -> None:
        """A running request's next token: report it; end the request where it is finished or its client left."""
        row, job = slot.row, slot.job
        if job.cancelled:
            return self._release(slot, "abort")
        try:
            entry = None
            if scores is not None:
                chosen, ids, logp = scores
                entry = TokenLogprob(token, float(chosen), list(zip(ids[: row.top].tolist(), logp[: row.top].tolist())))
            event = row.push(token, entry, self.gen.decode, self.gen.eos_ids)
            self.counters.tokens += 1
            if event is not None and job.on_event(event) and row.finish is None:
                row.abort()
        except Exception as exc:  # this request's text or callback failed: it alone ends
            job.error = exc
            return self._release(slot, "error")
        if row.finish is not None:
            self._release(slot, row.finish)

    def _release(self, slot: _Slot, reason: str) -> None:
        index = next(i for i, s in enumerate(self.running) if s is slot)
        self.running[index] = None
        if slot.row.finish is None:  # ended from outside: its answer is what was passed on
            slot.row.abort()
        if reason == "abort" and slot.job.cancelled:
            self.counters.cancelled += 1
        elif reason == "error":
            self.counters.failed += 1
        else:
            self.counters.finished += 1
        if slot.job.error is None:
            slot.job.result = slot.row.completion()
        self._done(slot.job)

    def _done(self, job: Job) -> None:
        job.done.set()
        try:
            job.on_event(None)
        except Exception:  # the consumer's end-of-job hook failing must not stop the worker
            pass

    def _fail_running(self, exc: BaseException) -> None:
        for slot in self.running:
            if slot is not None:
                slot.job.error = exc
                self._release(slot, "error")
        self.dev, self.cache_len = None, 0  # donated buffers may be gone: start from a fresh state

    def _fit_cache(self, need: int) -> None:
        """Make the cache `cache_bucket(need)` slots long (at least `min_cache`), keeping every running row's slots."""
        size = cache_bucket(need, self.min_cache)
        if size == self.cache_len and self.dev is not None:
            return
        if self.dev is None:
            r, vocab = self.slots, self.gen.vocab
            zeros = lambda dtype: jnp.zeros((r,), dtype)
            self.dev = {"cache": self.gen.init_cache(r, size), "valid": jnp.zeros((r, size), bool), "lengths": zeros(jnp.int32),
                        "write": zeros(jnp.int32), "token": zeros(jnp.int32), "steps": zeros(jnp.int32),
                        "counts": jnp.zeros((r, vocab), jnp.int32)}
        else:
            fit = lambda a, axis: (jnp.pad(a, [(0, size - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)])
                                   if size > a.shape[axis] else jax.lax.slice_in_dim(a, 0, size, axis=axis))
            self.dev = {**self.dev, "cache": tuple((fit(k, 2), fit(v, 2)) for k, v in self.dev["cache"]), "valid": fit(self.dev["valid"], 1)}
            self.counters.resizes += 1
        self.cache_len = size
