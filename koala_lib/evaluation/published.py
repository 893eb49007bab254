"""The Koala blog's human evaluation, carried as data with its provenance.

    BLOG.panels["koala"]["Alpaca"]      # (better, tied, worse) percent for Koala-All vs Alpaca, Koala test set

Source: "Koala: A Dialogue Model for Academic Research", BAIR blog, 3 April 2023, the figure of blind pairwise
human judgments (about 100 raters) of Koala-13B trained on all data ("Koala-All") against each opponent, on the
Alpaca test set and the Koala test set. The blog gives these numbers only as a bar chart: they were measured from
the published figure, so each is good to about +/-0.5 points, and the bars are drawn at whole percents. The blog
gives no counts of judgments per bar, so no interval can be recomputed for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PublishedResults:
    model: str  # the model every bar is about
    panels: dict[str, dict[str, tuple[int, int, int]]]  # test set -> opponent -> (better, tied, worse) %
    source: str
    url: str
    precision: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def rows(self) -> list[dict]:
        return [{"test_set": t, "opponent": o, "better": b, "tie": tie, "worse": w}
                for t, bars in self.panels.items() for o, (b, tie, w) in bars.items()]


BLOG = PublishedResults(
    model="Koala-All",
    panels={
        "alpaca": {"Alpaca": (32, 38, 30), "Koala-Distill": (26, 28, 46), "ChatGPT": (31, 29, 40)},
        "koala": {"Alpaca": (48, 22, 30), "Koala-Distill": (34, 26, 40), "ChatGPT": (30, 26, 44)},
    },
    source="BAIR blog, 'Koala: A Dialogue Model for Academic Research' (2023-04-03), human evaluation figure",
    url="https://bair.berkeley.edu/blog/2023/04/03/koala/",
    precision="measured from the published figure: about +/-0.5 points; bars drawn at whole percents",
    notes=(
        "Koala-All: Koala-13B fine-tuned on all data; Koala-Distill: on the ChatGPT-distilled data only",
        "test queries whose BLEU with any training example exceeded 20 were removed before judging",
        "the blog's 180-prompt Alpaca test set subset was never published",
    ),
)
