"""bench/RESULTS.md and the README's performance table: the table is generated from the sections' headline rows."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import results  # noqa: E402


def test_the_readme_table_is_the_one_generated_from_results_md():
    readme = results.README.read_text(encoding="utf-8")
    block = readme.split(results.START + "\n", 1)[1].split("\n" + results.END, 1)[0]
    assert block == results.performance_table()
    assert block.count("\n") >= 8  # every benchmark contributes rows


def test_record_section_keeps_other_sections_and_orders_headlines(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    results.record_section("leakage", "Leakage", ["| a | b |"], headline=[("filter", "1 s")])
    results.record_section("curation", "Curation", ["text"], headline=[("cleaning", "2 s"), ("html", "3x")])
    results.record_section("leakage", "Leakage again", ["| c | d |"], headline=[("filter", "0.5 s")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Leakage again" in text and "| c | d |" in text and "| a | b |" not in text and "Curation" in text
    assert results.performance_table(text).splitlines()[2:] == [
        "| cleaning | 2 s |", "| html | 3x |",
        *(f"| {what} | {result} |" for what, result in (results.PENDING["train_gpu"], results.PENDING["gpu_check"])),
        "| filter | 0.5 s |"]


def test_update_readme_rewrites_only_the_marked_block(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    results.record_section("generate", "Generation", ["x"], headline=[("decode", "9 tok/s")])
    readme = tmp_path / "README.md"
    readme.write_text(f"# kit\n\nbefore\n{results.START}\nold table\n{results.END}\n\nafter\n")
    results.update_readme(readme)
    assert readme.read_text() == (f"# kit\n\nbefore\n{results.START}\n{results.performance_table()}\n{results.END}\n\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- performance:start -->"):
        results.update_readme(readme)
