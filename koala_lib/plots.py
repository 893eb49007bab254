"""Figures. Each function returns a matplotlib Figure; `save` writes it reproducibly (fixed dpi, no metadata).

Figures are built with `Figure()` rather than pyplot, so nothing is kept in global state and a notebook shows
each figure once, where the cell returns it.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 120
BEFORE, AFTER = "#b8c4d6", "#2f6db3"


def save(fig: Figure, path: str | Path) -> Path:
    """Save as PNG at a fixed dpi with no software or date metadata, so the bytes depend only on the content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def data_composition(report: dict) -> Figure:
    """Examples and characters per source, before and after filtering (stage 1 report)."""
    sources = list(report["sources"])
    reps = [report["sources"][s] for s in sources]
    fig = Figure(figsize=(11, 0.5 * len(sources) + 1.8))
    ax_n, ax_c = fig.subplots(1, 2, sharey=True)
    y = range(len(sources))
    h = 0.38
    for ax, before, after, label in (
        (ax_n, [r["read"] for r in reps], [r["records"] for r in reps], "examples"),
        (ax_c, [r["chars_before"] / 1e6 for r in reps], [r["chars_after"] / 1e6 for r in reps], "characters (millions)"),
    ):
        ax.barh([i - h / 2 for i in y], before, height=h, color=BEFORE, label="before filtering")
        ax.barh([i + h / 2 for i in y], after, height=h, color=AFTER, label="after filtering")
        for i, (b, a) in enumerate(zip(before, after)):
            ax.text(a, i + h / 2, f" {a:,.0f}" if label == "examples" else f" {a:.2f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    ax_n.set_yticks(list(y), sources)
    ax_n.invert_yaxis()
    ax_n.set_title("Examples per source: rows read vs records kept", fontsize=10)
    ax_c.set_title("Characters per source: parsed vs kept", fontsize=10)
    ax_n.legend(loc="lower right", fontsize=8)
    total = report["totals"]
    fig.suptitle(
        f"Curated data, profile {report['profile']!r} ({report['mixture']}): "
        f"{total['records']:,} records from {total['read']:,} rows",
        fontsize=11,
    )
    fig.tight_layout()
    return fig
