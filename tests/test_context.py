"""The adapter remembers how it was trained: generate and merge apply the recorded prompt, template and base."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from peftkit.cli import main
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.core.context import Quantization, TrainingContext, fingerprint, read_context
from peftkit.data.formats import ReadStats, read_conversations
from peftkit.errors import PeftkitError
from peftkit.generation import generate
from peftkit.models import load_model
from peftkit.quant import QuantLinear
from peftkit.train import TrainConfig, Trainer

INSTRUCTION = "Write the number in the message as digits."
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MESSAGE = "I would like seven, please."
TRAINED_PROMPT = [{"role": "user", "content": f"{INSTRUCTION}\n\n{MESSAGE}"}]  # as a training row renders it
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def write_rows(path, n=40):
    rows = [{"instruction": INSTRUCTION, "input": f"I would like {WORDS[i % 10]}, please.", "output": str(i % 10)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def save_base(folder, seed=0):
    model = tiny_llama(seed)
    with torch.no_grad():  # a sharper head: greedy answers then depend on the prompt
        model.lm_head.weight.mul_(30)
        model.lm_head.weight[:5] = 0  # and are text: special tokens (end of turn included) are never the argmax
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def train(tmp_path, name="run", **kw):
    base = save_base(tmp_path / "base") if not (tmp_path / "base").exists() else str(tmp_path / "base")
    cfg = TrainConfig.from_dict({
        "model": base, "data": write_rows(tmp_path / "orders.jsonl"), "output_dir": str(tmp_path / name),
        "precision": "fp32", "batch_size": 4, "lr": 1e-2, "method": "lora", "method_config": {"r": 4},
        "max_length": 128, "packing": False, "progress": False, "warmup_ratio": 0.0, "max_steps": 4, **kw})
    trainer = Trainer(cfg)
    result = trainer.run()
    return trainer, base, str(result.adapter_dir)


def cli_answer(capsys, *argv) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", "--precision", "fp32", "--max-new-tokens", "8", *argv, MESSAGE]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f">>> {MESSAGE}\n")
    ours = [line for line in out.err.replace("\r", "\n").splitlines() if line.startswith("peftkit")]  # not HF's bars
    return out.out.removeprefix(f">>> {MESSAGE}\n").removesuffix("\n\n"), ours


def by_hand(base, adapter, content, template=None) -> str:
    model, tok = load_model(base)
    if adapter:
        load_adapter(model, adapter)
    return generate(model, tok, [[{"role": "user", "content": content}]], max_new_tokens=8, template=template)[0]


def test_read_stats_name_the_shared_instruction_and_system_message():
    stats = ReadStats()
    read_conversations([{"instruction": "Do it.", "input": f"x{i}", "output": "y"} for i in range(3)], stats=stats)
    assert stats.instruction == "Do it." and stats.system is None
    stats = ReadStats()
    read_conversations([{"instruction": f"Do {i}.", "input": "x", "output": "y"} for i in range(3)], stats=stats)
    assert stats.instruction is None  # instructions differ: nothing to put back
    stats = ReadStats()
    read_conversations([{"instruction": "Do it.", "input": "x", "output": "y"},
                        {"instruction": "Do it.", "output": "y"}], stats=stats)
    assert stats.instruction is None  # a row without input was the instruction alone
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "a"}]} for i in range(2)]
    stats = ReadStats()
    read_conversations(chat, stats=stats)
    assert stats.system == "Be brief." and stats.instruction is None


def test_context_json_round_trip_and_bad_blocks():
    ctx = TrainingContext("my-base", "sha256:ab", Quantization("nf4", 128, False, "bfloat16"), "chatml", "{{ x }}",
                          "Be brief.", "Do it.")
    assert TrainingContext.from_json(json.loads(json.dumps(ctx.to_json()))) == ctx
    assert ctx.conversation("hi") == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Do it.\n\nhi"}]
    assert TrainingContext().conversation("hi") == [{"role": "user", "content": "hi"}]
    edited = ctx.to_json()
    edited["chat_template"]["text"] = "{{ y }}"
    with pytest.raises(PeftkitError, match="does not match its sha256"):
        TrainingContext.from_json(edited)
    with pytest.raises(PeftkitError, match="quantization must name a format"):
        TrainingContext.from_json({**ctx.to_json(), "quantization": {"format": "nf5"}})
    with pytest.raises(PeftkitError, match="input_format"):
        TrainingContext.from_json({**ctx.to_json(), "prompt": {"input_format": "{instruction} {oops}"}})
    with pytest.raises(PeftkitError, match="instruction must be a string"):
        TrainingContext.from_json({**ctx.to_json(), "prompt": {"instruction": 3}})


def test_fingerprint_ignores_dtype_and_sees_weights():
    a = tiny_llama(0)
    assert fingerprint(a) == fingerprint(tiny_llama(0).to(torch.bfloat16))
    assert fingerprint(a) != fingerprint(tiny_llama(1))
    from peftkit.quant import quantize_model

    quantize_model(a, "nf4")
    assert fingerprint(a) is None  # the full-precision weights are gone


def test_generate_applies_the_recorded_instruction_and_template(tmp_path, capsys):
    trainer, base, adapter = train(tmp_path)
    raw = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    block = json.loads((tmp_path / "run" / "adapter" / "peftkit.json").read_text())
    assert "peftkit" not in raw
    assert raw["base_model_name_or_path"] == base and block["base"]["name"] == base  # as the user named it
    assert block["base"]["fingerprint"] == fingerprint(load_model(base)[0])
    assert block["quantization"] is None
    assert block["chat_template"]["name"] == "model"
    assert block["chat_template"]["text"] == tiny_tokenizer().chat_template
    assert block["prompt"] == {"system": None, "instruction": INSTRUCTION, "input_format": "{instruction}\n\n{input}"}

    answer, err = cli_answer(capsys, "--adapter", adapter)  # no --model: the recorded base
    assert answer and answer == by_hand(base, adapter, f"{INSTRUCTION}\n\n{MESSAGE}")
    [line] = err
    assert "instruction 'Write the number" in line and "template model" in line
    # the fine-tuned model, in memory, gives the same answer to the prompt as trained
    assert answer == generate(trainer.model, trainer.tokenizer, [TRAINED_PROMPT], max_new_tokens=8)[0]
    raw_answer, err = cli_answer(capsys, "--adapter", adapter, "--no-context", "--model", base)
    assert raw_answer == by_hand(base, adapter, MESSAGE) and err == []
    assert raw_answer != answer  # the wrapping is what the test sees
    other, _ = cli_answer(capsys, "--adapter", adapter, "--instruction", "Say it.", "--template", "alpaca")
    assert other == by_hand(base, adapter, f"Say it.\n\n{MESSAGE}", template="alpaca")
    none, _ = cli_answer(capsys, "--adapter", adapter, "--instruction", "")
    assert none == raw_answer


def test_fingerprint_mismatch_warns_once_naming_both(tmp_path, capsys):
    _, base, adapter = train(tmp_path)
    shutil.copytree(base, tmp_path / "copy")
    _, err = cli_answer(capsys, "--adapter", adapter, "--model", str(tmp_path / "copy"))
    assert err == [next(iter(err))] and "warning" not in err[0]  # the same weights elsewhere
    other = save_base(tmp_path / "other", seed=1)
    _, err = cli_answer(capsys, "--adapter", adapter, "--model", other)
    [warning] = [line for line in err if "warning" in line]
    assert other in warning and base in warning and read_context(adapter).fingerprint in warning


def test_adapter_with_context_loads_in_peft_without_a_warning(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    trainer, base, adapter = train(tmp_path)
    with torch.no_grad():
        ours = trainer.model.eval()(input_ids=IDS).logits
    assert (Path(adapter) / "peftkit.json").is_file()
    base_model = AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base_model, adapter).eval()
    # the record lives in its own file: peft sees only keys it knows (it used to warn "Unexpected keyword arguments
    # ['peftkit'] ... upgrade PEFT" on every load)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "peftkit" in m or "Unexpected keyword" in m or "upgrade PEFT" in m], said
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, ours, atol=1e-5, rtol=1e-5)


def test_a_folder_with_the_record_inside_adapter_config_still_reads(tmp_path):
    trainer, base, adapter = train(tmp_path)
    folder = Path(adapter)
    recorded = read_context(folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["peftkit"] = json.loads((folder / "peftkit.json").read_text())  # how peftkit wrote it before
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    (folder / "peftkit.json").unlink()
    assert read_context(folder) == recorded and recorded is not None
    model, _ = load_model(base)
    load_adapter(model, folder)
    assert model.peftkit_context == recorded
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=IDS).logits, trainer.model.eval()(input_ids=IDS).logits)


def test_merge_of_a_qlora_adapter_uses_the_dequantized_base(tmp_path, capsys):
    trainer, base, adapter = train(tmp_path, quantize="nf4", quant_block_size=32)
    assert read_context(adapter).quantization == Quantization("nf4", 32, True, "float32")
    with torch.no_grad():
        adapted = trainer.model.eval()(input_ids=IDS).logits
    capsys.readouterr()
    assert main(["merge", adapter, str(tmp_path / "merged")]) == 0  # no --model, no --quantized-base
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("base:")]
    assert "NF4 + double quant (block 32)" in line and "dequantized" in line
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)

    assert main(["merge", adapter, str(tmp_path / "full"), "--quantized-base", "none"]) == 0
    assert "full precision as asked" in capsys.readouterr().out
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")(input_ids=IDS).logits
    assert (full - adapted).abs().max() > 100 * (got - adapted).abs().max()  # what the silent merge cost

    assert main(["merge", adapter, str(tmp_path / "q"), "--requantize"]) == 0  # the recorded format
    assert "re-quantized 14 layers to nf4" in capsys.readouterr().out
    layout = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert {v["block_size"] for v in layout["layers"].values()} == {32}


def test_generate_with_a_qlora_adapter_quantizes_the_base_as_trained(tmp_path, capsys):
    trainer, base, adapter = train(tmp_path, quantize="nf4")
    answer, err = cli_answer(capsys, "--adapter", adapter)
    assert "NF4 + double quant (block 64) base" in err[0]
    assert answer == generate(trainer.model, trainer.tokenizer, [TRAINED_PROMPT], max_new_tokens=8)[0]


def test_adapters_without_a_context_behave_as_before(tmp_path, capsys):
    base = save_base(tmp_path / "base")
    model, _ = load_model(base)
    apply_method(model, "lora", {"r": 4})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    assert "peftkit" not in raw and not (tmp_path / "old" / "peftkit.json").exists()
    assert read_context(tmp_path / "old") is None
    answer, err = cli_answer(capsys, "--adapter", str(tmp_path / "old"), "--model", base)
    assert answer == by_hand(base, tmp_path / "old", MESSAGE) and err == []
    fresh, _ = load_model(base)
    load_adapter(fresh, tmp_path / "old")
    assert not hasattr(fresh, "peftkit_context")
    assert main(["merge", str(tmp_path / "old"), str(tmp_path / "m"), "--model", base]) == 0
    assert "records no training context" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "old"), str(tmp_path / "m2"), "--model", base, "--requantize"]) == 2
    assert "--requantize: the adapter was not trained on a quantized base" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_a_malformed_block_is_refused_before_touching_the_model(tmp_path):
    _, base, adapter = train(tmp_path)
    path = tmp_path / "run" / "adapter" / "peftkit.json"
    raw = json.loads(path.read_text())
    raw["quantization"] = {"format": "nf4", "block_size": "big"}
    path.write_text(json.dumps(raw))
    model, _ = load_model(base)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PeftkitError, match="peftkit.json: peftkit: quantization: bad block_size"):
        load_adapter(model, adapter)
    assert model.state_dict().keys() == before.keys() and not any(
        isinstance(m, QuantLinear) for m in model.modules())


def test_compare_evaluates_in_the_template_it_trained_with(tmp_path, monkeypatch):
    import peftkit.generation as gen
    from peftkit.data.sequences import TEMPLATES
    from peftkit.eval.compare import COMMON_SETTINGS, DEFAULT_ENTRIES, CompareTask, run_entry

    base = save_base(tmp_path / "base")
    CompareTask(write_rows(tmp_path / "train.jsonl", n=16), [f"{INSTRUCTION}\n\n{MESSAGE}"], [["7"]]).save(
        tmp_path / "task.json")
    seen = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **kw: seen.append(kw.get("template")) or real(*a, **kw))
    common = {**COMMON_SETTINGS, "precision": "fp32", "max_length": 256, "template": "alpaca"}
    result = run_entry({"model": base, "task": str(tmp_path / "task.json"), "common": common, "metrics": "bleu-nist",
                        "max_new_tokens": 4, "eval_batch_size": 4, "label": "lora", "entry": DEFAULT_ENTRIES["lora"],
                        "output_dir": str(tmp_path / "lora")})
    assert len(result["predictions"]) == 1
    assert seen == [TEMPLATES["alpaca"]]  # not the model's own chatml template
