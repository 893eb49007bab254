"""A cache of slow or paid calls (judge verdicts, answers from `openai:MODEL` endpoints) in one SQLite file.

    cache = CallCache(cfg.call_cache_path)
    key = call_key("judge", identity, request)      # who answers, and exactly what is asked
    cache.get(key) or cache.put(key, "judge", identity, {"text": ...})

A key is the sha256 of everything that decides a reply: the answerer's identity (endpoint URL and model name, or
for a model the kit serves itself a hash of its weights) and the request as sent (messages, which hold the prompt
template, and the sampling settings). A re-run asks only what is not cached. Each reply is committed as it arrives
(SQLite in WAL mode), so a killed run loses at most the calls in flight. Failed calls are never cached.

Several runs may share one file (`call_cache` in the profile); threads of one run share one connection behind a
lock. `file_digest(path)` hashes a weights file once per (path, size, mtime) and keeps the digest in the same file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path


def call_key(*parts) -> str:
    """sha256 of the parts as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class CallCache:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed row survives a killed process
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, kind TEXT NOT NULL, identity TEXT NOT NULL, "
                         "value TEXT NOT NULL, created TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, size INTEGER, mtime_ns INTEGER, sha256 TEXT, "
                         "PRIMARY KEY (path, size, mtime_ns))")
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return json.loads(row[0])

    def peek(self, key: str) -> dict | None:
        """The cached value without counting a hit or a miss."""
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, kind: str, identity: str, value: dict) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?)",
                             (key, kind, identity, json.dumps(value, ensure_ascii=False), stamp))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def file_digest(self, path: Path | str) -> str:
        """sha256 of a file's bytes, computed once per (path, size, mtime)."""
        path = Path(path).resolve()
        stat = path.stat()
        where = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM digests WHERE path = ? AND size = ? AND mtime_ns = ?", where).fetchone()
        if row:
            return row[0]
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (*where, digest.hexdigest()))
        return digest.hexdigest()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "CallCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
