"""Stage progress: lines to $KOALA_PROGRESS (not the notebook) under the pipeline, which prints them as they come."""

import subprocess
import sys
import threading
import time

import pytest

from koala_lib.pipeline import follow, streaming
from koala_lib.progress import ENV, LINE_INTERVAL, bar


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_under_koala_progress_a_bar_writes_lines_to_the_file_and_nothing_to_the_terminal(tmp_path, monkeypatch, capsys):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(ENV, str(log))
    with bar(total=3, desc="train koala_all", unit="step") as b:
        for loss in (2.5, 2.0, 1.5):
            b.set_postfix_str(f"loss {loss:.3f}, 42 tok/s", refresh=False)
            b.update(1)
    for _ in bar(range(5), desc="curate hc3", unit=" rows"):
        pass
    lines = log.read_text(encoding="utf-8").splitlines()
    train = [line for line in lines if line.startswith("train koala_all: ")]
    assert train[0].startswith("train koala_all: 0/3 step 0% [")
    assert train[-1].startswith("train koala_all: 3/3 step 100% [") and train[-1].endswith(", loss 1.500, 42 tok/s]")
    assert lines[-1].startswith("curate hc3: 5/5 rows 100% [") and len(lines) <= 6
    assert all("\r" not in line and line.strip() == line and line for line in lines)
    assert capsys.readouterr() == ("", "")


def test_a_fast_loop_writes_a_few_lines_not_one_per_update(tmp_path, monkeypatch, capsys):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(ENV, str(log))
    b = bar(total=10_000, desc="judge pairs", unit="pair")
    for _ in range(10_000):
        b.set_postfix(wins=1)  # refreshes in tqdm; here it waits for the next line
        b.update(1)
    b.close()
    lines = log.read_text(encoding="utf-8").splitlines()
    assert LINE_INTERVAL >= 1 and len(lines) <= 3  # the start, perhaps one more, the end
    assert lines[-1].startswith("judge pairs: 10,000/10,000 pair 100% [") and "wins=1" in lines[-1]
    assert capsys.readouterr() == ("", "")


def test_a_bar_without_a_total_counts_and_a_disabled_bar_writes_nothing(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(ENV, str(log))
    for _ in bar(iter(range(7)), desc="leakage: queries", unit="queries"):
        pass
    with bar(total=4, desc="silent", disable=True) as b:
        b.update(4)
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines[-1].startswith("leakage: queries: 7 queries [") and not any("silent" in line for line in lines)


def test_without_koala_progress_the_bar_is_tqdm_auto_and_the_file_stays_empty(tmp_path, monkeypatch, capsys):
    log = tmp_path / "progress.log"
    log.write_text("", encoding="utf-8")
    monkeypatch.delenv(ENV, raising=False)
    with bar(total=2, desc="answers base", unit="prompt") as b:
        b.update(2)
    assert log.read_text(encoding="utf-8") == ""
    assert "answers base" in capsys.readouterr().err  # tqdm's own bar, on stderr as ever


def test_an_unwritable_progress_file_does_not_stop_the_work(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "missing" / "progress.log"))
    assert sum(bar(range(4), desc="train", unit="step")) == 6
    assert not (tmp_path / "missing").exists()


def test_the_tailer_prints_lines_from_another_process_while_running_and_the_last_ones_after_stop(tmp_path):
    log = tmp_path / "03_finetune.progress.log"
    log.write_text("", encoding="utf-8")
    seen: list[str] = []
    child = ("import time\nfrom koala_lib.progress import bar\n"
             "with bar(total=2, desc='train koala_all', unit='step') as b:\n"
             "    b.set_postfix_str('loss 2.110, 115 tok/s', refresh=False); b.update(1)\n")
    with streaming(log, "  03 | ", emit=seen.append, poll=0.05):
        subprocess.run([sys.executable, "-c", child], env={**_env(), ENV: str(log)}, check=True, timeout=60)
        # printed while the stage still runs: the child's first line and the line with its final count
        assert _wait_for(lambda: any("1/2 step" in line for line in seen)), seen
        assert seen[0].startswith("  03 | train koala_all: 0/2 step 0% [")
        assert seen[-1].startswith("  03 | train koala_all: 1/2 step 50% [") and seen[-1].endswith("loss 2.110, 115 tok/s]")
        with open(log, "a", encoding="utf-8") as fh:  # written just before the stage ends, one unterminated
            fh.write("curate hc3: 40/40 rows\nlast words")
    assert seen[-2:] == ["  03 | curate hc3: 40/40 rows", "  03 | last words"]


def test_the_tailer_joins_a_line_written_in_pieces_and_splits_carriage_returns(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("", encoding="utf-8")
    seen: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=follow, args=(log, seen.append, stop, 0.02))
    thread.start()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("judge koala_all vs base: 3/")
        fh.flush()
        time.sleep(0.1)
        fh.write("8 pair\n\n\rExecuting: 2/16 cell    \r")
        fh.flush()
    assert _wait_for(lambda: len(seen) == 2)
    assert thread.is_alive()
    stop.set()
    thread.join(timeout=5)
    assert seen == ["judge koala_all vs base: 3/8 pair", "Executing: 2/16 cell"] and not thread.is_alive()


def test_streaming_prints_to_stdout_prefixed_by_default(tmp_path, capsys):
    log = tmp_path / "p.log"
    log.write_text("", encoding="utf-8")
    with streaming(log, "  05 | ", poll=0.05):
        log.write_text("judge pairs: 2/2 pair\n", encoding="utf-8")
    assert capsys.readouterr().out == "  05 | judge pairs: 2/2 pair\n"


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != ENV}


@pytest.fixture(autouse=True)
def _no_inherited_progress(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
