"""Benchmark: does `peftkit studio` stay responsive while a run trains? (target: API median < 300 ms on 2 cores)

Starts ``peftkit studio`` as a user does (its own process, loopback, a fresh workspace holding the shipped orders
task), measures the API idle, then launches a LoRA run on the bundled SmolLM2-135M-Instruct (or `--tiny`, conftest's
tiny Llama) from the API and measures again while it trains, with a metrics stream (SSE) open as the Train page holds
it. Each round asks what the pages ask: the run list, a run's status, a memory plan, the page itself. Training runs
in its own process; the studio's event loop only reads files and answers. Writes section "studio" of BENCHMARKS.md
(not with `--print-only`).

    python bench/studio_latency.py               # ~2 minutes on a 2-core CPU
    python bench/studio_latency.py --tiny --print-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, write_section  # noqa: E402

ROUTES = {  # what the pages ask, as (method, path, body)
    "GET /api/runs": ("GET", "api/runs", None),
    "GET /api/runs/status": ("GET", "api/runs/status?run=runs/bench", None),
    "POST /api/plan": ("POST", "api/plan", {"model": "smollm2-135m-instruct", "method": "lora", "settings": "r=16"}),
    "GET / (page)": ("GET", "", None),
}


def call(url: str, method: str, path: str, body: dict | None) -> float:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"}, method=method)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            r.read()
    except urllib.error.HTTPError as e:  # idle, the run does not exist yet: its 404 is an answer all the same
        e.read()
    return time.perf_counter() - t0


def measure(url: str, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in ROUTES}
    for _ in range(rounds):
        for name, (method, path, body) in ROUTES.items():
            times[name].append(call(url, method, path, body))
        time.sleep(0.05)
    return times


def hold_stream(url: str, stop: threading.Event, events: list[int]) -> None:
    """The Train page's metrics stream, read until `stop`."""
    with urllib.request.urlopen(url + "api/runs/metrics?run=runs/bench", timeout=120) as r:
        while not stop.is_set():
            line = r.readline()
            if not line:
                return
            events.append(line.startswith(b"data: "))


def start_studio(ws: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "studio", "--port", "0", "--workspace", str(ws)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    match = re.search(r"on (http://127\.0\.0\.1:\d+/)", proc.stderr.readline())
    if not match:
        proc.kill()
        raise SystemExit("the studio did not print its URL")
    return proc, match[1]


def workspace(tiny: bool) -> tuple[Path, dict]:
    import peftkit

    ws = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    (ws / "data").mkdir()
    shutil.copy(Path(peftkit.__file__).parent / "data" / "tasks" / "orders_train.jsonl", ws / "data" / "orders.jsonl")
    recipe = {"data": "data/orders.jsonl", "max_steps": 100000, "max_length": 256, "save_every": 0}
    if tiny:
        from conftest import tiny_llama, tiny_tokenizer

        tiny_llama().save_pretrained(ws / "tiny")
        tiny_tokenizer().save_pretrained(ws / "tiny")
        recipe.update(model="tiny", precision="fp32")
    return ws, recipe


def wait_training(url: str, at_least: int = 2, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "api/runs/status?run=runs/bench") as r:
            status = json.load(r)
        if status["status"] != "running" or status["step"] >= at_least:
            return status
        time.sleep(1)
    raise SystemExit("the run did not start training in time")


def table(idle: dict[str, list[float]], busy: dict[str, list[float]]) -> str:
    def ms(xs: list[float], q: float) -> str:
        return f"{1000 * statistics.quantiles(xs, n=10)[int(q * 10) - 1]:.0f}" if q < 1 else f"{1000 * max(xs):.0f}"

    rows = ["| request | idle: median ms | training: median ms | training: p90 ms | training: max ms |",
            "|---|---:|---:|---:|---:|"]
    for name in ROUTES:
        rows.append(f"| {name} | {1000 * statistics.median(idle[name]):.1f} | "
                    f"{1000 * statistics.median(busy[name]):.1f} | {ms(busy[name], 0.9)} | {ms(busy[name], 1)} |")
    everything = [t for xs in busy.values() for t in xs]
    rows.append(f"| **all** | {1000 * statistics.median([t for xs in idle.values() for t in xs]):.1f} | "
                f"**{1000 * statistics.median(everything):.1f}** | {ms(everything, 0.9)} | {ms(everything, 1)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="conftest's tiny random Llama (a smoke test)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--print-only", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    ws, recipe = workspace(args.tiny)
    proc, url = start_studio(ws)
    stop, events = threading.Event(), []
    try:
        idle = measure(url, args.rounds)
        launch = json.dumps({"name": "bench", "recipe": recipe}).encode()
        urllib.request.urlopen(urllib.request.Request(url + "api/runs", launch, {"Content-Type": "application/json"}))
        status = wait_training(url)
        threading.Thread(target=hold_stream, args=(url, stop, events), daemon=True).start()
        busy = measure(url, args.rounds)
        after = wait_training(url, at_least=0)
    finally:
        stop.set()
        stop_run = json.dumps({"run": "runs/bench"}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(url + "api/runs/stop", stop_run,
                                                          {"Content-Type": "application/json"}))
            wait_training(url, at_least=1 << 62)  # until it has stopped (at a checkpoint)
        except OSError:
            pass
        proc.terminate()
        proc.wait(30)
    model = "conftest's tiny Llama" if args.tiny else "SmolLM2-135M-Instruct"
    section = (f"## Studio responsiveness while a run trains (`bench/studio_latency.py`)\n\n{machine()}; "
               f"{os.cpu_count()} cores. `peftkit studio` in its own process; a LoRA run on {model} (orders task, "
               f"256 tokens) training in its `peftkit train` subprocess from step {status['step']} to "
               f"{after['step']} while {args.rounds} rounds of the requests below were timed, a metrics stream open "
               f"({sum(events)} metric events received; load average {os.getloadavg()[0]:.1f}: a shared machine, "
               "so steps were slow). Latency is client-side, over loopback.\n\n"
               + table(idle, busy) + "\n")
    print(section)
    shutil.rmtree(ws, ignore_errors=True)
    if not args.print_only:
        write_section("studio", section)


if __name__ == "__main__":
    main()
