"""Stage 4: which models answer, AlpacaEval files, answers brought from elsewhere, `koala generate` and `koala serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from koala_lib.inference.answers import answer_all, answerers, read_outputs
from koala_lib.config import ConfigError
from koala_lib.inference.testsets import TestPrompt


def test_default_answerers_are_base_and_every_variant_and_need_stage_3(make_cfg):
    cfg = make_cfg("smoke")
    with pytest.raises(ConfigError, match=r"'koala_all' has no fine-tuned model at .*train/koala_all/hf; run `koala train"):
        answerers(cfg)
    # smoke's `generate.extra` has the base model stand in for ChatGPT, as the demo does
    assert [(a.name, a.kind, a.path, a.stand_in) for a in answerers(make_cfg("smoke", "generate.models=[base]"))] == [
        ("base", "base", None, False), ("chatgpt", "base", None, True)]


def test_extra_answerers_name_a_folder_or_a_file(make_cfg, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "alpaca.json").write_text("[]")
    cfg = make_cfg("smoke", "generate.models=[base]", f"generate.extra=[mine={tmp_path / 'hf'}, alpaca={tmp_path / 'alpaca.json'}]")
    assert [(a.name, a.kind) for a in answerers(cfg)] == [("base", "base"), ("mine", "checkpoint"), ("alpaca", "outputs")]
    for bad, message in [("nameonly", "is not NAME=WHAT"), ('"x=openai:"', "openai: needs a model name"), (f"x={tmp_path / 'nope'}", "neither a Hugging Face folder nor an outputs file"),
                         (f"base={tmp_path / 'alpaca.json'}", "two models share a name")]:
        with pytest.raises(ConfigError, match=message):
            answerers(make_cfg("smoke", "generate.models=[base]", f"generate.extra=[{bad}]"))


def test_outputs_file_is_matched_by_instruction_and_bad_rows_are_counted(tmp_path):
    prompts = [TestPrompt("koala_0", "koala", "Say hi."), TestPrompt("t_1", "alpaca", "Add 2 and 2."), TestPrompt("t_2", "alpaca", "Unanswered.")]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Add 2 and 2.", "output": "4", "generator": "alpaca-13b"},
        {"instruction": "Say hi.", "output": "Hi!", "generator": "alpaca-13b", "dataset": "koala"},
        {"instruction": "Say hi.", "output": 7, "generator": "alpaca-13b"},
        "not an object",
    ]))
    rows, stats = read_outputs(path, "alpaca", prompts)
    assert [(r["id"], r["output"], r["generator"], r["dataset"]) for r in rows] == [("koala_0", "Hi!", "alpaca", "koala"), ("t_1", "4", "alpaca", "selfinstruct")]
    assert stats == {"malformed": 2, "missing_prompts": 1}
    path.write_text('{"instruction": "x"}')
    with pytest.raises(ConfigError, match="expected a JSON list"):
        read_outputs(path, "alpaca", prompts)


def test_answer_all_writes_alpaca_eval_files(make_cfg, tmp_path):
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps([{"instruction": "How do I reverse a list in Python without changing the original list?",
                                   "output": "Use reversed() or slicing.", "generator": "someone"}]))
    cfg = make_cfg("smoke", "generate.models=[base]", f"generate.extra=[theirs={theirs}]", "generate.max_new_tokens=4")
    result = answer_all(cfg, progress=False)
    base = json.loads((cfg.run_dir / "generations" / "base.json").read_text())
    assert len(base) == 8 and [r["id"] for r in base[:2]] == ["koala_0", "koala_1"]
    assert all(r["generator"] == "base" and r["finish_reason"] in ("stop", "length") for r in base)
    assert base[0]["instruction"] == "How do I reverse a list in Python without changing the original list?"
    assert base[4]["dataset"] == "selfinstruct" and base[4]["test_set"] == "alpaca"
    assert [r["output"] for r in result.answers("theirs")] == ["Use reversed() or slicing."]
    assert result.metrics()["models"]["theirs"] == {"malformed": 0, "missing_prompts": 7, "answers": 1}
    assert list(result.table().index) == ["base", "theirs"]
    assert (cfg.figures_path / "example_generations.png").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_koala_serve_command_serves_the_profile_model(tmp_path):
    port = free_port()
    env = {**os.environ, "KOALA_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "koala_lib.cli", "serve", "--profile", "smoke", "--model", "base",
                             "--runs-dir", str(tmp_path), "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                    assert [m["id"] for m in json.loads(resp.read())["data"]] == ["base"]
                    break
            except OSError:
                assert time.monotonic() < deadline, "koala serve did not start"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert b"<html" in resp.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
