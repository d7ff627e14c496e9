"""The trainer with peftkit's optimizers: every name works, and resume restores 8-bit / paged state exactly."""

from __future__ import annotations

import pytest
from test_train import make_cfg, run

from peftkit.errors import PeftkitError


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_resume_restores_optimizer_state_exactly(tmp_path, optimizer):
    # full fine-tuning: the tiny model's embedding and head have 4096 entries, so 8-bit states are used for them
    kw = dict(max_steps=6, save_every=2, optimizer=optimizer, method="full", method_config={}, lr=1e-3,
              page_budget_bytes=64 * 1024 if optimizer.startswith("paged") else None)
    full, _ = run(make_cfg(tmp_path / "full", **kw))
    cfg = make_cfg(tmp_path / "cut", **kw)
    run(cfg, until=3)
    resumed, _ = run(cfg, resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_unknown_optimizer_is_a_clear_error(tmp_path):
    with pytest.raises((PeftkitError, ValueError), match="adamw_8bit"):
        run(make_cfg(tmp_path, optimizer="adam9000", max_steps=1))
