"""Resume compares the contents of what the run read (data, tokenizer, chat template), not how the path is spelled."""

from __future__ import annotations

import json
import os

import pytest
from conftest import tiny_tokenizer
from test_train import make_cfg, sharp_llama, write_data

from peftkit.errors import PeftkitError
from peftkit.train import Trainer
from peftkit.train.resume import data_fingerprint


def trainer(cfg, tokenizer=None, **kw) -> Trainer:
    return Trainer(cfg, model=sharp_llama(), tokenizer=tokenizer or tiny_tokenizer(), **kw)


def cut_run(tmp_path, **kw):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=2, **kw)
    trainer(cfg).run(until_step=2)
    return cfg


def test_changed_rows_are_refused_naming_the_file(tmp_path):
    cfg = cut_run(tmp_path)
    rows = (tmp_path / "d.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"instruction": "Repeat 9 twice", "output": "99"})
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    with pytest.raises(PeftkitError) as e:
        trainer(cfg, resume=True).run()
    message = str(e.value)
    assert f"data file {tmp_path / 'd.jsonl'} changed since the run started" in message
    assert "restore what the run trained on, or start a new run" in message and "\n" not in message


def test_the_same_bytes_under_another_spelling_resume(tmp_path, monkeypatch):
    cfg = cut_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "d.jsonl")
    for spelling in ("d.jsonl", "link.jsonl"):  # relative, and a symlink
        assert data_fingerprint(spelling) == data_fingerprint(cfg.data)
    result = trainer(cfg.replace(data="link.jsonl"), resume=True).run()
    assert result.steps == 4


def test_a_folder_names_the_file_that_changed_and_a_new_one(tmp_path):
    folder = tmp_path / "data"
    write_data(folder / "a.jsonl", n=24)
    write_data(folder / "b.jsonl", n=24)
    before = data_fingerprint(str(folder))
    write_data(folder / "sub" / "c.jsonl", n=2)
    assert set(data_fingerprint(str(folder))["files"]) - set(before["files"]) == {os.path.join("sub", "c.jsonl")}
    (folder / ".cache").write_text("ignored")  # hidden files are not data
    assert data_fingerprint(str(folder))["files"].keys() == before["files"].keys() | {os.path.join("sub", "c.jsonl")}


def test_a_changed_tokenizer_is_refused(tmp_path):
    cfg = cut_run(tmp_path)
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(PeftkitError, match="cannot resume .*: the tokenizer changed since the run started"):
        trainer(cfg, tokenizer=other, resume=True).run()


def test_an_older_checkpoint_without_fingerprints_resumes_with_a_note(tmp_path, capsys):
    cfg = cut_run(tmp_path)
    state_file = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["inputs"]  # what peftkit wrote before it fingerprinted contents
    state_file.write_text(json.dumps(state))
    with pytest.raises(PeftkitError, match="the run's settings changed \\(data: "):  # compared as written, then
        trainer(cfg.replace(data=os.path.relpath(cfg.data)), resume=True).run()
    assert trainer(cfg, resume=True).run().steps == 4
    assert "recorded no fingerprint of its data, tokenizer or chat template" in capsys.readouterr().err
