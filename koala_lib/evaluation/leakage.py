"""Test-query leakage filter: drop the test queries that (nearly) occur in the training data, as Koala did.

    from koala_lib.evaluation.leakage import find_leaks, load_queries, load_train_texts
    report = find_leaks(load_queries("koala_test_set.jsonl"), load_train_texts("runs/demo/data/curated"))
    report.removed[0]   # Leak(id='koala_17', bleu=43.2, train_text='...', train_index=1021, query='...')
    report.kept         # ids of the queries that stay, in input order
    report.table()      # the removed ones as a pandas DataFrame

`run_leakage(queries, train, 20.0, "leakage.json")` does the same from files and writes `report.to_json()`.

Definition: a query is removed when its sentence BLEU with some training text is strictly above the threshold
(Koala: 20), BLEU being exactly `sacrebleu.sentence_bleu(query, [user_turn])` with sacrebleu's defaults:
  * direction: the test query is the hypothesis; each user turn of a training record is a single reference,
    scored on its own; a query's score is the maximum over all user turns (`Leak` keeps the first best one);
  * tokenizer 13a, case-sensitive, smoothing 'exp' (mteval-v13a, Chen & Cherry method 3), effective order,
    n-grams up to 4.
Training texts: the user turns of curated records (`load_train_texts`: a `save_to_disk` folder or a JSONL of
rows). Queries: `(id, text)` pairs (`load_queries` reads both test-set formats; `queries_from_prompts` takes
`TestPrompt`s and names them `test_set/id`, since ids of different test sets may collide).

Speed: scoring every pair (`brute_force_leaks`) is far too slow for 360 queries x 470K texts. An inverted index of
the training texts' n-grams (orders 1..INDEX_ORDERS) gives each query's exact clipped n-gram matches against all
texts at once; `bleu_upper_bound` turns them into an upper bound of the score, and only the pairs whose bound
reaches the threshold are scored by sacrebleu. Decisions and scores are those of brute force.
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU

from koala_lib.data.readers import SourceFormatError
from koala_lib.data.schema import Record
from koala_lib.files import atomic_text
from koala_lib.progress import bar as progress_bar

MAX_ORDER = 4  # sacrebleu's BLEU.MAX_NGRAM_ORDER
INDEX_ORDERS = 3  # n-gram orders held in the index (exact matches); order 4 is only bounded (cheaper to build)
SLACK = 1e-9  # the bound and sacrebleu add up the same logs in another order: never skip within this of the threshold


@dataclass(frozen=True)
class Leak:
    id: str
    bleu: float  # the highest sentence BLEU of the query against one training text
    train_text: str  # that training text (the first one, when several tie)
    train_index: int  # its position in `train_texts`
    query: str = ""


@dataclass
class LeakageReport:
    threshold: float
    removed: list[Leak] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    pairs: int = 0  # queries x training texts
    candidates: int = 0  # pairs scored by sacrebleu
    seconds: float = 0.0
    index_seconds: float = 0.0  # of which building the index
    train_texts: int = 0
    distinct_train_texts: int = 0

    def to_json(self) -> dict:
        stats = {k: getattr(self, k) for k in ("pairs", "candidates", "seconds", "index_seconds", "train_texts", "distinct_train_texts")}
        removed = [{"id": leak.id, "bleu": leak.bleu, "train_text": leak.train_text} for leak in self.removed]
        return {"threshold": self.threshold, "removed": removed, "kept": list(self.kept), **stats}

    def table(self, width: int = 120):
        """The removed queries (id, bleu, query, train_text shortened to `width` characters), highest BLEU first."""
        import pandas as pd

        def cut(text: str) -> str:
            return text if len(text) <= width else text[: width - 1] + "…"

        rows = [(leak.id, round(leak.bleu, 2), cut(leak.query), cut(leak.train_text)) for leak in self.removed]
        frame = pd.DataFrame(rows, columns=["id", "bleu", "query", "train_text"])
        return frame.sort_values("bleu", ascending=False, kind="stable").reset_index(drop=True)


def _metric() -> BLEU:
    """The scorer `sacrebleu.sentence_bleu` builds with its defaults (13a, 'exp', effective order, cased)."""
    return BLEU(lowercase=False, tokenize=BLEU.TOKENIZER_DEFAULT, smooth_method="exp", effective_order=True)


def _tokens(metric: BLEU, text: str) -> list[str]:
    return metric._preprocess_segment(text).split()  # exactly what sacrebleu scores: 13a on text.rstrip()


# Why `bleu_upper_bound` is never below sacrebleu's score (BLEU.compute_bleu, read in sacrebleu 2.6.0). For a
# hypothesis of h >= 1 tokens and a reference of r tokens the statistics are the totals t_n = h - n + 1 and the
# clipped matches c_n = sum over distinct hypothesis n-grams g of min(count_hyp(g), count_ref(g)). If all c_n
# are 0 the score is 0. Otherwise, with K = min(4, h) (effective order only drops orders with t_n = 0; it keeps
# orders with no match):
#     score = BP * (p_1 * ... * p_K) ** (1/K),   BP = 1 if h >= r else exp(1 - r/h),
#     p_n = 100 c_n / t_n if c_n > 0, else 100 / (2**z_n * t_n)   ('exp' smoothing),
# z_n being the number of orders m <= n with c_m = 0. BP, t_n and K depend on the lengths only (known exactly).
# (1) The score is non-decreasing in each c_n: raising a positive c_n raises p_n alone; raising c_n from 0 to 1
#     multiplies p_n by 2**z_n >= 2 and lowers z_m by one, i.e. doubles p_m, for every later zero order m.
# (2) Upper bounds: c_n <= t_n; c_n <= r - n + 1 (the reference has no more n-grams); c_n <= c_(n-1): grouping
#     n-grams by their (n-1)-gram prefix p, sum_x min(hyp(p x), ref(p x)) <= min(hyp(p), ref(p)), and these
#     sum to c_(n-1). (The tempting c_n <= c_1 - n + 1 is false: "a b a" vs "b a b" has c_1 = c_2 = 2.)
#     c_1 = 0 forces every c_n = 0 (a matched n-gram starts with a matched token), hence score 0.
# So the formula evaluated at b_n = min(given bound on c_n, b_(n-1), t_n, r - n + 1) >= c_n is >= the score.
def bleu_upper_bound(hyp_len: int, ref_len, matches: Sequence) -> np.ndarray:
    """Upper bound of sentence BLEU for a hypothesis of `hyp_len` tokens against references of `ref_len` tokens
    (an array), given upper bounds (or exact values) of the clipped matches of orders 1..len(matches) >= 1."""
    shape = np.broadcast_shapes(np.shape(ref_len), *(np.shape(m) for m in matches))
    ref_len = np.broadcast_to(np.asarray(ref_len, dtype=np.float64), shape)
    order = min(MAX_ORDER, hyp_len)
    if order == 0:
        return np.zeros_like(ref_len)
    bound = np.full(ref_len.shape, np.inf)
    zeros, log_sum, first = np.zeros_like(ref_len), np.zeros_like(ref_len), None
    for n in range(1, order + 1):
        total = hyp_len - n + 1
        known = np.asarray(matches[n - 1], dtype=np.float64) if n <= len(matches) else np.inf
        bound = np.minimum(np.minimum(known, bound), np.minimum(total, np.maximum(ref_len - n + 1, 0)))
        first = bound if first is None else first
        zeros = zeros + (bound == 0)
        log_sum += np.log(np.where(bound > 0, 100.0 * bound / total, 100.0 / (2.0**zeros * total)))
    bp = np.where(ref_len > hyp_len, np.exp(1 - ref_len / hyp_len), 1.0)
    return np.where(first > 0, bp * np.exp(log_sum / order), 0.0)


class NgramIndex:
    """Inverted index of the distinct training texts: for orders 1..orders, n-gram -> (texts, counts in them)."""

    def __init__(self, texts: Sequence[str], orders: int = INDEX_ORDERS, progress: bool = False):
        self.metric, self.orders = _metric(), orders
        first: dict[str, int] = {}
        for i, text in enumerate(texts):
            first.setdefault(text, i)
        self.texts = list(first)  # distinct, in order of first occurrence (so the first best text wins ties)
        self.first_index = np.fromiter(first.values(), np.int64, len(first))
        self.vocab: dict[str, int] = {}
        flat, self.lengths = array("q"), np.zeros(len(self.texts), np.int64)
        bar = progress_bar(self.texts, desc="leakage: tokenize", unit="texts", disable=not progress, mininterval=0.5)
        for i, text in enumerate(bar):
            ids = [self.vocab.setdefault(tok, len(self.vocab)) for tok in _tokens(self.metric, text)]
            self.lengths[i] = len(ids)
            flat.extend(ids)
        tokens = np.frombuffer(flat, np.int64) if flat else np.zeros(0, np.int64)
        n_texts, width = len(self.texts), max(len(self.vocab), 1)
        owner = np.repeat(np.arange(n_texts), self.lengths)  # text of each token
        left = np.repeat(np.cumsum(self.lengths), self.lengths) - np.arange(len(tokens))  # tokens to the text's end
        self.keys: list[np.ndarray] = []  # order n >= 2: sorted (id of (n-1)-gram prefix * width + token id)
        self.postings: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (indptr by n-gram id, text, count)
        grams, count = tokens, len(self.vocab)  # dense n-gram id of the n-gram starting at each position
        for n in range(1, orders + 1):
            pos = np.flatnonzero(left >= n)
            if n > 1:
                uniq, inverse = np.unique(grams[pos] * width + tokens[pos + n - 1], return_inverse=True)
                grams = np.full(len(tokens), -1, np.int64)
                grams[pos], count = inverse, len(uniq)
                self.keys.append(uniq)
            pairs, counts = np.unique(grams[pos] * n_texts + owner[pos], return_counts=True)
            gram, text = np.divmod(pairs, max(n_texts, 1))
            indptr = np.zeros(count + 1, np.int64)
            np.cumsum(np.bincount(gram, minlength=count), out=indptr[1:])
            self.postings.append((indptr, text.astype(np.int32), counts.astype(np.int32)))

    def _query_grams(self, tokens: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per order: (ids of the query's n-grams present in the index, their counts in the query)."""
        ids = np.array([self.vocab.get(tok, -1) for tok in tokens], np.int64)
        grams, out, width = ids, [], max(len(self.vocab), 1)
        for n in range(1, min(self.orders, len(ids)) + 1):
            if n > 1:
                keys, prev, last = self.keys[n - 2], grams[:-1], ids[n - 1:]
                at = np.searchsorted(keys, prev * width + last)
                found = (prev >= 0) & (last >= 0) & (at < len(keys))
                found[found] = keys[at[found]] == (prev * width + last)[found]
                grams = np.where(found, at, -1)
            present, counts = np.unique(grams[grams >= 0], return_counts=True)
            out.append((present, counts))
        return out

    def _matches(self, n: int, grams: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Clipped n-gram matches of the query against every text: sum over its n-grams of min(query, text)."""
        indptr, text, count = self.postings[n - 1]
        spans = [(indptr[g], indptr[g + 1], k) for g, k in zip(grams, counts)]
        if not spans:
            return np.zeros(len(self.texts))
        where = np.concatenate([text[a:b] for a, b, _ in spans])
        clipped = np.concatenate([np.minimum(count[a:b], k) for a, b, k in spans])
        return np.bincount(where, weights=clipped, minlength=len(self.texts))

    def candidates(self, tokens: list[str], threshold: float) -> np.ndarray:
        """Distinct-text numbers (ascending) whose BLEU with the query may exceed `threshold`; the others cannot."""
        h, floor = len(tokens), threshold - SLACK * max(1.0, threshold)
        matched = [self._matches(n, grams, counts) for n, (grams, counts) in enumerate(self._query_grams(tokens), start=1)]
        if not matched:
            return np.zeros(0, np.int64)
        # A text without any match of order m scores at most bleu_upper_bound(h, h, [t_1 .. t_(m-1), 0]) (BP <= 1,
        # c_n <= t_n, c_n = 0 from m on). Take the highest m for which that is below the threshold (m = 1 always
        # is: no common token, BLEU 0) and bound only the texts with c_m > 0: far fewer than all texts.
        m = 1
        while m < len(matched) and bleu_upper_bound(h, h, [h - n + 1 for n in range(1, m + 1)] + [0]) <= floor:
            m += 1
        alive = np.flatnonzero(matched[m - 1])
        return alive[bleu_upper_bound(h, self.lengths[alive], [c[alive] for c in matched]) > floor]


def find_leaks(queries: Sequence[tuple[str, str]], train_texts: Sequence[str], threshold: float = 20.0,
               progress: bool = True) -> LeakageReport:
    """Queries `(id, text)` whose sentence BLEU with some training text exceeds `threshold` (see the module doc)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (BLEU is in [0, 100]), got {threshold}")
    start = time.perf_counter()
    index = NgramIndex(train_texts, progress=progress)
    report = LeakageReport(threshold, pairs=len(queries) * len(train_texts), train_texts=len(train_texts),
                           distinct_train_texts=len(index.texts), index_seconds=time.perf_counter() - start)
    for qid, text in progress_bar(queries, desc="leakage: queries", unit="queries", disable=not progress, mininterval=0.5):
        best = None
        tokens = _tokens(index.metric, text)
        for u in index.candidates(tokens, threshold) if tokens else ():
            score = index.metric.sentence_score(text, [index.texts[u]]).score
            report.candidates += 1
            if score > threshold and (best is None or score > best[0]):
                best = (score, int(index.first_index[u]))
        _decide(report, qid, text, best, train_texts)
    report.seconds = time.perf_counter() - start
    return report


def brute_force_leaks(queries: Sequence[tuple[str, str]], train_texts: Sequence[str],
                      threshold: float = 20.0) -> LeakageReport:
    """The reference: every query against every training text through sacrebleu (slow; for tests and benches)."""
    start, metric = time.perf_counter(), _metric()
    report = LeakageReport(threshold, pairs=len(queries) * len(train_texts), train_texts=len(train_texts),
                           distinct_train_texts=len(set(train_texts)))
    for qid, text in queries:
        best = None
        for i, ref in enumerate(train_texts):
            score = metric.sentence_score(text, [ref]).score
            if score > threshold and (best is None or score > best[0]):
                best = (score, i)
        report.candidates += len(train_texts)
        _decide(report, qid, text, best, train_texts)
    report.seconds = time.perf_counter() - start
    return report


def _decide(report: LeakageReport, qid: str, text: str, best: tuple[float, int] | None, train: Sequence[str]) -> None:
    if best is None:
        report.kept.append(qid)
    else:
        report.removed.append(Leak(qid, best[0], train[best[1]], best[1], text))


# ----------------------------------------------------------------------------- inputs and the file-to-file run


def train_texts_from_records(records: Iterable[Record]) -> list[str]:
    """Every user turn of every record, in order (assistant turns are not compared)."""
    return [text for record in records for text in record.user_turns()]


def load_train_texts(path: str | Path) -> list[str]:
    """User turns of curated records: a `datasets.save_to_disk` folder (or a run's `data/` folder holding
    `curated/`), or a JSONL of the same rows. A bad JSONL line raises SourceFormatError naming `file:line`."""
    path = Path(path)
    if path.is_dir():
        import datasets

        folder = path / "curated" if (path / "curated").is_dir() else path
        return train_texts_from_records(Record.from_row(row) for row in datasets.load_from_disk(str(folder)))
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = Record.from_row(json.loads(line))
            if not all(isinstance(text, str) for text in record.user_turns()):
                raise TypeError("a turn's text is not a string")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceFormatError(f"{path}:{number}: not a curated record row ({type(exc).__name__}: {exc})") from None
        records.append(record)
    return train_texts_from_records(records)


def queries_from_prompts(prompts: Iterable) -> list[tuple[str, str]]:
    """`(f"{test_set}/{id}", instruction)` for koala_lib.inference.testsets.TestPrompt objects (ids are unique per test set only)."""
    return [(f"{p.test_set}/{p.id}", p.instruction) for p in prompts]


def load_queries(path: str | Path) -> list[tuple[str, str]]:
    """`(id, text)` from a Koala test set JSONL (`{"id", "prompt"}`) or a self-instruct one (`{"id", "instruction",
    "instances"}`: text joined with the first input as in koala_lib.inference.testsets). A bad line raises SourceFormatError."""
    from koala_lib.inference.testsets import BadRow, parse_row  # the kit's own row parser, so the texts match stage 4's

    path = Path(path)
    queries, seen = [], set()
    for number, line in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None  # parse_row names the problem
        try:
            prompt = parse_row(line, "koala" if isinstance(row, dict) and "prompt" in row else "alpaca")
        except BadRow as bad:
            raise SourceFormatError(f"{path}:{number}: {bad.reason}: {bad}") from None
        if prompt.id in seen:
            raise SourceFormatError(f"{path}:{number}: duplicate_id: id {prompt.id!r} is used on an earlier line")
        seen.add(prompt.id)
        queries.append((prompt.id, prompt.instruction))
    return queries


def run_leakage(queries_path: str | Path, train_path: str | Path, threshold: float, out_path: str | Path,
                progress: bool = True) -> LeakageReport:
    """`find_leaks` from files; writes `report.to_json()` to `out_path` (atomically)."""
    report = find_leaks(load_queries(queries_path), load_train_texts(train_path), threshold, progress)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(out_path, json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    return report
