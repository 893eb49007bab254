"""Stage 5's FastChat export counted by FastChat's own `show_result.py` (fschat 0.2.36, `--mode pairwise-all`):
with a text-mode judge (MT-bench's rule: the same winner in both orders wins, else a tie), FastChat's win / tie /
loss for the model in each comparison's file are the report's better / tie / worse."""

import json

import pytest

from fake_judge import shown_answers
from koala_lib.evaluation.report import build_report
from koala_lib.evaluation.stage import eval_dir, run_judge
from koala_lib.inference.serve import serving

show_result = pytest.importorskip("fastchat.llm_judge.show_result")


def _text_judge():
    """[[A]] / [[B]] for the better-written answer (`q<digit>` in front), and the first slot when they are alike."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        a, b = shown_answers(body)
        verdict = "[[A]]" if a[:2] >= b[:2] else "[[B]]"
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"So: {verdict}"}}]}

    return app


def test_fastchat_counts_the_kits_file_as_the_report_does(make_cfg, monkeypatch):
    with serving(_text_judge()) as url:
        cfg = make_cfg("smoke", f"eval.judge.base_url={url}/v1", "eval.judge.model=fake", "eval.judge.mode=text",
                       "eval.comparisons=[koala_all:alpaca,koala_all:chatgpt]")
        gen = cfg.run_dir / "generations"
        gen.mkdir(parents=True)
        for model, quality in {"koala_all": "q3", "alpaca": "q3", "chatgpt": "q4"}.items():
            rows = [{"id": f"koala_{i}", "test_set": "koala", "instruction": f"Q{i}?", "generator": model,
                     "output": f"{'q1' if model == 'alpaca' and i % 3 == 0 else quality} answer {i}"} for i in range(9)]
            (gen / f"{model}.json").write_text(json.dumps(rows))
        eval_dir(cfg).mkdir(parents=True)
        (eval_dir(cfg) / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [], "kept": []}))
        run_judge(cfg, progress=False)
    rows = {r["model_b"]: r for r in build_report(cfg).comparisons if r["test_set"] == "koala"}
    printed = []
    monkeypatch.setattr(show_result, "print", printed.append, raising=False)  # FastChat prints its table
    for opponent, row in rows.items():
        path = eval_dir(cfg) / "fastchat" / "koala" / f"koala_all_vs_{opponent}.jsonl"
        args = type("Args", (), {"input_file": str(path), "model_list": None, "baseline_model": None, "bench_name": "x", "judge_model": "x"})
        show_result.display_result_pairwise(args)
        table = printed[-1]
        counts = {k: int(table.loc["koala_all", k]) for k in ("win", "tie", "loss")}
        assert counts == {"win": row["wins"], "tie": round(row["tie"] * row["n"] / 100), "loss": row["losses"]}
        assert table.loc["koala_all", "win_rate_adjusted"] * 100 == pytest.approx(row["win_rate"])
    # alike answers (q3 vs q3) went to the first slot in both orders: ties; alpaca's q1 answers lost; q4 always won
    assert (rows["alpaca"]["wins"], rows["alpaca"]["losses"], rows["alpaca"]["tie"]) == (3, 0, pytest.approx(100 * 6 / 9))
    assert (rows["chatgpt"]["wins"], rows["chatgpt"]["losses"]) == (0, 9)
