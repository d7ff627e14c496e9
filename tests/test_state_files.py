"""Optimizer and scheduler state through safetensors + JSON (no pickle): every optimizer resumes bit-identically."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_optim import _assert_same, _groups, _params, _train

from peftkit.errors import PeftkitError
from peftkit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
from peftkit.train.state_files import load_state, write_state


def save(state, folder, name):
    folder.mkdir(exist_ok=True)
    for file, content in write_state(state, name).items():
        content(folder / file) if callable(content) else (folder / file).write_text(content)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(_groups(ps), lr=1e-2, weight_decay=0.1, foreach=False),
    lambda ps: PagedAdamW(_groups(ps), lr=1e-2, weight_decay=0.1, page_budget_bytes=10_000),
    lambda ps: AdamW8bit(_groups(ps), lr=1e-2, weight_decay=0.1, min_8bit_size=256),
    lambda ps: PagedAdamW8bit(_groups(ps), lr=1e-2, weight_decay=0.1, min_8bit_size=256, page_budget_bytes=10_000),
], ids=["torch-adamw", "paged32", "8bit", "paged8"])
def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path, make):
    ps = _params()
    opt = make(ps)
    _train(opt, ps, 6, seed=1)
    save(opt.state_dict(), tmp_path, "optimizer")
    saved = [p.detach().clone() for p in ps]
    _train(opt, ps, 6, seed=2)  # uninterrupted

    ps2 = [torch.nn.Parameter(t) for t in saved]
    opt2 = make(ps2)
    loaded = load_state(tmp_path, "optimizer")
    assert [g.get("betas") for g in loaded["param_groups"]] == [g.get("betas") for g in opt2.param_groups]
    assert all(isinstance(k, int) for k in loaded["state"])  # parameter indices stay ints
    opt2.load_state_dict(loaded)
    _train(opt2, ps2, 6, seed=2)  # resumed
    _assert_same(opt, ps, opt2, ps2)
    assert load_file(str(tmp_path / "optimizer.safetensors"))  # the tensors are plain safetensors


def test_scheduler_state_and_special_values_round_trip(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        opt.step()
        sched.step()
    state = {**sched.state_dict(), "odd": {1: (math.inf, None, True), "__tensor__": "x"}, "nan": math.nan}
    save(state, tmp_path, "scheduler")
    json.loads((tmp_path / "scheduler.json").read_text())  # strict JSON: no NaN/Infinity literals
    back = load_state(tmp_path, "scheduler")
    assert math.isnan(back.pop("nan")) and math.isnan(state.pop("nan"))
    assert back == state
    fresh = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    fresh.load_state_dict(back)
    assert fresh.get_last_lr() == sched.get_last_lr()


def test_a_value_a_state_file_cannot_hold_is_named():
    with pytest.raises(PeftkitError, match=r"cannot store optimizer\.extra \(object\)"):
        write_state({"extra": object()}, "optimizer")
