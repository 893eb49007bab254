"""`koala runs diff RUN_A RUN_B`: what went into two runs differently, and the first stage whose outputs part.

    result = diff_runs("runs_a/demo", "runs_b/demo")
    print(format_diff(result)); exit(0 if result["identical"] else 1)

Compared stage by stage from the manifests (koala_lib/manifest.py): first what went in (the kit's code, Python and
library versions, numerics variables, devices, config keys, the hashes of inputs from outside the run), then the
outputs, in pipeline order. What always differs between two runs is not compared: start and end times, the run
folders' paths (`runs_dir`, `figures_dir`, `call_cache` and the overrides that set them), and in JSON outputs the
times, durations and speeds (manifest.VOLATILE).
"""

from __future__ import annotations

import json
from pathlib import Path

from koala_lib.manifest import run_manifests

PATH_KEYS = ("runs_dir", "figures_dir", "call_cache")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def _settings(m: dict) -> dict:
    """What went into one stage, flat: `kit.commit`, `packages.jax`, `env.XLA_FLAGS`, `devices.cpu.model`,
    `config.train.learning_rate`, `overrides`, ... (the run's paths left out)."""
    config = {k: v for k, v in m["config"].items() if k not in (*PATH_KEYS, "overrides")}
    overrides = [o for o in m["overrides"] if o.partition("=")[0].strip() not in PATH_KEYS]
    return {**_flat({"kit": m["kit"], "python": m["python"], "packages": m["packages"], "env": m["env"],
                     "devices": m["devices"], "config": config}), "overrides": " ".join(overrides)}


def _outside(hashes: dict) -> dict:
    """Inputs read from outside the run (source files, the base model, test sets): inside-run inputs are outputs
    of an earlier stage and compared there."""
    return {k: v for k, v in hashes.items() if k.startswith(("/", "kit:", "cache:"))}


def diff_runs(a: str | Path, b: str | Path) -> dict:
    """{identical, inputs: [{what, a, b, stages}], outputs: [{stage, files, differ, only_a, only_b}], first, missing}."""
    ma, mb = run_manifests(Path(a)), run_manifests(Path(b))
    stages = [s for s in ma if s in mb]
    missing = [{"stage": s, "in": "a" if s in ma else "b"} for s in (*ma, *mb) if (s in ma) != (s in mb)]
    inputs: dict[str, dict] = {}
    for stage in stages:
        sa, sb = _settings(ma[stage]), _settings(mb[stage])
        ia, ib = _outside(ma[stage]["inputs"]), _outside(mb[stage]["inputs"])
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                inputs.setdefault(key, {"what": key, "a": sa.get(key), "b": sb.get(key), "stages": []})["stages"].append(stage)
        for name in sorted(set(ia) | set(ib)):
            if ia.get(name) != ib.get(name):
                key = f"input {name}"
                inputs.setdefault(key, {"what": key, "a": ia.get(name), "b": ib.get(name), "stages": []})["stages"].append(stage)
    outputs, first = [], None
    for stage in stages:
        oa, ob = ma[stage]["outputs"], mb[stage]["outputs"]
        differ = sorted(k for k in set(oa) & set(ob) if oa[k] != ob[k])
        row = {"stage": stage, "files": len(set(oa) | set(ob)), "differ": differ,
               "only_a": sorted(set(oa) - set(ob)), "only_b": sorted(set(ob) - set(oa))}
        outputs.append(row)
        if first is None and (differ or row["only_a"] or row["only_b"]):
            first = {"stage": stage, "file": (differ or row["only_a"] or row["only_b"])[0]}
    steps = [s for s in (first_step(Path(a), Path(b), stage) for stage in stages if stage.startswith("train/")) if s]
    if first is not None and first["stage"].startswith("train/"):
        first.update(next((s for s in steps if s["stage"] == first["stage"]), {}))
    identical = not inputs and first is None and not missing
    return {"a": str(a), "b": str(b), "identical": identical, "inputs": list(inputs.values()), "outputs": outputs,
            "first": first, "steps": steps, "answers": answers_differ(Path(a), Path(b)), "verdicts": verdicts_differ(Path(a), Path(b)),
            "missing": missing}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def first_step(a: Path, b: Path, stage: str) -> dict | None:
    """The first optimizer step whose fingerprint (train/<variant>/steps.jsonl) differs, and why, judged in this
    order: the learning rate (settings), the batch's rows (data), the loss from the same rows and the same
    parameters (numerics), the parameters after the step from the same loss (optimizer); `steps` when one run
    recorded fewer steps and they agree as far as they go."""
    sa, sb = _lines(a / stage / "steps.jsonl"), _lines(b / stage / "steps.jsonl")
    before = None  # the parameters' checksum going into the step, equal in both runs so far
    for x, y in zip(sa, sb):
        if x == y:
            before = x["param_checksum"]
            continue
        if x["lr"] != y["lr"]:
            kind, what = "settings", f"learning rate {x['lr']:.6g} -> {y['lr']:.6g}"
        elif x["rows"] != y["rows"]:
            row = next(i for i, (p, q) in enumerate(zip(x["rows"], y["rows"])) if p != q) if len(x["rows"]) == len(y["rows"]) else 0
            kind, what = "data", f"batch rows differ from row {row}"
        elif x["loss_bits"] != y["loss_bits"] or x["grad_norm_bits"] != y["grad_norm_bits"]:
            kind, what = "numerics", "same rows and same parameters before the step, a different loss" if before is not None or x["step"] == 1 \
                else "same rows, a different loss"
        else:
            kind, what = "optimizer", "same loss, different parameters after the step"
        return {"stage": stage, "step": x["step"], "kind": kind, "what": what}
    if len(sa) != len(sb):
        return {"stage": stage, "step": min(len(sa), len(sb)) + 1, "kind": "steps",
                "what": f"{len(sa)} steps recorded against {len(sb)}: other settings, a run stopped early, or one resumed from before steps.jsonl"}
    return None


def answers_differ(a: Path, b: Path) -> dict:
    """{model: answers that differ} over the models both runs answered with (generations/<model>.json)."""
    out = {}
    for path in sorted((a / "generations").glob("*.json")):
        other = b / "generations" / path.name
        if path.name == "models.json" or not other.is_file():
            continue
        key = lambda r: (r.get("test_set"), r.get("id"))
        xa = {key(r): r["output"] for r in json.loads(path.read_text(encoding="utf-8"))}
        xb = {key(r): r["output"] for r in json.loads(other.read_text(encoding="utf-8"))}
        changed = sum(xa.get(k) != xb.get(k) for k in set(xa) | set(xb))
        if changed:
            out[path.stem] = changed
    return out


def verdicts_differ(a: Path, b: Path) -> dict:
    """{"differ": n, "of": m}: the LLM judge's verdicts on the same pair that differ between the runs."""
    if not all((run / "eval" / "judgments" / "llm.jsonl").is_file() for run in (a, b)):
        return {"differ": 0, "of": 0}  # one run has not judged yet: nothing to compare
    key = lambda j: (j.get("test_set"), j.get("prompt_id"), j.get("model_a"), j.get("model_b"), j.get("judge"))
    ja = {key(j): j.get("verdict") for j in _lines(a / "eval" / "judgments" / "llm.jsonl")}
    jb = {key(j): j.get("verdict") for j in _lines(b / "eval" / "judgments" / "llm.jsonl")}
    both = set(ja) | set(jb)
    return {"differ": sum(ja.get(k) != jb.get(k) for k in both), "of": len(both)}


def _short(value) -> str:
    text = str(value)
    return text[:16] + "…" if len(text) == 64 or text.startswith("json:") else text


def format_diff(d: dict) -> str:
    if d["identical"]:
        stages = ", ".join(row["stage"] for row in d["outputs"])
        return f"runs identical: {d['a']} and {d['b']} ({stages}: same inputs, settings and outputs)"
    lines = [f"runs differ: {d['a']} vs {d['b']}"]
    if d["inputs"]:
        lines.append("what went in differently:")
        lines += [f"  {i['what']}: {_short(i['a'])} -> {_short(i['b'])}  (stages: {', '.join(i['stages'])})" for i in d["inputs"]]
    if d["first"]:
        where = f", step {d['first']['step']}: {d['first']['kind']} ({d['first']['what']})" if "step" in d["first"] else ""
        lines.append(f"first output that differs: stage {d['first']['stage']}{where}; {d['first']['file']}")
    for s in d["steps"]:
        if d["first"] is None or s["stage"] != d["first"]["stage"]:
            lines.append(f"  {s['stage']} parts at step {s['step']}: {s['kind']} ({s['what']})")
    if d["answers"]:
        lines.append("answers that differ: " + ", ".join(f"{m} {n}" for m, n in d["answers"].items()))
    if d["verdicts"]["differ"]:
        lines.append(f"judge verdicts that differ: {d['verdicts']['differ']} of {d['verdicts']['of']} pairs")
    lines.append("outputs by stage:")
    for row in d["outputs"]:
        parted = len(row["differ"]) + len(row["only_a"]) + len(row["only_b"])
        lines.append(f"  {row['stage']:<22} " + ("identical" if not parted else f"{parted} of {row['files']} files differ"
                                                   + (f" (e.g. {(row['differ'] or row['only_a'] or row['only_b'])[0]})")))
    lines += [f"  {m['stage']:<22} only in run {m['in']}" for m in d["missing"]]
    return "\n".join(lines)
