"""Progress bars for the stage functions, shown in the terminal of `koala pipeline` and kept out of the notebooks.

    from koala_lib.progress import bar

    for row in bar(rows, desc=f"curate {name}", unit="rows", disable=not progress):
        ...
    with bar(total=len(prompts), desc=f"answers {who}", unit="prompt", disable=not progress) as b:
        ...
        b.set_postfix_str(f"{tokens / seconds:.0f} tok/s", refresh=False)  # shown with the next update
        b.update(1)

`bar` takes tqdm's arguments and returns a tqdm bar. Where the environment variable KOALA_PROGRESS is unset it
is the ordinary `tqdm.auto` bar (a widget in JupyterLab, a text bar in a terminal). Where KOALA_PROGRESS names
a file, as `koala pipeline` sets it for the kernel of every stage notebook, the bar appends plain lines to that
file instead, one per update at most every LINE_INTERVAL seconds plus one with the final counts on close:

    train koala_all: 6/10 step 60% [00:05<00:03, 1.20 step/s, loss 2.110, 115 tok/s]

and writes nothing to stdout or stderr, so the notebook's outputs stay free of progress lines. The pipeline
prints the file's new lines, prefixed with the stage id, while the notebook runs (see koala_lib/pipeline.py).
"""

from __future__ import annotations

import os
import threading
from typing import Iterable

from tqdm.std import tqdm as _std_tqdm

ENV = "KOALA_PROGRESS"
LINE_INTERVAL = 2.0  # seconds between two lines of one bar in the file (the last line is always written)



def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None, unit: str = "it",
        disable: bool = False, **kwargs) -> _std_tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`); lines to $KOALA_PROGRESS where that is set.

    Any other tqdm argument passes through (`initial`, `leave`, `unit_scale`, ...). `unit` is a plain word
    ("step", "rows", "prompt"). `disable=True` gives a silent bar, as tqdm's. Under KOALA_PROGRESS `mininterval`
    is at least LINE_INTERVAL, and `set_postfix`/`set_postfix_str` between two lines only change the next one.
    """
    unit = " " + (str(unit).strip() or "it")  # "12 rows/s", whether the caller wrote "rows" or " rows"
    path = os.environ.get(ENV)
    if path:
        return LineBar(iterable, total=total, desc=desc, unit=unit, disable=disable, path=path, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)


class _Discard:
    """Where tqdm's own terminal writes go (carriage returns, clearing, the newline on close): nowhere."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LineBar(_std_tqdm):
    """A tqdm bar that appends one complete line per display to the file `path` (opened on its first line)."""

    def __init__(self, iterable=None, *args, path: str | os.PathLike, **kwargs):
        self._path, self._sink, self._last_line_t, self._final = os.fspath(path), None, None, False
        self._last_state = None  # (n, postfix) of the last line: the final line is written when it differs
        self._broken = False  # the file could not be written: progress is dropped, the work goes on
        self._sink_lock = threading.Lock()
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), LINE_INTERVAL)
        for key in ("file", "ncols", "dynamic_ncols", "position"):  # terminal layout: nothing to lay out in a file
            kwargs.pop(key, None)
        super().__init__(iterable, *args, file=_Discard(), **kwargs)

    def __str__(self) -> str:
        """`desc: n/total unit pct% [elapsed<remaining, rate, postfix]`; without a total `desc: n unit [elapsed, rate, postfix]`."""
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"].strip()
        rate = d["rate"] if d["rate"] is not None else ((n - d["initial"]) / elapsed if elapsed else None)
        head = f"{d['prefix']}: " if d.get("prefix") else ""
        times = self.format_interval(elapsed)
        if total:
            head += f"{_num(n)}/{_num(total)} {unit} {100 * n / total:.0f}%"
            times += "<" + (self.format_interval(max(total - n, 0) / rate) if rate else "?")
        else:
            head += f"{_num(n)} {unit}"
        speed = "? " + unit + "/s" if not rate else (f"{_num(rate)} {unit}/s" if rate >= 1 else f"{_num(1 / rate)} s/{unit}")
        return f"{head} [{', '.join(p for p in (times, speed, d.get('postfix') or '') if p)}]"

    def display(self, msg=None, pos=None):
        if msg == "" or self._final:  # tqdm clearing its line; nothing to clear in a file
            return True
        now = self._time()
        if self._last_line_t is not None and now - self._last_line_t < self.mininterval:
            return True  # set_postfix/refresh between two updates: the next line shows it
        self._last_line_t = now
        self._write(self.__str__() if msg is None else msg)
        return True

    def moveto(self, n):
        pass

    def clear(self, nolock=False):
        pass

    def close(self):
        if getattr(self, "disable", True):
            return
        try:
            if getattr(self, "last_print_t", None) is not None and self._last_state != (self.n, self.postfix):
                self._ema_dt = lambda: None  # the average rate over the whole run, as tqdm shows on close
                self._write(self.__str__())
        finally:
            self._final = True
            super().close()
            with self._sink_lock:
                if self._sink is not None:
                    self._sink.close()
                    self._sink = None

    def _write(self, line: str) -> None:
        self._last_state = (self.n, self.postfix)
        line = " ".join(line.split())  # one line, whatever desc or postfix held
        with self._sink_lock:
            if self._broken:
                return
            try:
                if self._sink is None:
                    self._sink = open(self._path, "a", encoding="utf-8", buffering=1)
                self._sink.write(line + "\n")
            except OSError:
                self._broken = True


def _num(x: float) -> str:
    """12, 1,234, 3.5, 0.25, 12.3: counts as integers, rates with about three significant digits."""
    if x == int(x) and abs(x) >= 1 or x == 0:
        return f"{int(x):,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
