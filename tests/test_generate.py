"""Generation: KV-cache decoding equals recomputing the prefix, parity with transformers' generate, sampling,
stop strings, streaming, and bucketed compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koala_lib.inference.generate import Generator, PromptTooLong, Sampling, bucket, held_back, prompt_bucket, sample
from koala_lib.model.llama import Llama
from koala_lib.model.presets import preset


class CharTokenizer:
    """A tiny tokenizer for the random debug model: id 0 is EOS, every other id a printable ASCII character."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 31 for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(32 + (i - 1) % 95) for i in ids if i > 0)


@pytest.fixture(scope="module")
def debug_model():
    return Llama(preset("debug").replace(vocab_size=300, eos_token_id=0), rngs=nnx.Rngs(3))


def greedy_by_recompute(model: Llama, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole prefix through the plain forward at every step (right-padded to
    64 tokens, which causal attention never sees, so that it compiles once)."""
    forward = nnx.jit(lambda m, tokens: m(tokens))
    ids = list(prompt)
    for _ in range(steps):
        padded = np.ones((1, 64), np.int32)
        padded[0, : len(ids)] = ids
        logits = forward(model, jnp.asarray(padded))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_kv_cache_logits_equal_the_plain_forward(debug_model):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, size=(2, 11)).astype(np.int32)
    full = debug_model(jnp.asarray(ids))  # [2, 11, V]
    cache = debug_model.init_cache(2, 16)
    valid = np.zeros((2, 16), bool)
    valid[:, :6] = True
    pos = np.broadcast_to(np.arange(11), (2, 11)).astype(np.int32)
    logits, cache = debug_model.extend(jnp.asarray(ids[:, :6]), jnp.asarray(pos[:, :6]), jnp.asarray(valid), cache, 0)
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for i in range(6, 11):
        valid[:, i] = True
        step, cache = debug_model.extend(jnp.asarray(ids[:, i:i + 1]), jnp.asarray(pos[:, i:i + 1]), jnp.asarray(valid), cache, i)
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)


def test_fused_projections_compute_the_same_logits_and_leave_the_model_alone(debug_model):
    fused = debug_model.fused()
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 300, size=(3, 13)), jnp.int32)
    np.testing.assert_allclose(fused(ids), debug_model(ids), atol=1e-5)
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert attn.qkv_proj.kernel.shape == (64, 64 + 2 * 32) and mlp.gate_up_proj.kernel.shape == (64, 2 * 128)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    assert debug_model.layers[0].self_attn.qkv_proj is None and debug_model.layers[0].self_attn.q_proj.kernel.shape == (64, 64)


def test_batched_left_padded_greedy_equals_recomputing_each_prompt_alone(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    prompts = [[5, 9, 11], [7] * 20, list(range(1, 34))]  # three prompt lengths, two prompt buckets' worth
    outs = gen.generate(prompts, Sampling(max_new_tokens=12, stop=()))
    for prompt, out in zip(prompts, outs):
        expected = greedy_by_recompute(debug_model, prompt, 12)  # the unfused model, whole prefix every step
        cut = expected.index(0) if 0 in expected else len(expected)  # EOS ends it
        assert out.tokens == expected[:cut]
        assert out.finish_reason == ("stop" if cut < 12 else "length")
        assert out.prompt_tokens == len(prompt)


def test_shapes_are_bucketed_so_compilation_is_shared(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    gen.generate([[1] * 3, [2] * 9], Sampling(max_new_tokens=8, stop=()))
    first = set(gen.compiled)
    gen.generate([[3] * 12, [4] * 15], Sampling(max_new_tokens=5, stop=()))  # same batch, prompt and cache buckets
    assert gen.compiled == first == {("prefill", (2, 16, 32)), ("decode", (2, 32))}
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert [prompt_bucket(n, 16) for n in (3, 17, 200, 256, 257, 300, 384, 385, 1000)] == [16, 32, 256, 256, 384, 384, 384, 512, 1024]


def test_wide_decode_on_a_cpu_keeps_matmuls_off_ynnpack_and_an_unknown_option_falls_back(monkeypatch):
    import koala_lib.inference.generate as generate

    assert generate.wide_decode_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert generate.wide_decode_options("gpu") == {}
    monkeypatch.setattr(generate, "_CPU_WIDE_DECODE_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})
    generate.wide_decode_options.cache_clear()
    try:
        assert generate.wide_decode_options("cpu") == {}
    finally:
        generate.wide_decode_options.cache_clear()


def test_wide_and_narrow_batches_decode_alike(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    prompts = [[1 + i % 5] * (3 + i) for i in range(9)]  # 9 rows: a batch bucket of 16, decoded by the wide step
    wide = gen.generate(prompts, Sampling(max_new_tokens=6, stop=()))
    narrow = [gen.generate([p], Sampling(max_new_tokens=6, stop=()))[0] for p in prompts[:3]]
    assert {key[1][0] for key in gen.compiled if key[0] == "decode"} == {1, 16}
    assert [c.tokens for c in wide[:3]] == [c.tokens for c in narrow]


def test_a_prompt_decodes_alike_in_a_multiple_of_128_bucket_and_a_power_of_two_one(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    long = [1 + i % 7 for i in range(300)]  # alone: prompt bucket 384
    alone = gen.generate([long], Sampling(max_new_tokens=4, stop=()))[0]
    together = gen.generate([long, [2] * 500], Sampling(max_new_tokens=4, stop=()))[0]  # with a longer one: 512
    assert {key[1][1] for key in gen.compiled if key[0] == "prefill"} == {384, 512}
    assert alone.tokens == together.tokens


def key_words(seeds):
    """Per-row threefry key words [B, 2] for these seeds, as the jitted steps take them."""
    return jnp.asarray([Sampling(seed=s).key_words for s in seeds], jnp.uint32)


def test_sampling_top_k_one_and_tiny_top_p_are_greedy():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    ones = jnp.ones(4, jnp.float32)
    seeds = key_words(range(4))
    by_k = sample(logits, seeds, 3, ones, ones, jnp.ones(4, jnp.int32))
    by_p = sample(logits, seeds, 3, ones, jnp.full(4, 1e-6), jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(by_k, greedy)
    np.testing.assert_array_equal(by_p, greedy)


def test_sampling_draws_only_from_the_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 400, jnp.float32))
    seeds = key_words(range(400))
    ones = jnp.ones(400, jnp.float32)
    top2 = np.asarray(sample(logits, seeds, 0, ones, ones, jnp.full(400, 2, jnp.int32)))
    assert set(top2) == {0, 1}
    nucleus = np.asarray(sample(logits, seeds, 0, ones, jnp.full(400, 0.7), jnp.zeros(400, jnp.int32)))
    assert set(nucleus) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the third token is outside the nucleus
    free = np.asarray(sample(logits, seeds, 0, ones, ones, jnp.zeros(400, jnp.int32)))
    assert set(free) == {0, 1, 2, 3}
    assert 0.4 < np.mean(free == 0) < 0.6


def test_sampling_is_reproducible_per_seed_and_independent_of_the_batch(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    hot = Sampling(max_new_tokens=10, temperature=1.0, seed=7, stop=())
    alone = gen.generate([[4, 5, 6]], hot)[0].tokens
    again = gen.generate([[4, 5, 6]], hot)[0].tokens
    batched = gen.generate([[9] * 5, [4, 5, 6]], [Sampling(max_new_tokens=10, stop=()), hot])[1].tokens
    other_seed = gen.generate([[4, 5, 6]], Sampling(max_new_tokens=10, temperature=1.0, seed=8, stop=()))[0].tokens
    assert alone == again == batched
    assert alone != other_seed


def test_held_back_keeps_a_possible_stop_prefix_and_half_characters():
    assert held_back("Sure. US", ["USER:"]) == 2
    assert held_back("Sure. USER", ["USER:"]) == 4
    assert held_back("Sure.", ["USER:"]) == 0
    assert held_back("caf\ufffd", []) == 1
    assert held_back("好的。用\ufffd", ["用户:"]) == 2  # a stop's first character, then half of the next one


def test_streamed_deltas_add_up_to_the_text_and_stop_strings_are_cut(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    free = gen.generate([[10, 20, 30]], Sampling(max_new_tokens=16, stop=()))[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]  # a string the model is known to produce
    events = []
    out = gen.generate([[10, 20, 30], [1, 2]], Sampling(max_new_tokens=16, stop=(stop,)), on_token=events.append)
    assert out[0].text == free.text[: free.text.find(stop)] and out[0].finish_reason == "stop"
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        assert "".join(e.delta for e in mine) == out[row].text
        assert [e.finish_reason for e in mine][-1] == out[row].finish_reason
        assert all(e.finish_reason is None for e in mine[:-1])


def test_prompt_longer_than_the_context_is_refused(debug_model):
    gen = Generator(debug_model, CharTokenizer())
    with pytest.raises(PromptTooLong, match="prompt 1: the prompt has 512 tokens; the model's context is 512"):
        gen.generate([[1, 2], [1] * 512])
    out = gen.generate([[1] * 508], Sampling(max_new_tokens=50, stop=()))[0]
    assert len(out.tokens) <= 4 and (out.finish_reason == "length" or len(out.tokens) < 4)


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="top_p=1.5"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Sampling(max_new_tokens=0)


@pytest.mark.slow
def test_parity_greedy_generation_equals_transformers_generate_on_smollm2():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from koala_lib.model.checkpoints import load_hf
    from koala_lib.model.gguf_default import default_model_dir

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gen = Generator(load_hf(folder), tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = [
        "BEGINNING OF CONVERSATION: USER: What is the capital of France? GPT:",
        "BEGINNING OF CONVERSATION: USER: Write a haiku about the sea. GPT:",
        "BEGINNING OF CONVERSATION: USER: Give me three tips for learning to play the guitar. GPT:",
        "BEGINNING OF CONVERSATION: USER: Explain recursion to a child. GPT:",
    ]
    batched = gen.generate(prompts, Sampling(max_new_tokens=32, stop=()))
    single = [gen.generate([p], Sampling(max_new_tokens=32, stop=()))[0] for p in prompts[:2]]
    for prompt, out in zip(prompts, batched):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**enc, max_new_tokens=32, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        ref = ref[: ref.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ref else ref
        assert out.tokens == ref, prompt
    assert [s.tokens for s in single] == [b.tokens for b in batched[:2]]


def test_top_k_and_top_p_on_candidates_keep_what_a_full_sort_keeps(monkeypatch):
    """The fast path (the 256 most likely tokens), the fallback (a full sort when the kept set may reach beyond the
    candidates: here with 8 of them) and a full sort from the start keep the same tokens, so they draw the same."""
    from koala_lib.inference import sampling

    rng = np.random.default_rng(0)
    b, v = 64, 5000
    for scale in (0.5, 3.0, 8.0):  # flat to peaked distributions: nuclei of thousands of tokens down to one
        logits = jnp.asarray(rng.normal(size=(b, v)) * scale, jnp.float32)
        top_p = jnp.asarray(rng.choice([1.0, 0.9, 0.5, 0.99, 0.0], b), jnp.float32)
        top_k = jnp.asarray(rng.choice([0, 0, 1, 5, 300, 6000], b), jnp.int32)  # 300: more than the candidates
        args = (logits, key_words(range(b)), 3, jnp.asarray(rng.choice([0.7, 1.0, 1.3], b), jnp.float32), top_p, top_k)
        kept, draws = {}, {}
        for candidates in (256, 8, v):
            monkeypatch.setattr(sampling, "CANDIDATES", candidates)
            kept[candidates] = np.asarray(jax.jit(sampling.kept_threshold)(logits, jnp.ones(b, bool), top_p, top_k))
            draws[candidates] = np.asarray(jax.jit(sample)(*args))
        np.testing.assert_array_equal(kept[256], kept[v])
        np.testing.assert_array_equal(kept[8], kept[v])
        np.testing.assert_array_equal(draws[256], draws[v])
        assert len(set(draws[v].tolist())) > b // 2  # they are draws, not all the greedy token
    # one token with 32 % of the mass, 299 with 0.1 % each, a flat rest with 38 %: top_k 300 (beyond the candidates)
    # leaves the first about 52 % of what it keeps, so top_p 0.5 keeps it alone; normalising over the whole
    # vocabulary instead would keep the first ~180 tokens
    row = np.log(np.array([0.32] + [0.001] * 299 + [0.381 / (v - 300)] * (v - 300), np.float32))
    for candidates in (256, 8, v):
        monkeypatch.setattr(sampling, "CANDIDATES", candidates)
        got = jax.jit(sampling.kept_threshold)(jnp.asarray(row[None]), jnp.ones(1, bool), jnp.full(1, 0.5), jnp.full(1, 300))
        assert float(got[0]) == pytest.approx(row[0])


class EndsAt(CharTokenizer):
    """CharTokenizer whose end-of-sequence id is `eos` (the debug model's own EOS id, 0, stays one too)."""

    def __init__(self, eos: int):
        self.eos_token_id = eos


def test_min_new_tokens_holds_back_an_end_of_sequence_the_model_would_draw_first(debug_model):
    prompt = [10, 20, 30]
    free = Generator(debug_model, CharTokenizer()).generate([prompt], Sampling(max_new_tokens=6, stop=(), logprobs=3))[0]
    first, runner_up = free.tokens[0], free.logprobs[0].top[1][0]
    gen = Generator(debug_model, EndsAt(first))  # the greedy first token is now an end of sequence
    stopped = gen.generate([prompt], Sampling(max_new_tokens=6, stop=()))[0]
    assert stopped.tokens == [] and stopped.text == "" and stopped.finish_reason == "stop"  # an empty answer
    held = gen.generate([prompt, prompt], [Sampling(max_new_tokens=6, stop=(), min_new_tokens=2), Sampling(max_new_tokens=6, stop=())])
    assert held[0].tokens[0] == runner_up and first not in held[0].tokens[:2] and len(held[0].tokens) >= 2
    assert held[1].tokens == []  # rows of one batch keep their own setting
    with pytest.raises(ValueError, match="min_new_tokens"):
        Sampling(min_new_tokens=-1)


def test_min_new_tokens_in_the_continuous_batcher(debug_model):
    from koala_lib.inference.scheduler import ContinuousBatcher

    prompt = [10, 20, 30]
    first = Generator(debug_model, CharTokenizer()).generate([prompt], Sampling(max_new_tokens=2, stop=()))[0].tokens[0]
    batcher = ContinuousBatcher(Generator(debug_model, EndsAt(first)), slots=2, max_queue=4)
    try:
        jobs = [batcher.submit(prompt, Sampling(max_new_tokens=5, stop=(), min_new_tokens=m), lambda e: None) for m in (0, 3)]
        assert all(job.done.wait(300) for job in jobs)
        plain, held = (job.result for job in jobs)
    finally:
        batcher.close()
    assert plain.tokens == [] and len(held.tokens) >= 3 and first not in held.tokens[:3]
