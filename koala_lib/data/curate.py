"""Stage 1: the seven upstream sources → one curated conversation set, with every row accounted for.

    result = curate(cfg)                 # reads, parses, cleans, caps, writes runs/<P>/data/
    result.report["sources"]["hh"]       # {"read": 48, "kept": 47, "rejected": {"malformed": 1}, ...}

For every source, `read == kept + sum(rejected.values())`: a row is kept (it gave one or more records) or
rejected under one named reason (see `schema.REJECTION_REASONS`); each rejection is logged with its file
and line in `rejections.jsonl`. Records are ordered by source, then by their place upstream.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from koala_lib.config import SOURCE_NAMES, Config, ConfigError, resolve_path
from koala_lib.files import atomic_open, atomic_text, staged_folder
from koala_lib.manifest import write_manifest
from koala_lib.plots import data_composition, save
from koala_lib.progress import bar

from .clean import Deduplicator, KeywordFilter, LanguageFilter, split_long
from .readers import RawRow, SourceFormatError, demo_root, describe_origin, iter_rows
from .schema import Record, Reject
from .sources import SOURCES


@dataclass
class SourceReport:
    origin: str
    read: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    records: int = 0
    by_preference: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)
    examples_before: int = 0  # records the parsed rows gave, before filters
    chars_before: int = 0
    chars_after: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "origin": self.origin,
            "read": self.read,
            "kept": self.kept,
            "rejected": dict(sorted(self.rejected.items())),
            "records": self.records,
            "by_preference": dict(sorted(self.by_preference.items())),
            "repairs": dict(sorted(self.repairs.items())),
            "examples_before": self.examples_before,
            "chars_before": self.chars_before,
            "chars_after": self.chars_after,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class CurationResult:
    records: list[Record]
    report: dict
    out_dir: Path
    figure_path: Path

    def figure(self):
        """The composition figure (examples and characters per source, before and after filtering)."""
        return data_composition(self.report)

    def metrics(self) -> dict:
        """The numbers tests read back: per-source read / kept / records / rejections, and totals."""
        return {"sources": {k: {f: v[f] for f in ("read", "kept", "records", "rejected")} for k, v in self.report["sources"].items()}, "totals": self.report["totals"]}

    def table(self):
        """Rows read, kept and rejected per source, one column per rejection reason (a pandas DataFrame)."""
        import pandas as pd

        rows = []
        for name, rep in self.report["sources"].items():
            rows.append({"source": name, "read": rep["read"], "kept": rep["kept"], "records": rep["records"], **rep["rejected"]})
        frame = pd.DataFrame(rows).set_index("source").fillna(0).astype(int)
        frame.loc["total"] = frame.sum()
        return frame


def selected_sources(cfg: Config, only: Sequence[str] | str | None) -> tuple[str, ...]:
    """The mixture's sources, restricted to `only` (names or a comma-separated string) when given."""
    names = cfg.data.source_names()
    if not only:
        return names
    wanted = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    unknown = [s for s in wanted if s not in SOURCE_NAMES]
    if unknown:
        raise ConfigError(f"--sources: unknown source {unknown[0]!r} (allowed: {', '.join(SOURCE_NAMES)})")
    outside = [s for s in wanted if s not in names]
    if outside:
        raise ConfigError(f"--sources: {outside[0]!r} is not in the mixture {cfg.data.mixture!r} ({', '.join(names)})")
    return tuple(n for n in names if n in wanted)


def curate(cfg: Config, sources: Sequence[str] | str | None = None, progress: bool = True) -> CurationResult:
    """Run stage 1 for the profile and write `runs/<P>/data/` (curated Arrow, JSONL, report, rejections, figure)."""
    names = selected_sources(cfg, sources)
    out_dir = cfg.run_dir / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    started, start = time.time(), time.perf_counter()
    records: list[Record] = []
    reports: dict[str, SourceReport] = {}
    with atomic_open(out_dir / "rejections.jsonl") as log:
        for name in names:
            recs, reports[name] = curate_source(cfg, name, log, progress)
            records.extend(recs)
    seconds = time.perf_counter() - start
    report = build_report(cfg, reports, seconds)
    write_outputs(records, report, out_dir)
    figure = save(data_composition(report), cfg.figures_path / "data_composition.png")
    files, hub = source_locations(cfg, names)
    write_manifest(cfg, "data", out_dir, inputs=files, outputs=[out_dir], started=started, extra={"hub_inputs": hub})
    read = report["totals"]["read"]
    print(f"curated {len(records):,} records from {read:,} rows of {len(names)} sources in {seconds:.1f} s ({read / max(seconds, 1e-9):,.0f} rows/s) -> {out_dir}")
    return CurationResult(records, report, out_dir, figure)


def source_locations(cfg: Config, names: Sequence[str]) -> tuple[list[Path], dict[str, dict]]:
    """(the local files or folders the sources are read from, {source: hub id, config, revision} of hub sources)."""
    files, hub = [], {}
    for name in names:
        src = getattr(cfg.data.sources, name)
        if src.path:
            files.append(resolve_path(src.path))
        elif src.origin == "demo":
            files.append(demo_root(name))
        else:
            hub[name] = {"hub_id": src.hub_id, "config": src.hub_config, "revision": src.revision, "files": list(src.files)}
    return files, hub


def curate_source(cfg: Config, name: str, log, progress: bool = True) -> tuple[list[Record], SourceReport]:
    """Read, parse and filter one source; returns its records and its report."""
    src = getattr(cfg.data.sources, name)
    if src.cap is None and cfg.data.cap_per_source is not None:
        src = replace(src, cap=cfg.data.cap_per_source)
    module = SOURCES[name]
    filters = source_filters(name, src)
    rep = SourceReport(origin=describe_origin(name, src))
    checker = _FormatCheck(name, module.SCHEMA, cfg.data.format_check_rows)
    kept_rows: list[tuple[str, list[Record]]] = []
    start = time.perf_counter()
    rows: Iterable[RawRow] = iter_rows(name, src, cfg.data.max_record_bytes)
    for raw in bar(rows, desc=f"curate {name}", unit="rows", disable=not progress, mininterval=0.5):
        rep.read += 1
        try:
            out = _process(raw, module, src, cfg, filters, rep)
        except Reject as rej:
            rep.rejected[rej.reason] += 1
            log.write(json.dumps({"source": name, "reason": rej.reason, "location": raw.location, "detail": rej.detail}, ensure_ascii=False) + "\n")
            checker.seen(raw, rej)
            continue
        checker.seen(raw, None)
        rep.kept += 1
        kept_rows.append((raw.location, out))
    checker.finish()
    kept_rows = _apply_cap(kept_rows, src.cap, cfg.seed, name, rep, log)
    records = [r for _, row in kept_rows for r in row]
    rep.records = len(records)
    rep.by_preference.update(r.preference for r in records)
    rep.chars_after = sum(r.chars() for r in records)
    rep.seconds = time.perf_counter() - start
    return records, rep


def _process(raw: RawRow, module, src, cfg: Config, filters: list[Callable], rep: SourceReport) -> list[Record]:
    if raw.error is not None:
        raise raw.error
    if not isinstance(raw.value, dict):
        raise Reject("malformed", f"row is a {type(raw.value).__name__}, expected an object")
    candidates = module.parse(raw.value, raw.location, src, cfg.data)
    rep.examples_before += len(candidates)
    rep.chars_before += sum(r.chars() for r in candidates)
    out: list[Record] = []
    for record in candidates:
        for keep in filters:
            record = keep(record)
        parts = split_long(record, cfg.data.max_chars)
        if len(parts) > 1:
            rep.repairs["split_long"] += 1
        if parts[0].meta.get("dropped_exchanges"):
            rep.repairs["exchange_longer_than_max_chars_dropped"] += parts[0].meta["dropped_exchanges"]
        out.extend(parts)
    for record in out[:1]:
        rep.repairs.update(record.meta.get("repairs", ()))
    return out


def source_filters(name: str, src) -> list[Callable[[Record], Record]]:
    """The filters a source's records pass, in order. Koala filtered ShareGPT only."""
    if name != "sharegpt":
        return []
    return [KeywordFilter(src.keywords), LanguageFilter(src.language, src.language_chars), Deduplicator(src.dedup)]


def _apply_cap(rows: list[tuple[str, list[Record]]], cap: int | None, seed: int, name: str, rep: SourceReport, log) -> list[tuple[str, list[Record]]]:
    """Keep a seeded sample of rows whose records fit in `cap`; the other rows are rejected as `cap`."""
    if cap is None or sum(len(r) for _, r in rows) <= cap:
        return rows
    order = list(range(len(rows)))
    random.Random(f"{seed}:{name}").shuffle(order)
    chosen, total = set(), 0
    for i in order:
        if total + len(rows[i][1]) <= cap:
            chosen.add(i)
            total += len(rows[i][1])
    for i in range(len(rows)):
        if i not in chosen:
            rep.kept -= 1
            rep.rejected["cap"] += 1
            log.write(json.dumps({"source": name, "reason": "cap", "location": rows[i][0], "detail": f"cap {cap} records"}) + "\n")
    return [rows[i] for i in sorted(chosen)]


class _FormatCheck:
    """Raises SourceFormatError when a file's first N rows are all malformed: the file is not this source at all."""

    def __init__(self, name: str, schema: str, rows: int):
        self.name, self.schema, self.rows = name, schema, rows
        self.files: dict[str, list] = {}  # file -> [rows seen, rows that parsed, first error]

    def seen(self, raw: RawRow, rej: Reject | None) -> None:
        state = self.files.setdefault(raw.file, [0, 0, None])
        state[0] += 1
        if rej is None or rej.reason not in ("malformed", "oversized"):
            state[1] += 1
        elif state[2] is None:
            state[2] = f"{raw.location}: {rej.detail or rej.reason}"
        if state[0] == self.rows:
            self._check(raw.file, state)

    def finish(self) -> None:
        for file, state in self.files.items():
            if 0 < state[0] < self.rows:
                self._check(file, state)

    def _check(self, file: str, state: list) -> None:
        if state[1] == 0:
            raise SourceFormatError(
                f"{file}: not a {self.name} file: its first {state[0]} rows all fail to parse "
                f"(first: {state[2]}). Expected {self.schema}"
            )


def build_report(cfg: Config, reports: dict[str, SourceReport], seconds: float) -> dict:
    sources = {name: rep.to_json() for name, rep in reports.items()}
    totals = {
        "read": sum(r.read for r in reports.values()),
        "kept": sum(r.kept for r in reports.values()),
        "rejected": sum(sum(r.rejected.values()) for r in reports.values()),
        "records": sum(r.records for r in reports.values()),
    }
    return {"profile": cfg.profile, "mixture": cfg.data.mixture, "pairs": cfg.data.pairs, "sources": sources, "totals": totals, "seconds": round(seconds, 3)}


def write_outputs(records: list[Record], report: dict, out_dir: Path) -> None:
    """Arrow dataset (`curated/`), a JSONL export and `report.json`, each replaced atomically."""
    import datasets

    rows = [r.to_row() for r in records]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "preference": datasets.Value("string"),
            "turns": datasets.List({"role": datasets.Value("string"), "text": datasets.Value("string")}),
            "meta": datasets.Value("string"),
        }
    )
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # our own bars are enough
    try:
        with staged_folder(out_dir / "curated") as tmp:
            datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    atomic_text(out_dir / "curated.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")


def load_curated(cfg: Config) -> list[Record]:
    """The records stage 1 wrote for this profile (what stage 2 reads)."""
    import datasets

    path = cfg.run_dir / "data" / "curated"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no curated data; run `koala curate --profile {cfg.profile}` first")
    return [Record.from_row(row) for row in datasets.load_from_disk(str(path))]


def example(records: list[Record], source: str | None = None, preference: str | None = None) -> Record:
    """The first record of a source and/or preference (for showing one in a notebook)."""
    for record in records:
        if (source is None or record.source == source) and (preference is None or record.preference == preference):
            return record
    raise LookupError(f"no record with source={source!r} preference={preference!r}")


def rejections_table(cfg: Config, limit: int | None = 20):
    """The logged rejections (source, reason, location, detail) as a pandas DataFrame."""
    import pandas as pd

    path = cfg.run_dir / "data" / "rejections.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    frame = pd.DataFrame(rows, columns=["source", "reason", "location", "detail"])
    return frame if limit is None else frame.head(limit)


def render_record(record: Record, width: int = 300) -> str:
    """A record as readable text, long turns shortened to `width` characters."""
    lines = [f"{record.id}  [{record.source}, {record.preference}]"]
    for t in record.turns:
        text = t.text if len(t.text) <= width else t.text[: width - 1] + "…"
        lines.append(f"{t.role.upper():>9}: {text}")
    return "\n".join(lines)
