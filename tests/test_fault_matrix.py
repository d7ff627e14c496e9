"""The fault matrix of issue 26, run as a user would: the `peftkit` CLI on a tiny model and one tiny trained adapter.

Every row: the exit status, one line on stderr naming the file / line / key and the way out, and nothing written
(no half-made output, the run folder intact). One adapter is trained once for the module (through the CLI) and
copied per case before it is damaged. The partial-adapter rows go through every command that loads an adapter:
generate, merge, export (merged and --lora) and serve (startup and ``POST /v1/adapters``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

from peftkit.cli import main
from peftkit.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, check_adapter
from peftkit.core.context import RECORD_NAME
from peftkit.data.formats import read_conversations
from peftkit.errors import PeftkitError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`peftkit ARGV` in a fresh process (this checkout's sources)."""
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *argv], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line a failed command ends with (progress bars of the libraries may come before it)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines, proc.stderr
    assert "Traceback" not in proc.stderr and sum("error:" in line for line in lines) == 1, proc.stderr
    assert lines[-1].startswith(f"peftkit {proc.args[3]}: error: "), proc.stderr
    return lines[-1]


def refused(capfd, *argv: str, code: int = 2) -> str:
    """Run `peftkit ARGV` (in this process: the same entry point, without a process start per row), check that it
    fails with `code` and exactly one line on stderr, and return that line."""
    assert main(list(argv)) == code
    err = capfd.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(f"peftkit {argv[0]}: error: "), err
    assert "Traceback" not in err, err
    return last


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama base folder, data, and a LoRA adapter (q_proj, v_proj) trained on it by `peftkit train`."""
    root = tmp_path_factory.mktemp("matrix")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    rows = [{"instruction": f"Repeat {i % 7} twice", "output": f"{i % 7}{i % 7}"} for i in range(16)]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {root / 'base'}\ndata: {root / 'd.jsonl'}\noutput_dir: {root / 'run'}\n"
                      "method: lora\nmethod_config: {r: 2, target_modules: [q_proj, v_proj]}\nmax_steps: 2\n"
                      "batch_size: 4\nmax_length: 48\nsave_every: 1\nprecision: fp32\nprogress: false\n"
                      "packing: false\n")
    proc = cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "base": root / "base", "adapter": root / "run" / "adapter", "run": root / "run",
            "recipe": recipe}


def copy_adapter(world, tmp_path, name: str = "adapter") -> Path:
    out = tmp_path / name
    shutil.copytree(world["adapter"], out)
    return out


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def edit_config(folder: Path, edit, name: str = CONFIG_NAME) -> None:
    raw = json.loads((folder / name).read_text())
    edit(raw)
    (folder / name).write_text(json.dumps(raw))


def partial(world, tmp_path) -> Path:
    """The adapter with every other tensor removed (issue 26: "44 of 120 tensors removed")."""
    folder = copy_adapter(world, tmp_path, "partial")
    edit_tensors(folder, lambda t: [t.pop(k) for k in sorted(t)[::2]])
    return folder


def k_proj_without_tensors(world, tmp_path) -> Path:
    """A config whose target_modules names k_proj, with no k_proj tensor in the file."""
    folder = copy_adapter(world, tmp_path, "kproj")
    edit_config(folder, lambda raw: raw.update(target_modules=["q_proj", "k_proj", "v_proj"]))
    return folder


BROKEN = {
    "partial": (partial, r"partial/adapter_model.safetensors is incomplete: \d+ of \d+ tensors missing"),
    "k_proj": (k_proj_without_tensors, r"kproj/adapter_config.json: target_modules names 'k_proj', but "
                                       r"adapter_model.safetensors holds no k_proj tensors"),
}


# ------------------------------------------------------------ the silent case: incomplete adapters, every loader
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_incomplete_adapter_is_refused_by_generate_in_one_line(world, tmp_path, case):
    make, expected = BROKEN[case]
    line = error_line(cli("generate", "--adapter", str(make(world, tmp_path)), "--max-new-tokens", "2", "hi"))
    assert re.search(expected, line), line


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("command", ["merge", "export", "export --lora"])
def test_an_incomplete_adapter_is_refused_by_merge_and_export(world, tmp_path, capfd, case, command):
    make, expected = BROKEN[case]
    folder = make(world, tmp_path)
    out = tmp_path / ("merged" if command == "merge" else "out.gguf")
    name, *flags = command.split()
    line = refused(capfd, name, str(folder), str(out), *flags)
    assert re.search(expected, line), line
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_incomplete_adapter_is_refused_by_serve_at_startup_and_at_run_time(world, tmp_path, case):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from peftkit.cli import build_parser
    from peftkit.commands.serve import build_engine
    from peftkit.serve.app import create_app

    make, expected = BROKEN[case]
    folder = make(world, tmp_path)
    with pytest.raises(PeftkitError, match=expected):
        build_engine(build_parser().parse_args(["serve", "--precision", "fp32", "--adapter", f"x={folder}"]))
    root = os.path.commonpath([folder, world["adapter"]])  # run-time loading needs a root holding both
    engine = build_engine(build_parser().parse_args(["serve", "--precision", "fp32", "--adapter-root", root,
                                                     "--adapter", f"whole={world['adapter']}"]))
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/adapters", json={"name": "broken", "path": str(folder)})
        assert r.status_code == 400 and re.search(expected, r.json()["error"]["message"]), r.text
        assert "broken" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
        r = client.post("/v1/adapters", json={"name": "again", "path": str(world["adapter"])})
        assert r.status_code == 200, r.text


def test_extra_and_misshapen_tensors_are_refused_naming_the_tensor(world, tmp_path, capfd):
    import torch

    extra = copy_adapter(world, tmp_path, "extra")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(extra, lambda t: t.update({key: torch.zeros(2, 32)}))
    line = refused(capfd, "merge", str(extra), str(tmp_path / "m1"))
    assert "extra/adapter_model.safetensors holds 1 tensor(s)" in line and "k_proj.lora_A" in line

    shape = copy_adapter(world, tmp_path, "shape")
    edit_tensors(shape, lambda t: t.update({k: torch.zeros(3, *v.shape[1:]) for k, v in list(t.items())[:1]}))
    line = refused(capfd, "export", str(shape), str(tmp_path / "o.gguf"), "--lora")
    assert "shape/adapter_model.safetensors:" in line and "has shape (3," in line


def test_the_whole_adapter_passes_the_same_check(world):
    from peftkit.models import load_model

    model, _ = load_model(world["base"])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    checked = check_adapter(world["adapter"], model)
    assert checked.spec.name == "lora" and len(checked.tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    after = model.state_dict()  # the model is only read
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


def test_an_adapter_config_saved_with_a_byte_order_mark_loads(world, tmp_path):
    from peftkit.models import load_model

    folder = copy_adapter(world, tmp_path)
    (folder / CONFIG_NAME).write_bytes(b"\xef\xbb\xbf" + (folder / CONFIG_NAME).read_bytes())
    assert check_adapter(folder, load_model(world["base"])[0]).context is not None


# ------------------------------------------------------------ the record: version, block size, corrupt files
@pytest.mark.parametrize("edit, expected", [
    (lambda raw: raw.update(version=99), "peftkit: record version 99 is not one this peftkit reads"),
    (lambda raw: raw.update(quantization={"format": "nf4", "block_size": 63}),
     "block_size must be a power of two"),
])
def test_a_bad_record_is_refused_naming_the_file(world, tmp_path, capfd, edit, expected):
    folder = copy_adapter(world, tmp_path)
    edit_config(folder, edit, RECORD_NAME)
    for argv in (["generate", "--adapter", str(folder), "hi"], ["merge", str(folder), str(tmp_path / "m")]):
        line = refused(capfd, *argv)
        assert f"{folder / RECORD_NAME}: " in line and expected in line, line
    assert not (tmp_path / "m").exists()


def test_a_truncated_weights_file_is_refused(world, tmp_path, capfd):
    folder = copy_adapter(world, tmp_path)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    line = refused(capfd, "generate", "--adapter", str(folder), "hi")
    assert f"{folder / WEIGHTS_NAME} is corrupt or truncated" in line


# ------------------------------------------------------------ merge: run folders, requantized output
def test_merge_refuses_a_path_inside_a_run_folder_even_with_overwrite(world, tmp_path, capfd):
    ckpt = world["run"] / "checkpoint-1"
    before = sorted(p.name for p in ckpt.iterdir())
    adapter = copy_adapter(world, tmp_path)
    for target in (ckpt, world["run"], world["run"] / "merged-here"):
        line = refused(capfd, "merge", str(adapter), str(target), "--overwrite")
        assert f"is inside the training run {world['run']}" in line
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert not (world["run"] / "merged-here").exists()


def test_a_requantized_merge_loads_in_generate(world, tmp_path, capfd):
    out = tmp_path / "merged-nf4"
    assert main(["merge", str(world["adapter"]), str(out), "--requantize", "nf4"]) == 0
    assert "peftkit generate --model" in capfd.readouterr().out
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "hi"]) == 0
    assert ">>> hi" in capfd.readouterr().out


# ------------------------------------------------------------ data: encodings
def test_non_utf8_data_names_file_and_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    path.write_bytes(good + b"\n" + '{"instruction": "café", "output": "x"}'.encode("latin-1") + b"\n" + good + b"\n")
    with pytest.raises(PeftkitError, match=r"latin1.jsonl: line 2 is not UTF-8 \(byte 0xe9 at column 21\).*"
                                           r"skip_bad_rows") as e:
        read_conversations(path)
    assert "\n" not in str(e.value)
    assert len(read_conversations(path, skip_bad_rows=True)) == 2
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"instruction,output\na,b\n" + "café,x\n".encode("latin-1"))
    with pytest.raises(PeftkitError, match=r"latin1.csv: line 3 is not UTF-8"):
        read_conversations(csv)


def test_non_utf8_data_fails_training_in_one_line(world, tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"))
    line = error_line(cli("train", str(world["recipe"]), f"data={path}", f"output_dir={tmp_path / 'run'}"))
    assert f"{path}: line 1 is not UTF-8 (byte 0xe9 at column 22)" in line
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_byte_order_mark_is_accepted_in_every_text_format(tmp_path, suffix):
    text = {".json": '[{"instruction": "a", "output": "b"}]', ".jsonl": '{"instruction": "a", "output": "b"}\n',
            ".csv": "instruction,output\na,b\n"}[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    [conversation] = read_conversations(path)
    assert conversation[-1]["content"] == "b" and conversation[0]["content"].startswith("a")


# ------------------------------------------------------------ the command line itself
def test_an_override_error_names_the_override_not_the_recipe(world, capfd):
    line = refused(capfd, "train", str(world["recipe"]), "epochs=abc")
    assert "override epochs=abc: " in line and "recipe.yaml" not in line
    line = refused(capfd, "train", str(world["recipe"]), "method_config.r=-2")
    assert "override method_config.r=-2: " in line and "recipe.yaml" not in line


def test_a_bad_recipe_is_still_blamed_on_its_file(world, tmp_path, capfd):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(world["recipe"].read_text() + "epochs: abc\n")
    line = refused(capfd, "train", str(recipe), "lr=1e-3")
    assert f"{recipe}: " in line and "override" not in line


def test_info_with_settings_that_do_not_fit_exits_non_zero(world, capfd):
    line = refused(capfd, "info", "--model", str(world["base"]), "--method", "lora", "r=100000")
    assert "--method lora r=100000" in line


def test_an_unreachable_hub_model_fails_fast_in_one_line(tmp_path):
    start = time.monotonic()
    line = error_line(cli("generate", "--model", "peftkit-test/no-such-model", "hi",
                          env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}))
    assert "'peftkit-test/no-such-model': HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" in line
    assert time.monotonic() - start < 20  # one process start, no retries


def test_a_gguf_chat_template_is_used_when_transformers_drops_it(tmp_path, monkeypatch):
    from test_export import bpe_llama, bpe_tokenizer
    from transformers import AutoTokenizer

    from peftkit import models
    from peftkit.export import export_gguf

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    tok = bpe_tokenizer()
    path = export_gguf(bpe_llama(), tok, tmp_path / "m.gguf", "f32")
    assert models.gguf_chat_template(path) == tok.chat_template
    real = AutoTokenizer.from_pretrained

    def dropping(*args, **kwargs):  # what transformers does for a Gemma 3 GGUF
        loaded = real(*args, **kwargs)
        if kwargs.get("gguf_file"):
            loaded.chat_template = None
        return loaded

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", dropping)
    assert models.load_tokenizer(path).chat_template == tok.chat_template
    monkeypatch.undo()
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    [folder] = (tmp_path / "cache").glob("m-*")  # a cache converted before: the template comes from the file
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    assert models.load_tokenizer(path).chat_template == tok.chat_template


# ------------------------------------------------------------ several processes
def test_under_torchrun_an_error_every_rank_raises_is_printed_once_and_recorded(world, tmp_path, capfd, monkeypatch):
    for rank in ("1", "0"):
        error_file = tmp_path / f"error-{rank}.json"
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        assert main(["train", str(world["recipe"]), "epochs=abc"]) == 2
        err = capfd.readouterr().err.strip()
        line = json.loads(error_file.read_text())["message"]["message"]  # what torchrun's summary shows
        assert line.startswith("peftkit train: error: ") and "override epochs=abc" in line
        assert err == ("" if rank == "1" else line)  # rank 0 prints it; the others only record it


def test_a_failing_rank_ends_the_launcher_with_one_line(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)  # a 1-process run: resuming it with 2 processes is refused on every rank
    before = {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir()}
    proc = cli("train", str(world["recipe"]), f"output_dir={run}", "max_steps=4", "--resume", "--nproc-per-node", "2",
               env={"OMP_NUM_THREADS": "1"})
    line = error_line(proc)
    assert re.search(r"rank \d of 2 exited with status 2 \(1 other rank\(s\) stopped too\): PeftkitError: cannot "
                     r"resume .*the run had 1 process\(es\), this one has 2", line), line
    assert proc.stderr.count("cannot resume") == 1 and "ChildFailedError" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir()} == before
