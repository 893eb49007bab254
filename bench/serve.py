"""Benchmark: `koala serve` with continuous batching against the static batcher, 32 concurrent openai clients.

SmolLM2-135M, fp32, greedy; 16 slots (rows decoded together) in both modes. Each client sends its requests one
after another (a closed loop), each with its own `max_tokens` drawn once from 16 to 256, so that both modes
answer exactly the same requests. Story openings as prompts: a base-style continuation rarely ends early, so an
answer's length is its `max_tokens`. Reported per mode: completion tokens per second over the whole round, and
the p50 / p95 latency of a request (sent to last byte). The modes run one after the other in this process, each
after a warm-up round that compiles its shapes.

    python bench/serve.py [--clients 32] [--requests 2] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import OPENINGS  # noqa: E402
from results import record_section  # noqa: E402


def workload(clients: int, per_client: int, seed: int = 0) -> list[list[tuple[str, int]]]:
    """Per client, its (prompt, max_tokens) requests in order."""
    rng = random.Random(seed)
    return [[(OPENINGS[(c + j) % len(OPENINGS)], rng.randint(16, 256)) for j in range(per_client)] for c in range(clients)]


def run_round(url: str, plan: list[list[tuple[str, int]]]) -> tuple[float, int, list[float]]:
    """(seconds, completion tokens, request latencies) of every client running its plan concurrently."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def one(requests: list[tuple[str, int]]) -> None:
        for prompt, max_tokens in requests:
            start = time.perf_counter()
            out = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0)
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += out.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(requests,)) for requests in plan]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, tokens[0], latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the measured round")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import jax
    from transformers import AutoTokenizer

    from koala_lib.conditioning.template import template_for
    from koala_lib.config import load
    from koala_lib.inference.generate import Generator
    from koala_lib.inference.serve import create_app, serving
    from koala_lib.model.checkpoints import load_hf
    from koala_lib.model.gguf_default import default_model_dir

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_hf(folder)
    template = template_for(load("demo"), tokenizer)
    plan = workload(args.clients, args.requests)
    warm = workload(args.clients, 1, seed=1)
    found = {}
    for mode in ("static", "continuous"):
        gen = Generator(model, tokenizer, max_batch=args.slots)  # a fresh generator: nothing compiled carries over
        with serving(create_app(gen, template, model_name="bench", batching=mode, max_batch=args.slots, max_queue=4 * args.clients)) as url:
            run_round(url, warm)
            seconds, tokens, latencies = run_round(url, plan)
        found[mode] = (tokens / seconds, percentile(latencies, 0.5), percentile(latencies, 0.95), tokens, seconds)
        print(f"{mode}: {tokens / seconds:.1f} tokens/s, p50 {found[mode][1]:.1f} s, p95 {found[mode][2]:.1f} s "
              f"({tokens} tokens in {seconds:.0f} s)", flush=True)

    (st, s50, s95, _, _), (ct, c50, c95, tokens, _) = found["static"], found["continuous"]
    lines = [
        f"SmolLM2-135M, fp32, greedy, {args.slots} slots, {args.clients} concurrent openai clients, {args.requests} requests each "
        f"(closed loop), `max_tokens` drawn once from 16 to 256 ({tokens} completion tokens per mode), story openings; "
        f"{os.cpu_count()} threads on {jax.devices()[0].platform}; each mode after a warm-up round.",
        "",
        "| batching | tokens/s | p50 latency | p95 latency |",
        "|---|---:|---:|---:|",
        f"| static (what waits is decoded together to its longest answer) | {st:,.1f} | {s50:.1f} s | {s95:.1f} s |",
        f"| continuous (rows leave and join between decode steps) | {ct:,.1f} | {c50:.1f} s | {c95:.1f} s |",
        "",
        f"Continuous / static: **{ct / st:.2f}x** tokens/s (goal >= 2x), p50 latency **{c50 / s50:.2f}x** (goal <= 0.5x), "
        f"p95 {c95 / s95:.2f}x.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record_section("serve", "Serving: continuous against static batching (bench/serve.py)", lines, headline=[
            (f"`koala serve`, SmolLM2-135M, {args.clients} concurrent openai clients, max_tokens 16-256: continuous vs static batching",
             f"{ct / st:.2f}x tokens/s ({ct:.0f} vs {st:.0f}; goal >= 2x), p50 latency {c50 / s50:.2f}x ({c50:.1f} vs {s50:.1f} s; goal <= 0.5x)"),
        ])


if __name__ == "__main__":
    main()
