"""Same recipe, same run: nothing outside the training step draws from the global generators, so the per-step
losses do not depend on what the cache holds, on a kill and resume, or on DDP (issue 26)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from test_train import make_cfg

from peftkit import hardware
from peftkit.train import Trainer


def global_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def same_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    """An empty PEFTKIT_CACHE, and no peak remembered in this process: the run measures it."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    hardware._cached_peak.cache_clear()
    yield tmp_path / "cache"
    hardware._cached_peak.cache_clear()


def test_measuring_the_matmul_peak_leaves_the_global_generators_alone(cold_cache):
    before = global_states()
    assert hardware.matmul_peak(torch.float32) > 0
    assert (cold_cache / "matmul_peak.json").is_file()  # it was measured, not read back
    assert same_states(before, global_states())


@pytest.mark.parametrize("settings", [
    dict(method_config={"r": 4, "lora_dropout": 0.2}),
    dict(method="sparse", method_config={"density": 0.05}),  # calibration runs at the start
    dict(ewc_lambda=1.0, method_config={"r": 4, "lora_dropout": 0.2}),  # the Fisher pass too
], ids=["lora", "sparse-calibrated", "ewc"])
def test_run_start_leaves_the_global_generators_alone(tmp_path, cold_cache, settings):
    cfg = make_cfg(tmp_path, max_steps=2, **settings)
    trainer = Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
    torch.manual_seed(123)  # a state the start must hand on untouched, as it would a checkpoint's
    random.seed(123)
    np.random.seed(123)
    before = global_states()
    trainer._start()
    assert (cold_cache / "matmul_peak.json").is_file()  # the start did measure the peak
    assert same_states(before, global_states())


# ---------------------------------------------------------------- the matrix: cache x processes x interruption
def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.history]


def test_single_process_losses_are_the_same_cold_or_warm_cut_or_not(tmp_path, cold_cache):
    kw = dict(max_steps=6, save_every=2, method_config={"r": 4, "lora_dropout": 0.2}, packing=True)

    def new(name: str, resume: bool = False) -> Trainer:
        return Trainer(make_cfg(tmp_path / name, **kw), model=tiny_llama(), tokenizer=tiny_tokenizer(),
                       resume=resume)

    cold = new("cold")
    cold.run()  # measures the peak: the cache was empty
    assert (cold_cache / "matmul_peak.json").is_file()
    warm = new("warm")
    warm.run()
    assert losses(warm) == losses(cold)
    for cache in ("warm", "cold"):
        new(f"cut-{cache}").run(until_step=5)  # "killed" after step 5: resumes from checkpoint-4
        if cache == "cold":  # the case: the resumed start measures the peak after restoring the generators
            (cold_cache / "matmul_peak.json").unlink()
            hardware._cached_peak.cache_clear()
        resumed = new(f"cut-{cache}", resume=True)
        resumed.run()
        assert losses(resumed) == losses(cold), cache
    assert (cold_cache / "matmul_peak.json").is_file()  # measured again by the cold resume


def test_ddp_losses_are_the_same_cold_or_warm_cut_or_not(tmp_path):
    from test_distributed import launch

    rows = [{"instruction": "Repeat " + "ab" * (i % 13), "output": str(i % 7)} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cache = tmp_path / "cache"
    # cold: an empty cache (the uninterrupted run measures) and a resume that measures again; then all warm
    cold = launch(2, str(data), tmp_path / "cold", 2, "resume", PEFTKIT_CACHE=str(cache), COLD_RESUME="1")
    assert (cache / "matmul_peak.json").is_file()
    warm = launch(2, str(data), tmp_path / "warm", 2, "resume", PEFTKIT_CACHE=str(cache))
    for rank in (0, 1):
        curves = [cold[rank]["straight"], cold[rank]["resumed"], warm[rank]["straight"], warm[rank]["resumed"]]
        assert all(c == curves[0] for c in curves), rank
        assert len(set(cold[rank]["digests"] + warm[rank]["digests"])) == 1
