"""Benchmark: the test-query leakage filter (sentence BLEU > 20) at Koala's scale.

360 synthetic queries against 470,000 synthetic training user turns (seeded): sentences of 5-40 words drawn from a
Zipf-like vocabulary of 4,000 words, with commas and final punctuation. A few queries are planted in the training
texts as near-copies (one or two words changed: they leak) and as loose paraphrases (every other word changed:
mostly below the threshold). The baseline, run in the same process, is brute force (sacrebleu on every pair) on a
subsample of the texts; on that subsample both must take identical decisions with identical scores.

    python bench/leakage.py [--texts 470000] [--queries 360] [--subsample 1000] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record_section  # noqa: E402

LETTERS = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))


class Corpus:
    """Seeded sentences of 5-40 words from a Zipf-Mandelbrot vocabulary (p_k ~ 1 / (k + 2.7))."""

    def __init__(self, seed: int, vocab: int = 4000):
        self.rng = np.random.default_rng(seed)
        lengths = self.rng.integers(2, 10, vocab)
        self.words = ["".join(self.rng.choice(LETTERS, n)) for n in lengths]
        weights = 1.0 / (np.arange(vocab) + 2.7)
        self.p = weights / weights.sum()

    def sentences(self, n: int) -> list[str]:
        lengths = self.rng.integers(5, 41, n)
        words = self.rng.choice(len(self.words), size=int(lengths.sum()), p=self.p)
        commas = self.rng.random(len(words)) < 0.06
        ends = self.rng.choice([".", "?", "!", ""], size=n, p=[0.5, 0.35, 0.05, 0.1])
        out, at = [], 0
        for i, length in enumerate(lengths):
            toks = [self.words[w] + ("," if c else "") for w, c in zip(words[at:at + length], commas[at:at + length])]
            toks[-1] = toks[-1].rstrip(",")
            out.append(" ".join(toks).capitalize() + ends[i])
            at += length
        return out

    def edit(self, text: str, every: int) -> str:
        """Replace every `every`-th word (from a random offset) with another vocabulary word."""
        toks = text.split()
        for i in range(int(self.rng.integers(0, every)), len(toks), every):
            toks[i] = self.words[int(self.rng.integers(len(self.words)))]
        return " ".join(toks)


def make_data(n_texts: int, n_queries: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[str], list[int]]:
    """(queries, training texts, positions of the planted texts)."""
    corpus = Corpus(seed)
    queries = [(f"q{i}", text) for i, text in enumerate(corpus.sentences(n_queries))]
    planted = [corpus.edit(queries[i][1], 12) for i in range(0, n_queries, 30)]  # near-copies: leak
    planted += [corpus.edit(queries[i][1], 2) for i in range(15, n_queries, 30)]  # paraphrases: mostly kept
    texts = corpus.sentences(n_texts - len(planted))
    where = sorted(corpus.rng.choice(n_texts, len(planted), replace=False).tolist())
    for at, text in zip(where, planted):
        texts.insert(at, text)
    return queries, texts, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=470_000)
    parser.add_argument("--queries", type=int, default=360)
    parser.add_argument("--subsample", type=int, default=1000, help="training texts for the brute-force baseline")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    from koala_lib.evaluation.leakage import brute_force_leaks, find_leaks

    start = time.perf_counter()
    queries, texts, planted = make_data(args.texts, args.queries)
    print(f"data: {len(queries)} queries, {len(texts):,} texts ({time.perf_counter() - start:.1f} s)", flush=True)

    report = find_leaks(queries, texts, 20.0, progress=False)
    indexed_rate = report.pairs / report.seconds
    print(f"indexed: {report.seconds:.1f} s (index {report.index_seconds:.1f} s), {len(report.removed)} removed, "
          f"{report.candidates:,} of {report.pairs:,} pairs scored by sacrebleu", flush=True)

    # the subsample: random texts plus every planted one, so that both sides have leaks to find
    rng = np.random.default_rng(1)
    others = rng.choice(np.setdiff1d(np.arange(len(texts)), planted), args.subsample - len(planted), replace=False)
    sub = [texts[i] for i in sorted([*planted, *others.tolist()])]
    brute = brute_force_leaks(queries, sub, 20.0)
    brute_rate = brute.pairs / brute.seconds
    small = find_leaks(queries, sub, 20.0, progress=False)
    same = small.kept == brute.kept and [(x.id, x.bleu, x.train_index) for x in small.removed] == [
        (x.id, x.bleu, x.train_index) for x in brute.removed]
    print(f"brute force: {brute.pairs:,} pairs in {brute.seconds:.1f} s; decisions identical: {same}", flush=True)
    if not same:
        raise SystemExit("the indexed filter and brute force disagree on the subsample")
    ratio = indexed_rate / brute_rate
    total = time.perf_counter() - start
    print(f"ratio: indexed {indexed_rate:,.0f} pairs/s vs brute force {brute_rate:,.0f} pairs/s = {ratio:,.0f}x")
    print(f"brute force on the full set would take ~{report.pairs / brute_rate / 3600:.1f} h")

    bleus = sorted(round(x.bleu, 1) for x in report.removed)
    lines = [
        f"Input: {len(queries)} synthetic queries against {len(texts):,} synthetic training user turns (5-40 words from a "
        f"Zipf-like vocabulary of 4,000 words; {len(planted) // 2} near-copies and {len(planted) - len(planted) // 2} "
        "loose paraphrases of queries planted). Sentence BLEU (sacrebleu defaults) > 20 removes a query.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| indexed filter, {report.pairs:,} pairs (tokenize + index + bound + exact check) | **{report.seconds:.1f} s** "
        f"(index {report.index_seconds:.1f} s), {indexed_rate:,.0f} pairs/s |",
        f"| removed / kept | {len(report.removed)} / {len(report.kept)} (BLEU of the removed: {bleus}) |",
        f"| pairs scored exactly by sacrebleu after the bound | {report.candidates:,} ({report.candidates / report.pairs:.2e} of all) |",
        f"| brute force (baseline, same process, {len(queries)} x {len(sub):,} texts) | {brute.seconds:.1f} s, "
        f"{brute_rate:,.0f} pairs/s (full set: ~{report.pairs / brute_rate / 3600:.1f} h) |",
        f"| speed-up in pairs/s, indexed vs brute force | **{ratio:,.0f}x** |",
        f"| decisions and scores on the subsample, indexed vs brute force | {'identical' if same else 'DIFFERENT'} "
        f"({len(brute.removed)} removed) |",
        f"| goal: whole benchmark under 2 minutes on {os.cpu_count()} cores | {total:.0f} s: "
        f"{'met' if total < 120 else 'missed'} |",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record_section("leakage", "Stage 5: test-query leakage filter (bench/leakage.py)", lines, headline=[
            (f"leakage filter, {len(queries)} queries x {len(texts):,} training texts (sentence BLEU > 20), decisions identical "
             "to brute-force sacrebleu", f"{report.seconds:.1f} s (goal: under 2 minutes); {ratio:,.0f}x brute force's pairs/s")])


if __name__ == "__main__":
    main()
