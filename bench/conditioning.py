"""Benchmark: stage 2 throughput (render + tokenize + mask + pack) and packing efficiency on the demo mixture.

The demo profile's curated records are replicated until they hold at least 1M tokens, then rendered,
tokenized in batches with offset-derived masks, and packed at seq_len 2048. The baseline, run in the same
process on a sample, tokenizes one record per call (what a simple per-example loop does).

    python bench/conditioning.py [--min-tokens 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-tokens", type=int, default=1_000_000)
    parser.add_argument("--baseline-sample", type=int, default=400)
    args = parser.parse_args()

    from koala_lib.conditioning.template import cut_to_length
    from koala_lib.conditioning import load_tokenizer, materialize, pack_plan, padding_fraction, template_for, tokenize
    from koala_lib.config import load
    from koala_lib.data.curate import curate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load("demo", [f"runs_dir={tmp}", f"figures_dir={tmp}/fig"])
        records = curate(cfg, progress=False).records
    tokenizer = load_tokenizer(cfg)
    template = template_for(cfg, tokenizer)
    per_copy = sum(len(ids) for ids, _, _ in tokenize(tokenizer, [template.render(r) for r in records]))
    copies = -(-args.min_tokens // per_copy)
    corpus = records * copies
    print(f"{len(records)} demo records ({per_copy:,} tokens) replicated x{copies} = {len(corpus):,} records")

    t = time.perf_counter()
    out = []
    for start in range(0, len(corpus), 512):
        for ids, mask, ends in tokenize(tokenizer, [template.render(r) for r in corpus[start : start + 512]]):
            ids, mask, kept = cut_to_length(ids, mask, ends, 2048)
            if kept:
                out.append((ids, mask))
    lengths = np.array([len(ids) for ids, _ in out])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([i for i, _ in out])
    mask = np.concatenate([m for _, m in out])
    t_tok = time.perf_counter() - t
    plan = pack_plan(lengths, 2048, 0, 0)
    materialize(plan, ids, mask, offsets, 2048, tokenizer.pad_token_id or 0)
    seconds = time.perf_counter() - t
    total = int(lengths.sum())
    rate = total / seconds

    sample = corpus[: args.baseline_sample]
    t = time.perf_counter()
    for r in sample:
        tokenize(tokenizer, [template.render(r)])
    base_rate = sum(lengths[: len(sample)]) / (time.perf_counter() - t)
    t = time.perf_counter()
    tokenize(tokenizer, [template.render(r) for r in sample])
    ours_rate = sum(lengths[: len(sample)]) / (time.perf_counter() - t)

    eff = {}
    demo = tokenize(tokenizer, [template.render(r) for r in records])
    for seq_len in (2048, 512):  # cut at turn boundaries as the stage does; those that cannot fit are left out
        cut = [cut_to_length(i, m, e, seq_len) for i, m, e in demo]
        fit = np.array([len(i) for i, _, kept in cut if kept])
        rows = len(pack_plan(fit, seq_len, 0, 0))
        eff[seq_len] = (1 - padding_fraction(fit, rows, seq_len), 1 - padding_fraction(fit, len(fit), seq_len), len(demo) - len(fit))
    print(f"render+tokenize+mask+pack: {total:,} tokens in {seconds:.1f} s = {rate:,.0f} tokens/s (tokenize {t_tok:.1f} s)")
    print(f"batched vs one record per call: {ours_rate:,.0f} vs {base_rate:,.0f} tokens/s = {ours_rate / base_rate:.1f}x")
    for seq_len, (packed, padded, over) in eff.items():
        print(f"seq_len {seq_len}: packed {packed:.1%} real tokens vs padded {padded:.1%} ({over} examples longer than a row)")
    goal = "met" if eff[2048][0] >= 0.97 else "NOT met"
    record_section(
        "conditioning",
        "Stage 2: render + tokenize + mask + pack (bench/conditioning.py)",
        [
            f"Input: the demo mixture's {len(records)} records replicated x{copies} ({total:,} tokens, SmolLM2 tokenizer).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| render + tokenize + mask + pack at seq_len 2048 | {seconds:.1f} s, **{rate:,.0f} tokens/s** |",
            f"| batched tokenization vs one record per call (baseline, same process, {len(sample)} records) | {ours_rate:,.0f} vs {base_rate:,.0f} tokens/s = **{ours_rate / base_rate:.1f}x** |",
            f"| real tokens per position, demo mixture, seq_len 2048: packed vs padded | **{eff[2048][0]:.1%}** vs {eff[2048][1]:.1%} (goal >= 97 %: {goal}) |",
            f"| real tokens per position, demo mixture, seq_len 512: packed vs padded | {eff[512][0]:.1%} vs {eff[512][1]:.1%} ({eff[512][2]} examples whose first exchange exceeds 512 left out, as the stage rejects them) |",
        ],
        headline=[
            (f"stage 2, render + tokenize + mask + pack, {total / 1e6:.2f}M tokens of demo data",
             f"{rate:,.0f} tokens/s; batched tokenization {ours_rate / base_rate:.1f}x one call per record"),
            ("real tokens per position, demo mixture, seq_len 2048 / 512",
             f"packed {eff[2048][0]:.1%} / {eff[512][0]:.1%}; padded {eff[2048][1]:.1%} / {eff[512][1]:.1%}"),
        ],
    )


if __name__ == "__main__":
    main()
