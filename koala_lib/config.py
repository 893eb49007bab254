"""Configuration: one YAML profile under `params/`, validated into frozen dataclasses.

A profile holds only what differs from the defaults written below; each field carries a one-line
comment (`doc`), which `koala config show` prints next to the resolved value. Unknown keys, keys
given twice and values of the wrong type or outside the allowed set are errors that name the key.

    cfg = load("demo", ["data.mixture=koala_distill", "seed=1"])
    cfg.data.sources.sharegpt.cap  # -> None
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from koala_lib.config_sources import MIXTURES, SOURCE_NAMES, SourceConfig, SourcesConfig, mixture_sources, variant_name  # noqa: F401 (re-exported)
from koala_lib.model.mesh_spec import parse_mesh
from koala_lib.typed_yaml import ConfigError, UniqueKeyLoader, build, doc, show, to_dict  # noqa: F401 (re-exported)

MODEL_PRESETS = ("debug", "smollm2-135m", "llama-7b", "llama-13b", "llama2-7b", "llama2-13b", "llama3-8b")


# ----------------------------------------------------------------------------- data sources


@dataclass(frozen=True)
class DataConfig:
    mixture: str = doc("koala_all", f"a preset ({', '.join(MIXTURES)}) or comma-separated source names")
    pairs: Literal["positive_negative", "positive_only"] = doc(
        "positive_negative", "preference pairs give a positive and a negative record, or the positive only"
    )
    cap_per_source: int | None = doc(None, "default `cap` for every source that sets none; null = no cap")
    max_chars: int = doc(12000, "longer conversations are split at turn boundaries (characters of turn text)")
    max_record_bytes: int = doc(1_000_000, "an upstream row larger than this (bytes of JSON) is rejected as `oversized`")
    format_check_rows: int = doc(20, "a file whose first N rows all fail to parse is reported as not in the expected format")
    sources: SourcesConfig = doc(SourcesConfig, "per-source settings, keyed by source name")

    def source_names(self) -> tuple[str, ...]:
        """The mixture's sources, in canonical order."""
        return mixture_sources(self.mixture)


# ----------------------------------------------------------------------------- conditioning

MARKER_STYLES = {
    # style: (positive marker, negative marker)
    "released": ("GPT:", "An Unhelpful Answer:"),  # Koala's released preprocessing code
    "blog": ("A helpful answer:", "An unhelpful answer:"),  # the blog post's wording
}


@dataclass(frozen=True)
class ConditioningConfig:
    beginning: str = doc("BEGINNING OF CONVERSATION:", "text that opens every conversation")
    user_marker: str = doc("USER:", "marker before each user turn")
    markers: Literal["released", "blog"] = doc("released", "answer markers: released (GPT: / An Unhelpful Answer:) or blog (A helpful answer: / An unhelpful answer:)")
    positive_marker: str | None = doc(None, "marker before a positive or unlabelled answer; null = the `markers` style's")
    negative_marker: str | None = doc(None, "marker before a negative (rejected) answer; null = the `markers` style's")
    seq_len: int = doc(2048, "tokens per packed row; a longer conversation is cut at turn boundaries")
    eval_fraction: float = doc(0.02, "share of examples held out for eval loss (seeded, after sorting by id)")
    epochs: int = doc(2, "epochs of packed rows written to disk, each in a new seeded order")

    def marker(self, preference: str) -> str:
        """The answer marker for a record's preference (`negative` → negative marker, else positive)."""
        positive, negative = MARKER_STYLES[self.markers]
        if preference == "negative":
            return self.negative_marker or negative
        return self.positive_marker or positive


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    base: str = doc("default", "base checkpoint: `default` (the embedded SmolLM2-135M-Instruct), a local HF folder, or a hub id")
    init: Literal["pretrained", "random"] = doc("pretrained", "start from `base`'s weights, or a random `preset` model (vocab from the tokenizer)")
    preset: Literal[MODEL_PRESETS] = doc("smollm2-135m", f"architecture preset: {', '.join(MODEL_PRESETS)}")  # type: ignore[valid-type]
    tokenizer: str | None = doc(None, "tokenizer folder or hub id; null = the base checkpoint's")
    dtype: Literal["float32", "bfloat16"] = doc("float32", "compute dtype of matmuls (bfloat16 on GPUs)")
    param_dtype: Literal["float32", "bfloat16"] = doc("float32", "dtype the parameters are kept in (fp32 master weights)")
    attention: Literal["auto", "xla", "cudnn"] = doc("auto", "attention implementation: xla (CPU), cudnn (GPU), or JAX's choice")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = doc("none", "rematerialization per block: none, full, or keep matmul outputs")


# ----------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None = doc(None, "host:port of process 0 for a multi-process run; null = one process (unless `auto`)")
    num_processes: int | None = doc(None, "processes in a multi-process run")
    process_id: int | None = doc(None, "this process's index (0 .. num_processes - 1)")
    auto: bool = doc(False, "let jax.distributed.initialize() read the cluster's environment (SLURM, Open MPI, ...)")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = doc(8, "rank r of each adapter (A [in, r], B [r, out])")
    alpha: float = doc(16.0, "the update is scaled by alpha / rank (PEFT's lora_alpha)")
    targets: tuple[str, ...] = doc((r"self_attn/(q|k|v|o)_proj", r"mlp/(gate|up|down)_proj"),
                                   "regexes searched in the linear layers' kernel paths (layers/<i>/mlp/up_proj/kernel, lm_head/kernel)")


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["full", "lora"] = doc("full", "full: every weight trained (fp32 master weights); lora: the base frozen in model.dtype, low-rank adapters trained")
    lora: LoRAConfig = doc(LoRAConfig, "the adapters of method: lora")
    variants: tuple[str, ...] = doc((), "models to fine-tune, each named by its data mixture (within data.mixture); empty = data.mixture")
    mesh: str = doc("1,-1,1", "device mesh (data, fsdp, tensor) sizes; -1 = the remaining devices")
    scan_layers: bool = doc(True, "loop over the layers with lax.scan (one layer compiled; FSDP gathers one layer at a time); false = unrolled")
    batch_size: int = doc(32, "packed rows per optimizer step, over all devices")
    grad_accum: int = doc(1, "micro-batches per step (batch_size must divide by it)")
    max_steps: int | None = doc(None, "stop after this many optimizer steps; null = every epoch of conditioning.epochs")
    learning_rate: float = doc(2e-5, "peak learning rate")
    end_learning_rate: float = doc(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = doc(0, "linear warmup from 0 to the peak, in optimizer steps")
    b1: float = doc(0.9, "AdamW beta1")
    b2: float = doc(0.95, "AdamW beta2")
    eps: float = doc(1e-8, "AdamW epsilon")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay")
    no_decay: tuple[str, ...] = doc(("norm", "embed_tokens"), "parameters whose path matches any of these regexes get no weight decay")
    clip_grad_norm: float | None = doc(1.0, "clip the global gradient norm to this; null = no clipping")
    eval_every: int = doc(0, "steps between eval-loss passes over the held-out split (always at the end); 0 = end only")
    eval_rows: int | None = doc(None, "packed eval rows per eval pass; null = all")
    log_every: int = doc(1, "steps between rows of metrics.jsonl")
    checkpoint_every: int = doc(200, "steps between orbax checkpoints (always at the end)")
    keep_checkpoints: int = doc(2, "most recent checkpoints kept")
    export_hf: bool = doc(True, "also write the final params as a Hugging Face folder (train/<variant>/hf)")
    peak_tflops: float | None = doc(None, "per-device peak TFLOP/s for MFU; null = a known GPU's dense bf16 peak, or a measured matmul on CPU")
    device_memory_gb: float | None = doc(None, "memory per device for the fit check; null = what the device reports")
    memory_check: Literal["error", "warn", "off"] = doc("error", "when the estimate exceeds device memory: stop, warn, or skip the check")
    distributed: DistributedConfig = doc(DistributedConfig, "multi-process (multi-host) runs through jax.distributed")


# ----------------------------------------------------------------------------- generation and evaluation


@dataclass(frozen=True)
class TestSetConfig:
    origin: Literal["demo", "public"] = doc("demo", "where prompts come from when `path` is unset: the kit's demo prompts or the public file (`url`)")
    path: str | None = doc(None, "a local file in the upstream layout; overrides `origin`")
    url: str = doc("", "the public file (downloaded once into ~/.cache/koala-kit/test_sets)")
    subset: int | None = doc(None, "keep a seeded sample of this many prompts (sorted by id first); null = all")
    limit: int | None = doc(None, "then keep only the first N prompts (quick runs); null = all")


@dataclass(frozen=True)
class KoalaTestSetConfig(TestSetConfig):
    url: str = doc("https://raw.githubusercontent.com/arnav-gudibande/koala-test-set/main/koala_test_set.jsonl",
                   "the Koala test set: 180 `{\"id\", \"prompt\"}` lines")


@dataclass(frozen=True)
class AlpacaTestSetConfig(TestSetConfig):
    url: str = doc("https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval/user_oriented_instructions.jsonl",
                   "self-instruct's 252 user-oriented instructions, the pool of the Alpaca test set")
    subset: int | None = doc(180, "the blog's 180 prompts were never published: a seeded 180 of the 252; null = all 252")


@dataclass(frozen=True)
class TestSetsConfig:
    koala: KoalaTestSetConfig = doc(KoalaTestSetConfig, "the Koala test set (real user queries)")
    alpaca: AlpacaTestSetConfig = doc(AlpacaTestSetConfig, "the Alpaca test set (self-instruct's user-oriented instructions)")


@dataclass(frozen=True)
class PanelJudgeConfig:
    base_url: str = doc("", "an OpenAI-compatible endpoint; empty = the kit's own server running the base model")
    model: str = doc("", "the judge model's name at that endpoint; empty = the model the endpoint serves")
    api_key_env: str = doc("OPENAI_API_KEY", "environment variable that holds the endpoint's API key")


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str = doc("", "an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1; empty = the kit's own server running the base model (offline, a weak judge)")
    model: str = doc("", "the judge model's name at that endpoint; empty = the model the endpoint serves")
    api_key_env: str = doc("OPENAI_API_KEY", "environment variable that holds the endpoint's API key")
    mode: Literal["auto", "logprobs", "text"] = doc("auto", "how a verdict is read: logprobs (one-token verdict, probabilities of A/B/C), text ([[A]]/[[B]]/[[C]] after reasoning), or auto (logprobs when the endpoint returns them)")
    top_logprobs: int = doc(20, "logprobs mode: alternatives asked for at the verdict token (0-20)")
    tie_margin: float = doc(0.05, "logprobs mode: a pair is a tie when the soft preference for model A is within this of 0.5")
    max_tokens: int = doc(512, "text mode: reply tokens per judgment at most (the verdict comes last)")
    max_answer_chars: int = doc(4000, "each question and answer shown to the judge is cut to this many characters (marked as cut)")
    concurrency: int = doc(8, "judge requests in flight at once")
    panel: tuple[PanelJudgeConfig, ...] = doc((), "several judges (each base_url, model, api_key_env; the other settings above are shared) whose verdicts are combined, each with its own card; empty = the one judge above")
    panel_verdict: Literal["mean", "majority"] = doc("mean", "a panel's verdict: the mean of its judges' soft preferences, or the majority of their hard verdicts (a tie without one)")
    panel_drop_unfit: bool = doc(False, "leave judges whose card is unfit out of the panel's verdict (once their cards are measured; their own verdicts are kept)")
    max_retries: int = doc(2, "retries per judge request (with the client's backoff) before the game is counted as failed; the kit's own server gets none")


@dataclass(frozen=True)
class CalibrationConfig:
    sources: tuple[str, ...] = doc(("hh", "webgpt", "summarize"), "human-labelled preference sources whose pairs calibrate the judge")
    pairs: int = doc(200, "labelled pairs judged at most (a seeded sample of stage 2's eval split)")


@dataclass(frozen=True)
class CardConfig:
    min_canary_accuracy: float = doc(90.0, "a fit judge picks the better answer of at least this % of the canary pairs, in both orders")
    min_position_consistency: float = doc(60.0, "a fit judge keeps its verdict under a swap of the answers in at least this % of pairs (MT-bench measured GPT-4 at 65)")
    require_human_agreement: bool = doc(True, "a fit judge's agreement with held-out human labels has its 95 % interval above chance (50 %)")
    drift_canaries: int = doc(8, "canary pairs an endpoint judge is asked again every run although cached, so that a model changed under the same name shows (a model the kit serves is identified by its weights' hash and cannot drift)")


@dataclass(frozen=True)
class EvalConfig:
    test_sets: TestSetsConfig = doc(TestSetsConfig, "the prompts every model answers")
    leakage_threshold: float = doc(20.0, "a test query whose sentence BLEU with a training user turn exceeds this is removed")
    comparisons: tuple[str, ...] = doc((), "pairs to judge as A:B (stage 4 model names); empty = the blog's: the first variant against alpaca, koala_distill and chatgpt, those of them that answered (against every other model when none did)")
    judge: JudgeConfig = doc(JudgeConfig, "the LLM judge (`koala judge`)")
    calibration: CalibrationConfig = doc(CalibrationConfig, "the judge's agreement with human labels (`koala judge calibrate`), on held-out pairs only")
    card: CardConfig = doc(CardConfig, "the judge card (`koala judge card`): the thresholds a judge must meet to be called fit")
    bootstrap: int = doc(1000, "bootstrap replicates (resampling prompts) for every interval")


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str = doc("https://api.openai.com/v1", "an OpenAI-compatible endpoint that answers `openai:MODEL` answerers")
    api_key_env: str = doc("OPENAI_API_KEY", "environment variable that holds the endpoint's API key")
    max_retries: int = doc(3, "retries per request (with the client's backoff) before the answer is counted as failed")
    concurrency: int = doc(8, "requests in flight at once")


@dataclass(frozen=True)
class GenerateConfig:
    models: tuple[str, ...] = doc((), "models that answer: `base` and fine-tuned variants by name; empty = base and every train variant")
    extra: tuple[str, ...] = doc((), "more answerers as NAME=WHAT: a Hugging Face folder, an outputs file in AlpacaEval's format, openai:MODEL (an OpenAI-compatible endpoint, `generate.endpoint`), or base (the profile's base model as a labelled stand-in for NAME)")
    native_template: tuple[str, ...] = doc(("base",), "models (by name, or `extra` for every generate.extra model) that answer through their tokenizer's own chat template when it has one, instead of Koala's")
    endpoint: EndpointConfig = doc(EndpointConfig, "the OpenAI-compatible endpoint of `openai:MODEL` answerers")
    max_new_tokens: int = doc(256, "new tokens per answer at most")
    min_new_tokens: int = doc(0, "the end-of-turn token is not drawn before this many new tokens (transformers' min_new_tokens, vLLM's min_tokens); 0 = off")
    temperature: float = doc(0.0, "sampling temperature; 0 = greedy (reproducible answers)")
    top_p: float = doc(1.0, "nucleus sampling mass; 1 = off")
    top_k: int = doc(0, "sample among the k most likely tokens; 0 = off")
    stop: tuple[str, ...] = doc(("USER:",), "an answer ends where one of these appears (the next user turn)")
    batch_size: int = doc(16, "prompts decoded together")
    max_queue: int = doc(64, "koala serve: requests waiting beyond this get HTTP 429")
    batching: str = doc("continuous", "koala serve: continuous (requests join and leave between decode steps) or static (what waits is decoded together to the end of its longest answer)")
    slots: int = doc(16, "koala serve: requests decoded together (KV-cache slots)")
    max_body_bytes: int = doc(1 << 20, "koala serve: a request body over this many bytes gets HTTP 413")
    moderation_words: tuple[str, ...] = doc((), "koala serve: a request or answer containing one of these words is refused (case-insensitive)")


# ----------------------------------------------------------------------------- the whole config


@dataclass(frozen=True)
class Config:
    profile: str = doc("demo", "profile name (the YAML file under params/)")
    seed: int = doc(0, "the one seed every random choice derives from")
    overrides: tuple[str, ...] = doc((), "set when loading, not in a profile: the key=value overrides applied (every stage's manifest records them)")
    runs_dir: str = doc("runs", "where stages write: outputs go to <runs_dir>/<profile>/; a relative path set here is taken from the kit root, one given as --runs-dir from the current folder")
    figures_dir: str | None = doc(None, "where figures are saved; null = <runs_dir>/<profile>/figures (with --runs-dir, null unless --set figures_dir names a folder)")
    call_cache: str | None = doc(None, "SQLite file of judge verdicts and openai:MODEL answers, keyed by who answered and exactly what was asked (a re-run pays no call twice); null = <runs_dir>/call_cache.sqlite; one file may serve several runs")
    data: DataConfig = doc(DataConfig, "stage 1: sources, mixture and cleaning")
    conditioning: ConditioningConfig = doc(ConditioningConfig, "stage 2: chat template, markers, packing")
    model: ModelConfig = doc(ModelConfig, "base model and tokenizer")
    train: TrainConfig = doc(TrainConfig, "stage 3: optimizer, device mesh, checkpoints, metrics")
    generate: GenerateConfig = doc(GenerateConfig, "stage 4: answers to the test sets, and `koala serve`")
    eval: EvalConfig = doc(EvalConfig, "stage 5: test sets and judgments")

    @property
    def run_dir(self) -> Path:
        """`<runs_dir>/<profile>`, absolute."""
        return resolve_path(self.runs_dir) / self.profile

    @property
    def variants(self) -> tuple[str, ...]:
        """The models stage 3 fine-tunes: `train.variants`, or the data mixture itself."""
        return self.train.variants or (self.data.mixture,)

    @property
    def call_cache_path(self) -> Path:
        return resolve_path(self.call_cache) if self.call_cache else resolve_path(self.runs_dir) / "call_cache.sqlite"

    @property
    def figures_path(self) -> Path:
        return resolve_path(self.figures_dir) if self.figures_dir else self.run_dir / "figures"


def check_variants(cfg: "Config", variants: Sequence[str] | None = None, key: str = "train.variants") -> None:
    """Every variant stage 3 trains (`variants`, default the profile's) must draw only on sources of the data mixture
    (checked when training starts); `key` is what the error names: the config key, or the option that gave them."""
    for variant in variants or cfg.variants:
        extra = set(mixture_sources(variant, key)) - set(cfg.data.source_names())
        if extra:
            raise ConfigError(f"{key}: {variant!r} needs {', '.join(sorted(extra))}, not in data.mixture {cfg.data.mixture!r}; set train.variants too")


# ----------------------------------------------------------------------------- paths


def project_root() -> Path:
    """The kit's root (the folder holding `params/`): $KOALA_HOME, else the checkout koala_lib lives in, else cwd."""
    if os.environ.get("KOALA_HOME"):
        return Path(os.environ["KOALA_HOME"]).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "params").is_dir():
        return here
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "params").is_dir():
            return folder
    return Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    """Absolute paths stay; relative ones are taken from the kit root, so notebooks and the CLI agree."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


# ----------------------------------------------------------------------------- loading


def profile_path(profile: str) -> Path:
    """`params/<profile>.yaml`, or the profile itself when it is a path to a YAML file."""
    if profile.endswith((".yaml", ".yml")):
        return resolve_path(profile)
    return project_root() / "params" / f"{profile}.yaml"


def defaults() -> Config:
    """Every key at its default: what a profile's YAML changes."""
    return replace(Config(), profile="defaults")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (project_root() / "params").glob("*.yaml"))


def load(profile: str = "demo", overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Config:
    """Load `params/<profile>.yaml`, apply `key=value` overrides, and validate into a frozen Config."""
    path = profile_path(profile)
    if not path.is_file():
        raise ConfigError(f"profile {profile!r}: no file {path} (available: {', '.join(available_profiles())})")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for key in ("profile", "overrides"):
        if key in raw:
            raise ConfigError(f"{path}: `{key}` is set when the profile is loaded, not in the file")
    parsed = _parse_overrides(overrides)
    given = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else \
        [str(o).strip() for o in ([overrides] if isinstance(overrides, str) else overrides or [])]
    raw = {"profile": Path(path).stem, **raw, "overrides": given}
    for key, value in parsed.items():
        if key == "overrides":
            raise ConfigError("override 'overrides': set when the profile is loaded, not by an override")
        _set_dotted(raw, key, value)
    cfg = build(Config, raw, "")
    cfg.data.source_names()  # validates the mixture
    for variant in cfg.train.variants:
        mixture_sources(variant, "train.variants")
    try:
        parse_mesh(cfg.train.mesh)
    except ValueError as exc:
        raise ConfigError(f"train.mesh: {exc}") from None
    if cfg.eval.bootstrap < 1:
        raise ConfigError(f"eval.bootstrap: {cfg.eval.bootstrap} replicates; it must be at least 1")
    j = cfg.eval.judge
    if not 0 <= j.top_logprobs <= 20:
        raise ConfigError(f"eval.judge.top_logprobs: {j.top_logprobs}; allowed 0 to 20 (OpenAI's limit)")
    if not 0.0 <= j.tie_margin < 0.5:
        raise ConfigError(f"eval.judge.tie_margin: {j.tie_margin}; allowed 0 <= tie_margin < 0.5")
    if cfg.eval.calibration.pairs < 1:
        raise ConfigError(f"eval.calibration.pairs: {cfg.eval.calibration.pairs}; it must be at least 1")
    if j.max_answer_chars < 1:
        raise ConfigError(f"eval.judge.max_answer_chars: {j.max_answer_chars}; it must be at least 1")
    for name in cfg.eval.calibration.sources:
        if name not in ("hh", "webgpt", "summarize"):
            raise ConfigError(f"eval.calibration.sources: {name!r} has no human preference labels (allowed: hh, webgpt, summarize)")
    if cfg.train.method == "lora" and cfg.model.init == "random":
        raise ConfigError("train.method: lora adapts a pretrained base, but model.init is random; set model.init=pretrained or train.method=full")
    if cfg.train.lora.rank < 1 or cfg.train.lora.alpha <= 0:
        raise ConfigError(f"train.lora: rank {cfg.train.lora.rank}, alpha {cfg.train.lora.alpha}; rank must be at least 1 and alpha above 0")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not divide by train.grad_accum {cfg.train.grad_accum}")
    g = cfg.generate
    for key, value, low, high in (("temperature", g.temperature, 0.0, 2.0), ("top_p", g.top_p, 0.0, 1.0)):
        if not low <= value <= high:
            raise ConfigError(f"generate.{key}: {value}; allowed {low:g} to {high:g} (OpenAI's range, as `koala serve` accepts it)")
    if g.top_k < 0 or g.min_new_tokens < 0:
        raise ConfigError(f"generate.top_k {g.top_k}, generate.min_new_tokens {g.min_new_tokens}: each must be at least 0")
    if g.max_new_tokens < 1 or g.min_new_tokens > g.max_new_tokens:
        raise ConfigError(f"generate.max_new_tokens: {g.max_new_tokens}; it must be at least 1 and at least generate.min_new_tokens ({g.min_new_tokens})")
    if g.batching not in ("continuous", "static"):
        raise ConfigError(f"generate.batching: {g.batching!r}; allowed: continuous, static")
    for key in ("slots", "max_queue", "max_body_bytes"):
        if getattr(g, key) < 1:
            raise ConfigError(f"generate.{key}: {getattr(g, key)}; it must be at least 1")
    return cfg


def with_runs_dir(overrides: Sequence[str], runs_dir: str | os.PathLike | None) -> list[str]:
    """The overrides of a command given `--runs-dir DIR`: DIR taken from the current folder (not the kit root), and
    the run's figures kept inside it (`DIR/<profile>/figures`) unless an override names `figures_dir` itself."""
    if runs_dir is None:
        return list(overrides)
    named = {str(item).partition("=")[0].strip() for item in overrides}
    return [*overrides, f"runs_dir={Path(runs_dir).expanduser().resolve()}", *([] if "figures_dir" in named else ["figures_dir=null"])]


def _parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. data.mixture=koala_distill")
        if key in parsed:
            raise ConfigError(f"override {key!r} is given twice")
        try:
            parsed[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed[key] = value
    return parsed


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
