"""What produced a stage's outputs: `manifest.json` in the stage's folder (`data/`, `conditioned/`,
`train/<variant>/`, `generate/`, `eval/`), written when the stage has written everything else.

    write_manifest(cfg, "conditioned", cfg.run_dir / "conditioned", inputs=[...], outputs=[...], started=t0)
    stale = stale_inputs(cfg, "data", ["data/curated"])   # what changed since the stage that wrote it

A manifest holds the kit's version and git state (commit, whether the code, params or notebooks differ from it,
and a hash of that difference), Python and the versions of the libraries that shape the numbers, the environment
variables that change numerics, the devices (for a CPU its model and vector extensions), the profile, the
overrides, the resolved config and its hash, the seed, a sha256 of every input the stage read and every output it
wrote, and when it started and ended. Paths inside the run are named relative to it (`data/curated.jsonl`), so
two runs in two folders compare name by name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from koala_lib.config import Config, project_root
from koala_lib.files import atomic_text
from koala_lib.typed_yaml import to_dict

NAME = "manifest.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "tokenizers", "numpy")
# Environment variables that change what XLA compiles or how numbers are computed, or which devices run.
NUMERICS_ENV = ("XLA_FLAGS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION", "JAX_PLATFORMS", "JAX_THREEFRY_PARTITIONABLE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES",
                "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS", "PYTHONHASHSEED", "KOALA_CACHE")
TRACKED = ("koala_lib", "params", "notebooks", "pyproject.toml")  # what the git state covers (not figures/)


# ----------------------------------------------------------------------------- the machine and the code


def cpu_info() -> dict:
    """{model, cores, extensions}: the CPU's name and the vector extensions that move the kit's speed and numerics."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX"))
    return {"model": name, "cores": os.cpu_count() or 1, "extensions": [label for flag, label in wanted if flag in flags]}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(project_root()), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", errors="replace") if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """{commit, dirty, diff_sha256} of the kit's checkout over its code, params and notebooks (None outside git)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None}
    diff = _git("diff", "HEAD", "--", *TRACKED) or ""
    untracked = (_git("ls-files", "--others", "--exclude-standard", "--", *TRACKED) or "").split()
    digest = hashlib.sha256(diff.encode())
    for name in sorted(untracked):
        digest.update(name.encode() + b"\0" + (project_root() / name).read_bytes())
    dirty = bool(diff or untracked)
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": digest.hexdigest() if dirty else None}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def devices() -> dict:
    import jax

    found = jax.devices()
    out = {"platform": found[0].platform, "kinds": sorted({d.device_kind for d in found}), "count": len(found),
           "processes": jax.process_count()}
    if found[0].platform == "cpu":
        out["cpu"] = cpu_info()
    return out


def environment() -> dict:
    """Where the stage ran: the kit's version and git state, Python, library versions, numerics variables, devices."""
    return {"kit": {"version": _version("koala-kit"), **git_state()},
            "python": platform.python_version(),
            "packages": {name: _version(name) for name in PACKAGES},
            "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
            "devices": devices()}


def config_record(cfg: Config) -> dict:
    """The profile, the overrides it was loaded with, the resolved config and its hash (paths of the run aside)."""
    resolved = to_dict(cfg)
    compared = {k: v for k, v in resolved.items() if k not in ("runs_dir", "figures_dir", "call_cache")}
    return {"profile": cfg.profile, "overrides": list(cfg.overrides), "config": resolved,
            "config_sha256": hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest(), "seed": cfg.seed}


# ----------------------------------------------------------------------------- files


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def file_name(path: Path, run_dir: Path) -> str:
    """How a manifest names a file, the same in two runs of two checkouts: relative to the run (`data/report.json`),
    to the kit (`kit:koala_lib/data/demo/...`) or to the kit's model cache (`cache:smollm2-135m-instruct/...`), else
    its absolute path."""
    from koala_lib.model.gguf_default import cache_dir

    resolved = Path(path).resolve()
    for prefix, root in (("", run_dir), ("kit:", project_root()), ("cache:", cache_dir())):
        try:
            return prefix + resolved.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return str(resolved)


def hashes(paths: Iterable[Path], run_dir: Path) -> dict[str, str]:
    """{name (file_name): sha256} of every file at or under `paths`. A path that does not exist is left out (a stage
    lists what it may read)."""
    out = {}
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for f in files:
            if f.name in (NAME, "metrics.json"):  # the manifest itself, and the summary a caller writes after it
                continue
            name = file_name(f, run_dir)
            out[name] = content_sha256(f, run_dir) if f.suffix in (".json", ".jsonl") and not name.startswith(("/", "kit:", "cache:")) else sha256(f)
    return out


# Keys of the kit's JSON outputs whose values differ between two runs of the same thing: times, durations (and
# every key ending in `_seconds`), speeds.
VOLATILE = frozenset({"seconds", "compile_seconds", "tokens_per_s", "mfu", "memory_gb", "rows_per_s", "time", "tstamp",
                      "started", "ended", "created", "peak_flops_per_device"})


def _steady(value):
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def content_sha256(path: Path, run_dir: Path) -> str:
    """sha256 of a JSON or JSON-lines output of the run as it would be in any run folder: keys in VOLATILE dropped,
    the run's own path written `<run>` and the kit's `<kit>`, keys sorted. A file that is not valid JSON is hashed
    as bytes."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        docs = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
    except ValueError:
        return sha256(path)
    canonical = "\n".join(json.dumps(_steady(d), sort_keys=True, ensure_ascii=False) for d in docs)
    for root, mark in ((run_dir, "<run>"), (project_root(), "<kit>")):
        canonical = canonical.replace(str(Path(root).resolve()), mark)
    return "json:" + hashlib.sha256(canonical.encode()).hexdigest()


# ----------------------------------------------------------------------------- writing and reading


def write_manifest(cfg: Config, stage: str, folder: Path, inputs: Iterable[Path], outputs: Iterable[Path], started: float,
                   stale: list[str] | None = None, extra: dict | None = None) -> Path:
    """Write `folder/manifest.json` for `stage` (a time.time() `started`); return its path."""
    record = {"stage": stage, **environment(), **config_record(cfg),
              "inputs": hashes(inputs, cfg.run_dir), "outputs": hashes(outputs, cfg.run_dir),
              "stale_inputs": stale or [], "started": _stamp(started), "ended": _stamp(time.time()), **(extra or {})}
    path = folder / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def stale_inputs(cfg: Config, upstream: str, reads: Iterable[str]) -> list[str]:
    """The files under the run-relative prefixes `reads` that differ from what stage folder `upstream`'s manifest
    recorded as its outputs (changed, missing, or new since), each named with what is wrong; [] when there is no
    manifest to compare with."""
    manifest = read_manifest(cfg.run_dir / upstream)
    if manifest is None:
        return []
    prefixes = tuple(reads)
    under = lambda name: any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes)
    recorded = {k: v for k, v in manifest["outputs"].items() if under(k)}
    current = {k: v for k, v in hashes([cfg.run_dir / p for p in prefixes], cfg.run_dir).items() if under(k)}
    out = [f"{k} (changed)" for k in sorted(recorded) if k in current and current[k] != recorded[k]]
    out += [f"{k} (missing)" for k in sorted(recorded) if k not in current]
    out += [f"{k} (not written by {upstream})" for k in sorted(current) if k not in recorded]
    return out


def warn_stale(stage: str, upstream: str, stale: list[str]) -> None:
    """Say, on stderr, that a stage reads files that changed since the stage that wrote them."""
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        print(f"koala: {stage} reads {len(stale)} file(s) that differ from what {upstream} recorded: {shown}; "
              f"re-run {upstream} to make them consistent (recorded as stale_inputs in the manifest)", file=sys.stderr, flush=True)


def run_manifests(run: Path) -> dict[str, dict]:
    """{stage: manifest} of a run folder (`runs/<profile>`), in pipeline order; stages not run yet are absent."""
    run = Path(run)
    folders = [run / "data", run / "conditioned", *sorted((run / "train").glob("*/")), run / "generate", run / "eval"]
    found = {}
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is not None:
            found[manifest["stage"]] = manifest
    return found


def format_run(run: Path) -> str:
    """One run's manifests in a few lines per stage (`koala runs show`)."""
    manifests = run_manifests(run)
    if not manifests:
        return f"{run}: no manifest (a run folder is runs/<profile>, written by koala pipeline or the stage commands)"
    first = next(iter(manifests.values()))
    kit, dev = first["kit"], first["devices"]
    state = "not a git checkout" if kit["commit"] is None else kit["commit"][:12] + (f" + changes {kit['diff_sha256'][:12]}" if kit["dirty"] else "")
    cpu = dev.get("cpu")
    lines = [f"run {run}: profile {first['profile']}, kit {kit['version']} at {state}",
             f"  python {first['python']}, " + ", ".join(f"{k} {v}" for k, v in first["packages"].items() if v),
             f"  devices: {dev['count']} × {dev['platform']}" + (f" ({cpu['model']}, {', '.join(cpu['extensions']) or 'no AVX2'})" if cpu else ""),
             f"  overrides: {' '.join(first['overrides']) or 'none'}; environment: {first['env'] or 'nothing that changes numerics'}"]
    for stage, m in manifests.items():
        lines.append(f"  {stage:<22} {m['started']} -> {m['ended']}  config {m['config_sha256'][:12]}  "
                     f"{len(m['inputs'])} inputs, {len(m['outputs'])} outputs" + (f"; STALE: {', '.join(m['stale_inputs'])}" if m["stale_inputs"] else ""))
    return "\n".join(lines)
