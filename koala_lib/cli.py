"""The `koala` command: one subcommand per stage, each a thin call into koala_lib.

    koala config show --profile demo --set data.mixture=koala_distill
    koala curate --profile smoke --sources sharegpt,hh
    koala plan --profile koala13b
    koala train --profile smoke --variant koala_distill
    koala generate --profile demo
    koala serve --profile demo --model koala_all --port 8000
    koala leakage|judge|rate|mturk|report --profile demo      (stage 5, see koala_lib/cli_eval.py)
    koala pipeline --profile demo --stages 01
    koala weights fetch-default
    koala weights merge --base B --adapter A --out DIR     (a PEFT LoRA adapter merged into B)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from koala_lib.config import ConfigError, check_variants, load, show, with_runs_dir


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="demo", help="profile under params/ (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.mixture=koala_distill (repeatable)")
    parser.add_argument("--runs-dir", default=None, metavar="DIR",
                        help="write everything under DIR/<profile>/ (figures too) instead of the kit's runs/; relative to the current folder")


def _overrides(args: argparse.Namespace) -> list[str]:
    return with_runs_dir(args.overrides, args.runs_dir)


def cmd_config_show(args: argparse.Namespace) -> int:
    if args.defaults:
        from koala_lib.config import defaults

        print(show(defaults()), end="")
    else:
        print(show(load(args.profile, _overrides(args))), end="")
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from koala_lib.data.curate import curate

    cfg = load(args.profile, _overrides(args))
    result = curate(cfg, sources=args.sources, progress=not args.quiet)
    print(result.table().to_string())
    print(f"report: {result.out_dir / 'report.json'}\nfigure: {result.figure_path}")
    return 0


def cmd_condition(args: argparse.Namespace) -> int:
    from koala_lib.conditioning.stage import condition
    from koala_lib.conditioning.template import marked_text

    cfg = load(args.profile, _overrides(args))
    result = condition(cfg, progress=not args.quiet)
    for example in result.train[: args.show]:
        print(f"--- {example.id} [{example.source}, {example.preference}]")
        print(marked_text(result.tokenizer, example.ids, example.mask))
    print(result.table().to_string())
    print(f"stats: {result.out_dir / 'stats.json'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from koala_lib.train.report import train_all

    cfg = load(args.profile, _overrides(args))
    variants = [v.strip() for v in args.variant.split(";")] if args.variant else None
    check_variants(cfg, variants, "--variant")
    report = train_all(cfg, variants, progress=not args.quiet)
    print(report.table().to_string())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from koala_lib.train.plan import plan

    cfg = load(args.profile, _overrides(args))
    print(f"compiling {cfg.profile}'s train step on virtual CPU devices ...", file=sys.stderr, flush=True)
    print(plan([cfg], devices=args.devices)[0].text())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from koala_lib.inference.answers import answer_all

    cfg = load(args.profile, _overrides(args))
    models = [m.strip() for m in args.model.split(",")] if args.model else None
    result = answer_all(cfg, models, progress=not args.quiet)
    print(result.table().to_string())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from koala_lib.inference.serve import app_for_profile, run_server

    cfg = load(args.profile, _overrides(args))
    key = args.api_key or os.environ.get("KOALA_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"koala serve: warning: listening on {args.host} without an API key (set --api-key or KOALA_API_KEY)", file=sys.stderr)
    run_server(app_for_profile(cfg, args.model, args.checkpoint, key), args.host, args.port)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    import time

    from koala_lib.pipeline import run_pipeline, written_since

    start = time.time()
    runs = run_pipeline(args.profile, _overrides(args), stages=args.stages, progress=not args.quiet)
    print(f"pipeline {args.profile!r}: {len(runs)} stage(s) in {sum(r.seconds for r in runs):.1f} s")
    for run in runs:
        print(f"  {run.stage}  {run.seconds:7.1f} s  {run.notebook}")
    for kind, paths in written_since(args.profile, _overrides(args), start).items():
        print(f"{kind} written ({len(paths)}):")
        for path in paths:
            print(f"  {path}")
    return 0


def cmd_notebooks_refresh(args: argparse.Namespace) -> int:
    from koala_lib.nbtools import refresh

    for path in refresh(args.profile, _overrides(args), stages=args.stages):
        print(f"cleaned {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from koala_lib.doctor import exit_code, format_checks, run_checks

    cfg = load(args.profile, _overrides(args))
    checks = run_checks(cfg)
    print(format_checks(checks, cfg.profile))
    return exit_code(checks)


def cmd_runs_show(args: argparse.Namespace) -> int:
    from koala_lib.manifest import format_run

    print(format_run(Path(args.run)))
    return 0


def cmd_runs_diff(args: argparse.Namespace) -> int:
    import json

    from koala_lib.run_diff import diff_runs, format_diff

    result = diff_runs(args.run_a, args.run_b)
    print(json.dumps(result, indent=1) if args.json else format_diff(result))
    return 0 if result["identical"] else 1


def cmd_readme(args: argparse.Namespace) -> int:
    from koala_lib.config import project_root
    from koala_lib.run_numbers import update_document

    cfg = load(args.profile, _overrides(args))
    path = Path(args.file) if args.file else project_root() / "README.md"
    try:
        count = update_document(cfg, path)
    except KeyError as exc:  # a mark the run does not fill
        print(f"koala: error: {path}: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"{count} numbers of {cfg.run_dir} written into {path}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from koala_lib.lab import run_lab

    run_lab(args.port, browser=not args.no_browser)
    return 0


def cmd_weights_fetch_default(args: argparse.Namespace) -> int:
    from koala_lib.model.gguf_default import default_model_dir

    print(default_model_dir())
    return 0


def cmd_weights_export(args: argparse.Namespace) -> int:
    from koala_lib.model.checkpoints import load_hf, resolve_checkpoint, save_hf

    source = resolve_checkpoint(args.checkpoint)
    out = save_hf(load_hf(source), args.out, tokenizer_from=source)
    print(out)
    return 0


def cmd_weights_from_meta(args: argparse.Namespace) -> int:
    from koala_lib.model.meta import convert_meta

    print(convert_meta(args.meta, args.out, tokenizer_from=args.tokenizer))
    return 0


def cmd_weights_diff(args: argparse.Namespace) -> int:
    from koala_lib.model.weights_diff import make_diff

    print(make_diff(Path(args.base), Path(args.target), Path(args.out)))
    return 0


def cmd_weights_recover(args: argparse.Namespace) -> int:
    from koala_lib.model.weights_diff import recover

    summary = recover(Path(args.base), Path(args.diff), Path(args.out))
    bad = [row for row in summary if not row["recovered_matches"]]
    for row in summary:
        flag = "ok" if row["recovered_matches"] else "MISMATCH"
        print(f"{flag:8} {row['tensor']:55} {str(row['shape']):>16} {row['dtype']}")
    print(f"recovered {len(summary)} tensors into {args.out}; {len(bad)} differ from the target's checksums")
    return 1 if bad else 0


def cmd_weights_merge(args: argparse.Namespace) -> int:
    from koala_lib.model.checkpoints import resolve_checkpoint
    from koala_lib.model.peft import merge_folder

    print(merge_folder(resolve_checkpoint(args.base), Path(args.adapter), Path(args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koala", description="Reproduce the Koala chatbot, stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect profiles").add_subparsers(dest="action", required=True)
    p = config.add_parser("show", help="print the resolved config of a profile, with a comment per key")
    _common(p)
    p.add_argument("--defaults", action="store_true", help="every key at its default instead (what a profile changes; docs/config.md)")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("curate", help="stage 1: curate the sources into conversations")
    _common(p)
    p.add_argument("--sources", default=None, help="only these sources, comma-separated (e.g. sharegpt,hc3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("condition", help="stage 2: markers, tokens with loss masks, packed rows")
    _common(p)
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N training texts, trained spans in ⟦ ⟧")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_condition)

    p = sub.add_parser("train", help="stage 3: fine-tune each variant on a device mesh (resumes from its last checkpoint)")
    _common(p)
    p.add_argument("--variant", default=None, help="only this variant (a mixture, e.g. koala_distill); default: train.variants")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="stage 3 before renting GPUs: compile the train step on virtual devices; XLA's memory and FLOPs beside the estimate")
    _common(p)
    p.add_argument("--devices", type=int, default=None, help="devices the -1 of train.mesh stands for (default: this machine's)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="stage 4: each model answers the test sets -> runs/<P>/generations/<model>.json")
    _common(p)
    p.add_argument("--model", default=None, help="only these models, comma-separated (base, a variant, an extra name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible server with a chat page at / for one model")
    _common(p)
    p.add_argument("--model", default=None, help="base, a variant or an extra name (default: the first trained variant, else base)")
    p.add_argument("--checkpoint", default=None, help="serve this Hugging Face folder (or `default`) instead of a profile model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the API and the chat page (default: 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (or set KOALA_API_KEY)")
    p.set_defaults(func=cmd_serve)

    from koala_lib.cli_eval import register

    register(sub, _common)

    p = sub.add_parser("pipeline", help="run the stage notebooks with papermill")
    _common(p)
    p.add_argument("--stages", default=None, help="only these stages, comma-separated (e.g. 01,02)")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("doctor", help="is this machine ready for the profile? checks with a fix each; exit 1 if a needed one fails")
    _common(p)
    p.set_defaults(func=cmd_doctor)

    runs = sub.add_parser("runs", help="what produced a run: its stages' manifests").add_subparsers(dest="action", required=True)
    p = runs.add_parser("show", help="a run's manifests: code, versions, devices, overrides, config hash, stale inputs")
    p.add_argument("run", help="the run folder, e.g. runs/demo")
    p.set_defaults(func=cmd_runs_show)
    p = runs.add_parser("diff", help="what went into two runs differently, and the first stage whose outputs part; exit 1 when they differ")
    p.add_argument("run_a", help="a run folder, e.g. runs/demo")
    p.add_argument("run_b", help="the other run folder")
    p.add_argument("--json", action="store_true", help="the comparison as JSON, for scripts")
    p.set_defaults(func=cmd_runs_diff)

    p = sub.add_parser("readme", help="write the numbers the README quotes (its <!-- run:KEY --> marks) from the profile's run")
    _common(p)
    p.add_argument("--file", default=None, help="the document to rewrite (default: the kit's README.md)")
    p.set_defaults(func=cmd_readme)

    p = sub.add_parser("lab", help="JupyterLab on the notebooks (localhost only; --allow-root added when run as root)")
    p.add_argument("--port", type=int, default=8888, help="port on localhost (default 8888); forward it over SSH to reach it from elsewhere")
    p.add_argument("--no-browser", action="store_true", help="do not try to open a browser")
    p.set_defaults(func=cmd_lab)

    notebooks = sub.add_parser("notebooks", help="maintain the committed notebooks").add_subparsers(dest="action", required=True)
    p = notebooks.add_parser("refresh", help="re-execute the notebooks (smoke profile) and store them cleaned")
    _common(p)
    p.set_defaults(profile="smoke")
    p.add_argument("--stages", default=None, help="only these stages, comma-separated")
    p.set_defaults(func=cmd_notebooks_refresh)

    weights = sub.add_parser("weights", help="base model weights").add_subparsers(dest="action", required=True)
    p = weights.add_parser("fetch-default", help="convert the embedded SmolLM2-135M GGUF to a HF folder; print its path")
    _common(p)
    p.set_defaults(func=cmd_weights_fetch_default)
    p = weights.add_parser("export", help="write a checkpoint as a Hugging Face folder (transformers and vLLM load it as is)")
    p.add_argument("--checkpoint", required=True, help="`default`, a Hugging Face folder, or a hub id")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(func=cmd_weights_export)
    p = weights.add_parser("from-meta", help="Meta's params.json + consolidated.*.pth -> a Hugging Face folder")
    p.add_argument("--meta", required=True, help="folder with params.json and consolidated.NN.pth")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--tokenizer", default=None, help="folder whose tokenizer files are copied alongside")
    p.set_defaults(func=cmd_weights_from_meta)
    p = weights.add_parser("diff", help="write target - base as a weight diff (Koala's way of publishing weights)")
    p.add_argument("--base", required=True, help="the base Hugging Face folder")
    p.add_argument("--target", required=True, help="the fine-tuned Hugging Face folder")
    p.add_argument("--out", required=True, help="the diff folder to write")
    p.set_defaults(func=cmd_weights_diff)
    p = weights.add_parser("recover", help="base + diff -> the fine-tuned folder, checked tensor by tensor")
    p.add_argument("--base", required=True)
    p.add_argument("--diff", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_weights_recover)
    p = weights.add_parser("merge", help="base + a PEFT LoRA adapter folder -> a merged Hugging Face folder (the base's dtype)")
    p.add_argument("--base", required=True, help="`default`, a Hugging Face folder, or a hub id")
    p.add_argument("--adapter", required=True, help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--out", required=True, help="the merged folder to write")
    p.set_defaults(func=cmd_weights_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from koala_lib.data.readers import SourceFormatError
    from koala_lib.evaluation.judgments import JudgmentError
    from koala_lib.evaluation.mturk import MTurkError
    from koala_lib.evaluation.rating_app import StudyError
    from koala_lib.model.peft import AdapterError
    from koala_lib.model.weights_diff import BaseMismatch
    from koala_lib.pipeline import StageFailed
    from koala_lib.train import DoesNotFit

    try:
        return func(args)
    except (ConfigError, SourceFormatError, StageFailed, FileNotFoundError, BaseMismatch, DoesNotFit, JudgmentError,
            MTurkError, StudyError, AdapterError) as exc:
        print(f"koala: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
