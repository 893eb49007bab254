"""Stage 2 run: curated records → rendered, tokenized, masked examples → packed rows on disk.

    result = condition(cfg)          # writes runs/<P>/conditioned/
    result.stats["packed"]["padding_fraction"]

Layout of `runs/<P>/conditioned/` (numpy `.npy` files, memory-mappable, so a training loop can stream rows
and resume at any row index):

    examples/{train,eval}/ids.npy, mask.npy, offsets.npy   flat tokens of every example; offsets [n + 1]
    examples/{train,eval}/index.jsonl                     id, source, preference, tokens, trained per example
    train/epoch_<e>/{tokens,loss_mask,segment_ids,positions}.npy   [rows, seq_len], a new order each epoch
    eval/{tokens,loss_mask,segment_ids,positions}.npy
    stats.json
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koala_lib.config import Config
from koala_lib.data.curate import load_curated
from koala_lib.files import staged_folder
from koala_lib.manifest import stale_inputs, warn_stale, write_manifest
from koala_lib.data.schema import Record
from koala_lib.plots import packing_efficiency, save, token_lengths
from koala_lib.progress import bar as progress_bar

from .packing import materialize, pack_plan, packing_table, padding_fraction, plan_arrays
from .template import Example, cut_to_length, highlight_html, load_tokenizer, marked_text, template_for, tokenize, tokenizer_files

BATCH = 512  # records rendered and tokenized per call


@dataclass
class ConditionResult:
    train: list[Example]
    eval: list[Example]
    stats: dict
    out_dir: Path
    tokenizer: object
    seed: int = 0

    def table(self):
        """Examples, tokens and trainable tokens per source (a pandas DataFrame)."""
        import pandas as pd

        s = self.stats
        frame = pd.DataFrame({k: s[k] for k in ("examples", "tokens", "trainable_tokens")}).fillna(0).astype(int)
        frame.index.name = "source"
        frame.loc["total"] = frame.sum()
        return frame

    def example(self, kind: str) -> Example:
        """A training example to show: `single_turn`, `multi_turn`, `positive` or `negative`."""
        tests = {
            "single_turn": lambda e: e.exchanges == 1 and e.preference == "none",
            "multi_turn": lambda e: e.exchanges >= 2 and e.preference == "none",
            "positive": lambda e: e.preference == "positive",
            "negative": lambda e: e.preference == "negative",
        }
        if kind not in tests:
            raise ValueError(f"kind must be one of {', '.join(tests)}, not {kind!r}")
        candidates = sorted((e for e in self.train if tests[kind](e)), key=lambda e: (len(e.ids), e.id))
        if not candidates:
            raise LookupError(f"no {kind} example in this run")
        return candidates[len(candidates) // 4]  # a short-ish one, readable on screen

    def show(self, kind: str):
        """The example with trained tokens highlighted (an IPython HTML object)."""
        from IPython.display import HTML

        e = self.example(kind)
        head = f"<b>{kind.replace('_', ' ')}</b> · <code>{e.id}</code> · {len(e.ids)} tokens, {int(e.mask.sum())} trained"
        return HTML(f"<div style='margin:6px 0'>{head}</div>" + highlight_html(self.tokenizer, e.ids, e.mask))

    def marked(self, kind: str) -> str:
        """The example as text, trained spans between ⟦ ⟧."""
        e = self.example(kind)
        return f"{e.id}\n{marked_text(self.tokenizer, e.ids, e.mask)}"

    def padding_table(self):
        """Rows and padding: packed vs one example per padded row (a pandas DataFrame)."""
        import pandas as pd

        s = self.stats
        layouts = ("packed", "padded")
        return pd.DataFrame(
            {"rows": [s[k]["rows"] for k in layouts], "padding %": [round(100 * s[k]["padding_fraction"], 2) for k in layouts]},
            index=pd.Index(layouts, name="layout"),
        )

    def figures(self):
        """(token lengths per source, packing efficiency) figures."""
        c = self.stats["seq_len"]
        lengths = {src: [len(e.ids) for e in self.train if e.source == src] for src in self.stats["examples"]}
        return token_lengths(lengths, c), packing_efficiency(packing_table([len(e.ids) for e in self.train], c, self.seed), c)

    def metrics(self) -> dict:
        s = self.stats
        return {k: s[k] for k in ("examples", "tokens", "trainable_tokens", "rejected", "packed", "padded", "seq_len", "split")}


def group_key(record: Record) -> str:
    """Records from one upstream row share a key (both sides of a pair, HC3 answers to one question, split parts)."""
    return group_key_of_id(record.id, record.source)


def group_key_of_id(record_id: str, source: str) -> str:
    """`group_key` from a record's id and source (as stage 2's example index stores them)."""
    key = record_id.split("#")[0]
    return key.rsplit(":", 1)[0] if source in ("hh", "webgpt", "summarize", "hc3") else key


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval): whole groups of records (see `group_key`) held out, a seeded `fraction` of the groups.

    Groups are sorted before sampling, so the split depends only on the data and the seed.
    """
    groups = sorted({group_key(r) for r in records})
    n_eval = max(1, round(len(groups) * fraction)) if fraction > 0 and len(groups) > 1 else 0
    held = set(random.Random(f"{seed}:eval").sample(groups, n_eval))
    ordered = sorted(records, key=lambda r: r.id)
    return [r for r in ordered if group_key(r) not in held], [r for r in ordered if group_key(r) in held]


def build_examples(records: list[Record], tokenizer, template, seq_len: int, rejected: Counter, progress: bool, desc: str) -> list[Example]:
    """Render, tokenize, mask and cut each record; rejections are counted by reason."""
    examples: list[Example] = []
    bar = progress_bar(total=len(records), desc=desc, unit="records", disable=not progress, mininterval=0.5)
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        for record, (ids, mask, ends) in zip(batch, tokenize(tokenizer, [template.render(r) for r in batch])):
            ids, mask, kept = cut_to_length(ids, mask, ends, seq_len)
            if kept == 0:
                rejected["too_long"] += 1
            elif not mask.any():
                rejected["no_trainable_token"] += 1
            else:
                examples.append(Example(record.id, record.source, record.preference, ids, mask, kept, len(record.turns) // 2))
        bar.update(len(batch))
    bar.close()
    return examples


def flatten(examples: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(e.ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([e.ids for e in examples]) if examples else np.zeros(0, np.int32)
    mask = np.concatenate([e.mask for e in examples]) if examples else np.zeros(0, np.uint8)
    return ids, mask, offsets


def _write_examples(folder: Path, examples: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    ids, mask, offsets = flatten(examples)
    np.save(folder / "ids.npy", ids)
    np.save(folder / "mask.npy", mask)
    np.save(folder / "offsets.npy", offsets)
    with open(folder / "index.jsonl", "w", encoding="utf-8") as fh:
        for e in examples:
            fh.write(json.dumps({"id": e.id, "source": e.source, "preference": e.preference, "tokens": len(e.ids), "trained": int(e.mask.sum()), "exchanges": e.exchanges}) + "\n")
    return ids, mask, offsets


def write_rows(folder: Path, rows: dict[str, np.ndarray]) -> None:
    """Packed arrays as `<name>.npy` files in `folder` (memory-mappable; `load_rows` reads them back)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in rows.items():
        np.save(folder / f"{name}.npy", array)


def condition(cfg: Config, progress: bool = True) -> ConditionResult:
    """Run stage 2 for the profile and write `runs/<P>/conditioned/` (replaced atomically) and its figures."""
    started, start = time.time(), time.perf_counter()
    c = cfg.conditioning
    stale = stale_inputs(cfg, "data", ["data/curated"])
    warn_stale("stage 2", "stage 1 (data/)", stale)
    records = load_curated(cfg)
    tokenizer = load_tokenizer(cfg)
    template = template_for(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_records, eval_records = split_records(records, c.eval_fraction, cfg.seed)
    rejected: Counter = Counter()
    train = build_examples(train_records, tokenizer, template, c.seq_len, rejected, progress, "condition train")
    evals = build_examples(eval_records, tokenizer, template, c.seq_len, rejected, progress, "condition eval")

    final = cfg.run_dir / "conditioned"
    with staged_folder(final) as tmp:
        ids, mask, offsets = _write_examples(tmp / "examples" / "train", train)
        lengths = np.diff(offsets)
        rows_per_epoch = []
        for epoch in progress_bar(range(c.epochs), desc="pack epochs", unit="epoch", disable=not progress):
            plan = pack_plan(lengths, c.seq_len, cfg.seed, epoch)
            write_rows(tmp / "train" / f"epoch_{epoch}", {**materialize(plan, ids, mask, offsets, c.seq_len, pad_id), **plan_arrays(plan)})
            rows_per_epoch.append(len(plan))
        e_ids, e_mask, e_offsets = _write_examples(tmp / "examples" / "eval", evals)
        eval_plan = pack_plan(np.diff(e_offsets), c.seq_len, cfg.seed, 0)
        write_rows(tmp / "eval", {**materialize(eval_plan, e_ids, e_mask, e_offsets, c.seq_len, pad_id), **plan_arrays(eval_plan)})

        stats = build_stats(cfg, train, evals, rejected, rows_per_epoch[0] if rows_per_epoch else 0, len(records))
        stats["pad_id"] = int(pad_id)
        stats["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    save(token_lengths({s: [len(e.ids) for e in train if e.source == s] for s in stats["examples"]}, c.seq_len), cfg.figures_path / "token_lengths.png")
    save(packing_efficiency(packing_table(lengths, c.seq_len, cfg.seed), c.seq_len), cfg.figures_path / "packing_efficiency.png")
    write_manifest(cfg, "conditioned", final, inputs=[cfg.run_dir / "data" / "curated", *tokenizer_files(tokenizer)],
                   outputs=[final], started=started, stale=stale)
    total = sum(stats["tokens"].values())
    print(f"conditioned {len(train) + len(evals):,} examples ({total:,} tokens) in {stats['seconds']:.1f} s "
          f"({total / max(stats['seconds'], 1e-9):,.0f} tokens/s); padding {stats['packed']['padding_fraction']:.1%} packed "
          f"vs {stats['padded']['padding_fraction']:.1%} padded -> {final}")
    return ConditionResult(train, evals, stats, final, tokenizer, cfg.seed)


def build_stats(cfg: Config, train: list[Example], evals: list[Example], rejected: Counter, rows: int, records: int) -> dict:
    c = cfg.conditioning
    by = defaultdict(lambda: [0, 0, 0])
    cut = sum(1 for e in train + evals if e.exchanges < e.total_exchanges)
    for e in train + evals:
        by[e.source][0] += 1
        by[e.source][1] += len(e.ids)
        by[e.source][2] += int(e.mask.sum())
    lengths = np.array([len(e.ids) for e in train])
    return {
        "profile": cfg.profile,
        "tokenizer": cfg.model.tokenizer or cfg.model.base,
        "seq_len": c.seq_len,
        "markers": {"positive": c.marker("positive"), "negative": c.marker("negative")},
        "records": records,
        "split": {"train": len(train), "eval": len(evals)},
        "examples": {s: v[0] for s, v in by.items()},
        "tokens": {s: v[1] for s, v in by.items()},
        "trainable_tokens": {s: v[2] for s, v in by.items()},
        "rejected": dict(sorted(rejected.items())),
        "cut_at_turn_boundary": cut,
        "exchanges_dropped_by_cut": sum(e.total_exchanges - e.exchanges for e in train + evals),
        "packed": {"rows": rows, "padding_fraction": round(padding_fraction(lengths, rows, c.seq_len), 6)},
        "padded": {"rows": len(lengths), "padding_fraction": round(padding_fraction(lengths, len(lengths), c.seq_len), 6)},
        "epochs": c.epochs,
    }


def load_rows(cfg: Config, split: str = "train", epoch: int = 0) -> dict[str, np.ndarray]:
    """Packed rows written by stage 2, memory-mapped (what stage 3 streams)."""
    folder = cfg.run_dir / "conditioned" / (f"train/epoch_{epoch}" if split == "train" else "eval")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no packed rows; run `koala condition --profile {cfg.profile}` first")
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("tokens", "loss_mask", "segment_ids", "positions")}
