"""`koala rate`: a blind pairwise rating web app for a team's own raters, one study per SQLite file.

    tokens = create_study("study.db", pair_items(answers, [("koala_all", "base")]), ["alice", "bob"],
                          seed=0, attention_checks=2)                 # rater -> secret token
    links = rating_links("study.db", "http://10.0.0.5:8001")          # rater -> http://.../r/<token>
    serve_forever("study.db", host="0.0.0.0", port=8001)               # raters open their link and click
    write_judgments(Path("judgments.jsonl"), export_judgments("study.db"))
    print(format_rater_report(rater_report("study.db")))              # progress and attention checks

A rater's page (`GET /r/<token>`, koala_lib/evaluation/static/rate.html) shows one prompt and two answers, A on the left
and B on the right, with "A is better" / "Tie" / "B is better" (keys 1/2/3 or a/t/b). Model names never
leave the server: the browser sees only texts and opaque random assignment keys.

JSON API (errors are `{"error": {"message", "field"}}`):
  GET  /api/<token>/next          {"key", "prompt", "left", "right", "done", "total"} or {"finished": true, ...}
  GET  /api/<token>/item/<key>    the same for one of this rater's items, plus "choice" (null until rated)
  POST /api/<token>/rate          {"key", "choice": "left"|"tie"|"right"}: commits, then answers like /next
Unknown token: 404. A key of another rater's assignment: 404, as for a key that does not exist, so one
rater can neither read nor change another's ratings. Rating a rated key again with the same choice is
accepted (a retried request); with a different choice it is 409: a committed rating is final. A bad body
is 400 naming the field.

Decisions:
- Sides are randomized per item and rater: each rater's new items get a balanced list of `swapped` flags
  (half model_a on the right, +-1) and a display order, both shuffled by a generator seeded from
  (seed, rater), so the same calls with the same seed give the same study. Assignment keys are random.
- Each rating is its own transaction, committed before the next screen is sent. The file is in WAL mode
  with `synchronous=FULL`: a commit has then been written to the WAL *and* fsynced. A SIGKILL of the server
  loses nothing with NORMAL either (the OS keeps written pages), but FULL also survives a power cut, and
  one fsync per human click costs nothing noticeable.
- `create_study` on an existing file adds: new raters get new tokens (existing ones keep theirs), items
  are matched by `PairItem.key` (an item already there is not added again; the same key with different
  texts is refused), new items are assigned to every rater, and `attention_checks` is the number the
  study should have (missing ones are added). A different seed than the study's is refused.
- Attention checks reuse a study item's prompt and model_a's answer, against an off-topic answer; the
  expected verdict is "A". They look like any other screen, are counted by `rater_report` (a tie counts
  as failed) and are never exported as judgments.

Tables: meta(name, value); items(id, item_key, prompt_id, test_set, prompt, model_a, answer_a, model_b,
answer_b, expected: NULL or the verdict an attention check expects); raters(id, token, position);
assignments(key, item_id, rater, position, swapped); ratings(key, choice, time).
"""

from __future__ import annotations

import random
import secrets
import sqlite3
from contextlib import closing, contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from koala_lib.evaluation.judgments import Judgment, PairItem, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, item_key TEXT NOT NULL UNIQUE, prompt_id TEXT NOT NULL, test_set TEXT NOT NULL,
    prompt TEXT NOT NULL, model_a TEXT NOT NULL, answer_a TEXT NOT NULL, model_b TEXT NOT NULL,
    answer_b TEXT NOT NULL, expected TEXT);
CREATE TABLE IF NOT EXISTS raters (id TEXT PRIMARY KEY, token TEXT NOT NULL UNIQUE, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    key TEXT PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id), rater TEXT NOT NULL REFERENCES raters(id),
    position INTEGER NOT NULL, swapped INTEGER NOT NULL, UNIQUE (item_id, rater));
CREATE INDEX IF NOT EXISTS assignments_by_rater ON assignments (rater, position);
CREATE TABLE IF NOT EXISTS ratings (
    key TEXT PRIMARY KEY REFERENCES assignments(key), choice TEXT NOT NULL CHECK (choice IN ('left', 'tie', 'right')),
    time TEXT NOT NULL);
"""

CHECK_MODEL = "attention-check"  # model_b of attention checks (never shown)
# Answers no attentive rater prefers to a real one: off-topic, whatever the prompt was.
OFF_TOPIC = (
    "Lighthouses were once kept by families who lived beside them and wound the lamp clockwork every few hours.",
    "The recipe needs two cups of flour, a pinch of salt and one egg. Bake until golden.",
    "Weather for tomorrow: cloudy in the morning, light wind from the west, clearing by the evening.",
    "Chapter 3. The train left the station at nine, and nobody on the platform waved.",
)
CHOICES = ("left", "tie", "right")


class StudyError(ValueError):
    """A study file cannot be created, extended or served as asked; the message says why."""


@contextmanager
def _connect(db_path, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode; with `write`, the block is one IMMEDIATE transaction."""
    with closing(sqlite3.connect(str(db_path), timeout=30, isolation_level=None)) as db:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        if not write:
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _study(db_path) -> Path:
    path = Path(db_path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file (create it with `koala rate init`)")
    try:
        with _connect(path) as db:
            db.execute("SELECT value FROM meta WHERE name = 'seed'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StudyError(f"{path}: not a rating study ({exc})") from None
    return path


def _texts(item: PairItem) -> tuple:
    return (item.prompt_id, item.test_set, item.prompt, item.model_a, item.answer_a, item.model_b, item.answer_b)


def create_study(db_path, items: Sequence[PairItem], raters: Sequence[str], seed: int = 0,
                 attention_checks: int = 0, secret: str | None = None) -> dict[str, str]:
    """Create (or extend) the study in `db_path`; returns every rater's token (rater id -> token).

    Sides and order are drawn from `seed` and a `secret` stored in the study file (random when not given), so a
    rater who knows the profile's seed and their own id still cannot recompute which side holds which model."""
    if not items:
        raise StudyError("a study needs at least one item")
    if isinstance(raters, str):
        raise StudyError(f"raters must be a list of ids, not the string {raters!r} (split it on commas first)")
    names = [str(r).strip() for r in raters]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise StudyError(f"raters must be distinct non-empty ids, got {list(raters)!r}")
    if attention_checks < 0:
        raise StudyError(f"attention_checks must be >= 0, got {attention_checks}")
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(str(db_path))) as db:
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StudyError(f"{db_path}: SQLite could not switch the file to WAL mode")
        db.executescript(SCHEMA)
    with _connect(db_path, write=True) as db:
        stored = db.execute("SELECT value FROM meta WHERE name = 'seed'").fetchone()
        if stored is None:
            db.execute("INSERT INTO meta VALUES ('seed', ?)", (str(int(seed)),))
        elif int(stored["value"]) != int(seed):
            raise StudyError(f"{db_path}: the study was created with seed {stored['value']}, not {seed}")
        salt = db.execute("SELECT value FROM meta WHERE name = 'secret'").fetchone()
        if salt is None:
            db.execute("INSERT INTO meta VALUES ('secret', ?)", (secret or secrets.token_hex(16),))
        elif secret is not None and secret != salt["value"]:
            raise StudyError(f"{db_path}: the study was created with another secret")
        stored_secret = db.execute("SELECT value FROM meta WHERE name = 'secret'").fetchone()["value"]
        draw = f"{int(seed)}/{stored_secret}"
        known = {r["item_key"]: r for r in db.execute("SELECT * FROM items")}
        for item in items:
            row = known.get(item.key)
            if row is not None and tuple(row[c] for c in ("prompt_id", "test_set", "prompt", "model_a", "answer_a",
                                                          "model_b", "answer_b")) != _texts(item):
                raise StudyError(f"{db_path}: item {item.key} is already in the study with different texts")
            if row is None and item.model_a == item.model_b:
                raise StudyError(f"item {item.key}: model_a and model_b are the same model")
            if row is None:
                db.execute("INSERT INTO items (item_key, prompt_id, test_set, prompt, model_a, answer_a, model_b, "
                           "answer_b) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (item.key, *_texts(item)))
                known[item.key] = db.execute("SELECT * FROM items WHERE item_key = ?", (item.key,)).fetchone()
        _add_checks(db, attention_checks, draw)
        first = db.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
        have = {r["id"] for r in db.execute("SELECT id FROM raters")}
        for name in names:
            if name not in have:
                db.execute("INSERT INTO raters VALUES (?, ?, ?)", (name, secrets.token_urlsafe(24), first))
                first += 1
        all_items = [r["id"] for r in db.execute("SELECT id FROM items ORDER BY id")]
        for rater in [r["id"] for r in db.execute("SELECT id FROM raters ORDER BY position")]:
            _assign(db, rater, all_items, draw)
        return {r["id"]: r["token"] for r in db.execute("SELECT id, token FROM raters ORDER BY position")}


def _add_checks(db: sqlite3.Connection, wanted: int, seed: str) -> None:
    real = [r for r in db.execute("SELECT * FROM items WHERE expected IS NULL ORDER BY id")]
    have = db.execute("SELECT COUNT(*) FROM items WHERE expected IS NOT NULL").fetchone()[0]
    if have >= wanted:
        return
    rng = random.Random(f"koala-rate/{seed}/checks/{have}")
    usable = [r for r in real if r["answer_a"].strip()] or real
    for n in range(have, wanted):
        base = usable[rng.randrange(len(usable))]
        db.execute("INSERT INTO items (item_key, prompt_id, test_set, prompt, model_a, answer_a, model_b, answer_b, "
                   "expected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'A')",
                   (f"check/{n}/{base['item_key']}", base["prompt_id"], base["test_set"], base["prompt"],
                    base["model_a"], base["answer_a"], CHECK_MODEL, OFF_TOPIC[n % len(OFF_TOPIC)]))


def _assign(db: sqlite3.Connection, rater: str, item_ids: list[int], seed: str) -> None:
    """Assign the items `rater` lacks: shuffled after their current ones, with balanced random sides."""
    done = {r[0] for r in db.execute("SELECT item_id FROM assignments WHERE rater = ?", (rater,))}
    new = [i for i in item_ids if i not in done]
    if not new:
        return
    start = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM assignments WHERE rater = ?", (rater,)).fetchone()[0]
    rng = random.Random(f"koala-rate/{seed}/{rater}/{start}")
    sides = [i % 2 == 1 for i in range(len(new))]
    rng.shuffle(sides)
    order = list(range(len(new)))
    rng.shuffle(order)
    for item_id, swapped, position in zip(new, sides, order):
        db.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                   (secrets.token_urlsafe(12), item_id, rater, start + position, int(swapped)))


def rating_links(db_path, base_url: str) -> dict[str, str]:
    """Each rater's personal link: `<base_url>/r/<token>`."""
    with _connect(_study(db_path)) as db:
        return {r["id"]: f"{base_url.rstrip('/')}/r/{r['token']}" for r in db.execute("SELECT id, token FROM raters ORDER BY position")}


def _verdict(choice: str, swapped: bool) -> str:
    """The screen choice in model terms: "left" is model_a's answer unless the sides were swapped."""
    if choice == "tie":
        return "tie"
    return "A" if (choice == "left") != swapped else "B"


_ROWS = """SELECT a.rater, a.swapped, i.*, r.choice, r.time FROM ratings r JOIN assignments a ON a.key = r.key
           JOIN items i ON i.id = a.item_id JOIN raters t ON t.id = a.rater"""


def export_judgments(db_path) -> list[Judgment]:
    """Every rating except attention checks, as Judgments (source "rater", judge = rater id), in rating order."""
    with _connect(_study(db_path)) as db:
        rows = db.execute(_ROWS + " WHERE i.expected IS NULL ORDER BY t.position, r.time, a.position").fetchall()
    return [Judgment(r["prompt_id"], r["test_set"], r["model_a"], r["model_b"], _verdict(r["choice"], bool(r["swapped"])),
                     r["rater"], bool(r["swapped"]), r["time"], "rater") for r in rows]


def rater_report(db_path) -> dict[str, dict[str, int]]:
    """Per rater: `rated` of `total` screens, and `checks` attention checks of which `checks_passed` /
    `checks_failed` were answered (a check not yet reached is neither)."""
    with _connect(_study(db_path)) as db:
        report = {r["id"]: {"rated": 0, "total": 0, "checks": 0, "checks_passed": 0, "checks_failed": 0}
                  for r in db.execute("SELECT id FROM raters ORDER BY position")}
        for r in db.execute("SELECT a.rater, a.swapped, i.expected, r.choice FROM assignments a JOIN items i "
                            "ON i.id = a.item_id LEFT JOIN ratings r ON r.key = a.key"):
            line = report[r["rater"]]
            line["total"] += 1
            line["rated"] += r["choice"] is not None
            if r["expected"] is not None:
                line["checks"] += 1
                if r["choice"] is not None:
                    line["checks_passed" if _verdict(r["choice"], bool(r["swapped"])) == r["expected"] else "checks_failed"] += 1
    return report


def format_rater_report(report: dict[str, dict[str, int]]) -> str:
    """The report as a small text table."""
    lines = [f"{'rater':<20} {'rated':>11}  attention checks"]
    for rater, r in report.items():
        checks = f"{r['checks_passed']} passed, {r['checks_failed']} failed of {r['checks']}" if r["checks"] else "-"
        lines.append(f"{rater:<20} {r['rated']:>5} / {r['total']:<5}  {checks}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the app


class RateBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    key: str
    choice: Literal["left", "tie", "right"]


class _NotFound(Exception):
    pass


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status_code=status, headers=_HEADERS)


_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def create_rating_app(db_path) -> FastAPI:
    """The rating app for the study in `db_path` (which must exist)."""
    path = _study(db_path)
    app = FastAPI(title="koala-rate", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the body is not valid JSON")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        if field == "choice":
            return _error(400, "choice: must be one of 'left', 'tie', 'right'", field)
        return _error(400, f"{field or 'body'}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(_NotFound)
    async def not_found(request: Request, exc: _NotFound):
        return _error(404, str(exc))

    def rater_of(db: sqlite3.Connection, token: str) -> str:
        row = db.execute("SELECT id FROM raters WHERE token = ?", (token,)).fetchone()
        if row is None:
            raise _NotFound("unknown rating link")
        return row["id"]

    def screen(db: sqlite3.Connection, rater: str, key: str | None = None) -> dict:
        """The rater's item `key` (or the first unrated one) as the browser sees it: texts, never model names."""
        done, total = db.execute("SELECT COUNT(r.key), COUNT(*) FROM assignments a LEFT JOIN ratings r ON r.key = a.key "
                                 "WHERE a.rater = ?", (rater,)).fetchone()
        query = ("SELECT a.key, a.swapped, i.prompt, i.answer_a, i.answer_b, r.choice FROM assignments a JOIN items i "
                 "ON i.id = a.item_id LEFT JOIN ratings r ON r.key = a.key WHERE a.rater = ? ")
        if key is None:
            row = db.execute(query + "AND r.key IS NULL ORDER BY a.position LIMIT 1", (rater,)).fetchone()
            if row is None:
                return {"finished": True, "done": done, "total": total}
        else:
            row = db.execute(query + "AND a.key = ?", (rater, key)).fetchone()
            if row is None:
                raise _NotFound("no such item for this rating link")
        left, right = (row["answer_b"], row["answer_a"]) if row["swapped"] else (row["answer_a"], row["answer_b"])
        out = {"key": row["key"], "prompt": row["prompt"], "left": left, "right": right, "done": done, "total": total}
        if key is not None:
            out["choice"] = row["choice"]
        return out

    @app.get("/r/{token}", response_class=HTMLResponse)
    def page(token: str):
        with _connect(path) as db:
            if db.execute("SELECT 1 FROM raters WHERE token = ?", (token,)).fetchone() is None:
                return HTMLResponse("<!doctype html><title>Unknown link</title><p>This rating link is not valid.</p>",
                                    status_code=404, headers=_HEADERS)
        nonce = secrets.token_urlsafe(16)
        html = (resources.files("koala_lib.evaluation") / "static" / "rate.html").read_text(encoding="utf-8")
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(html.replace("{{nonce}}", nonce), headers={**_HEADERS, "Content-Security-Policy": csp})

    @app.get("/api/{token}/next")
    def next_item(token: str):
        with _connect(path) as db:
            return JSONResponse(screen(db, rater_of(db, token)), headers=_HEADERS)

    @app.get("/api/{token}/item/{key}")
    def one_item(token: str, key: str):
        with _connect(path) as db:
            return JSONResponse(screen(db, rater_of(db, token), key), headers=_HEADERS)

    @app.post("/api/{token}/rate")
    def rate(token: str, body: RateBody):
        with _connect(path, write=True) as db:  # committed when the block ends, before the answer is sent
            rater = rater_of(db, token)
            owned = db.execute("SELECT 1 FROM assignments WHERE key = ? AND rater = ?", (body.key, rater)).fetchone()
            if owned is None:
                raise _NotFound("no such item for this rating link")
            before = db.execute("SELECT choice FROM ratings WHERE key = ?", (body.key,)).fetchone()
            if before is None:
                db.execute("INSERT INTO ratings VALUES (?, ?, ?)", (body.key, body.choice, now()))
            elif before["choice"] != body.choice:
                return _error(409, f"this item was already rated {before['choice']!r}; a rating cannot be changed", "choice")
        with _connect(path) as db:
            return JSONResponse(screen(db, rater), headers=_HEADERS)

    return app


def serve_forever(db_path, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve the study until interrupted. Access logs are off: every URL carries a rater's token."""
    import uvicorn

    app = create_rating_app(db_path)
    print(f"rating study {db_path} on http://{host}:{port}/r/<token> (each rater's link: `koala rate links` with the same options)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
