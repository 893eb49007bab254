"""Sampling settings and the on-device pieces that use them: penalties, the next token, its log-probabilities.

    Sampling(max_new_tokens=128, temperature=0.7, top_p=0.9, seed=-1, frequency_penalty=0.5)

Sampling follows transformers' order: temperature, then top-k, then top-p on what top-k kept. A row with
temperature 0 is greedy. Each row draws from its own key, `fold_in(key(seed), step)`, so a request's sample
does not depend on what else is in the batch. A seed is any 64-bit integer, as OpenAI's API takes it: its value
modulo 2**64 is the two 32-bit words of a threefry key (so seeds 0 to 2**32 - 1 give `jax.random.key(seed)`).

Penalties, as OpenAI defines them: before sampling (greedy included), each token's logit is lowered by
`frequency_penalty` times the number of times the answer has used it so far, and by `presence_penalty` once if it
has used it at all (both from -2 to 2; negative values favour repeats). The prompt does not count. Reported
log-probabilities stay the model's own, before penalties.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

TOP_LOGPROBS = 20  # alternatives each step computes; a row asks for 0..TOP_LOGPROBS of them
SEED_RANGE = (-(2**63), 2**64 - 1)  # signed or unsigned 64-bit


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256  # tokens to generate at most (fewer where the context ends first)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens holding this probability mass (0 = the top token)
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ("USER:",)  # generation ends where one of these appears; it is not returned
    seed: int = 0
    logprobs: int | None = None  # report each token's log-probability and this many alternatives; None = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_new_tokens: int = 0  # the end-of-sequence token is not drawn before this many tokens (transformers' min_new_tokens)

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": 0.0 <= self.temperature <= 100.0,
            "top_p": 0.0 <= self.top_p <= 1.0,
            "top_k": self.top_k >= 0,
            "seed": isinstance(self.seed, (int, np.integer)) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
            "logprobs": self.logprobs is None or 0 <= self.logprobs <= TOP_LOGPROBS,
            "frequency_penalty": -2.0 <= self.frequency_penalty <= 2.0,
            "presence_penalty": -2.0 <= self.presence_penalty <= 2.0,
            "min_new_tokens": self.min_new_tokens >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling: {name}={getattr(self, name)!r} is out of range")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def key_words(self) -> tuple[int, int]:
        """The seed as a threefry key's two uint32 words (high, low)."""
        wrapped = int(self.seed) % 2**64
        return wrapped >> 32, wrapped & 0xFFFFFFFF

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def row_settings(params: list[Sampling], rows: int) -> dict[str, np.ndarray]:
    """The per-row arrays the jitted steps take, for `params` padded to `rows` with greedy filler rows."""
    filler = Sampling()
    padded = list(params) + [filler] * (rows - len(params))
    return {
        "keys": np.array([p.key_words for p in padded], np.uint32),  # [B, 2]
        "temperature": np.array([p.temperature for p in padded], np.float32),
        "top_p": np.array([p.top_p for p in padded], np.float32),
        "top_k": np.array([p.top_k for p in padded], np.int32),
        "frequency": np.array([p.frequency_penalty for p in padded], np.float32),
        "presence": np.array([p.presence_penalty for p in padded], np.float32),
        "min_new": np.array([p.min_new_tokens for p in padded], np.int32),
    }


# ----------------------------------------------------------------------------- on the device


def penalize(logits, counts, frequency, presence):
    """OpenAI's penalties: logits [B, V] less frequency [B] x counts [B, V] and presence [B] where a count is > 0.
    Skipped (no work) when every penalty is 0."""

    def apply(_):
        used = counts.astype(jnp.float32)
        return logits - frequency[:, None] * used - presence[:, None] * (used > 0)

    return jax.lax.cond(jnp.any(frequency != 0) | jnp.any(presence != 0), apply, lambda _: logits, None)


def hold_eos(logits, eos_ids: tuple[int, ...], step, min_new):
    """Logits [B, V] with the end-of-sequence ids at -inf in the rows that have generated fewer than `min_new` [B]
    tokens; `step` (scalar or [B]) is how many they have. Skipped (no work) when every `min_new` is 0."""
    if not eos_ids:
        return logits

    def apply(_):
        early = jnp.broadcast_to(jnp.asarray(step, jnp.int32), min_new.shape) < min_new  # [B]
        return jnp.where(early[:, None], logits.at[:, jnp.asarray(eos_ids)].set(-jnp.inf), logits)

    return jax.lax.cond(jnp.any(min_new > 0), apply, lambda _: logits, None)


CANDIDATES = 256  # top-k / top-p look at this many most likely tokens first; a full sort only where they fall short


def _truncation(ranked, lse, temperature_ok, top_p, top_k):
    """Per row, the lowest scaled logit kept by top-k then top-p, from `ranked` [B, n] (the n largest scaled logits,
    descending) and the log-normaliser `lse` [B, 1] of what top-k keeps; and whether `ranked` held the whole kept
    set. -inf (keep everything) where a row truncates nothing."""
    b, n = ranked.shape
    rank = jnp.arange(n)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, n), n)[:, None]
    ranked = jnp.where(rank < k, ranked, -jnp.inf)
    probs = jnp.exp(ranked - lse)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    kept = ((before < top_p[:, None]) | (rank == 0)) & jnp.isfinite(ranked)  # the first token is always kept
    threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1)
    truncates = (top_p < 1.0) | (top_k > 0)
    # whole: top-k keeps only candidates, and top-p closes before the last of them (or top-k alone decides)
    within = (top_k <= n) | (top_p >= 1.0)
    whole = within & ((~kept[:, -1]) | ((top_k > 0) & (top_k <= n)))
    return jnp.where(truncates, threshold, -jnp.inf), whole | ~truncates | ~temperature_ok


def kept_threshold(scaled, sampled, top_p, top_k):
    """Per row, the lowest of the scaled logits [B, V] that top-k then top-p keep (-inf: all of them).

    It first looks at the `CANDIDATES` most likely tokens (`lax.top_k`); only when some row's kept set may reach
    beyond them does it sort the whole vocabulary (on a CPU, sorting 16 x 49,152 logits costs about ten times the
    rest of a small model's sampling). Both give the same threshold."""
    vocab = scaled.shape[-1]
    n = min(CANDIDATES, vocab)
    top, _ = jax.lax.top_k(scaled, n)  # [B, n] descending
    k_lse = jax.nn.logsumexp(jnp.where(jnp.arange(n)[None, :] < top_k[:, None], top, -jnp.inf), axis=-1, keepdims=True)
    lse = jnp.where((top_k > 0)[:, None] & (top_k <= n)[:, None], k_lse, jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
    threshold, whole = _truncation(top, lse, sampled, top_p, top_k)

    def exact(_):  # the whole vocabulary, sorted
        ranked = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        full_lse = jax.nn.logsumexp(jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ranked, -jnp.inf), axis=-1, keepdims=True)
        return _truncation(ranked, full_lse, sampled, top_p, top_k)[0]

    return jax.lax.cond(jnp.all(whole), lambda _: threshold, exact, None)


def sample(logits, keys, step, temperature, top_p, top_k):
    """Next tokens [B] from logits [B, V]; per-row key words [B, 2] (uint32), step (scalar or [B]), temperature [B],
    top_p [B] and top_k [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        b = logits.shape[0]
        sampled = temperature > 0
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        threshold = kept_threshold(scaled, sampled, top_p, top_k)
        masked = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))
        row_key = lambda words, s: jax.random.fold_in(jax.random.wrap_key_data(words, impl="threefry2x32"), s)
        drawn = jax.vmap(jax.random.categorical)(jax.vmap(row_key)(keys, steps), masked).astype(jnp.int32)
        return jnp.where(sampled, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


def score(logits, token, wanted):
    """(log-probability of `token` [B], the top ids [B, K] and their log-probabilities [B, K]) under the raw
    logits [B, V], K = TOP_LOGPROBS; zeros of the same shapes, at no cost, unless `wanted` (a traced bool)."""
    b, k = logits.shape[0], min(TOP_LOGPROBS, logits.shape[-1])

    def compute(_):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_logp, top_ids = jax.lax.top_k(logp, k)
        return jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_logp

    skip = lambda _: (jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32))
    return jax.lax.cond(wanted, compute, skip, None)
