"""`koala rate` (koala_lib/evaluation/rating_app.py): the study file, the JSON API on a real loopback server, a
`koala rate serve` process SIGKILLed and restarted under the JSON API alone, and the rating page in headless
Chromium against a server process that is SIGKILLed and restarted.

The browser test needs Debian's `chromium` and `chromium-driver` and selenium; it is skipped without them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest

from koala_lib.evaluation.judgments import PairItem
from koala_lib.evaluation.rating_app import (
    CHECK_MODEL, OFF_TOPIC, StudyError, create_rating_app, create_study, export_judgments, format_rater_report,
    rater_report, rating_links,
)
from koala_lib.inference.serve import serving

ALPHA, BETA = "model-secret-alpha", "model-secret-beta"
SECRETS = ("model-secret", CHECK_MODEL)  # nothing the browser receives may contain these
PAYLOAD = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'
REPO = Path(__file__).resolve().parents[1]


def make_items(n: int, payload_at: int | None = None) -> list[PairItem]:
    return [PairItem(f"p{i}", "koala", f"Prompt number {i}?\nIt has two lines.", ALPHA, f"alpha answer {i}\n  indented",
                     BETA, f"beta answer {i}" + (f"\n{PAYLOAD}" if i == payload_at else "")) for i in range(n)]


def prompt_index(prompt: str) -> int:
    return int(prompt.split("?")[0].rsplit(" ", 1)[1])


def flags(db) -> dict[str, dict[str, bool]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT a.rater, i.item_key, a.swapped FROM assignments a JOIN items i ON i.id = a.item_id")
        out: dict[str, dict[str, bool]] = {}
        for rater, key, swapped in rows:
            out.setdefault(rater, {})[key] = bool(swapped)
    return out


def keys_of(db, rater: str) -> list[str]:
    with sqlite3.connect(db) as con:
        return [k for (k,) in con.execute("SELECT key FROM assignments WHERE rater = ? ORDER BY position", (rater,))]


class Api:
    """A small HTTP client that keeps every response body, to check that none carries a model name."""

    def __init__(self, url: str):
        self.url, self.seen = url, []

    def request(self, path: str, body=None, raw: str | None = None) -> tuple[int, object]:
        data = raw.encode() if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text, kind = resp.status, resp.read().decode(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            status, text, kind = exc.code, exc.read().decode(), exc.headers.get("content-type", "")
        self.seen.append(text)
        return status, (json.loads(text) if "json" in kind else text)

    def next(self, token):
        return self.request(f"/api/{token}/next")

    def item(self, token, key):
        return self.request(f"/api/{token}/item/{key}")

    def rate(self, token, key, choice):
        return self.request(f"/api/{token}/rate", {"key": key, "choice": choice})

    def assert_no_secrets(self):
        for text in self.seen:
            for secret in SECRETS:
                assert secret not in text, f"{secret!r} reached the client: {text[:300]}"


@pytest.fixture
def study(tmp_path):
    """(db path, tokens, Api on a served app): 6 items, raters alice and bob, 2 attention checks."""
    db = tmp_path / "study.db"
    tokens = create_study(db, make_items(6), ["alice", "bob"], seed=3, attention_checks=2)
    with serving(create_rating_app(db)) as url:
        yield db, tokens, Api(url)


# ----------------------------------------------------------------------------- the study file


def test_sides_are_randomized_per_rater_and_reproducible(tmp_path):
    raters = ["r1", "r2", "r3"]
    create_study(tmp_path / "a.db", make_items(12), raters, seed=7, secret="s")
    a = flags(tmp_path / "a.db")
    assert set(a) == set(raters) and all(len(f) == 12 for f in a.values())
    assert any(len({a[r][k] for r in raters}) == 2 for k in a["r1"]), "every item has the same sides for all raters"
    assert all(sum(f.values()) == 6 for f in a.values()), "sides are not balanced per rater"
    create_study(tmp_path / "b.db", make_items(12), raters, seed=7, secret="s")
    assert flags(tmp_path / "b.db") == a
    create_study(tmp_path / "c.db", make_items(12), raters, seed=8, secret="s")
    assert flags(tmp_path / "c.db") != a
    # without a given secret each study draws its own: the profile's seed alone does not reveal the sides
    create_study(tmp_path / "d.db", make_items(12), raters, seed=7)
    create_study(tmp_path / "e.db", make_items(12), raters, seed=7)
    assert flags(tmp_path / "d.db") != flags(tmp_path / "e.db")
    with sqlite3.connect(tmp_path / "a.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        orders = {r: [k for (k,) in con.execute("SELECT i.item_key FROM assignments a JOIN items i ON i.id = a.item_id "
                                                 "WHERE rater = ? ORDER BY position", (r,))] for r in raters}
    assert len({tuple(o) for o in orders.values()}) > 1, "every rater sees the items in the same order"


def test_tokens_are_unguessable_and_links_use_them(tmp_path):
    tokens = create_study(tmp_path / "s.db", make_items(2), [f"rater{i}" for i in range(20)])
    again = create_study(tmp_path / "t.db", make_items(2), [f"rater{i}" for i in range(20)])
    allowed = set(string.ascii_letters + string.digits + "-_")
    assert all(len(t) >= 22 and set(t) <= allowed for t in tokens.values())
    assert len(set(tokens.values()) | set(again.values())) == 40, "tokens repeat (within or across studies)"
    links = rating_links(tmp_path / "s.db", "http://10.0.0.5:8001/")
    assert links == {r: f"http://10.0.0.5:8001/r/{t}" for r, t in tokens.items()}


def test_extending_a_study_keeps_tokens_and_items(tmp_path):
    db = tmp_path / "s.db"
    first = create_study(db, make_items(3), ["alice"], seed=1, attention_checks=1)
    old_keys = keys_of(db, "alice")
    second = create_study(db, make_items(4), ["alice", "bob"], seed=1, attention_checks=2)
    assert second["alice"] == first["alice"] and set(second) == {"alice", "bob"}
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM items WHERE expected IS NULL").fetchone()[0] == 4
        assert con.execute("SELECT COUNT(*) FROM items WHERE expected IS NOT NULL").fetchone()[0] == 2
    assert keys_of(db, "alice")[:4] == old_keys, "existing assignments were changed"
    assert {r: n["total"] for r, n in rater_report(db).items()} == {"alice": 6, "bob": 6}
    changed = dataclasses.replace(make_items(1)[0], answer_b="something else")
    with pytest.raises(StudyError, match="different texts"):
        create_study(db, [changed], ["alice"], seed=1)
    with pytest.raises(StudyError, match="seed 1"):
        create_study(db, make_items(4), ["alice"], seed=2)
    with pytest.raises(StudyError, match="no such study"):
        create_rating_app(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_text("not a database at all, just text " * 100)
    with pytest.raises(StudyError, match="not a rating study"):
        create_rating_app(tmp_path / "junk.db")


# ----------------------------------------------------------------------------- the JSON API


def test_unknown_token_is_404(study):
    _, tokens, api = study
    bad = ("y" if tokens["alice"].startswith("x") else "x") + tokens["alice"][1:]  # never alice's own (random) token
    for status, body in (api.request(f"/r/{bad}"), api.next(bad), api.item(bad, "k"), api.rate(bad, "k", "tie")):
        assert status == 404
    assert api.next(bad)[1]["error"]["message"] == "unknown rating link"
    status, page = api.request(f"/r/{tokens['alice']}")
    assert status == 200 and "A is better" in page and "B is better" in page and "Tie" in page
    api.assert_no_secrets()


def test_another_raters_key_can_be_neither_read_nor_changed(study):
    db, tokens, api = study
    alice, bob = tokens["alice"], tokens["bob"]
    status, shown = api.next(alice)
    key = shown["key"]
    assert status == 200 and api.item(alice, key)[1]["choice"] is None
    assert api.item(bob, key)[0] == 404
    assert api.rate(bob, key, "left")[0] == 404
    assert api.item(alice, key)[1]["choice"] is None, "bob's write reached alice's item"
    assert api.rate(alice, key, "right")[0] == 200
    assert api.item(bob, key)[0] == 404 and api.rate(bob, key, "left")[0] == 404
    assert api.item(alice, key)[1]["choice"] == "right"
    assert api.next(bob)[1]["done"] == 0 and api.next(alice)[1]["done"] == 1
    with sqlite3.connect(db) as con:  # the study has attention checks: one of them may have come first
        (expected,) = con.execute("SELECT i.expected FROM assignments a JOIN items i ON i.id = a.item_id "
                                  "WHERE a.key = ?", (key,)).fetchone()
    assert [j.judge for j in export_judgments(db)] == ([] if expected else ["alice"])
    api.assert_no_secrets()


def test_bad_bodies_are_400_naming_the_field(study):
    _, tokens, api = study
    path = f"/api/{tokens['alice']}/rate"
    key = api.next(tokens["alice"])[1]["key"]
    cases = [({"key": key, "choice": "up"}, "choice"), ({"key": key}, "choice"), ({"choice": "tie"}, "key"),
             ({"key": 5, "choice": "tie"}, "key"), ({"key": key, "choice": 1}, "choice")]
    for body, field in cases:
        status, answer = api.request(path, body)
        assert status == 400 and answer["error"]["field"] == field and field in answer["error"]["message"], (body, answer)
    status, answer = api.request(path, raw="{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]
    assert api.next(tokens["alice"])[1]["done"] == 0


def test_rating_again_is_idempotent_and_a_change_is_409(study):
    db, tokens, api = study
    alice = tokens["alice"]
    key = api.next(alice)[1]["key"]
    status, after = api.rate(alice, key, "tie")
    assert status == 200 and after["done"] == 1 and after["key"] != key
    status, again = api.rate(alice, key, "tie")  # a retried request: accepted, same next screen
    assert status == 200 and again == after
    status, answer = api.rate(alice, key, "left")
    assert status == 409 and answer["error"]["field"] == "choice"
    assert api.item(alice, key)[1]["choice"] == "tie"


def test_export_undoes_the_swaps(study):
    db, tokens, api = study
    alice = tokens["alice"]
    swapped = flags(db)["alice"]
    expected, made = {}, []
    status, shown = api.next(alice)
    n = 0
    while not shown.get("finished"):
        if any(text in (shown["left"], shown["right"]) for text in OFF_TOPIC):
            status, shown = api.rate(alice, shown["key"], "tie")
            continue
        i = prompt_index(shown["prompt"])
        alpha_on_right = shown["right"].startswith("alpha answer")
        assert alpha_on_right == shown["left"].startswith("beta answer")
        choice = {4: "right", 5: "tie"}.get(n, "left")
        n += 1
        # model semantics: the side holding alpha's answer decides the verdict about model_a (alpha)
        verdict = "tie" if choice == "tie" else ("A" if (choice == "right") == alpha_on_right else "B")
        expected[f"p{i}"] = (verdict, alpha_on_right)
        made.append((choice, alpha_on_right, verdict))
        status, shown = api.rate(alice, shown["key"], choice)
        assert status == 200
    assert shown == {"finished": True, "done": 8, "total": 8}
    judgments = export_judgments(db)
    assert {j.prompt_id: (j.verdict, j.swapped) for j in judgments} == expected
    # "left" on a swapped screen (alpha on the right) is a win for model_b; on an unswapped one for model_a
    assert ("left", True, "B") in made and ("left", False, "A") in made
    for j in judgments:
        assert (j.model_a, j.model_b, j.judge, j.source, j.test_set) == (ALPHA, BETA, "alice", "rater", "koala")
        assert j.swapped == swapped[f"koala/{j.prompt_id}/{ALPHA}/{BETA}"]
        assert j.time.endswith("+00:00")
    api.assert_no_secrets()


def test_attention_checks_are_reported_not_exported(study):
    db, tokens, api = study
    alice = tokens["alice"]
    report = rater_report(db)
    assert report["bob"] == {"rated": 0, "total": 8, "checks": 2, "checks_passed": 0, "checks_failed": 0}
    status, shown = api.next(alice)
    checks = 0
    while not shown.get("finished"):
        bad_side = "left" if shown["left"] in OFF_TOPIC else "right" if shown["right"] in OFF_TOPIC else None
        if bad_side is None:
            choice = "tie"
        else:  # the first check is passed (the real answer chosen), the second failed (the off-topic one)
            choice = ("right" if bad_side == "left" else "left") if checks == 0 else bad_side
            checks += 1
        status, shown = api.rate(alice, shown["key"], choice)
    assert checks == 2
    report = rater_report(db)
    assert report["alice"] == {"rated": 8, "total": 8, "checks": 2, "checks_passed": 1, "checks_failed": 1}
    judgments = export_judgments(db)
    assert len(judgments) == 6 and all(CHECK_MODEL not in (j.model_a, j.model_b) for j in judgments)
    text = format_rater_report(report)
    assert "1 passed, 1 failed of 2" in text and "8 / 8" in text
    api.assert_no_secrets()


def test_no_model_name_reaches_the_browser(study):
    _, tokens, api = study
    for token in tokens.values():
        status, page = api.request(f"/r/{token}")
        assert status == 200
        status, shown = api.next(token)
        while not shown.get("finished"):
            assert set(shown) == {"key", "prompt", "left", "right", "done", "total"}
            api.item(token, shown["key"])
            api.request(f"/api/{token}/rate", {"key": shown["key"], "choice": "sideways"})
            status, shown = api.rate(token, shown["key"], "left")
        api.rate(token, keys_of(study[0], "alice")[0], "right")  # 409 for alice, 404 for bob
    api.assert_no_secrets()
    assert len(api.seen) > 40


# ----------------------------------------------------------------------------- a server process, SIGKILLed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db: Path, port: int, log: Path, cli: bool = False) -> subprocess.Popen:
    """The rating app in its own process: serve_forever through `python -c`, or with `cli` `koala rate serve`."""
    code = f"from koala_lib.evaluation.rating_app import serve_forever; serve_forever({str(db)!r}, port={port})"
    argv = ([sys.executable, "-m", "koala_lib.cli", "rate", "serve", "--db", str(db), "--host", "127.0.0.1",
             "--port", str(port)] if cli else [sys.executable, "-c", code])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/r/unknown", timeout=1):
                pass
        except urllib.error.HTTPError:
            return proc  # it answers (404 for an unknown token): it is up
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


def test_api_ratings_survive_a_sigkill(tmp_path):
    """The browser test's guarantee without a browser: `koala rate serve` in its own process, ratings POSTed as
    rate.html sends them, SIGKILL right after the last 2xx, restart on the same file: nothing acknowledged is lost."""
    db = tmp_path / "study.db"
    tokens = create_study(db, make_items(6), ["alice", "bob"], seed=5)
    alice = tokens["alice"]
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_server(db, port, log, cli=True)
    sent: dict[str, str] = {}  # key -> the choice acknowledged with a 200
    try:
        api = Api(f"http://127.0.0.1:{port}")
        status, shown = api.next(alice)  # what the page does on load
        assert status == 200 and (shown["done"], shown["total"]) == (0, 6)
        for choice in ("left", "tie", "right", "left"):  # then one POST per click, showing the screen it answers
            status, after = api.rate(alice, shown["key"], choice)
            assert status == 200, after
            sent[shown["key"]] = choice
            assert after["done"] == len(sent) and after["key"] not in sent
            shown = after
        os.kill(proc.pid, signal.SIGKILL)  # no graceful shutdown, at once after the last acknowledgement
        assert proc.wait(timeout=10) == -signal.SIGKILL

        with closing(sqlite3.connect(db)) as con:  # the file alone holds every acknowledged rating, exactly
            stored = dict(con.execute("SELECT key, choice FROM ratings"))
        assert stored == sent

        proc = start_server(db, port, log, cli=True)
        status, resumed = api.next(alice)  # a reload resumes at the screen shown before the kill
        assert status == 200 and resumed == shown
        assert (resumed["done"], resumed["total"]) == (4, 6)
        assert resumed["key"] == keys_of(db, "alice")[4] and resumed["key"] not in sent
        for key, choice in sent.items():
            status, item = api.item(alice, key)
            assert status == 200 and item["choice"] == choice
            # still final after the restart: a retry is accepted with the same next screen, a change is 409
            assert api.rate(alice, key, choice) == (200, shown)
            other = next(c for c in ("left", "tie", "right") if c != choice)
            assert api.rate(alice, key, other)[0] == 409
        assert api.next(tokens["bob"])[1]["done"] == 0
        for choice in ("right", "tie"):
            status, shown = api.rate(alice, shown["key"], choice)
            assert status == 200
        assert shown == {"finished": True, "done": 6, "total": 6}
        assert rater_report(db)["alice"]["rated"] == 6
        api.assert_no_secrets()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


# ----------------------------------------------------------------------------- the page in a browser


@pytest.mark.browser
def test_rating_in_the_browser_survives_a_sigkill(tmp_path, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    db = tmp_path / "study.db"
    tokens = create_study(db, make_items(8, payload_at=2), ["alice", "bob"], seed=11)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = Api(url)
    log = tmp_path / "server.log"
    proc = start_server(db, port, log)
    expected: dict[str, tuple[str, bool]] = {}
    seen_payload = False

    def text(element_id: str) -> str:
        return driver.find_element(By.ID, element_id).text

    def ready(progress: str):
        WebDriverWait(driver, 10, poll_frequency=0.05).until(
            lambda d: d.execute_script("return document.body.dataset.state") == "ready" and text("progress") == progress,
            f"the page did not show {progress}")

    def check_screen():
        nonlocal seen_payload
        source = driver.page_source
        assert not any(secret in source for secret in SECRETS)
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert driver.find_elements(By.CSS_SELECTOR, "#answers img, #answers script, #prompt *") == []
        if PAYLOAD in text("left") + text("right"):
            seen_payload = True
        # line breaks are kept (pre-wrap), so the prompt's second line is its own line
        assert text("prompt").splitlines()[1] == "It has two lines."

    def rate_screen(n: int):
        """Rate the screen showing item n+1 by clicking: alpha's side, beta's side or tie, in turn."""
        check_screen()
        i = prompt_index(text("prompt"))
        alpha_on_right = text("right").startswith("alpha answer")
        choice = ("alpha", "beta", "tie")[n % 3]
        if choice == "tie":
            button, verdict = "choose-tie", "tie"
        else:
            right = (choice == "alpha") == alpha_on_right
            button, verdict = ("choose-right" if right else "choose-left"), ("A" if choice == "alpha" else "B")
        expected[f"p{i}"] = (verdict, alpha_on_right)
        driver.find_element(By.ID, button).click()

    try:
        driver.get(f"{url}/r/{tokens['alice']}")
        for n in range(5):
            ready(f"{n + 1} / 8")
            rate_screen(n)
        ready("6 / 8")
        shown_before_kill = prompt_index(text("prompt"))

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        judgments = export_judgments(db)
        assert len(judgments) == 5 and {j.judge for j in judgments} == {"alice"}
        assert {j.prompt_id: (j.verdict, j.swapped) for j in judgments} == expected

        proc = start_server(db, port, log)
        driver.refresh()
        ready("6 / 8")
        assert prompt_index(text("prompt")) == shown_before_kill
        assert f"p{shown_before_kill}" not in expected

        # bob's token can neither read nor change alice's ratings
        for key in keys_of(db, "alice"):
            assert api.item(tokens["bob"], key)[0] == 404
            assert api.rate(tokens["bob"], key, "right")[0] == 404
        assert api.next(tokens["bob"])[1]["done"] == 0
        assert api.next(tokens["alice"])[1]["done"] == 5
        assert {j.prompt_id: (j.verdict, j.swapped) for j in export_judgments(db)} == expected

        for n in range(5, 8):
            ready(f"{n + 1} / 8")
            rate_screen(n)
        WebDriverWait(driver, 10, poll_frequency=0.05).until(
            lambda d: d.execute_script("return document.body.dataset.state") == "finished")
        assert text("progress") == "8 / 8" and "Thank you" in text("finished")
        assert seen_payload, "the answer with the script payload was never shown literally"
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert not any(secret in driver.page_source for secret in SECRETS)
        assert {j.prompt_id: (j.verdict, j.swapped) for j in export_judgments(db)} == expected
        assert len(expected) == 8 and {v for v, _ in expected.values()} == {"A", "B", "tie"}
        api.assert_no_secrets()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
