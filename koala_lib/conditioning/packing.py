"""Packing: tokenized examples into rows of `seq_len` tokens, several per row, nothing lost or duplicated.

    plan = pack_plan(lengths, seq_len=2048, seed=0, epoch=0)   # [[example indices of row 0], ...]
    rows = materialize(plan, flat_ids, flat_mask, offsets, seq_len, pad_id)

Each epoch shuffles the examples with (seed, epoch), then places them best-fit: into the open row whose free
space is the smallest that still holds the example, or a new row. `segment_ids` number the examples in a row
from 1 (0 marks padding) and `positions` restart at 0 for each, so attention can be kept within an example.
"""

from __future__ import annotations

import bisect

import numpy as np


def pack_plan(lengths: np.ndarray, seq_len: int, seed: int, epoch: int) -> list[list[int]]:
    """Rows of example indices; every example appears exactly once. An example longer than seq_len is an error."""
    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"an example has {int(lengths.max())} tokens, more than seq_len {seq_len}")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free capacities of open rows
    rows_with: dict[int, list[int]] = {}  # free capacity -> open rows with it
    for idx in order.tolist():
        n = int(lengths[idx])
        k = bisect.bisect_left(free_sizes, n)
        if k < len(free_sizes):
            free = free_sizes[k]
            row = rows_with[free].pop()
            if not rows_with[free]:
                del rows_with[free]
                free_sizes.pop(k)
        else:
            free, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(idx)
        left = free - n
        if left > 0:
            if left not in rows_with:
                bisect.insort(free_sizes, left)
                rows_with[left] = []
            rows_with[left].append(row)
    return rows


def materialize(plan: list[list[int]], ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The packed arrays, each [rows, seq_len]: tokens, loss_mask, segment_ids (0 = padding), positions."""
    rows = len(plan)
    out = {
        "tokens": np.full((rows, seq_len), pad_id, dtype=np.int32),
        "loss_mask": np.zeros((rows, seq_len), dtype=np.uint8),
        "segment_ids": np.zeros((rows, seq_len), dtype=np.int32),
        "positions": np.zeros((rows, seq_len), dtype=np.int32),
    }
    for r, members in enumerate(plan):
        col = 0
        for seg, idx in enumerate(members, start=1):
            start, end = int(offsets[idx]), int(offsets[idx + 1])
            n = end - start
            out["tokens"][r, col : col + n] = ids[start:end]
            out["loss_mask"][r, col : col + n] = mask[start:end]
            out["segment_ids"][r, col : col + n] = seg
            out["positions"][r, col : col + n] = np.arange(n, dtype=np.int32)
            col += n
    return out


def padding_fraction(lengths: np.ndarray, rows: int, seq_len: int) -> float:
    """Share of positions that hold no token."""
    return 1.0 - float(np.sum(lengths)) / float(rows * seq_len) if rows else 0.0


def packing_table(lengths, seq_len: int, seed: int, row_lengths: tuple[int, ...] = (512, 1024, 2048, 4096)) -> dict[str, list]:
    """Share of positions (%) holding real tokens at several row lengths (and the profile's): packed rows against
    one padded example per row; examples longer than a row are left out of that row length's count."""
    lengths = np.asarray(lengths)
    sizes = sorted({*row_lengths, seq_len})
    packed, padded = [], []
    for size in sizes:
        fitting = lengths[lengths <= size]
        packed.append(100 * (1 - padding_fraction(fitting, len(pack_plan(fitting, size, seed, 0)), size)))
        padded.append(100 * (1 - padding_fraction(fitting, len(fitting), size)))
    return {"row_length": sizes, "packed": packed, "padded": padded}


def plan_arrays(plan: list[list[int]]) -> dict[str, np.ndarray]:
    """A plan as two arrays to keep beside the rows: `members` (the example indices of every row, one row after the
    other) and `member_offsets` (row r's are members[offsets[r]:offsets[r + 1]]), so a step can name its examples."""
    offsets = np.zeros(len(plan) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(row) for row in plan])
    members = np.array([i for row in plan for i in row], dtype=np.int32)
    return {"members": members, "member_offsets": offsets}
