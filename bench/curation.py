"""Benchmark: the full ShareGPT cleaning on a ShareGPT-sized synthetic dump.

Synthesizes N conversations (default 90,000) in the raw dump format, with ChatGPT-HTML answers (paragraphs,
lists, code blocks with the copy toolbar, tables), 20 % duplicate first queries and 10 % non-English
conversations, then runs stage 1 on it exactly as `koala curate --sources sharegpt` does (read, parse,
HTML → markdown, keyword, language, dedup, split, write). The baseline, run in the same process on a sample
of the same answers, is markdownify (BeautifulSoup), the converter the community's ShareGPT cleaners use.

    python bench/curation.py [--n 90000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record_section  # noqa: E402

WORDS = {
    "en": "the model learns to answer questions about data code travel food history science music with clear steps and examples "
    "while users ask for help writing emails planning trips fixing bugs and explaining ideas in simple words".split(),
    "fr": "le modèle apprend à répondre aux questions sur les données le code les voyages la cuisine avec des étapes claires "
    "et des exemples pendant que les utilisateurs demandent de l'aide pour écrire des courriels".split(),
    "de": "das Modell lernt Fragen über Daten Code Reisen Essen und Geschichte mit klaren Schritten und Beispielen zu beantworten "
    "während die Nutzer um Hilfe beim Schreiben von Nachrichten und beim Planen bitten".split(),
    "es": "el modelo aprende a responder preguntas sobre datos código viajes comida e historia con pasos claros y ejemplos "
    "mientras los usuarios piden ayuda para escribir correos y planear viajes".split(),
}
TOOLBAR = (
    '<div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 bg-gray-800 px-4 py-2 '
    'text-xs font-sans"><span class="">{lang}</span><button class="flex ml-auto gap-2"><svg stroke="currentColor"></svg>'
    "Copy code</button></div>"
)


def sentence(rng: random.Random, lang: str, n: int) -> str:
    words = WORDS[lang]
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def html_answer(rng: random.Random, lang: str) -> str:
    parts = [f"<p>{sentence(rng, lang, rng.randint(12, 30))} <strong>{sentence(rng, lang, 3)}</strong></p>"]
    items = "".join(f"<li><p>{sentence(rng, lang, rng.randint(6, 14))} <code>x{i}</code></p></li>" for i in range(rng.randint(2, 5)))
    parts.append(f"<ol>{items}</ol>")
    if rng.random() < 0.4:
        code = "\n".join(f'<span class="hljs-keyword">def</span> f{i}(x):\n    <span class="hljs-keyword">return</span> x &lt; {i}' for i in range(rng.randint(2, 6)))
        parts.append(f'<pre>{TOOLBAR.format(lang="python")}<div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python">{code}</code></div></div></pre>')
    if rng.random() < 0.15:
        rows = "".join(f"<tr><td>{rng.choice(WORDS[lang])}</td><td>{i}</td></tr>" for i in range(4))
        parts.append(f"<table><thead><tr><th>name</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>")
    parts.append(f"<p>{sentence(rng, lang, rng.randint(8, 20))}</p>")
    return '<div class="markdown prose w-full break-words dark:prose-invert light">' + "".join(parts) + "</div>"


def synthesize(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, queries = [], []
    for i in range(n):
        lang = rng.choice(["fr", "de", "es"]) if rng.random() < 0.10 else "en"
        duplicate = lang == "en" and bool(queries) and rng.random() < 0.20 / 0.90  # 20 % of all conversations
        turns = []
        for k in range(rng.randint(1, 4)):
            if k == 0 and duplicate:
                query = rng.choice(queries).upper()  # a duplicate, differently cased
            else:
                query = f"{sentence(rng, lang, rng.randint(6, 20))} ({i}.{k})"
                if k == 0 and lang == "en":
                    queries.append(query)
            turns += [{"from": "human", "value": query}, {"from": "gpt", "value": html_answer(rng, lang)}]
        rows.append({"id": f"syn{i}_0", "conversations": turns})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=90_000, help="conversations to synthesize")
    parser.add_argument("--baseline-sample", type=int, default=2_000, help="answers converted by the baseline")
    args = parser.parse_args()

    from markdownify import markdownify

    from koala_lib.config import load
    from koala_lib.data.curate import curate
    from koala_lib.data.html2md import html_to_markdown

    t = time.perf_counter()
    rows = synthesize(args.n)
    answers = [turn["value"] for row in rows for turn in row["conversations"] if turn["from"] == "gpt"]
    print(f"synthesized {len(rows):,} conversations, {len(answers):,} HTML answers in {time.perf_counter() - t:.1f} s")

    sample = answers[: args.baseline_sample]
    t = time.perf_counter()
    for html in sample:
        markdownify(html)
    base_rate = len(sample) / (time.perf_counter() - t)
    t = time.perf_counter()
    for html in sample:
        html_to_markdown(html)
    ours_rate = len(sample) / (time.perf_counter() - t)
    print(f"HTML→markdown: koala_lib {ours_rate:,.0f} answers/s vs markdownify {base_rate:,.0f} answers/s = {ours_rate / base_rate:.1f}x")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sg_synthetic.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        size_mb = path.stat().st_size / 2**20
        cfg = load("demo", [f"runs_dir={tmp}/runs", f"figures_dir={tmp}/fig", "data.mixture=sharegpt", f"data.sources.sharegpt.path={path}"])
        t = time.perf_counter()
        result = curate(cfg, progress=False)
        seconds = time.perf_counter() - t
    rep = result.report["sources"]["sharegpt"]
    rate = rep["read"] / seconds
    print(f"ShareGPT cleaning: {rep['read']:,} conversations ({size_mb:.0f} MB) in {seconds:.1f} s = {rate:,.0f} conversations/s; "
          f"kept {rep['kept']:,}, rejected {rep['rejected']}")
    goal = "met" if seconds < 180 else "NOT met"
    record_section(
        "curation",
        "Stage 1: ShareGPT cleaning (bench/curation.py)",
        [
            f"Input: {rep['read']:,} synthetic conversations in the raw dump format ({size_mb:.0f} MB, {len(answers):,} HTML answers, "
            "20 % duplicate first queries, 10 % non-English).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| full cleaning (read, parse, HTML→markdown, keyword, language, dedup, split, write) | {seconds:.1f} s, {rate:,.0f} conversations/s |",
            f"| goal: 90K conversations in under 3 minutes | {goal} |",
            f"| kept / rejected | {rep['kept']:,} / {sum(rep['rejected'].values()):,} {dict(rep['rejected'])} |",
            f"| HTML→markdown, koala_lib vs markdownify (baseline, same process, {len(sample):,} answers) | {ours_rate:,.0f} vs {base_rate:,.0f} answers/s = **{ours_rate / base_rate:.1f}x** |",
        ],
        headline=[
            (f"stage 1, full ShareGPT cleaning of a {rep['read']:,}-conversation dump ({size_mb:.0f} MB, HTML answers)",
             f"{seconds:.1f} s, {rate:,.0f} conversations/s (goal: under 3 minutes)"),
            ("HTML → markdown, the kit's lxml tree walk vs markdownify", f"{ours_rate / base_rate:.1f}x faster"),
        ],
    )


if __name__ == "__main__":
    main()
