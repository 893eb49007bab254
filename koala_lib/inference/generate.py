"""Generation with a KV cache: jitted prefill and decode over bucketed shapes, sampling, stop strings, streaming.

    gen = Generator(model, tokenizer)
    [out] = gen.generate([prompt], Sampling(max_new_tokens=128))       # greedy by default
    out.text, out.finish_reason                                         # "stop" (EOS or a stop string) | "length"

A batch of prompts of different lengths is left-padded to a bucket of a few static sizes (powers of two for
the batch and the cache; for the prompt, powers of two up to 256 tokens, then multiples of 128), so XLA compiles
once per bucket, not per request. Prefill runs the
prompts through `Llama.extend` in one call; each decode call then writes one token per row into the cache.
The host reads the tokens one step behind the device (JAX dispatches the next step before the current one is
read), decodes text, cuts stop strings, and reports each row's new text to `on_token` for streaming; a
callback that returns True ends its row at once (finish reason "abort": a client left, a moderation check).

Sampling (koala_lib/inference/sampling.py): temperature, top-k, top-p, OpenAI's frequency and presence penalties,
and a key per row from its seed, so a request's sample does not depend on what else is in the batch. The host's
side of each answer (text, stop strings, streaming) is koala_lib/inference/rows.py. A server that lets requests
join and leave between decode steps is koala_lib/inference/scheduler.py, built on this class's jitted model.

Log-probabilities (`Sampling(logprobs=k)`, k alternatives from 0 to 20): each step also computes, on the device,
the log-softmax of the model's raw logits (the model's own distribution, whatever the temperature, top-k or top-p)
at the chosen token and the 20 most likely tokens; the host reads them only when some row of the batch asked.
`Completion.logprobs` holds one `TokenLogprob` per generated token: every token of `Completion.tokens` (those of
a stop string too, though the text cuts it), then the EOS token when that ended the answer (as vLLM reports it:
an answer that ends at once still has the distribution of its first token). Each `TokenEvent` carries the
entries of the tokens generated since the row's previous event, so the events' entries add up to the list.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koala_lib.inference.rows import Completion, Row, TokenEvent, TokenLogprob, held_back  # noqa: F401 (re-exported)
from koala_lib.inference.sampling import TOP_LOGPROBS, Sampling, hold_eos, penalize, row_settings, sample, score  # noqa: F401
from koala_lib.model.llama import Llama


class PromptTooLong(ValueError):
    """A prompt leaves no room in the model's context for even one new token."""


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


PROMPT_STEP = 128  # prompt buckets above 2 * PROMPT_STEP tokens grow by this many


def prompt_bucket(n: int, minimum: int = 1) -> int:
    """The prompt length compiled for n tokens: the next power of two up to 2 * PROMPT_STEP, then the next multiple
    of PROMPT_STEP, so a 300-token prompt (a judge's question and two answers) pays for 384 positions, not 512.
    Prefill is compute-bound on a CPU; the few extra compiled shapes cost less than the padding they save."""
    if n <= 2 * PROMPT_STEP:
        return bucket(n, minimum)
    return max(minimum, -(-int(n) // PROMPT_STEP) * PROMPT_STEP)


# ----------------------------------------------------------------------------- the generator

# On a CPU, XLA hands matmuls to YNNPACK, which repacks the whole weight matrix on every call. A decode step of
# 8 or more rows spends more on that repacking than on arithmetic, and Eigen's matmuls are faster there
# (SmolLM2-135M on 2 cores: batch 16 about +20 % tokens/s, batch 8 about +10 %); with 1 to 4 rows YNNPACK's
# matrix-vector path is the faster one (Eigen runs batch 2 at 40 % of its speed). Reductions stay with YNNPACK:
# without it, the one-token attention's reductions are slower than all the matmuls gain. Prefill keeps the default.
_CPU_WIDE_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
WIDE_DECODE_ROWS = 8


@functools.cache
def wide_decode_options(backend: str) -> dict[str, str]:
    """XLA options for decode steps of `WIDE_DECODE_ROWS` rows or more on `backend`: the above on a CPU whose XLA
    accepts them, else none."""
    if backend != "cpu":
        return {}
    try:
        probe = jax.device_put(np.ones((2, 2), np.float32), jax.devices("cpu")[0])
        jax.jit(lambda x: x @ x, compiler_options=_CPU_WIDE_DECODE_OPTIONS)(probe)
    except jax.errors.JaxRuntimeError:  # an XLA without the option: decode with its defaults
        return {}
    return dict(_CPU_WIDE_DECODE_OPTIONS)


class Generator:
    """Batched generation for one model; compiled functions are kept per bucket for the generator's lifetime."""

    def __init__(self, model: Llama, tokenizer, *, max_batch: int = 16, min_prompt_bucket: int = 16, fuse: bool = True):
        self.tokenizer = tokenizer
        self.context = model.cfg.max_position_embeddings
        self.vocab = model.cfg.vocab_size
        self.max_batch = max_batch
        self.min_prompt_bucket = min_prompt_bucket
        eos = {tokenizer.eos_token_id, model.cfg.eos_token_id}
        self.eos_ids = {int(e) for e in eos if e is not None}
        self.eos_order = tuple(sorted(self.eos_ids))  # a static tuple for the jitted steps
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0))
        # q/k/v and gate/up fused into one matmul each: the same function, fewer small matmuls per decode step
        self.graphdef, self.state = nnx.split(model.fused() if fuse else model)
        self.init_cache = model.init_cache  # shapes and dtype only: it reads no parameter
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(4,))
        self.backend = jax.tree.leaves(self.state)[0].devices().pop().platform
        self._decode = jax.jit(self._decode_fn, donate_argnums=(2, 3, 4, 5))
        self._decode_wide = jax.jit(self._decode_fn, donate_argnums=(2, 3, 4, 5), compiler_options=wide_decode_options(self.backend))
        self.compiled: set[tuple[str, tuple[int, ...]]] = set()  # (function, shape bucket), for tests and benchmarks
        self.on_compile: Callable[[str], None] | None = None  # told, in a line, of each shape about to be compiled

    def compiling(self, function: str, shape: tuple[int, ...], what: str) -> None:
        """Record that `function` runs at `shape` (a bucket); the first time, tell `on_compile` (the server logs it:
        the request that meets a new shape waits for XLA once, and nothing else would say why)."""
        if (function, shape) not in self.compiled:
            self.compiled.add((function, shape))
            self.announce_compile(function, what)

    def announce_compile(self, function: str, what: str) -> None:
        if self.on_compile is not None:
            self.on_compile(f"compiling the {function} step for {what} (once for this shape; later requests reuse it)")

    # -- jitted pieces (`knobs`: the per-row arrays of sampling.row_settings)

    def _prefill_fn(self, state, tokens, positions, valid, cache, knobs, scored):
        model = nnx.merge(self.graphdef, state)
        logits, cache = model.extend(tokens, positions, valid, cache, 0, last_only=True)
        chosen = hold_eos(logits[:, 0], self.eos_order, 0, knobs["min_new"])
        token = sample(chosen, knobs["keys"], 0, knobs["temperature"], knobs["top_p"], knobs["top_k"])
        counts = jnp.zeros((tokens.shape[0], logits.shape[-1]), jnp.int32).at[jnp.arange(tokens.shape[0]), token].add(1)
        return token, score(logits[:, 0], token, scored), cache, counts

    def _decode_fn(self, state, token, lengths, valid, cache, counts, index, step, knobs, scored):
        model = nnx.merge(self.graphdef, state)
        valid = valid.at[:, index].set(True)
        logits, cache = model.extend(token[:, None], lengths[:, None], valid, cache, index, last_only=True)
        chosen = hold_eos(penalize(logits[:, 0], counts, knobs["frequency"], knobs["presence"]), self.eos_order, step, knobs["min_new"])
        token = sample(chosen, knobs["keys"], step, knobs["temperature"], knobs["top_p"], knobs["top_k"])
        counts = counts.at[jnp.arange(token.shape[0]), token].add(1)
        return token, score(logits[:, 0], token, scored), lengths + 1, valid, cache, counts

    # -- the public call

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> ids, with the BOS token where the tokenizer adds one (as in training)."""
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def check_prompt(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise ValueError("empty prompt")
        if len(ids) >= self.context:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the model's context is {self.context}, so at most {self.context - 1} fit")

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        on_token: Callable[[TokenEvent], bool | None] | None = None,
    ) -> list[Completion]:
        """Completions for the prompts (text or token ids), in batches of at most `max_batch`."""
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, row in enumerate(ids):
            try:
                self.check_prompt(row)
            except ValueError as exc:
                raise type(exc)(f"prompt {i}: {exc}") from None
        params = [sampling] * len(ids) if isinstance(sampling, Sampling) else list(sampling)
        if len(params) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(params)} sampling settings")
        out: list[Completion] = []
        for start in range(0, len(ids), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            shifted = None if on_token is None else (lambda ev, s=start: on_token(dataclasses.replace(ev, row=ev.row + s)))
            out.extend(self._generate_batch(ids[chunk], params[chunk], shifted))
        return out

    def _generate_batch(self, ids: list[list[int]], params: list[Sampling], on_token) -> list[Completion]:
        n = len(ids)
        b = bucket(n)
        t = prompt_bucket(max(len(r) for r in ids), self.min_prompt_bucket)
        rows = [Row(len(r), min(p.max_new_tokens, self.context - len(r)), p.stop, p.logprobs, i) for i, (r, p) in enumerate(zip(ids, params))]
        slots = bucket(t + max(r.limit for r in rows))
        tokens = np.full((b, t), self.pad_id, np.int32)
        valid = np.zeros((b, slots), bool)
        positions = np.zeros((b, t), np.int32)
        for i, r in enumerate(ids):
            pad = t - len(r)
            tokens[i, pad:] = r
            valid[i, pad:t] = True
            positions[i, pad:] = np.arange(len(r))
        valid[n:, t - 1] = True  # filler rows: one padding token, never read
        lengths = np.array([len(r) for r in ids] + [1] * (b - n), np.int32)
        knobs = row_settings(params, b)
        scored = np.bool_(any(r.top is not None for r in rows))  # else the scores stay on the device, all zeros
        self.compiling("prefill", (b, t, slots), f"{b} prompts of up to {t} tokens, cache {slots}")
        self.compiling("decode", (b, slots), f"{b} rows, cache {slots}")

        token, scores, cache, counts = self._prefill(self.state, tokens, positions, valid, self.init_cache(b, slots), knobs, scored)
        lengths, valid = jnp.asarray(lengths), jnp.asarray(valid)
        decode = self._decode_wide if b >= WIDE_DECODE_ROWS else self._decode
        longest = max(r.limit for r in rows)
        for step in range(1, longest + 1):
            pending = None
            if step < longest:  # dispatch the next step before reading this one
                pending = decode(self.state, token, lengths, valid, cache, counts, jnp.int32(t + step - 1), jnp.int32(step), knobs, scored)
            host = np.asarray(token)
            chosen, top_ids, top_logp = (np.asarray(a).tolist() for a in scores) if scored else (None, None, None)
            for i, row in enumerate(rows):
                if row.finish is None:
                    entry = None if row.top is None else TokenLogprob(int(host[i]), chosen[i], list(zip(top_ids[i][: row.top], top_logp[i][: row.top])))
                    self.report(row, row.push(int(host[i]), entry, self.decode, self.eos_ids), on_token)
            if all(r.finish for r in rows) or pending is None:
                break
            token, scores, lengths, valid, cache, counts = pending
        return [r.completion() for r in rows]

    def decode(self, tokens: list[int]) -> str:
        """Generated ids -> text (special tokens dropped)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @staticmethod
    def report(row: Row, event: TokenEvent | None, on_token) -> None:
        """Pass a row's event to the callback; a callback that returns True (while the row runs) ends the row."""
        if event is not None and on_token is not None and on_token(event) and row.finish is None:
            row.abort()
