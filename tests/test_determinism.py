"""Same recipe, same run: nothing outside the training step draws from the global generators, so the per-step
losses do not depend on what the cache holds, on a kill and resume, or on DDP (issue 26)."""

from __future__ import annotations

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
