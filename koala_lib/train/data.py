"""Packed rows for one variant, and the global batch of any step, each process reading only its own rows.

    data = VariantData.open(cfg, "koala_distill")
    data.steps_per_epoch, data.position(step)          # -> (epoch, first row)
    batch = data.global_batch(step, mesh)              # dict of sharded arrays [accum, micro, T]

A variant trains on the stage 2 examples of its sources. When those are all the conditioned sources, it uses
stage 2's packed rows as they are; otherwise its examples are re-packed with the same seeded best-fit packing
into `runs/<P>/train/<variant>/rows/` (once; memory-mapped after). The position in the data is a function of
the step alone, so a resumed run reads exactly the rows it would have read. The last batch of an epoch is
filled with empty rows (no tokens, no targets), which change no sum and no gradient.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from koala_lib.conditioning.packing import materialize, pack_plan, plan_arrays
from koala_lib.conditioning.stage import load_rows, write_rows
from koala_lib.config import Config, mixture_sources, variant_name
from koala_lib.files import staged_folder

FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")
BATCH_SPEC = P(None, ("data", "fsdp"), None)  # [accum, micro, T]: rows over every data-parallel device


def _examples(folder: Path, sources: set[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, offsets, selected example indices) of a stage 2 examples folder, for `sources`."""
    with open(folder / "index.jsonl", encoding="utf-8") as fh:
        chosen = [i for i, line in enumerate(fh) if json.loads(line)["source"] in sources]
    ids, mask = np.load(folder / "ids.npy", mmap_mode="r"), np.load(folder / "mask.npy", mmap_mode="r")
    return ids, mask, np.load(folder / "offsets.npy"), np.array(chosen, dtype=np.int64)


def _repack(folder: Path, sources: set[str], seq_len: int, seed: int, epoch: int, pad_id: int) -> dict[str, np.ndarray]:
    ids, mask, offsets, chosen = _examples(folder, sources)
    lengths = (offsets[1:] - offsets[:-1])[chosen]
    plan = [[int(chosen[i]) for i in row] for row in pack_plan(lengths, seq_len, seed, epoch)]
    return {**materialize(plan, ids, mask, offsets, seq_len, pad_id), **plan_arrays(plan)}


def _load(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in FIELDS}


@dataclass
class VariantData:
    name: str
    epochs: list[dict[str, np.ndarray]]  # per epoch: FIELDS -> [rows, T] (memory-mapped)
    eval: dict[str, np.ndarray]
    batch_size: int
    grad_accum: int
    folders: list[Path] = field(default_factory=list)  # per epoch: the rows' folder (members.npy beside them)
    index: Path | None = None  # stage 2's examples/train/index.jsonl: example index -> id

    @classmethod
    def open(cls, cfg: Config, variant: str) -> "VariantData":
        conditioned = cfg.run_dir / "conditioned"
        stats_path = conditioned / "stats.json"
        if not stats_path.is_file():
            raise FileNotFoundError(f"{conditioned}: no packed rows; run `koala condition --profile {cfg.profile}` first")
        stats = json.loads(stats_path.read_text())
        if stats["seq_len"] != cfg.conditioning.seq_len:
            raise ValueError(f"{conditioned} was packed at seq_len {stats['seq_len']}, the profile asks for {cfg.conditioning.seq_len}; re-run stage 2")
        sources = set(mixture_sources(variant))
        present = set(stats["examples"])
        name, epochs = variant_name(variant), stats["epochs"]
        if present <= sources:  # every conditioned example belongs to the variant: stage 2's rows as they are
            train = [load_rows(cfg, "train", e) for e in range(epochs)]
            evals = load_rows(cfg, "eval")
            folders = [conditioned / "train" / f"epoch_{e}" for e in range(epochs)]
        else:
            folder = cfg.run_dir / "train" / name / "rows"
            stamp = {"sources": sorted(sources), "seed": cfg.seed, "seq_len": stats["seq_len"], "epochs": epochs,
                     "examples": stats["split"], "members": True}
            fresh = (folder / "stamp.json").is_file() and json.loads((folder / "stamp.json").read_text()) == stamp
            if not fresh and jax.process_index() == 0:  # one writer; the other processes wait below
                with staged_folder(folder) as tmp:
                    pad = int(stats.get("pad_id", 0))
                    for e in range(epochs):
                        write_rows(tmp / f"epoch_{e}", _repack(conditioned / "examples" / "train", sources, stats["seq_len"], cfg.seed, e, pad))
                    write_rows(tmp / "eval", _repack(conditioned / "examples" / "eval", sources, stats["seq_len"], cfg.seed, 0, pad))
                    (tmp / "stamp.json").write_text(json.dumps(stamp) + "\n")
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"rows of {name}")
            train = [_load(folder / f"epoch_{e}") for e in range(epochs)]
            evals = _load(folder / "eval")
            folders = [folder / f"epoch_{e}" for e in range(epochs)]
        if not len(train[0]["tokens"]):
            raise ValueError(f"variant {variant!r}: no training rows (sources {', '.join(sorted(sources))} have no examples)")
        return cls(name, train, evals, cfg.train.batch_size, cfg.train.grad_accum, folders, conditioned / "examples" / "train" / "index.jsonl")

    # ------------------------------------------------------------------ positions

    @property
    def seq_len(self) -> int:
        return int(self.epochs[0]["tokens"].shape[1])

    def rows(self, epoch: int) -> int:
        return int(self.epochs[epoch]["tokens"].shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows(0) // self.batch_size)

    def total_steps(self, max_steps: int | None) -> int:
        total = sum(-(-self.rows(e) // self.batch_size) for e in range(len(self.epochs)))
        return min(total, max_steps) if max_steps else total

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first row) that optimizer step `step` (0-based) reads."""
        for epoch in range(len(self.epochs)):
            n = -(-self.rows(epoch) // self.batch_size)
            if step < n:
                return epoch, step * self.batch_size
            step -= n
        raise IndexError("step past the last epoch")

    def step_rows(self, step: int) -> list[dict]:
        """What optimizer step `step` (0-based) reads, row by row: the ids of the examples packed into the row (None
        where the rows were packed before members were kept) and a sha256 of its tokens (an edit that changes one
        example's length repacks rows whose indices stay the same)."""
        epoch, first = self.position(step)
        arrays, folder = self.epochs[epoch], self.folders[epoch] if self.folders else None
        members = offsets = None
        if folder is not None and (folder / "members.npy").is_file():
            members, offsets = np.load(folder / "members.npy"), np.load(folder / "member_offsets.npy")
        if self._ids is None and self.index is not None and self.index.is_file():
            with open(self.index, encoding="utf-8") as fh:
                self._ids = [json.loads(line)["id"] for line in fh]
        out = []
        for row in range(first, min(first + self.batch_size, self.rows(epoch))):
            ids = None if members is None or self._ids is None else [self._ids[i] for i in members[offsets[row]:offsets[row + 1]]]
            out.append({"examples": ids, "tokens_sha256": hashlib.sha256(np.ascontiguousarray(arrays["tokens"][row]).tobytes()).hexdigest()[:16]})
        return out

    _ids = None  # example ids, read once from `index`

    # ------------------------------------------------------------------ batches

    def block(self, arrays: dict[str, np.ndarray], name: str, start: int, stop: int, end: int) -> np.ndarray:
        """Rows [start, stop) of one field as int32, with empty (all-zero) rows at and past row `end`."""
        out = np.zeros((stop - start, self.seq_len), dtype=np.int32)
        have = max(0, min(stop, end) - start)
        if have:
            out[:have] = arrays[name][start : start + have]
        return out

    def global_batch(self, step: int, mesh: Mesh) -> dict[str, jax.Array]:
        """The step's batch [accum, micro, T], built from the rows each process's devices hold."""
        epoch, first = self.position(step)
        return self._sharded(self.epochs[epoch], first, self.grad_accum, self.batch_size // self.grad_accum, mesh)

    def eval_batches(self, mesh: Mesh, max_rows: int | None = None):
        """Eval rows in batches of one micro-batch [1, micro, T]; the last one filled with empty rows."""
        micro = self.batch_size // self.grad_accum
        rows = len(self.eval["tokens"]) if max_rows is None else min(max_rows, len(self.eval["tokens"]))
        for first in range(0, rows, micro):
            yield self._sharded(self.eval, first, 1, micro, mesh, limit=rows)

    def _sharded(self, arrays, first: int, accum: int, micro: int, mesh: Mesh, limit: int | None = None) -> dict[str, jax.Array]:
        shape = (accum, micro, self.seq_len)
        sharding = NamedSharding(mesh, BATCH_SPEC)
        end = len(arrays["tokens"]) if limit is None else limit

        def read(name: str):
            def callback(index: tuple[slice, ...]) -> np.ndarray:  # only this process's shards are asked for
                a_slice, m_slice, t_slice = index
                lo, hi, _ = m_slice.indices(micro)
                blocks = [self.block(arrays, name, first + a * micro + lo, first + a * micro + hi, end) for a in range(*a_slice.indices(accum))]
                return np.stack(blocks)[:, :, t_slice]

            return jax.make_array_from_callback(shape, sharding, callback)

        return {name: read(name) for name in FIELDS}
