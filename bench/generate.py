"""Benchmark: decoding speed of SmolLM2-135M, the kit (JAX, KV cache) against transformers' `generate` (PyTorch).

Greedy, fp32, same prompts and threads, in this one script: tokens per second at batch 1 and batch 16 (new tokens
counted on each side, prefill included), then the kit's server with 8 concurrent clients of the official
`openai` client. On a GPU it also reports batch-1 decode against the memory-bandwidth limit (weight bytes
read per token / bandwidth).

    python bench/generate.py [--new-tokens 64] [--repeats 2] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_forward import interleaved  # noqa: E402
from results import record_section  # noqa: E402

# Story openings: a base-style model rarely ends them within a few dozen tokens, so both sides decode the full length.
OPENINGS = [
    "The old lighthouse keeper climbed the stairs one last time and",
    "In the spring of 1887, a young engineer arrived in the city with",
    "Every morning the baker on Elm Street opened his shop before dawn, and",
    "The spaceship drifted silently past the rings of Saturn while",
    "My grandmother kept a small wooden box under her bed, and inside it",
    "When the river flooded the valley, the villagers gathered on the hill and",
    "The detective examined the broken window carefully, noticing that",
    "Long ago, in a kingdom surrounded by mountains, there lived a",
]


def prompts(n: int) -> list[str]:
    return [OPENINGS[i % len(OPENINGS)] + ("" if i < len(OPENINGS) else " then") for i in range(n)]


def kit_runner(gen, texts: list[str], new_tokens: int):
    from koala_lib.inference.generate import Sampling

    sampling = Sampling(max_new_tokens=new_tokens, stop=())
    counted = {}

    def run():
        outs = gen.generate(texts, sampling)
        counted["tokens"] = sum(len(o.tokens) for o in outs)

    return run, counted


def hf_runner(model, tokenizer, texts: list[str], new_tokens: int):
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    counted = {}

    def run():
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        eos = tokenizer.eos_token_id
        counted["tokens"] = int(sum((row != eos).cumprod(0).sum() for row in new))  # tokens before the first EOS

    return run, counted


def server_throughput(gen, template, clients: int, requests: int, new_tokens: int, rounds: int = 3) -> tuple[float, int]:
    """(best tokens/s over `rounds`, tokens per round) for `requests` chat requests sent by `clients` concurrent
    openai clients."""
    from openai import OpenAI

    from koala_lib.inference.serve import create_app, serving

    with serving(create_app(gen, template, model_name="bench")) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)

        def ask(i: int) -> int:
            out = client.chat.completions.create(model="bench", max_tokens=new_tokens, temperature=0,
                                                 messages=[{"role": "user", "content": prompts(requests)[i]}])
            return out.usage.completion_tokens

        with ThreadPoolExecutor(clients) as pool:  # a first round compiles the batch shapes the server will see
            list(pool.map(ask, range(requests)))
        best = 0.0
        for _ in range(rounds):  # how requests fall into batches depends on timing: a round may meet a new shape
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(ask, range(requests)))
            best = max(best, tokens / (time.perf_counter() - start))
        return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from koala_lib.conditioning.template import template_for
    from koala_lib.config import load
    from koala_lib.inference.generate import Generator
    from koala_lib.model.checkpoints import load_hf
    from koala_lib.model.gguf_default import default_model_dir

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gen = Generator(load_hf(folder), tokenizer, max_batch=16)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # Both batch sizes of both sides in one interleaved run: the batch-16 / batch-1 ratio then compares runs made
    # under the same machine conditions, not two measurements minutes apart.
    runners, counts = [], []
    for batch in (1, 16):
        texts = prompts(batch)
        for run, counted in (kit_runner(gen, texts, args.new_tokens), hf_runner(hf, AutoTokenizer.from_pretrained(folder), texts, args.new_tokens)):
            runners.append(run)
            counts.append(counted)
    seconds = interleaved(runners, args.repeats, rounds=3)
    rates = {}
    for i, batch in enumerate((1, 16)):
        kit_n, ref_n = counts[2 * i]["tokens"], counts[2 * i + 1]["tokens"]
        rates[batch] = (kit_n / seconds[2 * i], ref_n / seconds[2 * i + 1], kit_n, ref_n)
        print(f"batch {batch}: kit {rates[batch][0]:.1f} tok/s, transformers {rates[batch][1]:.1f} tok/s", flush=True)
    template = template_for(load("demo"), tokenizer)
    served, served_tokens = server_throughput(gen, template, args.clients, 2 * args.clients, args.new_tokens)

    lines = [
        f"SmolLM2-135M, greedy, fp32, {args.new_tokens} new tokens per prompt (story openings, prefill included), "
        f"{threads} threads, on {jax.devices()[0].platform}.",
        "",
        "| batch | kit tokens/s | transformers tokens/s | kit / transformers |",
        "|---:|---:|---:|---:|",
        *(f"| {b} | {k:,.1f} | {r:,.1f} | {k / r:.2f}x |" for b, (k, r, _, _) in rates.items()),
        "",
        f"Goals: batch 1 at least 1.5x transformers (**{rates[1][0] / rates[1][1]:.2f}x**); batch 16 at least 5x batch 1 in "
        f"total tokens/s (**{rates[16][0] / rates[1][0]:.1f}x**).",
        f"Server (`koala serve` app, {args.clients} concurrent openai clients, {2 * args.clients} chat requests of up to "
        f"{args.new_tokens} tokens, best of 3 rounds): **{served:,.1f} tokens/s** ({served_tokens} tokens).",
    ]
    if jax.default_backend() == "gpu":
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(gen.state))
        bandwidth = float(os.environ.get("KOALA_GPU_BANDWIDTH_GBS", "3350")) * 1e9  # H100 SXM HBM3
        limit = bandwidth / weight_bytes
        lines.append(f"Batch-1 decode against the memory-bandwidth limit ({weight_bytes / 1e6:.0f} MB of weights / "
                     f"{bandwidth / 1e9:.0f} GB/s = {limit:,.0f} tokens/s): {rates[1][0] / limit:.1%}.")
    print("\n".join(lines))
    if not args.no_record:
        b1, b16 = rates[1], rates[16]
        record_section("generate", "Generation: kit vs transformers (bench/generate.py)", lines, headline=[
            ("greedy decoding, SmolLM2-135M fp32, batch 1, vs transformers `generate`, same threads",
             f"{b1[0] / b1[1]:.2f}x ({b1[0]:.1f} vs {b1[1]:.1f} tokens/s; goal >= 1.5x)"),
            ("the same at batch 16", f"{b16[0]:.1f} tokens/s, {b16[0] / b16[1]:.2f}x transformers; {b16[0] / b1[0]:.1f}x the kit's "
             f"batch 1 (goal >= 5x{'' if b16[0] >= 5 * b1[0] else ' not met'})"),
            (f"`koala serve`, {args.clients} concurrent openai clients, {2 * args.clients} chat requests of up to {args.new_tokens} tokens",
             f"{served:,.0f} tokens/s"),
        ])


if __name__ == "__main__":
    main()
