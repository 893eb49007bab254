"""The blog's opponents in stage 4: a stand-in for ChatGPT, answers from an OpenAI-compatible endpoint, and models
that answer through their own chat template."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from koala_lib.inference.answers import answer_all, answerers, load_generator, read_models, sampling
from koala_lib.inference.chat_format import KoalaChat, NativeChat, format_for
from koala_lib.conditioning.template import template_for
from koala_lib.evaluation.stage import comparisons
from koala_lib.inference.serve import serving

QUESTION = "How do I reverse a list in Python without changing the original list?"


def test_openai_answerer_through_a_scripted_endpoint_counts_failures(make_cfg):
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        question = body["messages"][0]["content"]
        seen.append(body)
        if "grammar" in question:  # one prompt fails on every try
            return JSONResponse({"error": {"message": "busy", "type": "server_error"}}, status_code=500)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f" re: {question[:12]} "}}]}

    with serving(app) as url:
        cfg = make_cfg("smoke", "generate.extra=[chatgpt=openai:gpt-3.5-turbo]",
                       f"generate.endpoint.base_url={url}/v1", "generate.endpoint.max_retries=1")
        (who,) = answerers(cfg, ["chatgpt"])
        assert (who.name, who.kind, who.model) == ("chatgpt", "openai", "gpt-3.5-turbo")
        result = answer_all(cfg, models=["chatgpt"], progress=False)
    rows = json.loads((cfg.run_dir / "generations" / "chatgpt.json").read_text())
    assert len(rows) == 7 and rows[0] == {"instruction": QUESTION, "output": "re: How do I rev", "generator": "chatgpt",
                                          "dataset": "koala", "id": "koala_0", "test_set": "koala", "finish_reason": "stop"}
    assert "user_oriented_task_1" not in {r["id"] for r in rows}  # the failed prompt has no answer, and is counted
    assert result.stats["chatgpt"]["failed"] == {"InternalServerError": 1}
    assert sum("grammar" in b["messages"][0]["content"] for b in seen) == 2  # the client retried once
    assert all(b["model"] == "gpt-3.5-turbo" and b["max_tokens"] == 16 and b["temperature"] == 0.0 for b in seen)
    assert read_models(cfg)["chatgpt"]["what"].startswith("openai:gpt-3.5-turbo at http://127.0.0.1:")


def test_default_comparisons_are_the_blogs():
    from koala_lib import config

    cfg = config.load("demo")
    models = ["alpaca", "chatgpt", "koala_all", "koala_distill"]
    assert comparisons(cfg, models) == [("koala_all", "alpaca"), ("koala_all", "koala_distill"), ("koala_all", "chatgpt")]
    assert comparisons(cfg, ["koala_all", "base"]) == [("koala_all", "base")]  # none of the blog's: every other model


def test_the_base_stand_in_answers_under_its_own_chat_template_and_is_labelled(make_cfg):
    cfg = make_cfg("demo", "generate.max_new_tokens=24")
    (who,) = answerers(cfg, ["chatgpt"])
    assert (who.kind, who.stand_in) == ("base", True)
    assert who.describe(cfg)["what"] == "stand-in: SmolLM2-135M-Instruct"
    gen = load_generator(cfg, who)
    native = format_for(cfg, who.name, gen.tokenizer, who.extra, who.stand_in)
    assert isinstance(native, NativeChat) and native.stops == ()
    assert native.prompt_text([], QUESTION).startswith("<|im_start|>system\n")
    assert native.prompt_text([], QUESTION).endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(format_for(cfg, "koala_all", gen.tokenizer), KoalaChat)  # fine-tunes keep Koala's template
    koala = KoalaChat(template_for(cfg, gen.tokenizer), gen.tokenizer, ("USER:",))
    mine, theirs = (gen.generate([f.prompt_ids([], QUESTION)], sampling(cfg, f.stops))[0].text for f in (native, koala))
    # greedy, fp32: under Koala's template the instruct model writes digits; under its own it answers
    assert mine.startswith("You can reverse a list in Python using slicing")
    assert theirs.strip().startswith("1.0.1.1.1")


def test_a_model_without_a_chat_template_answers_under_koalas(make_cfg):
    from transformers import AutoTokenizer

    from koala_lib.model.gguf_default import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    tokenizer.chat_template = None
    fmt = format_for(make_cfg("demo"), "base", tokenizer)
    assert isinstance(fmt, KoalaChat) and fmt.prompt_text([], "Hi?") == "BEGINNING OF CONVERSATION: USER: Hi? GPT:"
    assert fmt.prompt_text([], "Hi?", system="Be brief.") == "BEGINNING OF CONVERSATION: USER: Be brief.\n\nHi? GPT:"
