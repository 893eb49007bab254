"""Stage 5's subcommands of `koala`: leakage, judge, rate, mturk, report (registered by koala_lib.cli).

    koala leakage --profile demo                      # test prompts vs the curated data -> runs/demo/eval/leakage.json
    koala leakage --queries Q.jsonl --train runs/demo/data/curated --out leaks.json
    koala judge --profile demo                        # the LLM judge, both orders -> runs/demo/eval/judgments/llm.jsonl
    koala judge calibrate --profile demo              # its agreement with held-out human labels -> runs/demo/eval/calibration.json
    koala judge card --profile demo                   # canaries, position, length, markdown, self -> runs/demo/eval/judge_card.json
    koala rate init --profile demo --raters alice,bob # a blind rating study; prints each rater's link
    koala rate serve --profile demo --port 8001
    koala rate links --profile demo                   # each rater's link again
    koala rate export --profile demo                  # -> runs/demo/eval/judgments/raters.jsonl
    koala mturk export --profile demo --out hits/
    koala mturk import --profile demo --results Batch_results.csv --key hits/key.json
    koala report --profile demo                       # -> runs/demo/eval/summary.json and the figures
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from koala_lib.config import ConfigError, load, with_runs_dir


def _cfg(args: argparse.Namespace):
    return load(args.profile, with_runs_dir(args.overrides, args.runs_dir))


def cmd_leakage(args: argparse.Namespace) -> int:
    if args.queries or args.train:
        from koala_lib.evaluation.leakage import run_leakage

        if not (args.queries and args.train and args.out):
            raise ConfigError("koala leakage: --queries, --train and --out go together")
        report = run_leakage(Path(args.queries), Path(args.train), args.threshold, Path(args.out), progress=not args.quiet)
        where = args.out
    else:
        from koala_lib.evaluation.stage import eval_dir, filter_leaks

        cfg = _cfg(args)
        report = filter_leaks(cfg, progress=not args.quiet)
        where = eval_dir(cfg) / "leakage.json"
    for leak in report.removed:
        print(f"removed {leak.id}  BLEU {leak.bleu:.1f}  ~ {leak.train_text[:100]!r}")
    print(f"{len(report.removed)} removed, {len(report.kept)} kept (threshold {report.threshold}) -> {where}")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.stage import run_judge

    if args.dry_run:
        from koala_lib.evaluation.stage import plan_calls

        plan = plan_calls(_cfg(args))
        for part, p in plan["parts"].items():
            print(f"{part:12s} {p['games']:6d} games, {p['cached']:6d} cached, {p['to_send']:6d} to send, "
                  f"~{p['prompt_tokens_estimate']:,} prompt tokens (estimate, the kit's tokenizer)")
        print(f"{'total':12s} {plan['to_send']:6d} calls to send ({plan['mode']} requests), "
              f"~{plan['prompt_tokens_estimate']:,} prompt tokens (estimate); cache {plan['cache']}")
        for note in plan["notes"]:
            print(f"note: {note}")
        return 0
    if args.action == "card":
        from koala_lib.evaluation.judge_card import card_path, measure_card

        cfg = _cfg(args)
        card = measure_card(cfg, progress=not args.quiet)
        print(f"-> {card_path(cfg)}")
        return 0 if card.fit else 3  # a script can stop before it believes an unfit judge
    if args.action == "calibrate":
        from koala_lib.evaluation.calibration import calibrate, calibration_path

        cfg = _cfg(args)
        cal = calibrate(cfg, progress=not args.quiet)
        per_source = ", ".join(f"{k} {v['pairs']}" for k, v in cal.by_source.items())
        print(f"{cal.pairs} pairs ({per_source}): {cal.agree} agree, "
              f"{cal.disagree} disagree, {cal.ties} ties, {cal.no_verdict} without a verdict; the answer shown first won "
              f"{'-' if cal.first_shown_wins is None else f'{cal.first_shown_wins:.1f} %'} of decisive games -> {calibration_path(cfg)}")
        return 0
    judged = run_judge(_cfg(args), progress=not args.quiet)
    r = judged.result
    print(f"judge {r.judge}{' (weak)' if judged.weak else ''}: {len(r.judgments)} pairs in {r.seconds:.1f} s; "
          f"outcomes {dict(r.outcomes)}; failed requests {dict(r.errors) or 0} -> {judged.path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.report import build_report
    from koala_lib.evaluation.stage import eval_dir
    from koala_lib.metrics import write_metrics

    cfg = _cfg(args)
    report = build_report(cfg)
    write_metrics(cfg, "eval", report.metrics())
    print(report.table().to_string() if report.comparisons else "no judgments yet")
    print(f"summary: {eval_dir(cfg) / 'summary.json'}")
    for name, path in report.figures.items():
        print(f"figure {name}: {path}")
    return 0


def cmd_mturk_export(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.mturk import export_batch
    from koala_lib.evaluation.stage import items_to_judge

    cfg = _cfg(args)
    batch = export_batch(items_to_judge(cfg), Path(args.out), seed=cfg.seed)
    print(f"{batch.items} HITs ({batch.flipped} with sides flipped): template {batch.hit_html}, input {batch.batch_csv}, "
          f"key {batch.key} (keep the key private)")
    return 0


def cmd_mturk_import(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.judgments import write_judgments
    from koala_lib.evaluation.mturk import import_results
    from koala_lib.evaluation.stage import judgments_dir

    result = import_results(Path(args.results), Path(args.key))
    out = Path(args.out) if args.out else judgments_dir(_cfg(args)) / f"mturk_{Path(args.results).stem}.jsonl"
    write_judgments(out, result.judgments)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items())) or "none"
    print(f"{len(result.judgments)} judgments from {result.rows} rows (dropped: {dropped}) -> {out}")
    return 0


def _study(args: argparse.Namespace) -> Path:
    from koala_lib.evaluation.stage import eval_dir

    return Path(args.db) if args.db else eval_dir(_cfg(args)) / "rating" / "study.db"


def cmd_rate_init(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.rating_app import create_study, rating_links
    from koala_lib.evaluation.stage import items_to_judge

    cfg = _cfg(args)
    raters = [r.strip() for r in args.raters.split(",") if r.strip()]
    db = _study(args)
    db.parent.mkdir(parents=True, exist_ok=True)
    create_study(db, items_to_judge(cfg), raters, seed=cfg.seed, attention_checks=args.attention_checks)
    for rater, link in rating_links(db, args.base_url).items():
        print(f"{rater}: {link}")
    print(f"study: {db} (send each rater only their own link; then `{_serve_command(args)}`)")
    return 0


def _study_options(args: argparse.Namespace) -> str:
    """The options that name this study again, as the user gave them."""
    import shlex

    words = ["--profile", args.profile, *(w for item in args.overrides for w in ("--set", item))]
    words += ["--runs-dir", args.runs_dir] if args.runs_dir else []
    words += ["--db", args.db] if args.db else []
    return shlex.join(words)


def _serve_command(args: argparse.Namespace) -> str:
    """`koala rate serve` for the study just made, listening where --base-url says raters will reach it."""
    from urllib.parse import urlsplit

    url = urlsplit(args.base_url)
    extra = "" if url.hostname in ("127.0.0.1", "localhost") else " --host 0.0.0.0"
    extra += f" --port {url.port}" if url.port and url.port != 8001 else ""
    return f"koala rate serve {_study_options(args)}{extra}"


def cmd_rate_links(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.rating_app import rating_links

    for rater, link in rating_links(_study(args), args.base_url).items():
        print(f"{rater}: {link}")
    return 0


def cmd_rate_serve(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.rating_app import serve_forever

    serve_forever(_study(args), args.host, args.port)
    return 0


def cmd_rate_report(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.rating_app import format_rater_report, rater_report

    print(format_rater_report(rater_report(_study(args))))
    return 0


def cmd_rate_export(args: argparse.Namespace) -> int:
    from koala_lib.evaluation.judgments import write_judgments
    from koala_lib.evaluation.rating_app import export_judgments
    from koala_lib.evaluation.stage import judgments_dir

    judgments = export_judgments(_study(args))
    out = Path(args.out) if args.out else judgments_dir(_cfg(args)) / "raters.jsonl"
    write_judgments(out, judgments)
    print(f"{len(judgments)} judgments -> {out}")
    return 0


def register(sub, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add stage 5's subcommands to the `koala` parser."""
    p = sub.add_parser("leakage", help="stage 5: remove test queries whose BLEU with a training user turn exceeds the threshold")
    common(p)
    p.add_argument("--queries", default=None, help="a JSONL of {id, prompt} (or self-instruct's format); default: the profile's test sets")
    p.add_argument("--train", default=None, help="a curated dataset folder or a JSONL of curated records; default: the profile's stage 1 output")
    p.add_argument("--threshold", type=float, default=20.0, help="sentence BLEU above which a query leaks (with --queries)")
    p.add_argument("--out", default=None, help="the JSON report to write (with --queries)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_leakage)

    p = sub.add_parser("judge", help="stage 5: an LLM judge over an OpenAI-compatible endpoint (eval.judge), both orders per pair")
    p.add_argument("--dry-run", action="store_true", help="print how many calls stage 5's judge would send (comparisons, "
                   "calibration, card) and an estimate of their prompt tokens, and send none")
    p.add_argument("action", nargs="?", choices=["calibrate", "card"],
                   help="calibrate: judge held-out human-labelled pairs (eval.calibration) and report the agreement; "
                        "card: the judge's fitness (canaries, position, length, markdown, self-preference, the agreement "
                        "when measured; exit status 3 when unfit), for the profile's judge or any --set eval.judge.base_url")
    common(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("report", help="stage 5: statistics of every judgment, summary.json and the figures")
    common(p)
    p.set_defaults(func=cmd_report)

    rate = sub.add_parser("rate", help="a blind pairwise rating web app for your own raters").add_subparsers(dest="action", required=True)
    for name, func, text in (("init", cmd_rate_init, "create (or extend) the study for the profile's pairs; print each rater's link"),
                             ("links", cmd_rate_links, "print each rater's link again"),
                             ("serve", cmd_rate_serve, "serve the rating pages until stopped"),
                             ("report", cmd_rate_report, "progress and attention checks per rater"),
                             ("export", cmd_rate_export, "ratings -> judgments (default: runs/<P>/eval/judgments/raters.jsonl)")):
        p = rate.add_parser(name, help=text)
        common(p)
        p.add_argument("--db", default=None, help="the study's SQLite file (default: runs/<P>/eval/rating/study.db)")
        if name == "init":
            p.add_argument("--raters", required=True, help="rater ids, comma-separated")
            p.add_argument("--attention-checks", type=int, default=0, help="items with an obviously bad answer, per rater")
        if name in ("init", "links"):
            p.add_argument("--base-url", default="http://127.0.0.1:8001", help="where raters will reach `koala rate serve`")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
            p.add_argument("--port", type=int, default=8001)
        if name == "export":
            p.add_argument("--out", default=None, help="JSONL to write")
        p.set_defaults(func=func)

    mturk = sub.add_parser("mturk", help="Mechanical Turk: HIT template and batch CSV, results import").add_subparsers(dest="action", required=True)
    p = mturk.add_parser("export", help="write hit.html, batch.csv and the private key.json for the profile's pairs")
    common(p)
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(func=cmd_mturk_export)
    p = mturk.add_parser("import", help="MTurk's batch results CSV -> judgments (rejected assignments dropped)")
    common(p)
    p.add_argument("--results", required=True, help="the results CSV downloaded from MTurk")
    p.add_argument("--key", required=True, help="key.json written by `koala mturk export`")
    p.add_argument("--out", default=None, help="JSONL to write (default: runs/<P>/eval/judgments/mturk_<results name>.jsonl)")
    p.set_defaults(func=cmd_mturk_import)
