"""Benchmark: `peftkit serve` under N concurrent clients over K LoRA adapters, against a naive HF peft loop.

On the bundled SmolLM2-135M-Instruct (or `--tiny`, conftest's tiny Llama), K random LoRA adapters (r=8, alpha=16,
all linear layers of the blocks, B ~ N(0, 0.02)) saved in peft's layout:

* **peftkit serve**: the server in this process on loopback; N client threads send one streamed chat request
  each, all at once, request i for adapter i mod K, through the `openai` client; the requests admitted together
  are prefilled in one forward pass;
* **peftkit serve, prefill one at a time**: the same, the engine prefilling each admitted request alone
  (``Engine(max_prefill_tokens=1)``, how it worked before): what batching the prefill saves;
* **naive peft loop**: transformers + peft, all K adapters loaded in one `PeftModel`, the same N requests one at a
  time in arrival order (`set_adapter`, then `generate`): what serving with HF peft does without a batcher.

All greedy, fp32, at most `--new-tokens` new tokens, stopping at EOS. Every request arrives at t = 0, so a request's
latency (and its time to the first token) includes its wait. Throughput is completion tokens over the wall time of
all N; the engine's prefill time is the time inside its prefill forward passes. The answers are compared with the
naive loop's (they should be equal). Writes section "serve" of BENCHMARKS.md (not with `--print-only`).

    python bench/serve.py                   # ~3 minutes on a 2-core CPU
    python bench/serve.py --tiny --print-only
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, write_section  # noqa: E402

from peftkit.core.adapter_io import apply_method, save_adapter  # noqa: E402
from peftkit.methods.lora import lora_layers  # noqa: E402
from peftkit.models import load_model  # noqa: E402

warnings.filterwarnings("ignore")
TOPICS = ["the sea", "a mountain", "bread", "a violin", "winter", "a bicycle", "the moon", "coffee", "a library",
          "rain", "a garden", "chess", "a train", "honey", "a lighthouse", "autumn", "a river", "glass", "a kite",
          "thunder", "a bridge", "salt", "a forest", "paper"]  # fmt: skip


def prompts(n: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def make_adapters(model: torch.nn.Module, k: int, folder: Path) -> list[Path]:
    paths = []
    for i in range(k):
        adapted = copy.deepcopy(model)
        torch.manual_seed(100 + i)
        apply_method(adapted, "lora", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
        with torch.no_grad():
            for _, layer in lora_layers(adapted):
                layer.lora_B.weight.normal_(0.0, 0.02)
        paths.append(save_adapter(adapted, folder / f"adapter{i}"))
    return paths


def naive_peft(base: torch.nn.Module, tok, adapters: list[Path], jobs, new_tokens: int):
    """All requests one at a time through one PeftModel holding every adapter: (answers, latencies, tokens, wall)."""
    from peft import PeftModel

    from peftkit.data.sequences import prompt_text

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[0]), adapter_name="adapter0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"adapter{i}")
    model.eval()
    answers, latencies, tokens = [], [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for name, prompt in jobs:
            model.set_adapter(name)
            text = prompt_text(tok, [{"role": "user", "content": prompt}])
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 top_p=None, top_k=None, temperature=None)
            new = out[0, ids.shape[1]:]
            tokens += int(new.numel())
            answers.append(tok.decode(new, skip_special_tokens=True).strip())
            latencies.append(time.perf_counter() - start)
    return answers, latencies, tokens, time.perf_counter() - start


def served(base: torch.nn.Module, tok, adapters: list[Path], jobs, new_tokens: int, max_batch: int,
           max_prefill_tokens: int = 8192):
    """All requests at once to a live `peftkit serve`: (answers, latencies, tokens, wall, engine stats, times to the
    first token)."""
    import openai
    import uvicorn

    from peftkit.serve.app import create_app
    from peftkit.serve.engine import Engine

    engine = Engine(base, tok, "base", max_batch=max_batch, max_prefill_tokens=max_prefill_tokens)
    for i, path in enumerate(adapters):
        engine.load_adapter(f"adapter{i}", path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0,
                           timeout=3600)

    def ask(job, start):
        name, prompt = job
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=new_tokens, stream=True,
                                                stream_options={"include_usage": True})
        parts, first, usage = [], None, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        latency = time.perf_counter() - start
        return "".join(parts).strip(), latency, usage.completion_tokens, first or latency

    try:
        ask(jobs[0], time.perf_counter())  # warm-up
        before = collections.Counter(engine.stats)
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            start = time.perf_counter()
            with engine.hold():  # they arrive at once: none starts before all have arrived (a few ms on loopback)
                futures = [pool.submit(ask, job, start) for job in jobs]
                while engine.load()["waiting"] < len(jobs):
                    time.sleep(0.001)
            results = [f.result() for f in futures]
            wall = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join()
    answers, latencies, tokens, firsts = zip(*results, strict=True)
    stats = collections.Counter(engine.stats)
    stats.subtract(before)
    stats["max_rows"], stats["max_prefill_rows"] = engine.stats["max_rows"], engine.stats["max_prefill_rows"]
    engine.lora.close()  # the next server attaches its own hooks to the same model
    return list(answers), list(latencies), sum(tokens), wall, dict(stats), list(firsts)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent requests")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="conftest's tiny random Llama (a smoke test)")
    parser.add_argument("--print-only", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the two servers this many times, alternately, and keep each one's fastest run "
                             "(a shared machine's noise)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    if args.tiny:
        from conftest import tiny_tokenizer
        from test_serve import long_llama

        base, tok, model_name = long_llama(), tiny_tokenizer(), "tiny random Llama (conftest)"
    else:
        base, tok = load_model("smollm2-135m-instruct", dtype=torch.float32)
        model_name = "bundled SmolLM2-135M-Instruct"
    jobs = [(f"adapter{i % args.adapters}", p) for i, p in enumerate(prompts(args.clients))]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, args.adapters, Path(tmp))
        naive = naive_peft(base, tok, adapters, jobs, args.new_tokens)
        runs: dict[int, list] = {8192: [], 1: []}
        for _ in range(args.repeat):
            for budget, kept in runs.items():
                kept.append(served(base, tok, adapters, jobs, args.new_tokens, args.max_batch, budget))
        serve, alone = (min(kept, key=lambda run: run[3]) for kept in runs.values())
    elapsed = time.perf_counter() - t0
    same = {name: sum(a == b for a, b in zip(naive[0], run[0], strict=True)) for name, run in
            [("batched prefill", serve), ("prefill one at a time", alone)]}
    rows = {"naive HF peft loop (one request at a time)": (*naive[1:4], None),
            "peftkit serve": (*serve[1:4], serve[5]),
            "peftkit serve, prefill one at a time": (*alone[1:4], alone[5])}
    stats, stats_alone = serve[4], alone[4]
    lines = [
        f"## serve — `python bench/serve.py --clients {args.clients} --adapters {args.adapters} --new-tokens "
        f"{args.new_tokens}{' --tiny' if args.tiny else ''}{f' --repeat {args.repeat}' if args.repeat > 1 else ''}` "
        f"({machine()}, {elapsed:.0f} s, load average {load:.1f} at the start)",
        "",
        f"{model_name}, fp32, {args.adapters} random LoRA adapters (r=8 on all linear layers of the blocks), "
        f"{args.clients} chat requests arriving at once, request i for adapter i mod {args.adapters}, greedy, at most "
        f"{args.new_tokens} new tokens (stop at EOS). *peftkit serve*: the live server on loopback, one `openai` "
        f"client thread per request, `--max-batch {args.max_batch}`; *naive*: transformers + peft 0.21, the "
        "adapters in one `PeftModel`, requests one at a time (`set_adapter` + `generate`). Latency counts from "
        f"the common arrival. The server decoded {stats.get('steps', 0)} steps, {stats.get('mixed_steps', 0)} of "
        f"them with rows of different adapters in one forward pass (at most {stats.get('max_rows', 0)} rows); it "
        f"prefilled the {len(jobs)} prompts in {stats.get('prefills', 0)} forward passes (at most "
        f"{stats.get('max_prefill_rows', 0)} prompts in one) in {stats.get('prefill_s', 0):.2f} s, against "
        f"{stats_alone.get('prefills', 0)} passes in {stats_alone.get('prefill_s', 0):.2f} s one at a time "
        f"({stats_alone.get('prefill_s', 0) / max(stats.get('prefill_s', 0), 1e-9):.2f}x)"
        + (f"; the fastest of {args.repeat} alternate runs of each server." if args.repeat > 1 else "."),
        "",
        "| server | completion tokens | wall (s) | tokens/s | vs naive | p50 latency (s) | p99 latency (s) "
        "| p50 first token (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    naive_tps = naive[2] / naive[3]
    for name, (lat, tokens, wall, firsts) in rows.items():
        first = "–" if firsts is None else f"{statistics.median(firsts):.2f}"
        lines.append(f"| {name} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | {tokens / wall / naive_tps:.2f}x | "
                     f"{statistics.median(lat):.2f} | {pct(lat, 0.99):.2f} | {first} |")
    lines += ["", "Answers equal to the naive loop's: " + ", ".join(f"{k}: {n} of {len(jobs)}" for k, n in
                                                                   same.items()) + "."]
    section = "\n".join(lines)
    print(section)
    if not args.print_only:
        write_section("serve", section)
        print(f"wrote section serve of BENCHMARKS.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
