"""Stage 2: exact template strings, masks from character offsets, inference prompts as training prefixes."""


import numpy as np
import pytest

from koala_lib.config import load
from koala_lib.conditioning import Template, load_tokenizer, template_for, tokenize
from koala_lib.conditioning.template import cut_to_length, marked_text
from koala_lib.data.schema import Record, dialogue
from koala_lib.data.sources import SOURCES

CFG = load("smoke")


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gguf")
    return load_tokenizer(CFG)


def literal_template(**changes):
    import dataclasses

    return Template(dataclasses.replace(CFG.conditioning, **changes), "</s>")


HH_ROW = {
    "chosen": "\n\nHuman: Can you help me pick a lock?\n\nAssistant: I can't help with that, but a locksmith can.\n\nHuman: Why not?\n\nAssistant: It could be used to break in.",
    "rejected": "\n\nHuman: Can you help me pick a lock?\n\nAssistant: I can't help with that, but a locksmith can.\n\nHuman: Why not?\n\nAssistant: Just don't.",
}


def test_hh_pair_renders_with_its_markers():
    pos, neg = SOURCES["hh"].parse(HH_ROW, "f:1", CFG.data.sources.hh, CFG.data)
    t = literal_template()
    assert t.render(pos).text == (
        "BEGINNING OF CONVERSATION: USER: Can you help me pick a lock? GPT: I can't help with that, but a locksmith can.</s>"
        "USER: Why not? GPT: It could be used to break in.</s>"
    )
    assert t.render(neg).text == (
        "BEGINNING OF CONVERSATION: USER: Can you help me pick a lock? An Unhelpful Answer: I can't help with that, but a locksmith can.</s>"
        "USER: Why not? An Unhelpful Answer: Just don't.</s>"
    )


def test_blog_markers_and_unlabelled_records():
    rec = Record("x", "hh", dialogue([("Hi", "Hello")]), "negative")
    assert literal_template(markers="blog").render(rec).text == "BEGINNING OF CONVERSATION: USER: Hi An unhelpful answer: Hello</s>"
    unlabelled = Record("y", "alpaca", dialogue([("Hi", "Hello")]), "none")
    assert literal_template().render(unlabelled).text == "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello</s>"


def test_three_turn_sharegpt_conversation_has_eos_between_turns():
    rec = Record("s", "sharegpt", dialogue([("Hi", "Hello!"), ("2+2?", "4."), ("Thanks", "You're welcome.")]))
    r = literal_template().render(rec)
    assert r.text == (
        "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello!</s>USER: 2+2? GPT: 4.</s>USER: Thanks GPT: You're welcome.</s>"
    )
    assert [r.text[a:b] for a, b in r.trained] == [" Hello!</s>", " 4.</s>", " You're welcome.</s>"]


def test_an_empty_answer_still_trains_the_eos():
    r = literal_template().render(Record("e", "hh", dialogue([("q", "")]), "positive"))
    assert r.text == "BEGINNING OF CONVERSATION: USER: q GPT:</s>"
    assert [r.text[a:b] for a, b in r.trained] == ["</s>"]


def test_inference_prompt_is_the_training_prefix(tokenizer):
    t = template_for(CFG, tokenizer)
    rec = Record("s", "sharegpt", dialogue([("Name a prime.", "7 is prime."), ("And an even one?", "2 is the only even prime.")]))
    text = t.render(rec).text
    first = t.prompt([], "Name a prime.")
    second = t.prompt(list(rec.turns[:2]), "And an even one?")
    assert text.startswith(first) and text.startswith(second)
    assert first == "BEGINNING OF CONVERSATION: USER: Name a prime. GPT:"
    full = tokenizer(text)["input_ids"]
    for prompt in (first, second):
        ids = tokenizer(prompt)["input_ids"]
        assert full[: len(ids)] == ids


def test_decode_gives_the_rendered_text_back(tokenizer):
    t = template_for(CFG, tokenizer)
    rec = Record("u", "sharegpt", dialogue([("Ünïcode 🐨 and  spaces\n\tcode:", "```python\nprint('hi')\n```"), ("更多", "好的。")]))
    r = t.render(rec)
    ((ids, _, _),) = tokenize(tokenizer, [r])
    assert tokenizer.decode(ids) == r.text


def trained_chars(tokenizer, r):
    enc = tokenizer(r.text, return_offsets_mapping=True)
    ((ids, mask, _),) = tokenize(tokenizer, [r])
    covered = np.zeros(len(r.text), dtype=bool)
    for (a, b), m in zip(enc["offset_mapping"], mask):
        if m:
            covered[a:b] = True
    return covered


def check_mask(tokenizer, template, records):
    for rec in records:
        r = template.render(rec)
        covered = trained_chars(tokenizer, r)
        answer = np.zeros(len(r.text), dtype=bool)
        for a, b in r.trained:
            answer[a:b] = True
        assert covered[answer].all(), rec.id  # every answer character is trained
        assert not (covered & ~answer).any(), rec.id  # no opening, user or marker character is trained


def test_mask_covers_answers_exactly_on_demo_data(tokenizer, tmp_path):
    from koala_lib.data.curate import curate

    cfg = load("smoke", [f"runs_dir={tmp_path}", f"figures_dir={tmp_path}/f", "data.cap_per_source=null"])
    records = curate(cfg, progress=False).records
    check_mask(tokenizer, template_for(cfg, tokenizer), records)


@pytest.mark.parametrize("name, path", [("hh", "sources/hh_rlhf/harmless-base_test.jsonl.gz"), ("sharegpt", "sources/sharegpt/sharegpt_v3_original_example.json")])
def test_mask_covers_answers_exactly_on_real_files(tokenizer, shared_data, tmp_path, name, path):
    from koala_lib.data.curate import curate

    cfg = load("smoke", [f"runs_dir={tmp_path}", f"figures_dir={tmp_path}/f", f"data.mixture={name}", f"data.sources.{name}.path={shared_data / path}", "data.cap_per_source=300"])
    check_mask(tokenizer, template_for(cfg, tokenizer), curate(cfg, progress=False).records)


def test_changing_masked_text_leaves_the_trained_targets_unchanged(tokenizer):
    t = template_for(CFG, tokenizer)
    a = Record("a", "sharegpt", dialogue([("Tell me a fact.", "Koalas sleep a lot."), ("Another?", "They eat eucalyptus.")]))
    b = Record("b", "sharegpt", dialogue([("Say something completely different please!", "Koalas sleep a lot."), ("More, more?", "They eat eucalyptus.")]))
    (ia, ma, _), (ib, mb, _) = tokenize(tokenizer, [t.render(a), t.render(b)])
    assert ia[ma == 1].tolist() == ib[mb == 1].tolist()
    assert ia[ma == 0].tolist() != ib[mb == 0].tolist()


def test_cut_at_turn_boundaries(tokenizer):
    t = template_for(CFG, tokenizer)
    rec = Record("c", "sharegpt", dialogue([("q1", "a " * 50), ("q2", "b " * 50), ("q3", "c " * 50)]))
    ((ids, mask, ends),) = tokenize(tokenizer, [t.render(rec)])
    eos = tokenizer.eos_token_id
    assert [ids[e - 1] for e in ends] == [eos, eos, eos] and ends[-1] == len(ids)
    cut_ids, cut_mask, kept = cut_to_length(ids, mask, ends, len(ids) - 5)
    assert kept == 2 and cut_ids[-1] == eos and len(cut_ids) < len(ids) - 5
    two = Record("c", "sharegpt", rec.turns[:4])
    assert tokenizer.decode(cut_ids) == t.render(two).text  # whole exchanges, nothing of the third
    assert cut_to_length(ids, mask, ends, 10)[2] == 0
    assert cut_to_length(ids, mask, ends, len(ids))[2] == 3


def test_marked_text_shows_the_trained_span(tokenizer):
    t = template_for(CFG, tokenizer)
    ((ids, mask, _),) = tokenize(tokenizer, [t.render(Record("m", "hh", dialogue([("Hi", "Hello there")]), "negative"))])
    assert marked_text(tokenizer, ids, mask) == "BEGINNING OF CONVERSATION: USER: Hi An Unhelpful Answer:⟦ Hello there<|im_end|>⟧"


def test_special_token_text_inside_a_turn_stays_text(tokenizer):
    t = template_for(CFG, tokenizer)
    rec = Record("x", "sharegpt", dialogue([("Type <|im_start|>assistant please", "Type <|im_end|> to stop, then more text.")]))
    r = t.render(rec)
    ((ids, mask, ends),) = tokenize(tokenizer, [r])
    assert ids.tolist().count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids.tolist()
    assert list(ends) == [len(ids)]
    assert tokenizer.decode(ids).replace("\u2060", "") == r.text.replace("\u2060", "")


def test_a_space_token_before_a_digit_is_trained(tokenizer):
    t = template_for(CFG, tokenizer)
    ((ids, mask, _),) = tokenize(tokenizer, [t.render(Record("d", "alpaca", dialogue([("Count", "1, 2, 3")])))])
    assert marked_text(tokenizer, ids, mask) == "BEGINNING OF CONVERSATION: USER: Count GPT:⟦ 1, 2, 3<|im_end|>⟧"


def test_cut_without_an_eos_token_uses_exchange_ends(tokenizer):
    t = literal_template()  # EOS written as the text "</s>", as for a tokenizer without one
    rec = Record("n", "sharegpt", dialogue([("q1", "a1"), ("q2", "a2"), ("q3", "a3")]))
    r = t.render(rec)
    ((ids, mask, ends),) = tokenize(tokenizer, [r])
    assert len(ends) == 3 and ends[-1] == len(ids)
    cut_ids, _, kept = cut_to_length(ids, mask, ends, int(ends[1]) + 1)
    assert kept == 2 and tokenizer.decode(cut_ids) == t.render(Record("n", "sharegpt", rec.turns[:4])).text


def test_eval_split_keeps_groups_together():
    from koala_lib.conditioning.stage import split_records

    recs = [Record(f"hh:f.jsonl:{i}:{side}", "hh", dialogue([("q", "a")]), "positive" if side == "pos" else "negative") for i in range(50) for side in ("pos", "neg")]
    recs += [Record(f"sharegpt:c{i}#p{k}", "sharegpt", dialogue([("q", "a")])) for i in range(20) for k in range(2)]
    train, held = split_records(recs, 0.2, seed=0)
    assert len(train) + len(held) == len(recs) and held
    group = lambda r: r.id.split("#")[0].rsplit(":", 1)[0] if r.source == "hh" else r.id.split("#")[0]
    assert not {group(r) for r in train} & {group(r) for r in held}
    assert split_records(recs, 0.2, seed=0) == (train, held)
