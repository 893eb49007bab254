"""Figures. Each function returns a matplotlib Figure; `save` writes it reproducibly (fixed dpi, no metadata).

Figures are built with `Figure()` rather than pyplot, so nothing is kept in global state and a notebook shows
each figure once, where the cell returns it.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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


def token_lengths(lengths_by_source: dict[str, list[int]], seq_len: int) -> Figure:
    """Tokens per training example, one box per source, with the packing row length marked."""
    sources = [s for s, v in lengths_by_source.items() if v]
    fig = Figure(figsize=(9, 0.45 * len(sources) + 1.6), layout="constrained")
    ax = fig.subplots()
    data = [lengths_by_source[s] for s in sources]
    ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=True, flierprops={"markersize": 3, "alpha": 0.5})
    ax.set_yticks(range(1, len(sources) + 1), [f"{s} (n={len(v):,})" for s, v in zip(sources, data)])
    ax.invert_yaxis()
    ax.axvline(seq_len, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(seq_len, 0.5, f" seq_len {seq_len}", color="#c0392b", fontsize=8, va="top")
    ax.set_xlabel("tokens per example")
    ax.set_title("Token lengths per source (after cutting at turn boundaries)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def packing_efficiency(table: dict[str, list], seq_len: int) -> Figure:
    """Share of positions holding real tokens, packed rows vs one padded example per row, for several row lengths:
    `table` as conditioning.packing.packing_table gives it."""
    import numpy as np

    sizes, packed, padded = table["row_length"], table["packed"], table["padded"]
    fig = Figure(figsize=(8, 4.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(sizes))
    ax.bar(x - 0.2, padded, width=0.4, color=BEFORE, label="one example per row, padded")
    ax.bar(x + 0.2, packed, width=0.4, color=AFTER, label="packed (segment ids)")
    for i, (a, b) in enumerate(zip(padded, packed)):
        ax.text(i - 0.2, a + 1, f"{a:.0f}%", ha="center", fontsize=8)
        ax.text(i + 0.2, b + 1, f"{b:.1f}%", ha="center", fontsize=8)
    ax.set_xticks(x, [f"{s}{' (profile)' if s == seq_len else ''}" for s in sizes])
    ax.set_xlabel("row length (tokens)")
    ax.set_ylabel("real tokens (% of positions)")
    ax.set_ylim(0, 110)
    ax.set_title("Packing efficiency: how much of each row is real data", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def loss_curves(runs: dict[str, tuple[list[dict], list[dict]]]) -> Figure:
    """Training loss per step (thin) and eval loss (markers), one colour per variant; {variant: (train rows, eval rows)}."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = ("#2f6db3", "#c0392b", "#27ae60", "#8e44ad", "#d68910")
    for (variant, (train, evals)), color in zip(runs.items(), colors):
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, linewidth=1.2, alpha=0.85, label=f"{variant} train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color=color, linestyle="--", marker="o",
                    markersize=5, label=f"{variant} eval (held-out)")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("cross-entropy per trained token (nats)")
    ax.set_title("Fine-tuning loss: answer tokens only, averaged over each batch's targets", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig


def example_answers(examples: list[dict], width: int = 95, max_chars: int = 360) -> Figure:
    """Prompts with each model's answer side by side in text: [{test_set, instruction, answers{model: text}}]."""
    import textwrap

    def block(text: str, indent: str = "") -> list[str]:
        text = " ".join(text.split())
        text = text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"
        return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent) or [indent + "(empty)"]

    colors = ("#555555", "#2f6db3", "#c0392b", "#27ae60", "#8e44ad", "#d68910")
    lines: list[tuple[str, str, str]] = []  # (text, colour, weight)
    for ex in examples:
        lines += [(t, "black", "bold") for t in block(f"[{ex['test_set']}] {ex['instruction']}")]
        for (model, answer), color in zip(ex["answers"].items(), colors):
            lines.append((f"{model}:", color, "bold"))
            lines += [(t, color, "normal") for t in block(answer, "    ")]
        lines.append(("", "black", "normal"))
    fig = Figure(figsize=(10, 0.19 * len(lines) + 0.8), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title("Example answers of every model (first prompts of each test set)", fontsize=10, loc="left")
    for i, (text, color, weight) in enumerate(lines):
        ax.text(0.0, 1.0 - (i + 0.5) / len(lines), text, color=color, fontweight=weight, fontsize=8.5, family="monospace",
                va="center", ha="left", transform=ax.transAxes)
    return fig


WIN, TIE, LOSE = "#3a8f5c", "#c9c9c9", "#c0504d"
TEST_SET_TITLES = {"alpaca": "Alpaca test set", "koala": "Koala test set"}


def _win_tie_lose_panel(ax, rows: list[dict], title: str) -> None:
    """Stacked horizontal bars (better | tied | worse, in %) for one test set; whiskers where a row has intervals."""
    if not rows:
        ax.text(50, 1, "no judgments", ha="center", va="center", fontsize=10, color="#777777")
        ax.set_yticks([])
        ax.set_xlim(0, 100)
        ax.set_ylim(2.6, -0.6)
        ax.set_xlabel("% of judgments")
        ax.set_title(title, fontsize=10)
        return
    labels = [r["label"] for r in rows]
    y = list(range(len(rows)))
    better = [r["better"] for r in rows]
    tie = [r["tie"] for r in rows]
    worse = [r["worse"] for r in rows]
    ax.barh(y, better, height=0.7, color=WIN, label="better")
    ax.barh(y, tie, height=0.7, left=better, color=TIE, label="tied")
    ax.barh(y, worse, height=0.7, left=[b + t for b, t in zip(better, tie)], color=LOSE, label="worse")
    for i, r in enumerate(rows):
        for value, left in ((r["better"], 0), (r["tie"], r["better"]), (r["worse"], r["better"] + r["tie"])):
            if value >= 7:
                ax.text(left + value / 2, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color="black")
        if "better_ci" in r:  # interval of the better share at the end of its bar, of the worse share at its start
            lo, hi = r["better_ci"]
            ax.errorbar(r["better"], i - 0.18, xerr=[[r["better"] - lo], [hi - r["better"]]], color="#1d4a2f", capsize=3, lw=1.2)
            lo, hi = r["worse_ci"]
            edge = 100 - r["worse"]
            ax.errorbar(edge, i + 0.18, xerr=[[hi - r["worse"]], [r["worse"] - lo]], color="#5e1f1d", capsize=3, lw=1.2)
        if "n" in r:
            ax.text(101, i, f"n={r['n']}", va="center", fontsize=7, color="#555555")
    ax.set_yticks(y, labels)
    ax.set_ylim(max(len(rows), 3) - 0.4, -0.6)  # top to bottom; a lone bar keeps the height of one of three
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of judgments" + (" (whiskers: 95 % prompt-bootstrap intervals)" if any("better_ci" in r for r in rows) else ""))
    ax.set_title(title, fontsize=10)


def win_tie_lose(panels: dict[str, list[dict]], title: str, fig: Figure | None = None, row: int = 0, rows: int = 1) -> Figure:
    """The Koala blog's layout: one panel per test set, a stacked better / tied / worse bar per opponent.

    `panels` maps a test set (`alpaca`, `koala`) to rows `{"label", "better", "tie", "worse"}` in percent, with
    optional `better_ci` / `worse_ci` (drawn as whiskers) and `n`. Used for the published numbers and for the
    kit's own results, so the two can be read side by side (see `blog_comparison`)."""
    fig = fig or Figure(figsize=(11, 0.45 * max(3, *(len(v) for v in panels.values())) + 1.8), layout="constrained")
    sets = [s for s in ("alpaca", "koala") if s in panels] + [s for s in panels if s not in ("alpaca", "koala")]
    axes = fig.add_gridspec(rows, len(sets)).subplots()
    axes = axes.reshape(rows, len(sets))[row] if rows > 1 or len(sets) > 1 else [axes]
    for ax, name in zip(axes, sets):
        _win_tie_lose_panel(ax, panels[name], f"{title}: {TEST_SET_TITLES.get(name, name)}")
    drawn = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), None)
    if drawn is not None:
        axes[-1].legend(*drawn.get_legend_handles_labels(), loc="lower right", bbox_to_anchor=(1.0, 1.08), ncol=3,
                        fontsize=8, frameon=False)
    return fig


def blog_comparison(published: dict[str, list[dict]], ours: dict[str, list[dict]], published_title: str,
                    ours_title: str, note: str = "", stamp: str = "") -> Figure:
    """The blog's figure re-drawn from its numbers (top) and the kit's results in the same layout (bottom), with
    an optional `note` under the bottom half (e.g. how many of the judge's ties were missing verdicts) and a
    `stamp` across each bottom panel (e.g. "JUDGE UNFIT": the bars are computed, but not to be believed)."""
    n = max(3, *(len(v) for v in (*published.values(), *ours.values())))
    fig = Figure(figsize=(11, 2 * (0.45 * n + 1.6)), layout="constrained")
    grid = fig.add_gridspec(2, 1)
    top, bottom = fig.add_subfigure(grid[0]), fig.add_subfigure(grid[1])
    win_tie_lose(published, published_title, top)
    win_tie_lose(ours, ours_title, bottom)
    if note:
        bottom.supxlabel(note, fontsize=8, color="#555555")
    for ax in bottom.axes if stamp else ():
        ax.text(0.5, 0.5, stamp, transform=ax.transAxes, ha="center", va="center", rotation=15, fontsize=20,
                fontweight="bold", color="#b22222", alpha=0.45, zorder=10,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "#b22222", "alpha": 0.6})
    return fig
