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
    """Rows and characters per source, before and after filtering (stage 1 report)."""
    sources = list(report["sources"])
    reps = [report["sources"][s] for s in sources]
    fig = Figure(figsize=(11, 0.5 * len(sources) + 2.0), layout="constrained")
    ax_n, ax_c = fig.subplots(1, 2, sharey=True)
    y = range(len(sources))
    h = 0.38
    scale, suffix = (1e6, "M") if max(r["chars_before"] for r in reps) >= 1e6 else (1e3, "K")
    panels = (
        (ax_n, [r["read"] for r in reps], [r["kept"] for r in reps], "rows", ("before filtering", "after filtering")),
        (ax_c, [r["chars_before"] / scale for r in reps], [r["chars_after"] / scale for r in reps],
         f"characters ({'millions' if suffix == 'M' else 'thousands'})", ("before filtering", "after filtering")),
    )
    for ax, before, after, unit, (label_before, label_after) in panels:
        ax.barh([i - h / 2 for i in y], before, height=h, color=BEFORE, label=label_before)
        ax.barh([i + h / 2 for i in y], after, height=h, color=AFTER, label=label_after)
        for i, (b, a) in enumerate(zip(before, after)):
            if unit == "rows":
                note = f" {a:,} kept of {b:,} → {reps[i]['records']:,} records"
            else:
                note = f" {a:,.1f}{suffix} of {b:,.1f}{suffix}"
            ax.text(max(a, b), i + h / 2, note, va="center", fontsize=8)
        ax.set_xlabel(unit)
        ax.set_xlim(0, max(before + after + [1e-9]) * 1.45)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    ax_n.set_yticks(list(y), sources)
    ax_n.invert_yaxis()
    ax_n.set_title("Rows per source (a preference pair gives two records)", fontsize=10)
    ax_c.set_title("Characters of conversation text per source", fontsize=10)
    total = report["totals"]
    fig.suptitle(
        f"Curated data, profile {report['profile']!r} ({report['mixture']}): "
        f"{total['records']:,} records from {total['read']:,} rows",
        fontsize=11,
    )
    fig.legend(*ax_n.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig
