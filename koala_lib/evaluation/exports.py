"""The LLM judge's verdicts in the layouts other tools read, one folder per comparison and test set.

    paths = write_exports(eval_folder, items, judgments, fastchat_rows, judge)   # {(test_set, model, opponent): annotations}

For each comparison (model, opponent) on each test set:

- `alpaca_eval/<test_set>/<model>_vs_<opponent>/annotations.json` in AlpacaEval's orientation: the opponent is the
  baseline, `output_1` / `generator_1`; the model evaluated is `output_2` / `generator_2`; `preference` is in
  [1, 2] (1: output_1 better, 2: output_2 better, 1.5 even) = 1 + the judge's soft preference for the model, or
  1 / 1.5 / 2 from a hard verdict. `alpaca_eval.metrics.get_winrate(annotations)["win_rate"]` is then the model's
  soft win rate, as the report gives it, and `get_length_controlled_winrate` sees one model per file.
- `model_outputs.json` and `reference_outputs.json` beside it (`instruction`, `output`, `generator`, `dataset`):
  what `alpaca_eval --model_outputs ... --reference_outputs ...` takes, to re-judge with any AlpacaEval annotator.
- `fastchat/<test_set>/<model>_vs_<opponent>.jsonl`: the same games in FastChat's pairwise judgment layout
  (`model_1` is the model, `g1_winner` / `g2_winner`), which `fastchat/llm_judge/show_result.py --mode pairwise-all`
  counts.

Pairs the judge gave no verdict on are in the outputs files (they were asked) but not in the annotations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from koala_lib.evaluation.judgments import PairItem
from koala_lib.evaluation.pairwise import soft
from koala_lib.files import atomic_text


def comparison_name(model: str, opponent: str) -> str:
    return f"{model}_vs_{opponent}"


def alpaca_eval_folder(eval_folder: Path, test_set: str, model: str, opponent: str) -> Path:
    return Path(eval_folder) / "alpaca_eval" / test_set / comparison_name(model, opponent)


def fastchat_file(eval_folder: Path, test_set: str, model: str, opponent: str) -> Path:
    return Path(eval_folder) / "fastchat" / test_set / f"{comparison_name(model, opponent)}.jsonl"


def annotation_row(item: PairItem, judgment, annotator: str) -> dict:
    """One AlpacaEval annotation: `item.model_a` is the model evaluated (generator_2), `item.model_b` the baseline."""
    row = {"instruction": item.prompt, "output_1": item.answer_b, "generator_1": item.model_b,
           "output_2": item.answer_a, "generator_2": item.model_a, "annotator": annotator,
           "preference": 1.0 + soft(judgment), "dataset": item.test_set, "id": item.prompt_id}
    if judgment.judge != annotator:  # judged by rule (an empty answer), not by the annotator: said, one annotator per file
        row["judged_by"] = judgment.judge
    return row


def _outputs(items: Sequence[PairItem], side: str) -> list[dict]:
    return [{"instruction": it.prompt, "output": getattr(it, f"answer_{side}"), "generator": getattr(it, f"model_{side}"),
             "dataset": it.test_set, "id": it.prompt_id} for it in items]


def _dump(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def write_exports(eval_folder: Path, items: Sequence[PairItem], judgments: Sequence, fastchat_rows: Sequence[dict],
                  annotator: str) -> dict[tuple[str, str, str], Path]:
    """Write every comparison's AlpacaEval and FastChat files; returns (test_set, model, opponent) -> annotations.

    `judgments` are the LLM judge's (one per judged pair, oriented as the items), and those by rule (their `judge`
    names the rule, kept as `judged_by`; the file keeps one annotator, as AlpacaEval's LC expects); `fastchat_rows`
    are FastChat's rows (`question_id` is `test_set/prompt_id`; a panel has one per member and item; items the
    judge never saw have none)."""
    by_item: dict[str, list[dict]] = {}
    for row in fastchat_rows:
        by_item.setdefault(f"{row['question_id']}/{row['model_1']}/{row['model_2']}", []).append(row)
    by_key = {(j.test_set, j.prompt_id, j.model_a, j.model_b): j for j in judgments}
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.test_set, item.model_a, item.model_b), []).append(i)
    written = {}
    for (test_set, model, opponent), indices in sorted(groups.items()):
        chosen = [items[i] for i in indices]
        folder = alpaca_eval_folder(eval_folder, test_set, model, opponent)
        rows = [annotation_row(it, j, annotator) for it in chosen
                if (j := by_key.get((it.test_set, it.prompt_id, it.model_a, it.model_b))) is not None]
        _dump(folder / "annotations.json", rows)
        _dump(folder / "model_outputs.json", _outputs(chosen, "a"))
        _dump(folder / "reference_outputs.json", _outputs(chosen, "b"))
        path = fastchat_file(eval_folder, test_set, model, opponent)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for it in chosen for row in by_item.get(it.key, ())))
        written[(test_set, model, opponent)] = folder / "annotations.json"
    return written
