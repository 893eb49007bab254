"""Packing invariants: nothing lost or duplicated, positions restart per segment, order kept within a segment."""

from collections import Counter

import numpy as np
import pytest

from koala_lib.conditioning.packing import materialize, pack_plan, padding_fraction


def make_examples(n=300, seed=0, max_len=400):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.arange(offsets[-1], dtype=np.int32) + 10  # every token unique: its value names (example, place)
    mask = (rng.random(offsets[-1]) < 0.6).astype(np.uint8)
    return lengths, offsets, ids, mask


def test_every_example_is_placed_once_and_rows_fit():
    lengths, *_ = make_examples()
    plan = pack_plan(lengths, 512, seed=0, epoch=0)
    placed = [i for row in plan for i in row]
    assert sorted(placed) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in plan)


def test_tokens_preserved_positions_restart_and_order_kept():
    lengths, offsets, ids, mask = make_examples()
    rows = materialize(pack_plan(lengths, 512, 0, 0), ids, mask, offsets, 512, pad_id=0)
    real = rows["segment_ids"] > 0
    assert Counter(rows["tokens"][real].tolist()) == Counter(ids.tolist())  # multiset preserved, no pad leaked
    assert int(rows["loss_mask"][real].sum()) == int(mask.sum()) and rows["loss_mask"][~real].sum() == 0
    for r in range(rows["tokens"].shape[0]):
        for seg in np.unique(rows["segment_ids"][r][real[r]]):
            where = rows["segment_ids"][r] == seg
            tokens = rows["tokens"][r][where]
            assert (rows["positions"][r][where] == np.arange(where.sum())).all()
            assert (np.diff(tokens) == 1).all()  # consecutive and in order: one example, intact
            example = int(np.searchsorted(offsets, tokens[0] - 10, side="right") - 1)
            assert tokens[0] - 10 == offsets[example] and len(tokens) == lengths[example]


def test_deterministic_per_seed_and_new_order_each_epoch():
    lengths, *_ = make_examples()
    assert pack_plan(lengths, 512, 1, 0) == pack_plan(lengths, 512, 1, 0)
    assert pack_plan(lengths, 512, 1, 0) != pack_plan(lengths, 512, 1, 1)
    assert pack_plan(lengths, 512, 1, 0) != pack_plan(lengths, 512, 2, 0)


def test_packing_beats_padding():
    lengths, *_ = make_examples(n=2000, max_len=600)
    rows = len(pack_plan(lengths, 2048, 0, 0))
    assert padding_fraction(lengths, rows, 2048) < 0.03
    assert padding_fraction(lengths, len(lengths), 2048) > 0.8


def test_an_example_longer_than_a_row_is_an_error():
    with pytest.raises(ValueError, match="more than seq_len 8"):
        pack_plan(np.array([3, 9]), 8, 0, 0)
