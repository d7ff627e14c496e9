"""Sharded training (FSDP2, gloo on CPU): equal to one process and to DDP, checkpoints that resume on another number
of processes, the adapter as peft files, and what a sharded run refuses.

Six launches serve every test of the module (startup dominates on a busy machine): one process (the references,
a 1-rank sharded run cut at step 3), two processes under torchrun (sharded and DDP runs, the 8-bit and paged
optimizers, the cut 1-rank run resumed on 2, 2-rank runs cut at step 3), three processes (sharded runs of a global
batch of 6, the cut 2-rank run resumed on 3, 3-rank runs cut at step 3), one process again (the 2- and 3-rank runs
resumed on 1), two processes (a 3-rank run resumed on 2; a run whose rank 0 is killed -9 while saving), three
processes (the killed run resumed).

Three ranks split nothing evenly here: LoRA's A (4 rows) is sharded 2, 2, 0 and the 32-row weights 11, 11, 10 (FSDP2
pads the last shards), so these runs also check uneven and empty shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from test_distributed import free_port
from test_train import make_cfg, write_data
from transformers import LlamaForCausalLM

from peftkit.errors import PeftkitError
from peftkit.train import Trainer
from peftkit.train.resume import check_resumable

WORKER = Path(__file__).with_name("sharding_worker.py")
STEPS = 4


def _job(root: Path, name: str, data: str, batch_size: int, until: int | None = None, resume: bool = False,
         kill_saving: int | None = None, from_folder: bool = False, **kw) -> dict:
    config = dict(data=data, output_dir=str(root / name), precision="fp32", batch_size=batch_size, lr=1e-2,
                  method="lora", method_config={"r": 4}, max_length=64, progress=False, packing=False,
                  warmup_ratio=0.0, max_steps=STEPS, save_every=1, seed=3)
    return {"name": name, "config": {**config, **kw}, "until_step": until, "resume": resume,
            "kill_saving": kill_saving, "from_folder": from_folder}


def _model_folder(folder: Path, tied: bool) -> str:
    """The tiny Llama (its embeddings and head tied or not) and the tiny tokenizer, saved as a model folder."""
    config = tiny_llama().config
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _launch(root: Path, nproc: int, jobs: list[dict], killed: bool = False) -> None:
    """Run `jobs` in `nproc` processes (torchrun past 1); `killed`: a rank is expected to die by SIGKILL."""
    plan = root / f"plan-{nproc}-{len(list(root.glob('plan-*')))}.json"
    plan.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(WORKER), str(plan)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if killed:
        assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-4000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharding")
    data = write_data(root / "d.jsonl", n=40)
    full_ft = {"method": "full", "method_config": {}, "lr": 1e-3}
    qlora = {"quantize": "nf4", "precision": "bf16"}
    eight = {**full_ft, "optimizer": "adamw_8bit"}  # the tiny Llama's embeddings and head (4096 each) get 8-bit state
    paged8 = {**full_ft, "optimizer": "paged_adamw_8bit"}
    untied, tied = _model_folder(root / "tiny", tied=False), _model_folder(root / "tied", tied=True)
    lean = {"from_folder": True, "model": untied}  # the trainer loads the model itself: rank 0 alone reads it
    _launch(root, 1, [
        _job(root, "one-tied", data, 4, from_folder=True, model=tied),
        _job(root, "one-lora", data, 4), _job(root, "one-full", data, 4, **full_ft),
        _job(root, "cut1", data, 4, until=3, sharding="full"), _job(root, "one-qlora", data, 2, grad_accum=2, **qlora),
        _job(root, "one-lora6", data, 6), _job(root, "one-qlora6", data, 2, grad_accum=3, **qlora),
        _job(root, "one-full8", data, 4, **eight),
        _job(root, "one-qlora-folder", data, 2, grad_accum=2, from_folder=True, model=untied, **qlora),
    ])
    _launch(root, 2, [
        _job(root, "fsdp-lora", data, 2, sharding="full"), _job(root, "zero2-lora", data, 2, sharding="grad_op"),
        _job(root, "ddp-lora", data, 2), _job(root, "fsdp-full", data, 2, sharding="full", **full_ft),
        _job(root, "cut1", data, 2, resume=True, sharding="full"),
        _job(root, "cut2", data, 2, until=3, sharding="full"),
        _job(root, "fsdp-qlora", data, 2, sharding="full", **qlora),
        _job(root, "cut23", data, 3, until=3, sharding="full"),
        _job(root, "fsdp-full8", data, 2, sharding="full", **eight),
        _job(root, "fsdp-paged8", data, 2, sharding="full", **paged8),
        _job(root, "cut2-8bit", data, 2, until=3, sharding="full", **eight),
        _job(root, "lean-lora", data, 2, sharding="full", **lean),
        _job(root, "lean-qlora", data, 2, sharding="full", **lean, **qlora),
        _job(root, "lean-full", data, 2, sharding="full", **lean, **full_ft),
        _job(root, "lean-tied", data, 2, sharding="grad_op", from_folder=True, model=tied),
    ])
    _launch(root, 3, [
        _job(root, "three-lora", data, 2, sharding="full"),
        _job(root, "three-qlora", data, 2, sharding="full", **qlora),
        _job(root, "cut23", data, 2, resume=True, sharding="full"),
        _job(root, "cut3", data, 2, until=3, sharding="grad_op"),
        _job(root, "cut32", data, 2, until=3, sharding="full"),
        _job(root, "lean-lora3", data, 2, sharding="full", **lean),
    ])
    _launch(root, 1, [_job(root, "cut2", data, 4, resume=True, sharding="full"),
                      _job(root, "cut3", data, 6, resume=True, sharding="grad_op"),
                      _job(root, "cut2-8bit", data, 4, resume=True, sharding="full", **eight)])
    _launch(root, 2, [_job(root, "cut32", data, 3, resume=True, sharding="full"),
                      _job(root, "killed", data, 3, kill_saving=3, sharding="full")], killed=True)
    _launch(root, 3, [_job(root, "killed", data, 2, resume=True, sharding="full")])
    return root


def _losses(run: Path, rank: int = 0) -> list[float]:
    return json.loads((run / f"rank{rank}.json").read_text())["losses"]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_sharded_ranks_equal_one_process_of_the_same_global_batch(runs, method):
    sharded, one = runs / f"fsdp-{method}", runs / f"one-{method}"
    assert json.loads((sharded / "rank1.json").read_text())["world"] == 2
    assert _losses(sharded) == _losses(sharded, 1)  # every rank logs the global loss
    assert _losses(sharded) == pytest.approx(_losses(one), rel=1e-5)
    assert len(_losses(one)) == STEPS
    _close(_adapter(sharded), _adapter(one), 1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_three_sharded_ranks_equal_one_process_of_the_same_global_batch(runs, method):
    # 3 ranks x 2 rows against one process of 6 rows (QLoRA: 3 micro-batches of 2, the ranks' bf16 shapes). The
    # gradient sums run in another order (3 partial sums, then the reduce-scatter): equal within fp tolerance, not
    # bitwise. The ranks' gradients are summed, not averaged: a loss scaled x3 for averaging rounds otherwise in
    # bf16, and Adam's sign-like first steps made whole-step (2 x lr) differences of a third of the QLoRA adapter.
    sharded, one, tol = runs / f"three-{method}", runs / f"one-{method}6", 1e-5
    assert [json.loads((sharded / f"rank{r}.json").read_text())["world"] for r in range(3)] == [3, 3, 3]
    assert _losses(sharded) == _losses(sharded, 1) == _losses(sharded, 2)
    assert len(_losses(one)) == STEPS
    assert _losses(sharded) == pytest.approx(_losses(one), rel=tol)
    _close(_adapter(sharded), _adapter(one), tol)
    if method == "qlora":
        held = [json.loads((sharded / f"rank{r}.json").read_text())["packed_bytes"] for r in range(3)]
        whole = json.loads((one / "rank0.json").read_text())["packed_bytes"]
        assert sum(held) == whole and max(held) <= whole // 3 + 64  # each rank a third of the codes (+ padding)


def test_sharding_lets_go_of_the_whole_weights(runs):
    # the method's replaced modules (`InjectReport.originals`) held every adapted layer's whole weight on each rank
    for name in ("fsdp-lora", "zero2-lora", "fsdp-full"):
        assert [json.loads((runs / name / f"rank{r}.json").read_text())["whole_bytes"] for r in (0, 1)] == [0, 0]
    assert json.loads((runs / "ddp-lora" / "rank0.json").read_text())["whole_bytes"] > 0  # DDP's model holds them


@pytest.mark.parametrize("lean, given, reference, tol", [
    ("lean-lora", "fsdp-lora", "fsdp-lora", 0.0), ("lean-full", "fsdp-full", "fsdp-full", 0.0),
    ("lean-lora3", "three-lora", "three-lora", 0.0),
    # QLoRA against one process loading the folder too: a base given in fp32 is quantized from fp32, one loaded for
    # bf16 training from bf16 (other codes); 2 micro-batches of 2 rows: the ranks' shapes, as for fsdp-qlora
    ("lean-qlora", "fsdp-qlora", "one-qlora-folder", 1e-5)])
def test_rank_0_alone_loads_the_model_and_the_others_receive_their_shards(runs, lean, given, reference, tol):
    # the trainer loads the model folder itself: rank 0 reads it, the others build it empty and receive their
    # shards; the run trains as the one given the same model in every process (bit for bit) or one process
    world = json.loads((runs / given / "rank0.json").read_text())["world"]
    facts = [json.loads((runs / lean / f"rank{r}.json").read_text()) for r in range(world)]
    assert [f["loads"] for f in facts] == [[True]] + [[False]] * (world - 1)  # weights=False: nothing read
    assert len(_losses(runs / lean)) == STEPS
    assert _losses(runs / lean) == pytest.approx(_losses(runs / reference), rel=tol, abs=0)
    _close(_adapter(runs / lean), _adapter(runs / reference), 10 * tol)
    given_facts = [json.loads((runs / given / f"rank{r}.json").read_text()) for r in range(world)]
    assert {f["fingerprint"] for f in facts} == {given_facts[0]["fingerprint"]} != {None}  # rank 0's, everywhere
    assert [f["packed_bytes"] for f in facts] == [f["packed_bytes"] for f in given_facts]  # the same shards


def test_a_tied_head_loaded_by_rank_0_alone_equals_one_process(runs):
    lean, one = runs / "lean-tied", runs / "one-tied"
    assert [json.loads((lean / f"rank{r}.json").read_text())["loads"] for r in (0, 1)] == [[True], [False]]
    assert _losses(lean) == pytest.approx(_losses(one), rel=1e-5)
    _close(_adapter(lean), _adapter(one), 1e-5)


def test_the_others_wait_for_a_slow_load_and_stop_with_rank_0_on_a_different_model(tmp_path):
    data, model = write_data(tmp_path / "d.jsonl", n=8), _model_folder(tmp_path / "tiny", tied=False)
    # rank 0 loads for 10 s, longer than the run's collectives wait (dist_timeout: 4 s, set by this first job)
    slow = _job(tmp_path, "slow", data, 2, sharding="full", from_folder=True, model=model, dist_timeout=4,
                max_steps=1) | {"slow_load": 10}
    # then rank 1's recipe adapts with rank 8, rank 0's with 4: the shards rank 0 sends would not fit
    differ = _job(tmp_path, "differ", data, 2, sharding="full", from_folder=True, model=model) | {
        "on_rank": {"1": {"method_config": {"r": 8}}}}
    with pytest.raises(AssertionError) as failed:
        _launch(tmp_path, 2, [slow, differ])
    assert _losses(tmp_path / "slow") == _losses(tmp_path / "slow", 1) and len(_losses(tmp_path / "slow")) == 1
    said = str(failed.value)
    for rank in (0, 1):  # every rank says so, none waits for a broadcast that does not fit
        assert f"[rank{rank}]: peftkit.errors.PeftkitError: sharding: rank(s) [1] built a model different" in said
    assert not (tmp_path / "differ" / "adapter").exists()


def test_a_model_built_without_weights_has_the_loaded_ones_layout(tmp_path):
    from peftkit.models import load_model

    folder = _model_folder(tmp_path / "tied", tied=True)
    loaded, empty = load_model(folder)[0], load_model(folder, weights=False)[0]
    assert empty.lm_head.weight is empty.model.embed_tokens.weight  # tied, as loaded: one tensor to receive
    assert all(p.is_meta for p in empty.parameters())
    layout = [(n, t.shape, t.dtype) for n, t in [*loaded.named_parameters(), *loaded.named_buffers()]]
    assert layout == [(n, t.shape, t.dtype) for n, t in [*empty.named_parameters(), *empty.named_buffers()]]
    for name, buffer in empty.named_buffers():  # computed from the config, not received
        torch.testing.assert_close(buffer, loaded.get_buffer(name), rtol=0, atol=0)


def test_qlora_shards_its_packed_base_and_equals_one_process(runs):
    sharded, one = runs / "fsdp-qlora", runs / "one-qlora"
    held = [json.loads((sharded / f"rank{r}.json").read_text())["packed_bytes"] for r in (0, 1)]
    whole = json.loads((one / "rank0.json").read_text())["packed_bytes"]
    assert whole > 0 and sum(held) == whole and max(held) <= whole // 2 + 64  # each rank half the codes
    # one process with 2 micro-batches of 2 rows: the ranks' shapes (bf16 matmuls round by shape; 4-row batches pad
    # otherwise and drift 2e-4 by step 4 through Adam's sign-like steps)
    assert _losses(sharded) == pytest.approx(_losses(one), rel=1e-5)
    _close(_adapter(sharded), _adapter(one), 1e-4)


def test_sharded_equals_ddp_and_grad_op_equals_full(runs):
    assert _losses(runs / "fsdp-lora") == pytest.approx(_losses(runs / "ddp-lora"), rel=1e-6)
    _close(_adapter(runs / "fsdp-lora"), _adapter(runs / "ddp-lora"), 1e-6)
    assert _losses(runs / "zero2-lora") == _losses(runs / "fsdp-lora")  # same shards, same sums: bit for bit
    _close(_adapter(runs / "zero2-lora"), _adapter(runs / "fsdp-lora"), 0.0)


def test_checkpoints_hold_whole_tensors_and_no_pickle(runs):
    ckpt = runs / "fsdp-lora" / f"checkpoint-{STEPS}"
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert weights.keys() == {k.removeprefix("base_model.model.") for k in _adapter(runs / "fsdp-lora")}
    one = load_file(str(runs / "one-lora" / f"checkpoint-{STEPS}" / "trainable.safetensors"))
    assert {k: t.shape for k, t in weights.items()} == {k: t.shape for k, t in one.items()}  # whole, not halves
    optimizer = json.loads((ckpt / "optimizer.json").read_text())
    assert set(optimizer["state"]) == set(weights)  # keyed by parameter name: any number of ranks can load it
    assert not [p for p in ckpt.iterdir() if p.suffix in (".pt", ".bin", ".pkl") or p.name == ".metadata"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world"] == 2


@pytest.mark.parametrize(("cut", "straight"), [("cut1", "one-lora"), ("cut2", "fsdp-lora"), ("cut23", "one-lora6"),
                                               ("cut3", "three-lora"), ("cut32", "one-lora6"), ("killed", "one-lora6")])
def test_a_sharded_run_resumes_on_another_number_of_processes(runs, cut, straight):
    # cut1: 1 process to step 3, resumed on 2; cut2: 2 processes to step 3, resumed on 1 (batch_size x world = 4);
    # cut23: 2 processes to step 3, resumed on 3; cut3 (grad_op): 3 processes to step 3, resumed on 1 (x world = 6);
    # cut32: 3 processes to step 3, resumed on 2; killed: 2 processes, rank 0 killed -9 halfway through writing
    # checkpoint-3, resumed on 3 from checkpoint-2
    resumed = _losses(runs / cut)
    assert len(resumed) == STEPS
    assert resumed == pytest.approx(_losses(runs / straight), rel=1e-5)  # the sums run in another order: not bitwise
    _close(_adapter(runs / cut), _adapter(runs / straight), 1e-5)


def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_whole(runs):
    # read before the resume wrote checkpoint-3 and -4: the launch's own record of what it found
    found = json.loads((runs / "killed" / "rank0.json").read_text())["found"]
    assert found["latest"] == "checkpoint-2" and found["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    assert found["torn"]  # the half-written checkpoint-3 stayed a hidden temporary folder (removed at the resume)
    assert not [p for p in (runs / "killed").iterdir() if ".tmp-" in p.name]


def test_8bit_and_paged_optimizers_shard_their_state_and_equal_one_process(runs):
    # 2 ranks split the 128-row embeddings into 64 rows x 32 = 2048 elements: the 8-bit blocks (256) are the
    # unsharded ones, so only the gradient sums' order differs from one process
    sharded, one = runs / "fsdp-full8", runs / "one-full8"
    assert _losses(sharded) == pytest.approx(_losses(one), rel=1e-5)
    _close(_adapter(sharded), _adapter(one), 1e-5)
    # paging moves the state's bytes, never changes them: bit for bit the unpaged 8-bit optimizer
    assert _losses(runs / "fsdp-paged8") == _losses(sharded)
    _close(_adapter(runs / "fsdp-paged8"), _adapter(sharded), 0.0)
    held = [json.loads((sharded / f"rank{r}.json").read_text())["optimizer_bytes"] for r in (0, 1)]
    whole = json.loads((one / "rank0.json").read_text())["optimizer_bytes"]
    assert whole > 0 and held[0] == held[1] and sum(held) == whole  # each rank half
    # 2 ranks to step 3, resumed on 1: the checkpoint holds 32-bit moments, quantized again on the whole blocks
    assert _losses(runs / "cut2-8bit") == pytest.approx(_losses(one), rel=1e-5)
    _close(_adapter(runs / "cut2-8bit"), _adapter(one), 1e-5)


def test_sharding_refusals(tmp_path):
    with pytest.raises(PeftkitError, match="sharding: expected one of 'none', 'full', 'grad_op', got 'zero3'"):
        make_cfg(tmp_path, sharding="zero3")
    with pytest.raises(PeftkitError, match="ewc_lambda > 0 does not run with sharding"):
        Trainer(make_cfg(tmp_path, sharding="grad_op", ewc_lambda=1.0))
    with pytest.raises(PeftkitError, match="objective: dpo does not run with sharding yet"):
        Trainer(make_cfg(tmp_path, sharding="full", objective="dpo"))


def test_a_world_change_keeps_the_global_batch_or_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    saved = make_cfg(tmp_path, sharding="full", batch_size=2).to_dict()
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": saved, "world": 2}))
    check_resumable(ckpt, {**saved, "batch_size": 4}, 1, {})  # 2 x 2 rows = 1 x 4: allowed (inputs: old record)
    with pytest.raises(PeftkitError, match=r"global batch is 4 rows .* resume with batch_size=1"):
        check_resumable(ckpt, saved, 4, {})
    ddp = {**saved, "sharding": "none"}
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": ddp, "world": 2}))
    with pytest.raises(PeftkitError, match="the run had 2 process"):
        check_resumable(ckpt, {**ddp, "batch_size": 4}, 1, {})
