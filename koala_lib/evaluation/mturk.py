"""Pairwise judgments on Amazon Mechanical Turk: export a batch of HITs, import the workers' answers.

    batch = export_batch(pair_items(answers, [("koala_all", "base")]), Path("mturk"), seed=0)
    # upload hit.html as the project's layout and batch.csv as its input; keep key.json to yourself
    result = import_results(Path("Batch_123_batch_results.csv"), batch.key)
    write_judgments(Path("judgments.jsonl"), result.judgments); print(result.rejected)

Export writes three files to the output folder:
- `hit.html`: the task layout (Crowd HTML Elements): a `crowd-classifier` named `preference` showing `${prompt}`,
  `${response_a}` and `${response_b}`. MTurk fills the `${...}` variables HTML-escaped (the results CSV echoes them
  with entities, which import decodes), so the text is shown in blocks styled `white-space: pre-wrap` to keep the
  answers' line breaks and indentation. Preview a HIT in the requester sandbox before a paid batch.
- `batch.csv`: one row per item, columns `item_id, prompt, response_a, response_b, flip`. `flip` is 1 when
  model_a's answer is `response_b`; it is drawn per item from `seed`, and the layout never shows it. Item ids
  are random hex, not derived from the models.
- `key.json`: `item_id -> {prompt_id, test_set, model_a, model_b}`, the requester's secret.
  Model names are in no file a worker sees.

Import reads the batch results CSV that MTurk returns: its own columns (`WorkerId`, `AssignmentStatus`,
`SubmitTime`, ...), `Input.<column>` for every batch column and the answer, `Answer.preference.label` (Crowd HTML
Elements' `{"preference": {"label": ...}}` flattened) or `Answer.preference`. Values are HTML-unescaped. Rejected
assignments and unusable rows are dropped and counted by reason in `MTurkImport.rejected`, so that
`rows == len(judgments) + sum(rejected.values())`.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from koala_lib.evaluation.judgments import Judgment, PairItem, swap
from koala_lib.files import atomic_text

CLASSIFIER = "preference"  # the crowd-classifier's name in the layout
LABELS: dict[str, str] = {  # category text -> verdict about the screen sides ("A" = response_a)
    "Response A is better": "A",
    "Tie": "tie",
    "Response B is better": "B",
}
BATCH_COLUMNS: tuple[str, ...] = ("item_id", "prompt", "response_a", "response_b", "flip")
KEY_FIELDS: tuple[str, ...] = ("prompt_id", "test_set", "model_a", "model_b")
REQUIRED_COLUMNS: tuple[str, ...] = ("AssignmentId", "WorkerId", "AssignmentStatus", "SubmitTime",
                                     "Input.item_id", "Input.flip")
ANSWER_COLUMNS: tuple[str, ...] = (f"Answer.{CLASSIFIER}.label", f"Answer.{CLASSIFIER}", "Answer.taskAnswers")
TEMPLATE = "pairwise_hit.html"


class MTurkError(ValueError):
    """A batch cannot be exported, or a results or key file cannot be read; the message names the file."""


@dataclass(frozen=True)
class MTurkBatch:
    hit_html: Path  # the HIT layout
    batch_csv: Path  # the batch input
    key: Path  # item_id -> models (secret)
    items: int
    flipped: int  # items whose model_a answer is shown as response B


@dataclass
class MTurkImport:
    judgments: list[Judgment]
    rejected: Counter  # reason -> rows dropped
    rows: int  # data rows in the results file


# ----------------------------------------------------------------------------- export


def template_text() -> str:
    """The HIT layout shipped with the package."""
    return (resources.files("koala_lib.evaluation") / "templates" / TEMPLATE).read_text(encoding="utf-8")


def export_batch(items: Sequence[PairItem], out_dir: Path, seed: int = 0) -> MTurkBatch:
    """Write `hit.html`, `batch.csv` and `key.json` for `items` to `out_dir`.

    The same items and seed give the same files. Rows are shuffled so that a worker does not see one model pair
    after another; ids and flips come from a generator seeded by `seed` and the items' content, so a batch of
    other items never reuses this one's ids (an old key cannot silently match new results)."""
    if not items:
        raise MTurkError(f"{out_dir}: no items to export")
    layout = template_text()
    for needed in (f'name="{CLASSIFIER}"', *LABELS, *(f"${{{c}}}" for c in ("prompt", "response_a", "response_b"))):
        if needed not in layout:
            raise MTurkError(f"the packaged {TEMPLATE} lacks {needed!r}")
    fingerprint = hashlib.sha256()
    for item in items:
        for part in (item.key, item.prompt, item.answer_a, item.answer_b):
            fingerprint.update(part.encode("utf-8") + b"\0")
    rng = random.Random(f"koala-mturk:{seed}:{fingerprint.hexdigest()}")
    rows, key, seen = [], {}, set()
    for item in items:
        item_id = f"{rng.getrandbits(64):016x}"
        while item_id in seen:
            item_id = f"{rng.getrandbits(64):016x}"
        seen.add(item_id)
        flip = rng.random() < 0.5
        first, second = (item.answer_b, item.answer_a) if flip else (item.answer_a, item.answer_b)
        rows.append({"item_id": item_id, "prompt": item.prompt, "response_a": first, "response_b": second,
                     "flip": "1" if flip else "0"})
        key[item_id] = {"prompt_id": item.prompt_id, "test_set": item.test_set, "model_a": item.model_a,
                        "model_b": item.model_b}
    rng.shuffle(rows)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=BATCH_COLUMNS, quoting=csv.QUOTE_MINIMAL)  # RFC 4180, \r\n rows
    writer.writeheader()
    writer.writerows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = MTurkBatch(out_dir / "hit.html", out_dir / "batch.csv", out_dir / "key.json", len(rows),
                       sum(r["flip"] == "1" for r in rows))
    atomic_text(paths.hit_html, layout)
    atomic_text(paths.batch_csv, buffer.getvalue())
    atomic_text(paths.key, json.dumps(key, ensure_ascii=False, indent=1) + "\n")
    return paths


# ----------------------------------------------------------------------------- import


def read_key(path: Path) -> dict[str, dict[str, str]]:
    """key.json as written by `export_batch`; a malformed entry is an error naming the file and the item."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MTurkError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise MTurkError(f"{path}: expected an object of item_id -> models, got {type(data).__name__}")
    for item_id, entry in data.items():
        if not isinstance(entry, Mapping) or not all(entry.get(f) and isinstance(entry[f], str) for f in KEY_FIELDS):
            raise MTurkError(f"{path}: item {item_id!r} should have the text fields {', '.join(KEY_FIELDS)}")
        if entry["model_a"] == entry["model_b"]:
            raise MTurkError(f"{path}: item {item_id!r} pairs {entry['model_a']!r} with itself")
    return data


_ZONES = {"UTC": 0, "GMT": 0, "Z": 0, "PST": -8, "PDT": -7, "MST": -7, "MDT": -6, "CST": -6, "CDT": -5,
          "EST": -5, "EDT": -4}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_JAVA_DATE = re.compile(r"^[A-Za-z]{3} ([A-Za-z]{3}) +(\d{1,2}) (\d{1,2}):(\d{2}):(\d{2}) ([A-Za-z]+) (\d{4})$")


def parse_submit_time(text: str) -> str:
    """MTurk's `SubmitTime` as ISO 8601 UTC.

    The results CSV writes times like `Tue Apr 04 10:22:31 PDT 2023`; the API writes ISO 8601 (`...Z`). A time
    in another form, or with a zone not in `_ZONES`, is returned as it was (stripped)."""
    text = text.strip()
    match = _JAVA_DATE.match(text)
    when = None
    if match:
        month, day, hour, minute, second, zone, year = match.groups()
        if month.title() in _MONTHS and zone.upper() in _ZONES:
            try:
                local = datetime(int(year), _MONTHS.index(month.title()) + 1, int(day), int(hour), int(minute),
                                 int(second))
            except ValueError:
                return text
            when = local.replace(tzinfo=timezone(timedelta(hours=_ZONES[zone.upper()])))
    elif text:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            return text
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)  # the API's times are UTC
    if when is None:
        return text
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def _norm(text: str) -> str:
    return " ".join(html.unescape(text).split()).casefold()


_SCREEN = {_norm(label): side for label, side in LABELS.items()}


def _answer(row: Mapping[str, str | None]) -> str:
    """The chosen category text, whichever form the answer columns take ('' when there is none)."""
    for column in ANSWER_COLUMNS[:2]:
        value = html.unescape(row.get(column) or "").strip()
        if value:
            return value
    raw = html.unescape(row.get(ANSWER_COLUMNS[2]) or "").strip()
    if raw:  # the unflattened form: a JSON list with one {"preference": {"label": ...}} object
        try:
            data = json.loads(raw)
            chosen = (data[0] if isinstance(data, list) else data)[CLASSIFIER]
            return str(chosen["label"] if isinstance(chosen, Mapping) else chosen).strip()
        except (ValueError, LookupError, TypeError):
            return raw
    return ""


def import_results(results_csv: Path, key_path: Path) -> MTurkImport:
    """Judgments from MTurk's batch results, in model terms (the flip undone), source "mturk", judge = WorkerId.

    Rows dropped, by reason: `rejected_assignment` (AssignmentStatus Rejected), `bad_status` (not Submitted or
    Approved), `duplicate_assignment` (an AssignmentId seen before), `missing_worker`, `unknown_item` (item id
    not in the key), `bad_flip` (Input.flip not 0 or 1), `missing_label` (no answer), `unknown_label` (an answer
    that is none of the categories). A file without the needed columns is an error naming them."""
    results_csv = Path(results_csv)
    key = read_key(key_path)
    with results_csv.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise MTurkError(f"{results_csv}: empty file, expected MTurk's batch results CSV")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if not any(c in header for c in ANSWER_COLUMNS):
            missing.append(" or ".join(ANSWER_COLUMNS))
        if missing:
            raise MTurkError(f"{results_csv}: missing column(s) {', '.join(missing)}; is this MTurk's batch "
                             f"results CSV for a batch made by `koala mturk export`?")
        records = list(reader)

    judgments: list[Judgment] = []
    rejected: Counter = Counter()
    assignments: set[str] = set()
    for row in records:
        value = {c: html.unescape(row.get(c) or "").strip() for c in REQUIRED_COLUMNS}
        status = value["AssignmentStatus"]
        if status == "Rejected":
            rejected["rejected_assignment"] += 1
            continue
        if status not in ("Submitted", "Approved"):
            rejected["bad_status"] += 1
            continue
        if value["AssignmentId"] and value["AssignmentId"] in assignments:
            rejected["duplicate_assignment"] += 1
            continue
        assignments.add(value["AssignmentId"])
        if not value["WorkerId"]:
            rejected["missing_worker"] += 1
            continue
        entry = key.get(value["Input.item_id"])
        if entry is None:
            rejected["unknown_item"] += 1
            continue
        if value["Input.flip"] not in ("0", "1"):
            rejected["bad_flip"] += 1
            continue
        label = _answer(row)
        if not label:
            rejected["missing_label"] += 1
            continue
        screen = _SCREEN.get(_norm(label))
        if screen is None:
            rejected["unknown_label"] += 1
            continue
        flip = value["Input.flip"] == "1"
        verdict = swap(screen) if flip else screen
        judgments.append(Judgment(entry["prompt_id"], entry["test_set"], entry["model_a"], entry["model_b"],
                                  verdict, value["WorkerId"], flip, parse_submit_time(value["SubmitTime"]),
                                  source="mturk"))  # type: ignore[arg-type]
    return MTurkImport(judgments, rejected, len(records))
