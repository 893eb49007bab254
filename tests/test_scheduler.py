"""Continuous batching (koala_lib/inference/scheduler.py): slots that requests enter and leave between decode steps."""

from __future__ import annotations

import threading
import time

import pytest

from koala_lib.inference.batching import QueueFull
from koala_lib.inference.generate import Sampling
from koala_lib.inference.scheduler import ContinuousBatcher


def run_all(batcher: ContinuousBatcher, requests: list[tuple[list[int], Sampling]], hold: bool = True):
    """Submit every request (while the worker is held, so they start together) and wait for them all."""
    events: dict[int, list] = {}
    if hold:
        batcher._lock.acquire()
    try:
        jobs = [batcher.submit(ids, s, lambda e, i=i: events.setdefault(i, []).append(e)) for i, (ids, s) in enumerate(requests)]
    finally:
        if hold:
            batcher._lock.release()
    for job in jobs:
        assert job.done.wait(300), "a request did not finish"
    return jobs, events


def test_greedy_output_is_the_same_alone_or_among_others(smollm2_generator):
    gen = smollm2_generator
    batcher = ContinuousBatcher(gen, slots=4, max_queue=16)
    try:
        prompt = gen.encode("BEGINNING OF CONVERSATION: USER: Name three animals that live in Australia. GPT:")
        alone, _ = run_all(batcher, [(prompt, Sampling(max_new_tokens=24, stop=()))])
        cache_alone = batcher.cache_len
        others = [
            (gen.encode("USER: What is the capital of France? GPT:"), Sampling(max_new_tokens=5, stop=())),  # ends early
            (gen.encode("Count: " + "one two three " * 60), Sampling(max_new_tokens=200, stop=())),  # a longer cache
            (gen.encode("Write a haiku about the sea."), Sampling(max_new_tokens=30, temperature=0.9, seed=-1, stop=())),
            (gen.encode("USER: Hi GPT:"), Sampling(max_new_tokens=8, stop=())),  # waits for the first free slot
        ]
        together, _ = run_all(batcher, [others[0], others[1], (prompt, Sampling(max_new_tokens=24, stop=())), *others[2:]])
        assert batcher.cache_len >= 1024 > cache_alone or batcher.counters.resizes > 0
        assert together[2].result.tokens == alone[0].result.tokens
        assert len(together[2].result.tokens) == 24
        assert all(j.error is None for j in together)
        assert batcher.metrics()["finished"] == 6 and batcher.metrics()["busy"] == 0
    finally:
        batcher.close()


def test_a_short_answer_leaves_and_a_waiting_request_takes_its_slot(tiny_generator):
    batcher = ContinuousBatcher(tiny_generator, slots=2, max_queue=8)
    done_at: dict[int, int] = {}
    try:
        ids = tiny_generator.encode("hello")

        def tracker(i):
            def on_event(event):
                if event is None:
                    done_at[i] = batcher.counters.steps
            return on_event

        batcher._lock.acquire()
        try:
            jobs = [batcher.submit(ids, Sampling(max_new_tokens=n, stop=()), tracker(i)) for i, n in enumerate([60, 3, 3, 3])]
        finally:
            batcher._lock.release()
        for job in jobs:
            assert job.done.wait(120)
        assert [len(j.result.tokens) for j in jobs] == [60, 3, 3, 3]
        # the long answer holds one slot; the three short ones pass through the other, one after another,
        # each starting within a step of the previous one's end, while the long one is still decoding
        assert done_at[1] < done_at[2] < done_at[3] < done_at[0]
        assert done_at[3] <= 3 * 3 + 2
    finally:
        batcher.close()


def test_seeds_of_any_64_bit_value_run_beside_ordinary_requests(tiny_generator):
    batcher = ContinuousBatcher(tiny_generator, slots=4, max_queue=8)
    try:
        ids = tiny_generator.encode("a koala")
        settings = [Sampling(max_new_tokens=12, temperature=0.8, seed=-1, stop=()),
                    Sampling(max_new_tokens=12, temperature=0.8, seed=2**40, stop=()),
                    Sampling(max_new_tokens=12, stop=()),
                    Sampling(max_new_tokens=12, temperature=0.8, seed=2**64 - 1, stop=())]
        jobs, _ = run_all(batcher, [(ids, s) for s in settings])
        assert all(j.error is None and len(j.result.tokens) == 12 for j in jobs)
        again, _ = run_all(batcher, [(ids, settings[1]), (ids, settings[0])])
        assert again[0].result.tokens == jobs[1].result.tokens and again[1].result.tokens == jobs[0].result.tokens
        assert jobs[0].result.tokens != jobs[1].result.tokens
        assert jobs[3].result.tokens == jobs[0].result.tokens  # -1 and 2**64 - 1 are the same 64 bits
    finally:
        batcher.close()


@pytest.fixture(scope="module")
def flat_generator(tiny_generator):
    """A model whose final norm is zero: every logit is 0, so greedy picks id 0; the EOS is id 2."""
    import jax.numpy as jnp
    from flax import nnx

    from koala_lib.inference.generate import Generator
    from koala_lib.model.llama import Llama
    from koala_lib.model.presets import preset

    tokenizer = tiny_generator.tokenizer
    model = Llama(preset("debug").replace(vocab_size=len(tokenizer), eos_token_id=2), rngs=nnx.Rngs(0))
    model.norm.weight.set_value(jnp.zeros_like(model.norm.weight.get_value()))
    assert tokenizer.eos_token_id == 2
    return Generator(model, tokenizer)


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_frequency_and_presence_penalties_as_openai_defines_them(flat_generator, engine):
    """All logits equal: greedy repeats id 0; a penalty on what the answer used moves on to id 1, then id 2 (EOS)."""
    ids = flat_generator.encode("hello")
    settings = [Sampling(max_new_tokens=6, stop=()), Sampling(max_new_tokens=6, stop=(), frequency_penalty=0.5),
                Sampling(max_new_tokens=6, stop=(), presence_penalty=0.5), Sampling(max_new_tokens=6, stop=(), presence_penalty=-1.0)]
    if engine == "static":
        results = flat_generator.generate([ids] * 4, settings)
    else:
        batcher = ContinuousBatcher(flat_generator, slots=4, max_queue=8)
        try:
            results = [j.result for j in run_all(batcher, [(ids, s) for s in settings])[0]]
        finally:
            batcher.close()
    assert [r.tokens for r in results] == [[0] * 6, [0, 1], [0, 1], [0] * 6]
    assert [r.finish_reason for r in results] == ["length", "stop", "stop", "length"]


def test_a_failing_callback_ends_only_its_own_request(tiny_generator):
    batcher = ContinuousBatcher(tiny_generator, slots=4, max_queue=8)
    try:
        ids = tiny_generator.encode("hello there")

        def broken(event):
            if event is not None:
                raise RuntimeError("the client's handler broke")

        batcher._lock.acquire()
        try:
            bad = batcher.submit(ids, Sampling(max_new_tokens=8, stop=()), broken)
            good = [batcher.submit(ids, Sampling(max_new_tokens=8, stop=()), lambda e: None) for _ in range(2)]
        finally:
            batcher._lock.release()
        for job in [bad, *good]:
            assert job.done.wait(120)
        assert isinstance(bad.error, RuntimeError) and bad.result is None
        assert all(j.error is None and len(j.result.tokens) == 8 for j in good)
        assert batcher.metrics()["failed"] == 1
    finally:
        batcher.close()


def test_a_cancelled_request_frees_its_slot_at_the_next_step(tiny_generator):
    batcher = ContinuousBatcher(tiny_generator, slots=1, max_queue=4)
    try:
        ids = tiny_generator.encode("hello")
        started = threading.Event()
        long = batcher.submit(ids, Sampling(max_new_tokens=400, stop=()), lambda e: started.set())
        assert started.wait(60)
        long.cancelled = True
        assert long.done.wait(60)
        assert long.result.finish_reason == "abort" and len(long.result.tokens) < 400
        short = batcher.submit(ids, Sampling(max_new_tokens=3, stop=()), lambda e: None)
        assert short.done.wait(60) and len(short.result.tokens) == 3
        assert batcher.metrics()["cancelled"] == 1 and batcher.metrics()["busy"] == 0
    finally:
        batcher.close()


def test_the_queue_is_bounded(tiny_generator):
    batcher = ContinuousBatcher(tiny_generator, slots=1, max_queue=2)
    try:
        batcher._lock.acquire()
        try:
            ids = tiny_generator.encode("hi")
            jobs = [batcher.submit(ids, Sampling(max_new_tokens=2, stop=()), lambda e: None)]
            deadline = time.monotonic() + 30
            while batcher.jobs.qsize() and time.monotonic() < deadline:  # the worker took it and waits for the model
                time.sleep(0.01)
            jobs += [batcher.submit(ids, Sampling(max_new_tokens=2, stop=()), lambda e: None) for _ in range(2)]
            with pytest.raises(QueueFull):
                batcher.submit(ids, Sampling(max_new_tokens=2, stop=()), lambda e: None)
        finally:
            batcher._lock.release()
        assert all(j.done.wait(60) and j.error is None for j in jobs)
    finally:
        batcher.close()


def test_each_new_shape_is_announced_once_before_it_compiles(tiny_generator):
    """The server's one line per compilation: the first request of a shape waits for XLA, and says why; a second
    request of the same shape compiles nothing and says nothing."""
    lines: list[str] = []
    before = tiny_generator.on_compile
    tiny_generator.on_compile = lines.append
    batcher = ContinuousBatcher(tiny_generator, slots=2, max_queue=8)
    try:
        ids = tiny_generator.encode("a koala")
        run_all(batcher, [(ids, Sampling(max_new_tokens=4, stop=()))])
        assert lines == [f"compiling the prefill step for a prompt of up to 16 tokens, cache {batcher.cache_len} (once for this shape; later requests reuse it)",
                         f"compiling the decode step for 2 slots, cache {batcher.cache_len} (once for this shape; later requests reuse it)"]
        run_all(batcher, [(ids, Sampling(max_new_tokens=4, stop=()))])
        assert len(lines) == 2
    finally:
        batcher.close()
        tiny_generator.on_compile = before
