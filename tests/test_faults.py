"""Bad inputs and faults, one row each: the expected one-line error (or the right behaviour), and a check that
nothing was damaged (weights, checkpoints, the run folder, the input adapter)."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from conftest import requires_bundled, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file
from test_train import make_cfg, sharp_llama

from peftkit.commands.merge import check_output
from peftkit.errors import PeftkitError
from peftkit.quant import QuantLinear, load_quantized, quantize_model, save_quantized
from peftkit.train import Trainer, load_recipe
from peftkit.train.checkpoint import RunFolder, latest_checkpoint


def trainer(cfg, **kw) -> Trainer:
    return Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer(), **kw)


def all_checkpoints_finite(folder) -> bool:
    ckpts = sorted(folder.glob("checkpoint-*"))
    return all(all(bool(torch.isfinite(t).all()) for t in load_file(c / "trainable.safetensors").values())
               for c in ckpts)


# ---------------------------------------------------------------- divergence
@pytest.mark.parametrize("lr, cause", [
    (1e30, "non-finite"),  # the update overflows: inf weights, then nan loss / gradients
    (3e3, "non-finite|dead run|diverged"),  # saturated outputs: a dead or diverged run
])
def test_a_diverging_run_stops_before_a_bad_step_reaches_weights_or_checkpoints(tmp_path, lr, cause):
    cfg = make_cfg(tmp_path, max_steps=12, lr=lr, save_every=1, keep_checkpoints=2, warmup_ratio=0.0, epochs=4.0)
    with pytest.raises(PeftkitError, match=f"training stopped at step \\d+: .*({cause}).*Last checkpoint") as e:
        trainer(cfg).run()
    assert "precision fp32" not in str(e.value)  # the advice fits an fp32 run
    assert "\n" not in str(e.value)
    assert all_checkpoints_finite(tmp_path / "run")
    last = latest_checkpoint(tmp_path / "run")
    stopped = int(re.search(r"stopped at step (\d+)", str(e.value))[1])
    if stopped > 1:  # save_every=1: every step before the bad one was checkpointed, and the message names the last
        assert last == tmp_path / "run" / f"checkpoint-{stopped - 1}" and str(last) in str(e.value)
    else:
        assert last is None and "Last checkpoint (finite weights, verified when saved): none" in str(e.value)
    assert not (tmp_path / "run" / "adapter").exists()  # no adapter from a broken run


def test_skip_bad_steps_drops_the_bad_updates_and_keeps_training(tmp_path, monkeypatch):
    from peftkit.train import step as step_module

    real = step_module.sequence_loss
    calls = {"n": 0}

    def flaky(model, batch):  # micro-batches 2 and 3 give a nan loss
        loss, n = real(model, batch)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] in (2, 3) else loss), n

    monkeypatch.setattr(step_module, "sequence_loss", flaky)
    cfg = make_cfg(tmp_path, max_steps=5, skip_bad_steps=2)
    t = trainer(cfg)
    result = t.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 5 and [r.get("skipped", False) for r in log] == [False, True, True, False, False]
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    calls["n"] = 0
    with pytest.raises(PeftkitError, match="after 1 skipped step"):  # one allowed: the second bad step stops
        trainer(make_cfg(tmp_path / "b", max_steps=5, skip_bad_steps=1)).run()


# ---------------------------------------------------------------- output folders
def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=2)
    trainer(cfg).run()
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(PeftkitError, match="already holds a run .*--resume.*--overwrite"):
        trainer(cfg).run()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before  # untouched
    (tmp_path / "run" / "notes.txt").write_text("mine")
    trainer(cfg, overwrite=True).run()
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only run files are replaced


def test_resume_without_a_checkpoint_starts_again_and_the_plain_rerun_says_so(tmp_path, capsys):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=3)
    straight = trainer(make_cfg(tmp_path / "b", max_steps=4, save_every=3))
    straight.run()
    trainer(cfg).run(until_step=2)  # "killed" before its first checkpoint
    assert latest_checkpoint(tmp_path / "run") is None and (tmp_path / "run" / "metrics.jsonl").is_file()
    with pytest.raises(PeftkitError, match="stopped before its first checkpoint: --resume starts it again from step 0"):
        trainer(cfg).run()
    resumed = trainer(cfg, resume=True)
    assert resumed.run().steps == 4
    said = capsys.readouterr().err
    assert "no checkpoint yet (the run stopped before its first): starting it again from step 0" in said
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    # finished without checkpoints: nothing to resume, and the adapter is left alone
    done = make_cfg(tmp_path / "c", max_steps=2)
    trainer(done).run()
    with pytest.raises(PeftkitError, match="finished run without checkpoints: nothing to resume"):
        trainer(done, resume=True).run()
    assert (tmp_path / "c" / "run" / "adapter").is_dir()


@requires_bundled
def test_resuming_a_finished_run_says_nothing_to_do(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=2, save_every=1)
    trainer(cfg).run()
    keys = ("data", "output_dir", "max_steps", "packing", "max_length", "save_every", "batch_size", "lr")
    args = [sys.executable, "-m", "peftkit.cli", "train", *(f"{k}={cfg.to_dict()[k]}" for k in keys)]
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")}
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    # the CLI's bundled model is not the tiny one: only the run folder decides, before any training
    proc = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [f"peftkit: {tmp_path / 'run'} holds a finished run (step 2 of 2, "
                                                "adapter/): nothing to do"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, 'src'); from pathlib import Path;"
        "from peftkit.train.checkpoint import RunFolder; held = RunFolder(Path(sys.argv[1]));"
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PeftkitError, match="in use by another peftkit run \\(pid"):
            RunFolder(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    RunFolder(tmp_path / "run").release()  # the lock went with the process


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    (run / ".checkpoint-4.tmp-abc").mkdir(parents=True)
    (run / ".latest.xyz").write_text("checkpoint-4")
    (run / ".adapter.tmp-q1").mkdir()
    RunFolder(run).release()
    assert sorted(p.name for p in run.iterdir()) == [".peftkit.lock"]


def test_merge_refuses_an_output_that_holds_its_input_or_other_files(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    for out in (tmp_path / "run", adapter):
        with pytest.raises(PeftkitError, match="is or contains the adapter"):
            check_output(str(adapter), str(out), overwrite=True)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "x").write_text("keep")
    with pytest.raises(PeftkitError, match="not empty; use --overwrite"):
        check_output(str(adapter), str(tmp_path / "merged"), overwrite=False)
    check_output(str(adapter), str(tmp_path / "merged"), overwrite=True)
    check_output(str(adapter), str(tmp_path / "new"), overwrite=False)
    assert (tmp_path / "merged" / "x").read_text() == "keep"


def test_files_follow_the_umask(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=2, save_every=2)
    old = os.umask(0o022)
    try:
        trainer(cfg).run()
    finally:
        os.umask(old)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert ckpt.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "run" / "latest").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "adapter").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("change", ["quantize=nf4", "seed=3", "method_config.r=8", "optimizer=adamw_8bit"])
def test_resume_refuses_a_changed_setting_and_names_it(tmp_path, change):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=2)
    trainer(cfg).run(until_step=2)
    key, value = change.split("=")
    data = cfg.to_dict()
    if key.startswith("method_config."):
        data["method_config"] = {**data["method_config"], key.split(".")[1]: int(value)}
    else:
        data[key] = int(value) if value.isdigit() else value
    changed = type(cfg).from_dict(data)
    with pytest.raises(PeftkitError, match=f"cannot resume .*settings changed \\({key.split('.')[0]}: "):
        trainer(changed, resume=True).run()


def test_resume_with_a_new_lr_uses_it_and_cuts_the_log_back(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=6, save_every=2, scheduler="constant")
    trainer(cfg).run(until_step=3)  # killed after step 3: the checkpoint is step 2, the log has 3 rows
    faster = cfg.replace(lr=cfg.lr * 10)
    trainer(faster, resume=True).run()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[1]["lr"] == pytest.approx(cfg.lr) and log[2]["lr"] == pytest.approx(10 * cfg.lr)


# ---------------------------------------------------------------- untrusted files
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=2)
    trainer(cfg).run(until_step=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "run" / "checkpoint-2"
    assert not list(ckpt.glob("*.pt"))  # every state file is safetensors or JSON
    (ckpt / "optimizer.safetensors").write_bytes(pickle.dumps(Evil()))  # in place of a state file
    with pytest.raises(PeftkitError, match="optimizer.json \\(or its .safetensors\\) is unreadable") as e:
        trainer(cfg, resume=True).run()
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    for name in ("optimizer.safetensors", "optimizer.json"):  # an older peftkit's checkpoint: a pickle
        (ckpt / name).unlink()
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PeftkitError, match="optimizer.pt is a pickle .* no longer loads pickles .*start a new run"):
        trainer(cfg, resume=True).run()
    assert not marker.exists()


# ---------------------------------------------------------------- messages
def test_yaml_errors_are_one_line_with_file_line_and_column(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nlr: [1e-4\nbatch_size: 2\n")
    with pytest.raises(PeftkitError) as e:
        load_recipe(recipe)
    assert str(e.value).startswith(f"{recipe}:") and "\n" not in str(e.value)
    line, col = str(e.value).removeprefix(f"{recipe}:").split(":")[:2]
    assert line.isdigit() and col.isdigit()


def test_hf_spelling_is_an_alias_and_typos_get_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nlearning_rate: 1e-4\n")
    assert load_recipe(recipe).lr == 1e-4
    recipe.write_text("method: lora\nlerning_rate: 1e-4\n")
    with pytest.raises(PeftkitError, match="unknown key 'lerning_rate' .*did you mean lr\\?"):
        load_recipe(recipe)
    recipe.write_text("method: lora\nlr: 1e-3\nlearning_rate: 1e-4\n")
    with pytest.raises(PeftkitError, match="'learning_rate' and 'lr' are the same key"):
        load_recipe(recipe)


# ---------------------------------------------------------------- full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _enospc_for_latest(fd, *args, **kwargs):  # only the temporary file that becomes `latest` hits a full disk
    if ".latest." in os.readlink(f"/proc/self/fd/{fd}"):
        _enospc()
    return open(fd, *args, **kwargs)  # noqa: SIM115 - what os.fdopen returns


@pytest.mark.parametrize("target, patch, until", [
    ("checkpoint-4/optimizer.safetensors", ("peftkit.train.state_files.save_file", _enospc), 4),
    ("checkpoint-4/trainable.safetensors", ("peftkit.train.checkpoint.save_file", _enospc), 4),
    ("latest", ("peftkit.train.checkpoint.os.fdopen", _enospc_for_latest), 4),
    ("adapter/adapter_model.safetensors", ("peftkit.core.adapter_io.save_file", _enospc), None),
])
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, patch, until):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=2, keep_checkpoints=1)
    trainer(cfg).run(until_step=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    with monkeypatch.context() as m:
        m.setattr(*patch)
        with pytest.raises(PeftkitError) as e:
            trainer(cfg, resume=True).run(until_step=until)
    assert str(e.value).startswith(f"no space left on device while writing {tmp_path / 'run' / target}")
    assert "\n" not in str(e.value)
    run = tmp_path / "run"
    if target.startswith("adapter"):  # the run's last checkpoint is the kept state
        assert (run / "latest").read_text() == "checkpoint-4" and (run / "checkpoint-4").is_dir()
    else:  # the earlier checkpoint, whole, and not pruned although keep_checkpoints=1
        assert (run / "latest").read_text() == "checkpoint-2"
        assert {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir()} == before
        assert not (run / "checkpoint-4").exists()
    assert not list(run.glob(".*.tmp-*")) and not list(run.glob(".latest.*")) and not (run / "adapter").exists()
    result = trainer(cfg, resume=True).run()  # with space again, the run resumes from what was kept and finishes
    assert result.steps == 4 and (run / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- data
def test_skip_bad_rows_skips_invalid_jsonl_lines_too(tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [json.dumps({"instruction": f"Repeat {i % 7} twice", "output": f"{i % 7}{i % 7}"}) for i in range(40)]
    rows[5], rows[17] = '{"instruction": "cut off', "not json at all"
    rows[9] = json.dumps({"instruction": "no output"})
    data.write_text("\n".join(rows))
    cfg = make_cfg(tmp_path, data=str(data), max_steps=2)
    with pytest.raises(PeftkitError, match=f"^{data}: line 6 is not valid JSON .*set skip_bad_rows"):
        trainer(cfg)
    t = trainer(cfg.replace(skip_bad_rows=True))
    assert (t.data.read_stats.rows, t.data.read_stats.skipped, t.data.tok_stats.examples) == (40, 3, 37)
    assert {r.split(": ", 1)[1][:7] for r in t.data.read_stats.reasons} == {"line 6 ", "line 10", "line 18"}
    assert data.read_text().count("\n") == 39  # the file is only read


@pytest.mark.parametrize("overlong, expected", [
    ("drop", r"all 48 examples are longer than max_length=12 tokens \(shortest: (\d+)\); raise max_length"),
    ("truncate", r"all 48 examples lose their whole answer when truncated to max_length=12 tokens \(shortest "
                 r"prompt: (\d+) tokens\); raise max_length"),
])
def test_when_every_example_is_dropped_the_error_gives_the_reason(tmp_path, overlong, expected):
    cfg = make_cfg(tmp_path, max_length=12, overlong=overlong, max_steps=2)
    with pytest.raises(PeftkitError, match=expected) as e:
        trainer(cfg)
    assert "batch_size" not in str(e.value)
    shortest = int(re.search(expected, str(e.value)).group(1))
    assert shortest > 12  # the number is the real shortest length, beyond the limit
    assert trainer(cfg.replace(max_length=shortest + 8)).data.tok_stats.examples == 48
    assert not (tmp_path / "run").exists()  # nothing was written


def test_too_few_rows_after_dropping_names_the_drops(tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"instruction": "x" * (5 if i < 3 else 80), "output": "y"} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(PeftkitError, match="3 training rows cannot fill one step .*17 examples were dropped as "
                                           "longer than max_length=64"):
        trainer(make_cfg(tmp_path, data=str(data), overlong="drop", max_steps=2))


# ---------------------------------------------------------------- adapter files
def test_a_pickle_adapter_is_refused_by_name_and_the_printed_command_converts_it(tmp_path):
    from peftkit.core.adapter_io import read_adapter

    trainer(make_cfg(tmp_path, max_steps=2)).run()
    adapter = tmp_path / "run" / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")  # what older peft writes
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PeftkitError, match="adapter_model.bin is a pickle file; peftkit loads only "
                                           "adapter_model.safetensors.*convert it with: python -c") as e:
        read_adapter(adapter)
    command = str(e.value).split("convert it with: ", 1)[1].removesuffix(")")
    subprocess.run(command.replace("python", sys.executable, 1), shell=True, check=True)
    assert {k: v.tolist() for k, v in read_adapter(adapter)[2].items()} == {
        k.removeprefix("base_model.model."): v.tolist() for k, v in tensors.items()}

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PeftkitError, match="is a pickle file"):
        read_adapter(adapter)
    assert not marker.exists()
    with pytest.raises(subprocess.CalledProcessError):  # the conversion loads with weights_only: refused too
        subprocess.run(command.replace("python", sys.executable, 1), shell=True, check=True, capture_output=True)
    assert not marker.exists() and not (adapter / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- quantization files
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"


def _edit_layer(key, value):
    def edit(meta, tensors):
        meta["layers"][Q0][key] = value
    return edit


def _swap_q_proj(meta, tensors):  # same shapes, same format: only the fingerprint tells them apart
    for suffix in ("weight", "weight_absmax"):
        tensors[f"{Q0}.{suffix}"], tensors[f"{Q1}.{suffix}"] = tensors[f"{Q1}.{suffix}"], tensors[f"{Q0}.{suffix}"]


@pytest.mark.parametrize("edit, expected", [
    (_edit_layer("format", "fp4"), f"layer '{Q0}' does not match its stored tensors"),  # same nibbles, other codebook
    (_edit_layer("format", "int4"), f"layer '{Q0}' does not match its stored tensors"),
    (_swap_q_proj, f"layer '{Q0}' does not match its stored tensors"),
    (lambda m, t: m.update(version=99), "unsupported version 99; this peftkit reads version 2"),
    (lambda m, t: m.update(version=1), "unsupported version 1; .*older peftkit, without per-layer fingerprints"),
    (lambda m, t: m.update(layers=list(m["layers"].values())), "layers must be a non-empty object .*got list"),
    (lambda m, t: m.update(layers={Q0: "nf4"}), f"layer '{Q0}': the layout must be an object, got a str"),
    (_edit_layer("format", "nf5"), "unknown format 'nf5'"),
    (_edit_layer("block_size", "64"), "block_size must be of type int, got '64'"),
    (_edit_layer("in_features", True), "in_features must be of type int, got True"),
    (_edit_layer("double_quant", 1), "double_quant must be of type bool, got 1"),
    (_edit_layer("weight_dtype", "float8"), "weight_dtype 'float8' is not one of"),
    (lambda m, t: m["layers"][Q0].pop("fingerprint"), r"missing \['fingerprint'\]"),
    (lambda m, t: m.pop("version"), "unsupported version None"),
])
def test_a_quantization_file_is_validated_fully_on_load(tmp_path, edit, expected):
    model = tiny_llama()
    quantize_model(model, "nf4", compute_dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = model(ids).logits
    good = save_quantized(model, tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    meta, tensors = json.loads((good / "quantization.json").read_text()), load_file(good / "model.safetensors")
    edit(meta, tensors)
    (bad / "quantization.json").write_text(json.dumps(meta))
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(PeftkitError, match=expected) as e:
        load_quantized(bad, tiny_llama())
    assert "\n" not in str(e.value)
    with torch.no_grad():  # the good save still loads, with the same logits
        assert torch.equal(load_quantized(good, tiny_llama()).eval()(ids).logits, expected_logits)


def test_the_compute_dtype_of_a_quantization_file_may_be_changed(tmp_path):
    model = tiny_llama()
    quantize_model(model, "nf4", compute_dtype=torch.float32)
    folder = save_quantized(model, tmp_path)
    meta = json.loads((folder / "quantization.json").read_text())
    for layout in meta["layers"].values():
        layout["compute_dtype"] = "bfloat16"
    (folder / "quantization.json").write_text(json.dumps(meta))
    loaded = load_quantized(folder, tiny_llama())
    assert {m.compute_dtype for m in loaded.modules() if isinstance(m, QuantLinear)} == {torch.bfloat16}


# ---------------------------------------------------------------- distributed (one process here; DDP: test_distributed)
def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=2)
    trainer(cfg).run(until_step=2)
    state_file = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["world"] == 1
    state_file.write_text(json.dumps({**state, "world": 2}))  # as a 2-process run would have written it
    before = {p.name: p.read_bytes() for p in state_file.parent.iterdir()}
    with pytest.raises(PeftkitError, match=r"cannot resume .*checkpoint-2: the run had 2 process\(es\), this one has"):
        trainer(cfg, resume=True).run()
    assert {p.name: p.read_bytes() for p in state_file.parent.iterdir()} == before


@pytest.mark.parametrize("value", [0, -5])
def test_dist_timeout_must_be_positive(tmp_path, value):
    with pytest.raises(PeftkitError, match=f"dist_timeout must be > 0 seconds, got {value}"):
        make_cfg(tmp_path, dist_timeout=value)
