"""Stage 5 for a profile: leakage filter, LLM judge, and the report over every judgment collected.

    leaks = filter_leaks(cfg)          # runs/<P>/eval/leakage.json
    judged = run_judge(cfg)            # runs/<P>/eval/judgments/llm.jsonl (+ FastChat's layout)
    report = build_report(cfg)         # runs/<P>/eval/summary.json, figures, metrics

Judgments are read from every `runs/<P>/eval/judgments/*.jsonl`: the LLM judge's, and those exported from
`koala rate` or imported from MTurk into the same folder. Each source (`llm`, `rater`, `mturk`) is summarised on
its own; prompts the leakage filter removed are left out of everything.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from koala_lib.config import Config, ConfigError
from koala_lib.evaluation.judgments import PairItem, pair_items, read_judgments, write_judgments
from koala_lib.files import atomic_text
from koala_lib.inference.testsets import TEST_SETS, load_test_set


def eval_dir(cfg: Config) -> Path:
    return cfg.run_dir / "eval"


def judgments_dir(cfg: Config) -> Path:
    return eval_dir(cfg) / "judgments"


def test_prompts(cfg: Config) -> list:
    return [p for name in TEST_SETS for p in load_test_set(cfg, name).prompts]


def filter_leaks(cfg: Config, progress: bool = True):
    """Test queries against the user turns of stage 1's curated data; writes `eval/leakage.json`."""
    from koala_lib.data.curate import load_curated
    from koala_lib.evaluation.leakage import find_leaks, queries_from_prompts, train_texts_from_records

    queries = queries_from_prompts(test_prompts(cfg))  # ids `test_set/id`, as removed_queries reads them
    report = find_leaks(queries, train_texts_from_records(load_curated(cfg)), cfg.eval.leakage_threshold, progress)
    path = eval_dir(cfg) / "leakage.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    return report


def removed_queries(cfg: Config) -> set[str]:
    """`test_set/id` of the queries the leakage filter removed (run it first)."""
    path = eval_dir(cfg) / "leakage.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the leakage filter first (`koala leakage --profile {cfg.profile}`)")
    return {row["id"] for row in json.loads(path.read_text(encoding="utf-8"))["removed"]}


def load_answers(cfg: Config) -> dict[str, list[dict]]:
    """Stage 4's answers: model name -> rows."""
    folder = cfg.run_dir / "generations"
    files = sorted(f for f in folder.glob("*.json") if f.name != "models.json")  # models.json: what each model is
    if not files:
        raise FileNotFoundError(f"{folder}: no answers; run stage 4 first (`koala generate --profile {cfg.profile}`)")
    return {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in files}


BLOG_OPPONENTS = ("alpaca", "koala_distill", "chatgpt")  # the blog's figure: Koala-All against each


def comparisons(cfg: Config, models: list[str]) -> list[tuple[str, str]]:
    """`eval.comparisons` as (A, B) pairs; by default the blog's: the first variant against those of Alpaca,
    Koala-Distill and ChatGPT that answered (against every other model when none did)."""
    from koala_lib.config import variant_name

    if cfg.eval.comparisons:
        pairs = []
        for entry in cfg.eval.comparisons:
            a, sep, b = entry.partition(":")
            if not sep or not a.strip() or not b.strip() or a.strip() == b.strip():
                raise ConfigError(f"eval.comparisons: {entry!r} is not A:B with two different model names")
            for name in (a.strip(), b.strip()):
                if name not in models:
                    raise ConfigError(f"eval.comparisons: no answers from {name!r} (have: {', '.join(models)})")
            pairs.append((a.strip(), b.strip()))
        return pairs
    first = variant_name(cfg.variants[0])
    if first not in models:
        raise ConfigError(f"eval.comparisons: the first variant {first!r} has no answers; set eval.comparisons")
    blog = [(first, m) for m in BLOG_OPPONENTS if m in models and m != first]
    return blog or [(first, m) for m in models if m != first]


def items_to_judge(cfg: Config) -> list[PairItem]:
    """Every comparison on every prompt that survived the leakage filter."""
    answers = load_answers(cfg)
    removed = removed_queries(cfg)
    items = pair_items(answers, comparisons(cfg, list(answers)))
    return [i for i in items if f"{i.test_set}/{i.prompt_id}" not in removed]


@dataclass
class Judged:
    result: object  # JudgeResult
    weak: bool  # the kit's own small base model judged
    path: Path

    def summary(self) -> dict:
        r = self.result
        return {"judge": r.judge, "weak": self.weak, "mode": r.mode, **({"mode_note": r.mode_note} if r.mode_note else {}),
                "judgments": len(r.judgments), **r.outcomes, **({"errors": dict(r.errors)} if r.errors else {})}


def run_judge(cfg: Config, progress: bool = True) -> Judged:
    """Judge every item with `eval.judge` (or, when its base_url is empty, with the kit's own server running the
    base model; or with every judge of `eval.judge.panel`, combined); writes `eval/judgments/llm.jsonl`,
    `eval/judge.json`, and the same judgments in AlpacaEval's and FastChat's layouts, one folder per comparison and
    test set (`evaluation/exports.py`). A pair holding an empty answer is judged by rule, not sent
    (`answer_health.split_by_rule`)."""
    from koala_lib.evaluation.answer_health import split_by_rule
    from koala_lib.evaluation.panel import judge_items

    items = items_to_judge(cfg)
    to_judge, ruled = split_by_rule(items)
    result = judge_items(cfg, to_judge, "comparisons", progress)
    write_comparisons(cfg, items, to_judge, ruled, result)
    print(f"judge {result.judge}: {len(result.judgments)} of {len(to_judge)} pairs judged ({result.mode} verdicts"
          + (f"; {result.mode_note}" if result.mode_note else "") + f") in {result.seconds:.0f} s; "
          f"{result.calls} calls sent, {result.cache_hits} answered from the cache {cfg.call_cache_path}; "
          f"{len(ruled)} pairs with an empty answer judged by rule")
    return Judged(result, result.weak, judgments_dir(cfg) / "llm.jsonl")


def write_comparisons(cfg: Config, items: list[PairItem], to_judge: list[PairItem], ruled: list, result) -> None:
    """Stage 5's judge files from a JudgeResult over `to_judge` and the judgments by rule (see run_judge)."""
    from koala_lib.evaluation.exports import write_exports
    from koala_lib.evaluation.panel import agreement_table, load_member, member_configs

    order = {it.key: i for i, it in enumerate(items)}
    key = lambda j: order[f"{j.test_set}/{j.prompt_id}/{j.model_a}/{j.model_b}"]
    write_judgments(judgments_dir(cfg) / "llm.jsonl", sorted([*result.judgments, *ruled], key=key))  # the items' order
    write_judgments(eval_dir(cfg) / "llm_games.jsonl", result.games)
    for old in ("alpaca_eval", "fastchat"):  # this run's comparisons only
        shutil.rmtree(eval_dir(cfg) / old, ignore_errors=True)
    write_exports(eval_dir(cfg), items, [*result.judgments, *ruled], result.fastchat_rows, result.judge)
    summary = {
        "judge": result.judge, "weak": result.weak, "mode": result.mode, "mode_note": result.mode_note,
        "pairs": len(items), "sent_to_judge": len(to_judge), "by_rule": len(ruled),
        "judgments": len(result.judgments) + len(ruled), "outcomes": dict(result.outcomes),
        "errors": dict(result.errors), "calls": result.calls, "cache_hits": result.cache_hits,
        "identity": result.identity, "seconds": round(result.seconds, 2)}
    if cfg.eval.judge.panel:
        from koala_lib.evaluation.panel import kept_members

        members = [load_member(cfg, i, "comparisons") for i in range(len(member_configs(cfg)))]
        kept = kept_members(cfg)
        summary["panel"] = {
            "verdict": cfg.eval.judge.panel_verdict, "drop_unfit": cfg.eval.judge.panel_drop_unfit,
            "members": [{"index": i, "judge": m.judge, "identity": m.identity, "weak": m.weak, "kept": i in kept,
                         "judgments": len(m.judgments), "outcomes": dict(m.outcomes), "calls": m.calls}
                        for i, m in enumerate(members) if m is not None],
            "agreement": agreement_table({f"{i}: {m.judge}": m.judgments for i, m in enumerate(members) if m is not None})}
    atomic_text(eval_dir(cfg) / "judge.json", json.dumps(summary, indent=2) + "\n")


def all_judgments(cfg: Config) -> list:
    """Every judgment under `eval/judgments/`, less those of removed (leaked) queries."""
    removed = removed_queries(cfg)
    out = []
    for path in sorted(judgments_dir(cfg).glob("*.jsonl")):
        out.extend(j for j in read_judgments(path) if f"{j.test_set}/{j.prompt_id}" not in removed)
    return out


def plan_calls(cfg: Config) -> dict:
    """What stage 5's judge would send, before it sends anything: per part (comparisons, calibration, card), the
    games, how many the call cache already holds, and an estimate of the rest's prompt tokens counted with the
    profile's tokenizer (the judge's own tokenizer and chat template will count differently). In `auto` mode the
    games are counted as logprobs requests, which is what `auto` sends first."""
    from koala_lib.call_cache import CallCache, call_key
    from koala_lib.conditioning.template import load_tokenizer
    from koala_lib.evaluation.calibration import labelled_pairs
    from koala_lib.evaluation.judge import _messages, _request, cut, local_identity
    from koala_lib.evaluation.probes import probe_items

    from koala_lib.evaluation.answer_health import split_by_rule

    j = cfg.eval.judge
    mode = "text" if j.mode == "text" else "logprobs"
    notes, parts = [], {}
    try:
        parts["comparisons"] = items_to_judge(cfg)
    except FileNotFoundError as exc:  # before the leakage filter: every prompt, an upper bound
        answers = load_answers(cfg)
        parts["comparisons"] = pair_items(answers, comparisons(cfg, list(answers)))
        notes.append(f"comparisons counted before the leakage filter ({exc})")
    parts["comparisons"], ruled = split_by_rule(parts["comparisons"])
    if ruled:
        notes.append(f"{len(ruled)} comparison pairs hold an empty answer: judged by rule, not sent")
    try:
        parts["calibration"] = labelled_pairs(cfg)[0]
    except FileNotFoundError as exc:
        notes.append(f"calibration not counted ({exc})")
    parts["card"] = probe_items()
    tokenizer = load_tokenizer(cfg)
    out = {"mode": mode, "cache": str(cfg.call_cache_path), "parts": {}, "notes": notes}
    with CallCache(cfg.call_cache_path) as cache:
        if j.base_url:
            model = j.model
            identity = f"endpoint {j.base_url.rstrip('/')} model {model}" if model else None
            if identity is None:
                notes.append("eval.judge.model is empty: the served model is unknown before a call, so nothing counts as cached")
        else:
            model, identity = j.model or "base", local_identity(cfg, cache)
        for part, items in parts.items():
            games = cached = tokens = 0
            for item in items:
                q, a, b = (cut(t, j.max_answer_chars) for t in (item.prompt, item.answer_a, item.answer_b))
                for first, second in ((a, b), (b, a)):
                    messages = _messages(mode, q, first, second)
                    games += 1
                    if identity is not None and cache.peek(call_key("judge", identity, _request(model, mode, messages, j.max_tokens, j.top_logprobs))) is not None:
                        cached += 1
                    else:
                        tokens += sum(len(tokenizer(m["content"])["input_ids"]) for m in messages)
            out["parts"][part] = {"games": games, "cached": cached, "to_send": games - cached, "prompt_tokens_estimate": tokens}
    out["to_send"] = sum(p["to_send"] for p in out["parts"].values())
    out["prompt_tokens_estimate"] = sum(p["prompt_tokens_estimate"] for p in out["parts"].values())
    return out
