"""`peftkit studio` in a real browser (Playwright driving Debian's Chromium) against a live studio on loopback, as a
new user goes: plan -> data -> train a few steps -> the chart updates -> stop / resume -> chat with the adapter ->
export. Every network request is recorded: only loopback may be contacted. The screenshot is docs/studio.png.

Skips with one line naming what is missing (``apt-get install chromium``, ``pip install playwright``); .ci/run
installs Chromium so that CI never skips.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from studio_helpers import make_workspace

from peftkit.train.checkpoint import LOCK

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "studio.png"

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")


@pytest.fixture
def studio_url(tmp_path):
    """`peftkit studio` started as a user starts it, on a free loopback port; stopped (and its runs) afterwards."""
    ws = make_workspace(tmp_path / "ws")
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "studio", "--port", "0", "--workspace", str(ws)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
    assert match, f"no URL in the studio's first line: {line!r}"
    url = match[1]
    yield url
    for run in json.load(urllib.request.urlopen(url + "api/runs"))["runs"]:
        if run["status"] == "running":
            request = urllib.request.Request(url + "api/runs/stop", json.dumps({"run": run["id"]}).encode(),
                                             {"Content-Type": "application/json"})
            urllib.request.urlopen(request)
    proc.terminate()
    proc.wait(30)


def test_a_new_user_plans_inspects_trains_watches_stops_resumes_chats_and_exports(studio_url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        contacted: list[str] = []
        page.on("request", lambda r: contacted.append(r.url))
        page.set_default_timeout(45_000)
        try:
            page.goto(studio_url)
            _plan(page)
            _data(page)
            _train_stop_resume(page, tmp_path / "ws" / "runs" / "first")
            page.screenshot(path=str(SCREENSHOT), full_page=False)
            _chat(page)
            _export(page)
            assert not page.locator("#error").is_visible(), page.locator("#error").text_content()
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in contacted if not u.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, f"requests left loopback: {sorted(hosts)}"


def _plan(page) -> None:
    page.fill("#plan-form [name=model]", "tiny")
    page.fill("#plan-form [name=settings]", "r=4")
    page.wait_for_function("() => document.querySelector('#plan-summary').textContent"
                           ".startsWith('tiny: 4,096 trainable')")
    assert page.locator("#plan-bar svg rect").count() >= 4  # the memory bar's parts
    assert page.locator("#plan-methods tr").count() > 10  # every method side by side
    page.click("#plan-to-train")
    page.click("#tabs [data-page=data]")


def _data(page) -> None:
    page.fill("#data-form [name=path]", "data/bad.jsonl")
    page.fill("#data-form [name=max_length]", "64")
    page.click("#data-form button[type=submit]")
    page.wait_for_selector("#data-rows .tok.loss")
    assert "1 bad rows skipped" in page.text_content("#data-bad")
    assert page.locator("#data-rows .row").first.locator(".tok.loss").all_text_contents() == ["0", "0", "<|im_end|>"]


def _freeze_after(folder: Path, steps: int) -> int:
    """The run's pid, paused (SIGSTOP) as soon as its metrics log holds `steps` steps. Its clock then stands still
    while the page catches up and the user clicks stop, so the stop lands mid-run however fast this machine trains
    (24 tiny steps can end before a click does)."""
    metrics, deadline = folder / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline:
        held = re.search(r"pid (\d+)", (folder / LOCK).read_text()) if (folder / LOCK).exists() else None
        if held and metrics.exists() and metrics.read_text().count("\n") >= steps:
            os.kill(int(held[1]), signal.SIGSTOP)
            return int(held[1])
        time.sleep(0.002)
    raise AssertionError(f"{metrics} never reached {steps} steps")


def _train_stop_resume(page, folder: Path) -> None:
    page.click("#tabs [data-page=train]")
    page.fill("#train-form [name=name]", "first")
    page.fill("#train-form [name=data]", "data/train.jsonl")
    page.fill("#train-form [name=max_steps]", "24")
    page.fill("#train-form [name=lr]", "3e-3")
    page.fill("#train-form [name=batch_size]", "4")
    page.fill("#train-form [name=max_length]", "64")
    page.fill("#train-form [name=extra]", "precision=fp32 packing=false warmup_ratio=0")
    page.click("#train-form button[type=submit]")
    pid = _freeze_after(folder, 2)
    try:
        page.wait_for_function("() => records.length >= 2")  # the chart got its first steps, streamed
        blank = page.evaluate("() => document.createElement('canvas').toDataURL()")
        assert page.evaluate("() => document.querySelector('#charts canvas').toDataURL()") != blank
        with page.expect_response(lambda r: r.url.endswith("/api/runs/stop")) as stop:
            page.click("#run-stop")  # the SIGTERM waits, pending, until the run goes on
        assert stop.value.ok, stop.value.text()
    finally:
        os.kill(pid, signal.SIGCONT)
    page.wait_for_function("() => document.querySelector('#run-status').textContent.startsWith('stopped')")
    stopped_at = page.evaluate("() => records.length")
    page.click("#run-resume")
    page.wait_for_function("() => document.querySelector('#run-status').textContent.startsWith('finished')")
    steps = page.evaluate("() => records.map((r) => r.step)")
    assert steps == list(range(1, 25)) and stopped_at < 24  # resumed where it stopped, each step drawn once
    page.reload()  # a reload loses nothing: the run opens again with its whole history
    page.wait_for_function("() => records.length === 24 && document.querySelector('#run-title').textContent === "
                           "'runs/first'")


def _chat(page) -> None:
    page.click("#tabs [data-page=use]")
    page.check("#use-pick input[value='runs/first']")
    page.click("#use-load")
    page.wait_for_function("() => document.querySelector('#use-models').textContent.includes('runs/first')")
    page.fill("#use-prompt", "Repeat 3 twice")
    page.click("#use-send")
    page.wait_for_function("() => [...document.querySelectorAll('.answer')].length === 2 && "
                           "[...document.querySelectorAll('.answer')].every((a) => a.lastChild.textContent !== '...')")
    assert page.locator(".answer.err").count() == 0


def _export(page) -> None:
    page.select_option("#export-run", "runs/first")
    page.select_option("#export-kind", "merge")  # the tiny model's tokenizer has no GGUF form; merge runs the same way
    page.click("#export-go")
    page.wait_for_function("() => /done in|failed/.test(document.querySelector('#export-progress').textContent)")
    assert "done in" in page.text_content("#export-progress"), page.text_content("#export-progress")

