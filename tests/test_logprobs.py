"""Log-probabilities: the generator's entries, the token text and bytes, and the server's OpenAI layouts (chat and
legacy completions, streamed and not), checked against transformers' PyTorch model on the real SmolLM2 weights."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koala_lib import config
from koala_lib.conditioning.template import template_for
from koala_lib.inference.generate import Generator, Sampling
from koala_lib.model.llama import Llama
from koala_lib.model.presets import preset
from koala_lib.inference.serve import create_app, serving
from koala_lib.inference.token_text import TokenText, byte_alphabet

openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def streamed_chat(c, **ask) -> tuple[list, str, list[dict]]:
    """(chunks, the content, the logprob entries of all chunks in order)."""
    chunks = list(c.chat.completions.create(**ask, stream=True))
    entries = [e.model_dump() for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    return chunks, "".join(ch.choices[0].delta.content or "" for ch in chunks), entries


def joined_legacy(chunks) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        if ch.choices[0].logprobs:
            for key in out:
                out[key].extend(getattr(ch.choices[0].logprobs, key))
    return out


# ----------------------------------------------------------------------------- the generator (tiny random model)


def test_entries_are_the_raw_log_softmax_whatever_the_sampling_and_tokens_do_not_change(tiny_generator):
    gen = tiny_generator
    prompts = ["Once upon a time", "BEGINNING OF CONVERSATION: USER: Tell me about koalas, please. GPT:"]
    hot = dict(temperature=1.5, top_k=7, seed=3)
    plain = gen.generate(prompts, [Sampling(max_new_tokens=6, stop=()), Sampling(max_new_tokens=6, stop=(), **hot)])
    events = []
    scored = gen.generate(prompts, [Sampling(max_new_tokens=6, stop=(), logprobs=4), Sampling(max_new_tokens=6, stop=(), logprobs=0, **hot)], on_token=events.append)
    assert [c.tokens for c in scored] == [c.tokens for c in plain]  # asking for logprobs changes no token
    assert plain[0].logprobs is None and plain[1].logprobs is None
    model = nnx.merge(gen.graphdef, gen.state)
    for prompt, out, top in zip(prompts, scored, (4, 0)):
        assert [e.token for e in out.logprobs] == out.tokens and out.finish_reason == "length"
        ids = gen.encode(prompt) + out.tokens
        logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]))[0], axis=-1))  # the plain forward, no cache
        for k, entry in enumerate(out.logprobs):
            row = logp[len(ids) - len(out.tokens) - 1 + k]
            assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-4)
            assert [t for t, _ in entry.top] == list(np.argsort(-row)[:top])
            assert [lp for _, lp in entry.top] == pytest.approx(np.sort(row)[::-1][:top].tolist(), abs=1e-4)
    for row, out in enumerate(scored):  # the events' entries add up to the completion's
        assert [e for ev in events if ev.row == row for e in ev.logprobs] == out.logprobs


def test_sampling_checks_the_number_of_alternatives():
    assert Sampling(logprobs=20).logprobs == 20
    with pytest.raises(ValueError, match="logprobs=21"):
        Sampling(logprobs=21)
    with pytest.raises(ValueError, match="logprobs=-1"):
        Sampling(logprobs=-1)


@pytest.fixture(scope="module")
def eos_generator(tiny_generator):
    """A model whose final norm is zero: every logit is 0, so greedy picks id 0 (`<|endoftext|>`, made its EOS)."""
    tokenizer = tiny_generator.tokenizer
    model = Llama(preset("debug").replace(vocab_size=len(tokenizer), eos_token_id=0), rngs=nnx.Rngs(0))
    model.norm.weight.set_value(jnp.zeros_like(model.norm.weight.get_value()))
    return Generator(model, tokenizer)


def test_an_answer_that_ends_at_once_still_reports_its_eos_token(eos_generator):
    out = eos_generator.generate(["Hi"], Sampling(max_new_tokens=4, logprobs=3))[0]
    uniform = -math.log(len(eos_generator.tokenizer))
    assert (out.text, out.tokens, out.finish_reason) == ("", [], "stop")
    [entry] = out.logprobs
    assert entry.token == 0 and entry.logprob == pytest.approx(uniform, abs=1e-5)
    assert len(entry.top) == 3 and all(lp == pytest.approx(uniform, abs=1e-5) for _, lp in entry.top)


# ----------------------------------------------------------------------------- token text and bytes


def test_token_bytes_of_a_split_character_are_its_raw_bytes(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    names = TokenText(tokenizer)
    ids = tokenizer("日本", add_special_tokens=False)["input_ids"]
    assert [names(i)[1] for i in ids] == [b"\xe6\x97", b"\xa5", "本".encode()]  # 日 is split in two tokens
    assert [names(i)[0] for i in ids] == ["\ufffd", "\ufffd", "本"]
    space = tokenizer(" koala", add_special_tokens=False)["input_ids"]
    assert b"".join(names(i)[1] for i in space) == b" koala"
    assert names(tokenizer.eos_token_id) == ("<|im_end|>", b"<|im_end|>")
    assert byte_alphabet()["\u0120"] == 0x20 and byte_alphabet()["\u010a"] == 0x0A and len(byte_alphabet()) == 256


def test_sentencepiece_pieces_map_spaces_and_byte_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", *[f"<0x{b:02X}>" for b in range(256)], "\u2581", "H", "i", "é", "本", "\u2581k", "o", "a", "l"]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse(),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    names = TokenText(tokenizer)
    ids = tokenizer("Hi 日本", add_special_tokens=False)["input_ids"]
    assert [names(i)[1] for i in ids] == [b" ", b"H", b"i", b" ", b"\xe6", b"\x97", b"\xa5", "本".encode()]
    assert names(pieces.index("\u2581k")) == (" k", b" k")


# ----------------------------------------------------------------------------- the server (tiny random model)


def test_bad_logprob_settings_are_400_naming_the_parameter(tiny_server):
    url, _ = tiny_server
    chat = {"model": "koala-debug", "messages": HELLO, "max_tokens": 2}
    cases = [
        (f"{url}/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (f"{url}/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (f"{url}/v1/chat/completions", {**chat, "top_logprobs": 3}, "top_logprobs"),
        (f"{url}/v1/chat/completions", {**chat, "logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        (f"{url}/v1/completions", {"model": "koala-debug", "prompt": "Hi", "max_tokens": 2, "logprobs": 21}, "logprobs"),
    ]
    for where, body, param in cases:
        status, payload = post(where, body)
        assert (status, payload["error"]["param"]) == (400, param), body
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client(url).chat.completions.create(model="koala-debug", messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=21)


def test_a_request_without_logprobs_gets_null(tiny_server):
    url, _ = tiny_server
    status, chat = post(f"{url}/v1/chat/completions", {"model": "koala-debug", "messages": HELLO, "max_tokens": 3})
    assert status == 200 and "logprobs" in chat["choices"][0] and chat["choices"][0]["logprobs"] is None
    status, legacy = post(f"{url}/v1/completions", {"model": "koala-debug", "prompt": "Hi", "max_tokens": 3})
    assert status == 200 and "logprobs" in legacy["choices"][0] and legacy["choices"][0]["logprobs"] is None
    chunks = list(client(url).chat.completions.create(model="koala-debug", messages=HELLO, max_tokens=3, stream=True))
    assert len(chunks) >= 3 and all(ch.choices[0].logprobs is None for ch in chunks)


def test_streamed_chat_entries_add_up_to_the_answer_and_never_run_ahead_of_its_text(tiny_server):
    url, _ = tiny_server
    c = client(url)
    ask = dict(model="koala-debug", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=0, logprobs=True, top_logprobs=3)
    full = c.chat.completions.create(**ask)
    choice = full.choices[0]
    entries = [e.model_dump() for e in choice.logprobs.content]
    assert choice.finish_reason == "length" and len(entries) == full.usage.completion_tokens == 16
    assert all(len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] >= e["logprob"] for e in entries)
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == choice.message.content
    chunks, content, streamed = streamed_chat(c, **ask)
    assert content == choice.message.content and streamed == entries
    sent_text, sent_bytes = "", b""
    for ch in chunks:  # each chunk's entries are of tokens whose text has been sent
        sent_text += ch.choices[0].delta.content or ""
        sent_bytes += b"".join(bytes(e.bytes) for e in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else []))
        assert sent_text.encode().startswith(sent_bytes)
    assert sum(1 for ch in chunks if ch.choices[0].logprobs) > 1  # the entries streamed piece by piece too


def test_streamed_legacy_entries_equal_the_non_streamed_ones(tiny_server):
    url, _ = tiny_server
    c = client(url)
    prompt = "Once upon a time"
    ask = dict(model="koala-debug", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    full = c.completions.create(**ask)
    logprobs = full.choices[0].logprobs.model_dump()
    assert len(logprobs["tokens"]) == 8 and "".join(logprobs["tokens"]) == full.choices[0].text
    assert logprobs["text_offset"][0] == len(prompt)  # counted from the start of the prompt, as OpenAI's are
    assert logprobs["text_offset"] == [len(prompt) + len("".join(logprobs["tokens"][:k])) for k in range(8)]
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert top[token] == value and 2 <= len(top) <= 3  # the two alternatives asked for, and the chosen token
    assert joined_legacy(c.completions.create(**ask, stream=True)) == logprobs


def test_a_flagged_word_and_its_tokens_never_reach_a_streaming_client(tiny_server, tiny_generator):
    from koala_lib.inference.serve import word_list

    url, _ = tiny_server
    ask = dict(model="koala-debug", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=30, temperature=0, logprobs=True)
    plain = client(url).chat.completions.create(**ask).choices[0].message.content
    word = plain.split()[3]
    app = create_app(tiny_generator, template_for(config.load("smoke"), tiny_generator.tokenizer), model_name="koala-debug", moderation=word_list([word]))
    with serving(app) as moderated:
        chunks, content, streamed = streamed_chat(client(moderated), **ask)
    assert chunks[-1].choices[0].finish_reason == "content_filter" and word not in content
    sent = b"".join(bytes(e["bytes"]) for e in streamed)  # the held-back word's tokens are dropped with it
    assert word.encode() not in sent and content.encode().startswith(sent) and not content.encode()[len(sent):].strip()


def test_the_eos_that_ends_an_answer_has_its_entry_streamed_or_not(eos_generator):
    app = create_app(eos_generator, template_for(config.load("smoke"), eos_generator.tokenizer), model_name="koala-debug")
    uniform = -math.log(len(eos_generator.tokenizer))
    ask = dict(model="koala-debug", messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    with serving(app) as url:
        c = client(url)
        full = c.chat.completions.create(**ask)
        chunks, content, streamed = streamed_chat(c, **ask)
        legacy = c.completions.create(model="koala-debug", prompt="Hi", max_tokens=5, temperature=0, logprobs=1).choices[0].logprobs
    choice = full.choices[0]
    assert (choice.message.content, choice.finish_reason, full.usage.completion_tokens) == ("", "stop", 0)
    [entry] = [e.model_dump() for e in choice.logprobs.content]
    assert entry["token"] == "<|endoftext|>" and entry["bytes"] == list(b"<|endoftext|>")
    assert entry["logprob"] == pytest.approx(uniform, abs=1e-5) and len(entry["top_logprobs"]) == 2
    assert content == "" and streamed == [entry] and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].logprobs is None  # the entry came before the final chunk
    assert legacy.tokens == ["<|endoftext|>"] and legacy.text_offset == [2]


# ----------------------------------------------------------------------------- parity on the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2(smollm2_generator):
    """(the server's URL, its template, the tokenizer, transformers' LlamaForCausalLM) on the default model's folder."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from koala_lib.model.checkpoints import resolve_checkpoint

    tokenizer = smollm2_generator.tokenizer
    template = template_for(config.load("smoke"), tokenizer)
    hf = LlamaForCausalLM.from_pretrained(resolve_checkpoint("default"), dtype=torch.float32).eval()
    app = create_app(smollm2_generator, template, model_name="smollm2")
    with serving(app) as url:
        yield url, template, tokenizer, hf


def greedy_reference(hf, tokenizer, ids: list[int], steps: int, top: int) -> list[tuple[int, float, dict[int, float]]]:
    """transformers' greedy steps: (token, its log-softmax, {top id: log-softmax}), up to and including EOS."""
    import torch

    out = []
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
        best = torch.topk(logp, top)
        token = int(best.indices[0])
        out.append((token, float(logp[token]), dict(zip(best.indices.tolist(), best.values.tolist()))))
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
    return out


@pytest.mark.slow
def test_parity_logprobs_through_the_openai_client_equal_transformers(smollm2):
    url, template, tokenizer, hf = smollm2
    c = client(url)
    text = lambda token: tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    worst = 0.0

    def close(ours: float, reference: float) -> bool:
        nonlocal worst
        worst = max(worst, abs(ours - reference))
        return abs(ours - reference) <= 1e-4

    question = "What is a koala?"  # its first six tokens hold no stop string (" A koala is a marsup")
    ask = dict(model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    ids = tokenizer(template.prompt([], question), add_special_tokens=True)["input_ids"]
    reference = greedy_reference(hf, tokenizer, ids, 6, 5)
    full = [e.model_dump() for e in c.chat.completions.create(**ask).choices[0].logprobs.content]
    for entries in (full, streamed_chat(c, **ask)[2]):
        assert len(entries) == len(reference)
        for entry, (token, logprob, top) in zip(entries, reference):
            assert entry["token"] == text(token) and bytes(entry["bytes"]).decode() == text(token)
            assert close(entry["logprob"], logprob)
            assert {t["token"] for t in entry["top_logprobs"]} == {text(t) for t in top}
            by_text = {text(t): lp for t, lp in top.items()}
            assert all(close(t["logprob"], by_text[t["token"]]) for t in entry["top_logprobs"])

    prompt = "The capital of France is"
    ask = dict(model="smollm2", prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    reference = greedy_reference(hf, tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"], 6, 5)
    full = c.completions.create(**ask).choices[0].logprobs.model_dump()
    for legacy in (full, joined_legacy(c.completions.create(**ask, stream=True))):
        assert legacy["tokens"] == [text(t) for t, _, _ in reference]
        assert all(close(ours, lp) for ours, (_, lp, _) in zip(legacy["token_logprobs"], reference, strict=True))
        for mine, (_, _, top) in zip(legacy["top_logprobs"], reference):
            assert set(mine) == {text(t) for t in top}  # greedy: the chosen token is the first of the five
            assert all(close(mine[text(t)], lp) for t, lp in top.items())
        assert legacy["text_offset"] == [len(prompt) + len("".join(legacy["tokens"][:k])) for k in range(len(reference))]
    print(f"largest |logprob difference| against transformers: {worst:.2e}")
