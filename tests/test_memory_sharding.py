"""The estimator per process: sharding splits weights, gradients and optimizer states; the gathered units stay."""

from __future__ import annotations

from dataclasses import replace

import pytest

from peftkit.memory import TrainSetup, estimate
from peftkit.memory.arch import load_arch

MODEL = "smollm2-135m"


def _shares() -> tuple[float, float]:
    arch = load_arch(MODEL)
    root = sum(k for _, k in arch.outer_tensors()) / arch.num_params
    return root, (1 - root) / arch.layers


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_full_sharding_splits_the_state_and_adds_the_gathered_units(method):
    ddp = estimate(MODEL, TrainSetup(method=method, precision="bf16", batch_size=2, seq_len=256))
    two = estimate(MODEL, replace(ddp.setup, world_size=2, sharding="full"))
    root, block = _shares()
    stored = ddp.weights_frozen + ddp.quant_constants + ddp.weights_trainable
    assert two.weights_frozen == ddp.weights_frozen // 2
    assert two.weights_trainable == ddp.weights_trainable // 2
    assert two.optimizer_device == ddp.optimizer_device // 2
    assert two.gradients == ddp.gradients // 2 + int(ddp.gradients * (root + block))
    assert two.temp_weights == ddp.temp_weights + int(stored * (root + 2 * block))
    assert two.activations == ddp.activations and two.logits_loss == ddp.logits_loss  # per process, unchanged
    four = estimate(MODEL, replace(ddp.setup, world_size=4, sharding="full"))
    assert four.peak_bytes < two.peak_bytes < ddp.peak_bytes


def test_grad_op_keeps_a_gathered_copy_ddp_adds_its_buckets_one_process_changes_nothing():
    ddp = estimate(MODEL, TrainSetup(method="full", precision="bf16"))
    grad_op = estimate(MODEL, replace(ddp.setup, world_size=2, sharding="grad_op"))
    assert grad_op.temp_weights == ddp.temp_weights + ddp.weights_frozen + ddp.weights_trainable
    assert grad_op.optimizer_device == ddp.optimizer_device // 2
    assert estimate(MODEL, replace(ddp.setup, sharding="full")).components == ddp.components  # one process
    eight = estimate(MODEL, replace(ddp.setup, world_size=8))  # DDP: everything, and its buckets of the gradients
    assert eight.gradients == 2 * ddp.gradients
    assert {k: v for k, v in eight.components.items() if k != "gradients"} == \
        {k: v for k, v in ddp.components.items() if k != "gradients"}


def test_bad_world_or_sharding_is_refused():
    with pytest.raises(ValueError, match="sharding must be one of none, full, grad_op; got 'zero3'"):
        TrainSetup(sharding="zero3")
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        TrainSetup(world_size=0)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_8bit_and_paged_optimizer_states_are_split_too(optimizer):
    ddp = estimate(MODEL, TrainSetup(method="full", precision="bf16", optimizer=optimizer))
    two = estimate(MODEL, replace(ddp.setup, world_size=2, sharding="full"))
    assert ddp.optimizer_device + ddp.optimizer_host > 0
    assert (two.optimizer_device, two.optimizer_host) == (ddp.optimizer_device // 2, ddp.optimizer_host // 2)
