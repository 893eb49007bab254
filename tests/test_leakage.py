"""The leakage filter: same decisions as brute-force sacrebleu, a sound bound, an index that skips, the loaders."""

from __future__ import annotations

import json
import random

import pytest
import sacrebleu

from koala_lib.data.readers import SourceFormatError
from koala_lib.data.schema import Record, dialogue
from koala_lib.evaluation.leakage import (
    NgramIndex,
    bleu_upper_bound,
    brute_force_leaks,
    find_leaks,
    load_queries,
    load_train_texts,
    queries_from_prompts,
    run_leakage,
    train_texts_from_records,
)
from koala_lib.inference.testsets import TestPrompt

# few words, so that random texts share many n-grams; punctuation and entities exercise the 13a tokenizer
VOCAB = ["the", "cat", "sat", "on", "mat", "a", "dog", ".", ",", "?", "The", "don't", "U.S.", "3.5", "-", "&amp;", "(x)"]


def random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 3, 4, 5, 7, 10, 14, 20, 30])
    text = " ".join(rng.choice(VOCAB) for _ in range(n))
    return rng.choice([text, text, text + "  ", "\n" + text, text.replace(" ", "", 1)])


def signature(report):
    return report.kept, [(leak.id, leak.bleu, leak.train_index, leak.train_text) for leak in report.removed]


def assert_same_as_brute_force(queries, texts, threshold=20.0):
    fast, slow = find_leaks(queries, texts, threshold, progress=False), brute_force_leaks(queries, texts, threshold)
    assert signature(fast) == signature(slow)
    return fast


def test_scorer_is_sacrebleu_sentence_bleu():
    rng = random.Random(0)
    for _ in range(200):
        hyp, ref = random_text(rng), random_text(rng)
        ours = brute_force_leaks([("q", hyp)], [ref], threshold=0.0)  # kept <=> BLEU 0
        expected = sacrebleu.sentence_bleu(hyp, [ref]).score
        assert (ours.removed[0].bleu if ours.removed else 0.0) == expected


@pytest.mark.parametrize("threshold", [20.0, 0.0, 10.0, 45.0])
def test_random_pairs_same_decisions_as_brute_force(threshold):
    rng = random.Random(1)
    texts = [random_text(rng) for _ in range(40)] + ["", "   ", "\n"]
    queries = [(f"q{i}", random_text(rng)) for i in range(30)] + [("empty", ""), ("blank", " \n ")]
    report = assert_same_as_brute_force(queries, texts, threshold)
    assert report.pairs == len(queries) * len(texts)
    if threshold == 20.0:
        assert report.removed and report.kept  # not vacuous


def near_threshold_cases() -> tuple[list[tuple[str, str]], list[str]]:
    """Hypotheses sharing progressively more of a reference's n-grams, with filler words it does not contain."""
    rng = random.Random(2)
    ref_words = [f"r{i}" for i in range(40)]
    reference = " ".join(ref_words)
    queries = []
    for length in (4, 6, 9, 12, 16, 20, 25, 30):
        for shared in range(length + 1):
            for shuffled in (False, True):
                start = rng.randrange(0, 40 - shared + 1)
                part = ref_words[start:start + shared]
                if shuffled:
                    part = rng.sample(part, len(part))
                words = part + [f"f{j}" for j in range(length - shared)]
                if shuffled:
                    words = rng.sample(words, len(words))
                queries.append((f"L{length}s{shared}{'x' if shuffled else ''}", " ".join(words)))
    texts = [reference, " ".join(ref_words[:12]), " ".join(ref_words[10:]), "f0 f1 unrelated words"]
    return queries, texts


def test_near_threshold_pairs_same_decisions_as_brute_force():
    queries, texts = near_threshold_cases()
    best = [max(sacrebleu.sentence_bleu(q, [t]).score for t in texts) for _, q in queries]
    assert any(20 < b <= 22 for b in best) and any(18 <= b <= 20 for b in best)  # the set really straddles 20
    assert_same_as_brute_force(queries, texts, 20.0)
    # a threshold equal to a pair's score: "exceeds" is strict, both sides must keep that query
    tie = min(b for b in best if 20 < b <= 22)
    report = assert_same_as_brute_force(queries, texts, tie)
    assert all(leak.bleu > tie for leak in report.removed)


def test_bound_is_an_upper_bound():
    rng = random.Random(3)
    pairs = [(random_text(rng), random_text(rng)) for _ in range(600)] + [("a b a", "b a b"), ("a a a a", "a a")]
    for hyp, ref in pairs:
        score = sacrebleu.sentence_bleu(hyp, [ref])
        for known in range(1, 5):  # exact matches of the first `known` orders, the rest bounded
            bound = float(bleu_upper_bound(score.sys_len, score.ref_len, score.counts[:known]))
            assert bound >= score.score - 1e-9, (hyp, ref, known)
        exact = float(bleu_upper_bound(score.sys_len, score.ref_len, score.counts))
        assert exact == pytest.approx(score.score, rel=1e-12, abs=1e-12)


def test_ties_and_duplicates_keep_the_first_best_text():
    texts = ["x y", "a b c x", "a b c d", "a b c d", "a b c y"]
    report = assert_same_as_brute_force([("q", "a b c d"), ("r", "a b c z")], texts)
    assert [(leak.id, leak.train_index) for leak in report.removed] == [("q", 2), ("r", 1)]
    assert report.distinct_train_texts == 4


def zipf_sentences(rng: random.Random, n: int, vocab: int = 500) -> list[str]:
    words = [f"w{i}" for i in range(vocab)]
    weights = [1 / (k + 2.7) for k in range(vocab)]
    return [" ".join(rng.choices(words, weights, k=rng.randint(8, 25))) + rng.choice([".", "?", ""]) for _ in range(n)]


def test_index_skips_most_pairs():
    rng = random.Random(4)
    queries = [(f"q{i}", text) for i, text in enumerate(zipf_sentences(rng, 30))]
    texts = zipf_sentences(rng, 1000)
    texts[10], texts[500] = queries[3][1], queries[7][1].replace("w", "v", 2)
    report = assert_same_as_brute_force(queries, texts)
    assert {"q3", "q7"} <= {leak.id for leak in report.removed}
    assert report.candidates < 0.01 * report.pairs


def test_empty_inputs_do_not_crash():
    assert find_leaks([("a", "hello")], [], progress=False).kept == ["a"]
    assert find_leaks([], ["x"], progress=False).kept == []
    assert find_leaks([("a", ""), ("b", "  "), ("c", "x")], ["", " ", "\n"], progress=False).kept == ["a", "b", "c"]
    assert NgramIndex(["", "  "]).candidates([], 20.0).size == 0
    with pytest.raises(ValueError):
        find_leaks([("a", "x")], ["x"], threshold=-1, progress=False)


def records() -> list[Record]:
    return [
        Record("r1", "sharegpt", dialogue([("What is the capital of France?", "Paris."), ("And of Spain?", "Madrid.")])),
        Record("r2", "hc3", dialogue([("Explain BLEU.", "A metric.")]), meta={"k": 1}),
    ]


def test_load_train_texts_jsonl_and_dataset_folder(tmp_path):
    import datasets

    expected = ["What is the capital of France?", "And of Spain?", "Explain BLEU."]
    assert train_texts_from_records(records()) == expected
    rows = [r.to_row() for r in records()]
    jsonl = tmp_path / "curated.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n", encoding="utf-8")
    assert load_train_texts(jsonl) == expected
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "data" / "curated"))
    assert load_train_texts(tmp_path / "data" / "curated") == expected
    assert load_train_texts(tmp_path / "data") == expected  # a run's data folder


@pytest.mark.parametrize("bad", ["{not json", '{"id": "x"}', "[1, 2]", '{"id": "x", "source": "s", "preference": "none", '
                                 '"turns": [{"role": "user", "text": 3}], "meta": "{}"}'])
def test_malformed_jsonl_line_is_named(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(records()[0].to_row()) + "\n\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(SourceFormatError, match=r"bad\.jsonl:3:"):
        load_train_texts(path)


def test_load_queries_both_formats(tmp_path):
    koala = tmp_path / "koala.jsonl"
    koala.write_text('{"id": "koala_0", "prompt": "Hi there"}\n{"id": "koala_1", "prompt": "Bye"}\n', encoding="utf-8")
    assert load_queries(koala) == [("koala_0", "Hi there"), ("koala_1", "Bye")]
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"id": "t0", "instruction": "Sum these.", "instances": [{"input": "1 2", "output": "3"}]},
            {"id": "t1", "instruction": "Say hi.", "instances": [{"input": " ", "output": "hi"}]}]
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_queries(alpaca) == [("t0", "Sum these.\n\n1 2"), ("t1", "Say hi.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(SourceFormatError, match=r"bad\.jsonl:2: missing_field"):
        load_queries(bad)
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', encoding="utf-8")
    with pytest.raises(SourceFormatError, match=r"bad\.jsonl:2: duplicate_id"):
        load_queries(bad)
    prompts = [TestPrompt("0", "koala", "Hi"), TestPrompt("0", "alpaca", "Ho")]
    assert queries_from_prompts(prompts) == [("koala/0", "Hi"), ("alpaca/0", "Ho")]


def test_run_leakage_writes_the_report(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "prompt": "What is the capital of France?"}\n{"id": "b", "prompt": "Write a poem."}\n')
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r.to_row()) + "\n" for r in records()), encoding="utf-8")
    report = run_leakage(queries, train, 20.0, tmp_path / "out" / "leakage.json", progress=False)
    written = json.loads((tmp_path / "out" / "leakage.json").read_text())
    assert written == json.loads(json.dumps(report.to_json()))
    assert written["removed"] == [{"id": "a", "bleu": pytest.approx(100), "train_text": "What is the capital of France?"}]
    assert written["kept"] == ["b"] and written["threshold"] == 20.0 and written["pairs"] == 6
    table = report.table()
    assert list(table.columns) == ["id", "bleu", "query", "train_text"] and table.loc[0, "id"] == "a"


def test_real_koala_test_set(shared_data):
    queries = load_queries(shared_data / "eval" / "koala_test_set.jsonl")
    assert len(queries) == 180
    copied = queries[5]
    other_id, other = queries[9]
    words = other.split()
    paraphrase = " ".join(words[i] for i in range(0, len(words), 2)) + " please, in other words"  # half its words
    assert sacrebleu.sentence_bleu(other, [paraphrase]).score <= 20
    rng = random.Random(5)
    texts = [" ".join(rng.choice(VOCAB) for _ in range(12)) for _ in range(20)] + ["Hello!", copied[1], paraphrase]
    report = assert_same_as_brute_force(queries, texts)
    assert [(leak.id, leak.train_index) for leak in report.removed] == [(copied[0], 21)]
    assert report.removed[0].bleu == pytest.approx(100)
    assert other_id in report.kept and len(report.kept) == 179
