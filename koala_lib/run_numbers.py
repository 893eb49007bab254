"""The numbers a document quotes from a run, written into it from the run's own files, never typed by hand.

A document marks each number it quotes with its key, `<!-- run:KEY -->42 s<!-- /run -->`, or a whole block the
same way; `koala readme --profile demo` (after `make reproduce`) reads the run's metrics and rewrites every mark
of README.md, as `make bench` rewrites the performance table from bench/RESULTS.md.

    numbers = run_numbers(config.load("demo"))      # {key: text}
    text = fill(readme_text, numbers)               # KeyError naming a key the run does not give
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from koala_lib.config import Config, variant_name
from koala_lib.evaluation.judge_card import JudgeCard
from koala_lib.evaluation.report import model_label

MARK = re.compile(r"<!-- run:([a-z0-9_]+) -->(.*?)<!-- /run -->", re.DOTALL)
STAGES = {"01": "stage 1", "02": "stage 2", "03": "stage 3", "04": "stage 4", "05": "stage 5"}


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not written yet; run `koala pipeline --profile <P>` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _pct(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def _span(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{ci[0]:.1f}–{ci[1]:.1f}]"


def stage_numbers(run: Path) -> dict[str, str]:
    """Wall time of each stage and of the pipeline (notebooks/pipeline.json)."""
    times = _read(run / "notebooks" / "pipeline.json")
    out = {f"time_{sid}": _duration(times[sid]) for sid in STAGES if sid in times}
    out["time_pipeline"] = _duration(sum(times.values()))
    return out


def data_numbers(run: Path) -> dict[str, str]:
    data, cond = _read(run / "data" / "metrics.json"), _read(run / "conditioned" / "metrics.json")
    return {"rows_read": f"{data['totals']['read']:,}", "records": f"{data['totals']['records']:,}",
            "seq_len": str(cond["seq_len"]),
            "packed": _pct(100 * (1 - cond["packed"]["padding_fraction"]), 0),
            "padded": _pct(100 * (1 - cond["padded"]["padding_fraction"]), 0)}


def train_numbers(cfg: Config) -> dict[str, str]:
    """Per variant, the held-out loss at the first and last evaluation: `eval_<variant>` = "2.78 → 2.65"."""
    out = {}
    train = _read(cfg.run_dir / "train" / "metrics.json")
    for variant in cfg.variants:
        losses = train[variant_name(variant)]["eval_losses"]
        out[f"eval_{variant_name(variant)}"] = f"{losses[0]:.2f} → {losses[-1]:.2f}"
    return out


def eval_numbers(run: Path) -> dict[str, str]:
    summary = _read(run / "eval" / "summary.json")
    judge, card = _read(run / "eval" / "judge.json"), _read(run / "eval" / "judge_card.json")
    calibration = _read(run / "eval" / "calibration.json")
    kept, removed = summary["leakage"]["kept"], summary["leakage"]["removed"]
    by_set = {}
    for item in removed:
        by_set[item.split("/")[0]] = by_set.get(item.split("/")[0], 0) + 1
    health = summary["answer_health"]
    calls = {"comparisons": judge.get("calls", 0), "calibration": calibration.get("calls", 0), "card": card.get("calls", 0)}
    out = {"prompts": str(kept + len(removed)), "leaked": str(len(removed)),
           "leaked_by_set": ", ".join(f"{n} {name.capitalize()}" for name, n in sorted(by_set.items())) or "none",
           "kept": str(kept), "models": str(len(health)),
           "empty": str(sum(h["empty"] for h in health.values())),
           "judge_calls": f"{sum(calls.values()):,}",
           "judge_calls_by_part": ", ".join(f"{n:,} {part}" for part, n in calls.items()),
           "judge_games": f"{2 * judge.get('sent_to_judge', 0):,}",
           "health": "; ".join(f"{model_label(m, summary['models'])}: {h['cut']} of {h['answers']} cut, {h['degenerate']} degenerate"
                               for m, h in health.items()),
           "card": "```\n" + "\n".join(JudgeCard(**card).lines()) + "\n```",
           "card_verdict": "fit" if card["fit"] else "unfit",
           "agreement": (f"{card['human_agreement']:.1f} %{_span(card['human_agreement_ci'])}" if card.get("human_agreement") is not None
                         else "not measured"),
           "results_table": results_table(summary)}
    return out


def results_table(summary: dict) -> str:
    """The LLM judge's comparisons per test set as a markdown table: better / tie / worse, hard, soft and LC win
    rates with their intervals."""
    head = ("| this run (LLM judge, n) | better / tied / worse % | hard win rate % [95 % CI] | soft win rate % [95 % CI] "
            "| LC win rate, length term only % [95 % CI] |\n|---|---|---|---|---|")
    names = {"alpaca": "Alpaca test set", "koala": "Koala test set"}
    rows = []
    chosen = [r for r in summary["comparisons"] if r["source"] == "llm" and r["test_set"] != "all"]
    for r in sorted(chosen, key=lambda r: r["test_set"]):  # one test set after the other, as the figure's panels
        vs = model_label(r["model_b"], summary["models"]).replace(" (stand-in: ", ", stand-in (").rstrip()
        lc = "–" if r.get("lc_win_rate") is None else f"{r['lc_win_rate']:.1f}{_span(r.get('lc_ci'))}"
        rows.append(f"| {names.get(r['test_set'], r['test_set'])}, vs {vs} ({r['n']}) | {r['better']:.0f} / {r['tie']:.0f} / "
                    f"{r['worse']:.0f} | {r['win_rate']:.1f}{_span(r['win_rate_ci'])} | {r['soft_win_rate']:.1f}"
                    f"{_span(r['soft_win_rate_ci'])} | {lc} |")
    return "\n".join([head, *rows]) if rows else "(no comparison had a verdict)"


def run_numbers(cfg: Config) -> dict[str, str]:
    """Every number a document may quote from the profile's run, by key."""
    run = cfg.run_dir
    return {**stage_numbers(run), **data_numbers(run), **train_numbers(cfg), **eval_numbers(run)}


def fill(text: str, numbers: dict[str, str]) -> str:
    """`text` with every `<!-- run:KEY -->...<!-- /run -->` holding numbers[KEY]; a block value (one with a line
    break) sits on lines of its own between the marks."""
    unknown = sorted({m.group(1) for m in MARK.finditer(text)} - set(numbers))
    if unknown:
        raise KeyError(f"the document quotes {', '.join(unknown)}, which the run does not give (known: {', '.join(sorted(numbers))})")

    def put(match: re.Match) -> str:
        value = numbers[match.group(1)]
        value = f"\n\n{value}\n\n" if "\n" in value else value  # a block: blank lines keep it apart from the marks
        return f"<!-- run:{match.group(1)} -->{value}<!-- /run -->"

    return MARK.sub(put, text)


def update_document(cfg: Config, path: Path) -> int:
    """Rewrite the marks of `path` from the profile's run; the number of marks written."""
    text = path.read_text(encoding="utf-8")
    path.write_text(fill(text, run_numbers(cfg)), encoding="utf-8")
    return len(MARK.findall(text))
