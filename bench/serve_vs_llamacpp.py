"""Benchmark: peftkit's server against llama.cpp (node-llama-cpp 3.21.1, its prebuilt CPU binaries) on the bundled
SmolLM2-135M-Instruct, greedy, the same prompt token ids on both sides.

* llama.cpp reads the model as peftkit's own export writes it (``peftkit export``'s `export_gguf`, f16) and, for
  the 4-bit comparison, the bundled Q4_1 GGUF itself (peftkit's export writes f32 / f16 / bf16 / q8_0, no Q4_1);
* peftkit runs its `Engine` in this process, at the precision ``peftkit serve`` picks by default (auto) and in
  fp32, and a QLoRA adapter (random LoRA r=8 on all linear layers) on its NF4 base; one single-stream number goes
  through ``peftkit serve``'s HTTP API (the openai client, streamed) to show what HTTP adds.

Measured: one stream of 128 new tokens; 8 and 16 concurrent streams of 64 new tokens each (node-llama-cpp: one
context with that many sequences, decoded together); the time to the first token of a ~500-token prompt. EOS is
ignored on both sides (every stream produces its full count). tok/s = new tokens / wall time from the request to its
last token (a short prompt's prefill included). Each round runs llama.cpp (one node process, model loaded once)
then peftkit, alternating; medians over the rounds, ratios peftkit / llama.cpp. Both sides use `--threads` threads.

npm installs node-llama-cpp into peftkit's cache (``$PEFTKIT_CACHE/node-llama-cpp-3.21.1``) on the first run;
without npm or node the script prints one line and stops. Writes section "serve_vs_llamacpp" of BENCHMARKS.md.

    python bench/serve_vs_llamacpp.py              # ~4 minutes on a quiet 2-core CPU
    python bench/serve_vs_llamacpp.py --rounds 1 --print-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section  # noqa: E402

warnings.filterwarnings("ignore")
VERSION = "3.21.1"
RUNNER = Path(__file__).with_name("serve_vs_llamacpp.mjs")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG = ("The history of lighthouses begins with fires lit on hilltops to guide ships home at night. Later, towers "
        "were built so that the light could be seen from farther away, and keepers tended the lamps. ")


def install_llamacpp() -> Path | None:
    """The node_modules folder holding node-llama-cpp (installed with npm on first use), or None without npm/node."""
    from peftkit.paths import cache_dir

    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        return None
    folder = cache_dir() / f"node-llama-cpp-{VERSION}"
    modules = folder / "node_modules"
    if not (modules / "node-llama-cpp" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "peftkit-bench-llamacpp", "private": true}\n')
        subprocess.run([npm, "install", "--no-audit", "--no-fund", f"node-llama-cpp@{VERSION}"], cwd=folder,
                       check=True, capture_output=True, timeout=600)
    return modules


def specs(tok: Any) -> tuple[list[dict], list[int], list[int]]:
    """The runs each side makes (kind, streams, tokens, prompt ids), the short prompt and the ~500-token one."""
    from peftkit.data.sequences import prompt_text

    short = tok(prompt_text(tok, [{"role": "user", "content": PROMPT}]), add_special_tokens=False)["input_ids"]
    long_text = prompt_text(tok, [{"role": "user", "content": LONG * 14 + "Summarise this."}])
    long = tok(long_text, add_special_tokens=False)["input_ids"][-500:]
    runs = [{"kind": "streams", "streams": 1, "tokens": 128, "prompt": short},
            {"kind": "streams", "streams": 8, "tokens": 64, "prompt": short},
            {"kind": "streams", "streams": 16, "tokens": 64, "prompt": short},
            {"kind": "ttft", "prompt": long}]
    return runs, short, long


def llamacpp(modules: Path, gguf: Path, runs: list[dict], threads: int) -> tuple[list[dict], str]:
    """One node process: the runs on `gguf` (after a short warm-up run, thrown away); results, version."""
    warmup = [{**runs[0], "tokens": 8}]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"threads": threads, "runs": warmup + runs}, f)
    done = subprocess.run(["node", str(RUNNER), str(modules), str(gguf), f.name], capture_output=True, text=True,
                          timeout=600)
    Path(f.name).unlink()
    if done.returncode != 0:
        raise RuntimeError(f"node-llama-cpp failed: {done.stderr.strip()[-800:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["results"][len(warmup):], out["version"]


def peftkit_run(engine: Any, model: str, spec: dict) -> dict:
    """One run through `engine` (its streams submitted together under `hold`, so they start together)."""
    from peftkit.serve.request import Failed, Finished, SamplingParams

    streams = 1 if spec["kind"] == "ttft" else spec["streams"]
    tokens = 1 if spec["kind"] == "ttft" else spec["tokens"]
    lock, finished, counts = threading.Lock(), threading.Event(), []

    def emit(event: Any) -> None:
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Finished):
            with lock:
                counts.append(event.completion_tokens)
                if len(counts) == streams:
                    finished.set()

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    with engine.hold():
        for _ in range(streams):
            engine.submit(model, list(spec["prompt"]), params, emit, deltas=False)
    finished.wait()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "first_s": wall, "tokens": sum(counts)}


def peftkit_runs(engine: Any, model: str, runs: list[dict]) -> list[dict]:
    return [peftkit_run(engine, model, spec) for spec in runs]


def http_stream(engine: Any, prompt: str, tokens: int) -> float:
    """tok/s of one streamed completion of `prompt` through `peftkit serve`'s HTTP API, on loopback."""
    import socket

    import openai
    import uvicorn

    from peftkit.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0)
    rates = []
    try:
        for _ in range(3):
            start = time.perf_counter()
            stream = client.completions.create(model="base", prompt=prompt, max_tokens=tokens, stream=True,
                                               extra_body={"ignore_eos": True})
            for _chunk in stream:
                pass
            rates.append(tokens / (time.perf_counter() - start))
    finally:
        server.should_exit = True
        thread.join()
    return statistics.median(rates[1:])


def engines(threads: int) -> dict[str, tuple[Any, str]]:
    """label -> (a started Engine, the model name requests use): auto precision, fp32, QLoRA on NF4."""
    from peftkit.hardware import resolve_precision
    from peftkit.loading import base_quantization, load_base_as
    from peftkit.serve.engine import Engine
    from peftkit.serve.lora_batch import LoRAWeights

    torch.set_num_threads(threads)
    out: dict[str, tuple[Any, str]] = {}
    auto = resolve_precision("auto")
    for label, precision in ((f"peftkit {auto.name} (auto)", auto), ("peftkit fp32", resolve_precision("fp32"))):
        if label.startswith("peftkit fp32") and auto.name == "fp32":
            continue
        base = load_base_as("smollm2-135m-instruct", None, precision.weight_dtype, precision.compute_dtype)
        out[label] = (Engine(base.model, base.tokenizer, "base", max_batch=16), "base")
    base = load_base_as("smollm2-135m-instruct", base_quantization(None, "nf4"), auto.weight_dtype,
                        auto.compute_dtype)
    engine = Engine(base.model, base.tokenizer, "base", max_batch=16)
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in base.model.named_modules():
        if name.endswith(("_proj",)) and hasattr(module, "in_features"):
            a = torch.randn(8, module.in_features, generator=gen) * module.in_features ** -0.5
            b = torch.randn(module.out_features, 8, generator=gen) * 0.02
            layers[name] = (a.to(auto.compute_dtype), b.to(auto.compute_dtype))
    engine.add_adapter("qlora", LoRAWeights("random", 8, 2.0, layers))
    out[f"peftkit QLoRA r=8 on NF4 ({auto.name})"] = (engine, "qlora")
    for engine, _ in out.values():
        engine.start()
    return out


def export_f16(folder: Path) -> Path:
    """The bundled model written by peftkit's GGUF export in f16 (once; kept in `folder`)."""
    from peftkit.export.gguf import export_gguf
    from peftkit.models import load_model

    path = folder / "smollm2-135m-instruct.peftkit-f16.gguf"
    if not path.exists():
        model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32)
        export_gguf(model, tok, path, "f16", overwrite=True)
    return path


def rates(results: list[dict], runs: list[dict]) -> list[float]:
    """Per run: tok/s for streams, seconds to the first token for ttft."""
    return [r["first_s"] if s["kind"] == "ttft" else r["tokens"] / r["wall_s"] for r, s in zip(results, runs,
                                                                                            strict=True)]


def measure(rounds: int, threads: int, modules: Path) -> tuple[dict[str, list[list[float]]], list[dict], dict]:
    """label -> per-round rates of every run, alternating llama.cpp (f16, Q4_1) and the peftkit engines."""
    from peftkit.models import find_bundled_gguf, load_tokenizer
    from peftkit.paths import cache_dir

    tok = load_tokenizer("smollm2-135m-instruct")
    runs, short, _ = specs(tok)
    ggufs = {"llama.cpp f16 (peftkit export)": export_f16(cache_dir()),
             "llama.cpp Q4_1 (bundled GGUF)": find_bundled_gguf()}
    served = engines(threads)
    info: dict[str, Any] = {"short": len(short), "long": len(runs[-1]["prompt"])}
    table: dict[str, list[list[float]]] = {k: [] for k in [*ggufs, *served]}
    for _ in range(rounds):
        for label, gguf in ggufs.items():
            results, info["version"] = llamacpp(modules, gguf, runs, threads)
            table[label].append(rates(results, runs))
        for label, (engine, model) in served.items():
            peftkit_runs(engine, model, [{**runs[0], "tokens": 8}])  # warm-up, thrown away
            table[label].append(rates(peftkit_runs(engine, model, runs), runs))
    auto_label = next(iter(served))
    info["http"] = http_stream(served[auto_label][0], tok.decode(short), 128)
    info["http_label"] = auto_label
    for engine, _ in served.values():
        engine.shutdown()
    return table, runs, info


def report(table: dict[str, list[list[float]]], info: dict, threads: int, rounds: int, seconds: float) -> str:
    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in table.items()}
    f16 = med["llama.cpp f16 (peftkit export)"]
    q41 = med["llama.cpp Q4_1 (bundled GGUF)"]
    lines = [f"## serve_vs_llamacpp — `python bench/serve_vs_llamacpp.py --threads {threads} --rounds {rounds}` "
             f"({machine()}, torch threads and llama.cpp threads: {threads}, {seconds:.0f} s)", "",
             f"Bundled SmolLM2-135M-Instruct, greedy, EOS ignored; node-llama-cpp {info.get('version')} (prebuilt "
             "CPU binaries, its JavaScript loop included) against peftkit's `Engine` in-process. tok/s = new tokens / "
             f"wall time from the request to the last token ({info['short']}-token prompt). TTFT: time to the first "
             f"token of a {info['long']}-token prompt. Medians of {rounds} rounds, llama.cpp and peftkit alternating; "
             "ratios are peftkit / llama.cpp f16 (for the QLoRA row: / llama.cpp Q4_1).", "",
             "| engine | 1 stream x 128 (tok/s) | 8 streams x 64 (tok/s) | 16 streams x 64 (tok/s) | TTFT 500 (ms) |",
             "|---|---|---|---|---|"]
    for label, (one, eight, sixteen, ttft) in med.items():
        ref = q41 if "NF4" in label else f16
        ratio = "" if label.startswith("llama.cpp") else " ({:.2f}x)"
        cells = [f"{v:.1f}" + (ratio.format(v / r) if ratio else "") for v, r in ((one, ref[0]), (eight, ref[1]),
                                                                                (sixteen, ref[2]))]
        lines.append(f"| {label} | {' | '.join(cells)} | {ttft * 1000:.0f} |")
    lines += ["", f"Over HTTP (`peftkit serve`'s app, openai client, streamed, loopback), {info['http_label']}: one "
              f"stream of 128 tokens at {info['http']:.1f} tok/s (median of 2 after a warm-up).", "",
              "peftkit's GGUF export writes f32, f16, bf16 and q8_0 only: the Q4_1 rows use the bundled GGUF (the "
              "file peftkit loads the model from), and peftkit's 4-bit comparison is its own NF4 format."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, run: Callable[..., Any] = measure) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--print-only", action="store_true")
    args = parser.parse_args(argv)
    modules = install_llamacpp()
    if modules is None:
        print("serve_vs_llamacpp: skipped: npm or node is not on PATH (needed to install node-llama-cpp)")
        return
    started = time.perf_counter()
    table, _, info = run(args.rounds, args.threads, modules)
    body = report(table, info, args.threads, args.rounds, time.perf_counter() - started)
    print(body)
    if not args.print_only:
        write_section("serve_vs_llamacpp", body, per_cpu_class=True)


if __name__ == "__main__":
    main()
