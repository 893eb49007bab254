"""Stage 4: every model of the profile answers the test sets; answers are written in AlpacaEval's format.

    result = answer_all(cfg)          # runs/<P>/generations/<model>.json, one file per model
    result.table(); result.examples(); result.metrics()

Models ("answerers"): `base` (the profile's base model), each fine-tuned variant (stage 3's Hugging Face
export, `runs/<P>/train/<variant>/hf`), and any `generate.extra` entry `NAME=WHAT`: a Hugging Face folder, a
file of answers someone else produced (AlpacaEval's format, checked and copied in), `openai:MODEL` (a model
behind an OpenAI-compatible endpoint, e.g. ChatGPT), or `base` (the profile's base model answering under NAME as
a labelled stand-in, e.g. for ChatGPT in offline profiles). `models.json` beside the answers says what each is.

Each file is a JSON list with one object per prompt: `instruction`, `output`, `generator`, `dataset` (the
fields AlpacaEval reads; `dataset` is `koala` for the Koala test set and `selfinstruct` for the Alpaca test
set, AlpacaEval's names), plus `id`, `test_set` and `finish_reason` for stage 5. A fine-tuned model's prompts are rendered
with stage 2's template and the positive marker, exactly as in training; a model that was not fine-tuned on it
answers through its own chat template where `generate.native_template` says so (koala_lib/inference/chat_format.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from koala_lib.config import Config, ConfigError, resolve_path
from koala_lib.files import atomic_text
from koala_lib.manifest import stale_inputs, warn_stale, write_manifest
from koala_lib.inference.testsets import TEST_SETS, TestPrompt, load_test_set

DATASET_NAMES = {"koala": "koala", "alpaca": "selfinstruct"}  # AlpacaEval's names for the two sets
REQUIRED = ("instruction", "output", "generator")


@dataclass(frozen=True)
class Answerer:
    name: str
    kind: str  # "base" | "checkpoint" | "outputs" | "openai"
    path: Path | None  # a Hugging Face folder or an outputs file; None for a random-init base or an endpoint
    extra: bool = False  # a `generate.extra` entry
    stand_in: bool = False  # the base model answering under another model's name
    model: str = ""  # `openai`: the endpoint's model name

    def describe(self, cfg: Config) -> dict:
        """What the model is, for `models.json` and the labels of tables and figures."""
        what = {"base": f"base model {cfg.model.base}", "checkpoint": f"Hugging Face folder {self.path}",
                "outputs": f"answers file {self.path}", "openai": f"openai:{self.model} at {cfg.generate.endpoint.base_url}"}[self.kind]
        if self.stand_in:
            what = f"stand-in: {base_label(cfg)}"
        return {"name": self.name, "kind": self.kind, "what": what, "stand_in": self.stand_in}


def base_label(cfg: Config) -> str:
    """The base model's readable name (`default` is the embedded SmolLM2-135M-Instruct)."""
    if cfg.model.init == "random":
        return f"random {cfg.model.preset} model"
    return "SmolLM2-135M-Instruct" if cfg.model.base == "default" else Path(cfg.model.base).name


def answerers(cfg: Config, only: list[str] | None = None) -> list[Answerer]:
    """The profile's models, in order: `generate.models` (default: base and every variant), then `generate.extra`;
    with `only`, just those names (any variant of the profile, or an extra)."""
    from koala_lib.config import variant_name

    out: list[Answerer] = []
    extra_names = {e.partition("=")[0].strip() for e in cfg.generate.extra}
    names = [n for n in only if n not in extra_names] if only is not None else list(cfg.generate.models or ("base", *cfg.variants))
    base_path = lambda: None if cfg.model.init == "random" else base_folder(cfg)
    for name in names:
        if name == "base":
            out.append(Answerer("base", "base", base_path()))
            continue
        folder = cfg.run_dir / "train" / variant_name(name) / "hf"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"generate.models: {name!r} has no fine-tuned model at {folder}; run `koala train --profile {cfg.profile} --variant {name}` first")
        out.append(Answerer(variant_name(name), "checkpoint", folder))
    for entry in cfg.generate.extra:
        name, sep, what = (x.strip() for x in entry.partition("="))
        if not sep or not name or not what:
            raise ConfigError(f"generate.extra: {entry!r} is not NAME=WHAT (a folder, an answers file, openai:MODEL or base)")
        if only is not None and name not in only:
            continue
        p = resolve_path(what)  # relative to the kit root, as runs_dir is
        if what == "base":
            out.append(Answerer(name, "base", base_path(), extra=True, stand_in=True))
        elif what.startswith("openai:"):
            if not what[len("openai:"):].strip():
                raise ConfigError(f"generate.extra: {entry!r}: openai: needs a model name, e.g. {name}=openai:gpt-3.5-turbo")
            out.append(Answerer(name, "openai", None, extra=True, model=what[len("openai:"):].strip()))
        elif p.is_dir():
            out.append(Answerer(name, "checkpoint", p, extra=True))
        elif p.is_file():
            out.append(Answerer(name, "outputs", p, extra=True))
        else:
            raise ConfigError(f"generate.extra: {name!r}: {p} is neither a Hugging Face folder nor an outputs file (nor openai:MODEL or base)")
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"generate: two models share a name: {names}")
    return out


def base_folder(cfg: Config) -> Path:
    from koala_lib.model.checkpoints import resolve_checkpoint

    return resolve_checkpoint(cfg.model.base)


def load_generator(cfg: Config, who: Answerer):
    """A Generator for a base or checkpoint answerer, with the tokenizer that model was trained with."""
    from flax import nnx
    from transformers import AutoTokenizer

    from koala_lib.conditioning.template import load_tokenizer
    from koala_lib.inference.generate import Generator
    from koala_lib.model.checkpoints import load_hf, model_config, model_kwargs
    from koala_lib.model.llama import Llama

    kwargs = {**model_kwargs(cfg.model), "remat": "none"}
    if who.path is None:  # the random-init base of a `model.init: random` profile (stage 3 starts from the same seed)
        tokenizer = load_tokenizer(cfg)
        model = Llama(model_config(cfg.model.init, cfg.model.preset, cfg.model.base, len(tokenizer))[0], rngs=nnx.Rngs(cfg.seed), **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(who.path) if (who.path / "tokenizer.json").is_file() else load_tokenizer(cfg)
        model = load_hf(who.path, **kwargs)
    return Generator(model, tokenizer, max_batch=cfg.generate.batch_size)


def sampling(cfg: Config, stops: tuple[str, ...] | None = None):
    from koala_lib.inference.generate import Sampling

    g = cfg.generate
    return Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                    stop=tuple(g.stop if stops is None else stops), seed=cfg.seed, min_new_tokens=g.min_new_tokens)


def generate_answers(cfg: Config, who: Answerer, prompts: list[TestPrompt], progress: bool = True) -> tuple[list[dict], dict]:
    """(AlpacaEval rows, timing) for one model over the prompts."""
    from koala_lib.inference.chat_format import format_for
    from koala_lib.progress import bar

    gen = load_generator(cfg, who)
    fmt = format_for(cfg, who.name, gen.tokenizer, who.extra, who.stand_in)
    ids = [fmt.prompt_ids([], p.instruction) for p in prompts]
    params = sampling(cfg, fmt.stops)
    rows, tokens, began = [], 0, time.perf_counter()
    batch = cfg.generate.batch_size
    with bar(total=len(prompts), desc=f"answers: {who.name}", unit="prompt", disable=not progress) as shown:
        for start in range(0, len(prompts), batch):
            outs = gen.generate(ids[start:start + batch], params)
            for p, out in zip(prompts[start:start + batch], outs):
                rows.append(_row(p, out.text.strip(), who.name, out.finish_reason))
                tokens += len(out.tokens)
            seconds = time.perf_counter() - began
            shown.set_postfix_str(f"{tokens / max(seconds, 1e-9):.0f} tok/s", refresh=False)
            shown.update(len(outs))
    seconds = time.perf_counter() - began
    return rows, {"seconds": round(seconds, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                  "prompt_format": fmt.name}


def _row(p: TestPrompt, output: str, generator: str, finish: str | None) -> dict:
    return {"instruction": p.instruction, "output": output, "generator": generator, "dataset": DATASET_NAMES[p.test_set],
            "id": p.id, "test_set": p.test_set, "finish_reason": finish}


def read_outputs(path: Path, name: str, prompts: list[TestPrompt]) -> tuple[list[dict], dict]:
    """Answers from an AlpacaEval-format file, matched to the prompts by instruction; unmatched prompts are counted."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a JSON file of answers ({exc})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of {{instruction, output, generator}} objects")
    by_instruction: dict[str, str] = {}
    bad = 0
    for i, item in enumerate(data):
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in REQUIRED):
            bad += 1
            continue
        by_instruction.setdefault(item["instruction"], item["output"])
    if bad == len(data):
        raise ConfigError(f"{path}: no element has string fields {', '.join(REQUIRED)}")
    rows = [_row(p, by_instruction[p.instruction], name, None) for p in prompts if p.instruction in by_instruction]
    return rows, {"malformed": bad, "missing_prompts": len(prompts) - len(rows)}


@dataclass
class AnswersResult:
    cfg: Config
    prompts: list[TestPrompt]
    files: dict[str, Path] = field(default_factory=dict)
    rows: dict[str, list[dict]] = field(default_factory=dict)  # each model's answers, as written to its file
    stats: dict[str, dict] = field(default_factory=dict)
    test_sets: dict[str, dict] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)  # what each model is (models.json)

    def answers(self, name: str) -> list[dict]:
        return self.rows[name]

    def table(self):
        """One row per model: answers, mean length, finish reasons, speed (a DataFrame)."""
        import pandas as pd

        rows = []
        for name in self.files:
            answers = self.answers(name)
            lengths = [len(a["output"].split()) for a in answers]
            rows.append({"model": name, "answers": len(answers), "mean words": round(sum(lengths) / max(len(lengths), 1), 1),
                         "empty": sum(1 for a in answers if not a["output"]), "stopped": sum(1 for a in answers if a["finish_reason"] == "stop"),
                         "tokens/s": self.stats[name].get("tokens_per_s")})
        return pd.DataFrame(rows).set_index("model")

    def test_sets_table(self):
        """One row per test set: where it was read from, rows, prompts kept, rows rejected (a DataFrame)."""
        import pandas as pd

        return pd.DataFrame([{"test set": name, "prompts": t["prompts"], "rows": t["rows"],
                              "rejected": ", ".join(f"{k} {v}" for k, v in t["rejected"].items()) or "none",
                              "source": Path(t["source"]).name if "://" not in t["source"] else t["source"]}
                             for name, t in self.test_sets.items()]).set_index("test set")

    def examples(self, count: int = 2) -> list[dict]:
        """The first prompts of each test set with every model's answer: {test_set, instruction, answers{model: text}}."""
        picked = []
        for name in TEST_SETS:
            picked += [p for p in self.prompts if p.test_set == name][:count]
        answers = {m: {(a["test_set"], a["id"]): a["output"] for a in self.answers(m)} for m in self.files}
        label = lambda m: f"{m} ({self.models[m]['what']})" if self.models.get(m, {}).get("stand_in") else m
        return [{"test_set": p.test_set, "instruction": p.instruction,
                 "answers": {label(m): answers[m].get((p.test_set, p.id), "") for m in self.files}} for p in picked]

    def figure(self, count: int = 1):
        from koala_lib.plots import example_answers

        return example_answers(self.examples(count))

    def metrics(self) -> dict:
        return {"models": {name: {**self.stats[name], "answers": len(self.answers(name))} for name in self.files},
                "test_sets": self.test_sets, "prompts": len(self.prompts)}


def read_models(cfg: Config) -> dict[str, dict]:
    """`generations/models.json`: name -> what the model is (`what`, `stand_in`, `prompt_format`); {} before stage 4."""
    path = cfg.run_dir / "generations" / "models.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_prompts(cfg: Config) -> tuple[list[TestPrompt], dict[str, dict]]:
    prompts, info = [], {}
    for name in TEST_SETS:
        result = load_test_set(cfg, name)
        prompts += result.prompts
        info[name] = {"prompts": len(result.prompts), "rows": result.rows, "rejected": dict(result.rejected), "source": result.source}
    return prompts, info


def answer_all(cfg: Config, models: list[str] | None = None, progress: bool = True) -> AnswersResult:
    """Answer both test sets with each model (or only `models`), write the files, save the examples figure."""
    from koala_lib.plots import save

    started = time.time()
    chosen = answerers(cfg, list(models) if models else None)
    stale = [s for who in chosen if who.kind == "checkpoint" for s in stale_inputs(cfg, f"train/{who.name}", [f"train/{who.name}/hf"])]
    warn_stale("stage 4", "stage 3 (train/)", stale)
    prompts, info = load_prompts(cfg)
    result = AnswersResult(cfg, prompts, test_sets=info)
    out_dir = cfg.run_dir / "generations"
    out_dir.mkdir(parents=True, exist_ok=True)
    described = {}
    for who in chosen:
        if who.kind == "outputs":
            rows, stats = read_outputs(who.path, who.name, prompts)
        elif who.kind == "openai":
            from koala_lib.inference.endpoint_answers import endpoint_answers

            answered, stats = endpoint_answers(cfg, who.model, prompts, progress=progress)
            rows = [_row(p, text.strip(), who.name, finish) for p, text, finish in answered]
        else:
            rows, stats = generate_answers(cfg, who, prompts, progress)
        path = out_dir / f"{who.name}.json"
        atomic_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        result.files[who.name], result.rows[who.name], result.stats[who.name] = path, rows, stats
        described[who.name] = result.models[who.name] = {**who.describe(cfg), "prompt_format": stats.get("prompt_format")}
        failed = sum(stats.get("failed", {}).values())
        print(f"{who.name}: {len(rows)} answers -> {path}" + (f" ({stats['tokens_per_s']} tokens/s)" if "tokens_per_s" in stats else "")
              + (f"; {failed} requests failed" if failed else ""))
    known = read_models(cfg)
    atomic_text(out_dir / "models.json", json.dumps({**known, **described}, indent=2) + "\n")
    if result.files:
        save(result.figure(), cfg.figures_path / "example_generations.png")
    inputs = [Path(t["source"]) for t in info.values() if t.get("source")] + [who.path for who in chosen if who.path is not None]
    endpoints = {who.name: who.model for who in chosen if who.kind == "openai"}
    write_manifest(cfg, "generate", cfg.run_dir / "generate", inputs=inputs, outputs=[out_dir], started=started, stale=stale,
                   extra={"endpoint_models": endpoints, "endpoint": cfg.generate.endpoint.base_url if endpoints else None})
    return result
