"""How a model is prompted: Koala's template, or the model's own chat template.

    fmt = format_for(cfg, "base", tokenizer)       # NativeChat for SmolLM2-Instruct, KoalaChat for a fine-tune
    ids = fmt.prompt_ids(history=[], query="What is a koala?")
    fmt.stops                                      # strings that end an answer besides EOS

Koala's fine-tunes learned its template (`BEGINNING OF CONVERSATION: USER: ... GPT:`), so they answer under it.
A model that was not fine-tuned on it, such as the base instruct model or another Hugging Face folder, answers
through its tokenizer's own chat template (`tokenizer.chat_template`) when `generate.native_template` names it
and the tokenizer has one: under Koala's template SmolLM2-135M-Instruct answers "How do I reverse a list in
Python ...?" with "1.0.1.1.1...", under its own it writes an answer. A model without a chat template (LLaMA-1)
answers under Koala's template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from koala_lib.data.schema import Turn


@dataclass
class KoalaChat:
    """Koala's template with the positive marker last; the tokenizer adds its BOS as in training."""

    template: object  # conditioning.template.Template
    tokenizer: object
    stops: tuple[str, ...]
    name: str = "koala"
    lead: str = " "  # the template's space between the marker and the answer: the model writes it, a reply omits it

    def prompt_text(self, history: Sequence[Turn], query: str, system: str = "") -> str:
        if system:  # Koala's template has no system slot: the system text opens the first user turn
            if history:
                history = [Turn(history[0].role, f"{system}\n\n{history[0].text}"), *history[1:]]
            else:
                query = f"{system}\n\n{query}"
        return self.template.prompt(list(history), query)

    def prompt_ids(self, history: Sequence[Turn], query: str, system: str = "") -> list[int]:
        return list(self.tokenizer(self.prompt_text(history, query, system), add_special_tokens=True)["input_ids"])


@dataclass
class NativeChat:
    """The tokenizer's own chat template (`apply_chat_template`, with the generation prompt); it writes its own
    special tokens, so none are added on top."""

    tokenizer: object
    stops: tuple[str, ...] = ()
    name: str = "native"
    lead: str = ""

    def prompt_text(self, history: Sequence[Turn], query: str, system: str = "") -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": t.role, "content": t.text} for t in history] + [{"role": "user", "content": query}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, history: Sequence[Turn], query: str, system: str = "") -> list[int]:
        return list(self.tokenizer(self.prompt_text(history, query, system), add_special_tokens=False)["input_ids"])


def uses_native(cfg, name: str, extra: bool = False) -> bool:
    """Whether `generate.native_template` names the model (`extra` covers every `generate.extra` model)."""
    wanted = cfg.generate.native_template
    return name in wanted or (extra and "extra" in wanted)


def format_for(cfg, name: str, tokenizer, extra: bool = False, stand_in: bool = False):
    """The chat format model `name` answers under (a base stand-in counts as `base`)."""
    from koala_lib.conditioning.template import template_for

    native = uses_native(cfg, "base" if stand_in else name, extra and not stand_in)
    if native and getattr(tokenizer, "chat_template", None):
        return NativeChat(tokenizer)
    return KoalaChat(template_for(cfg, tokenizer), tokenizer, tuple(cfg.generate.stop))
