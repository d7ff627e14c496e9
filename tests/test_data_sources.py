"""Where rows come from: local folders and files through `datasets` (streamed, read only as far as used), Hub
dataset ids (simulated with the datasets cache: nothing is downloaded), and the one-line offline error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from peftkit.data import formats
from peftkit.data.formats import HubDataset, ReadStats, read_conversations
from peftkit.errors import PeftkitError

ROWS = [{"instruction": "Add", "input": f"{i} and 1", "output": str(i + 1)} for i in range(6)]
ROWS[2]["input"] = ""  # an empty cell stays an empty string


def chat(i):
    return {"conversations": [{"from": "system", "value": "Count."}, {"from": "human", "value": f"After {i}?"},
                              {"from": "gpt", "value": f"{i + 1}"}]}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("spec", "expected"), [
    ("owner/name", HubDataset("owner/name")),
    ("hub:owner/name:test", HubDataset("owner/name", split="test")),
    ("openai/gsm8k/main@refs/convert/parquet:train[:100]",
     HubDataset("openai/gsm8k", "main", "refs/convert/parquet", "train[:100]")),
    ("HuggingFaceH4/ultrachat_200k@v1.0:train_sft", HubDataset("HuggingFaceH4/ultrachat_200k", None, "v1.0",
                                                                "train_sft")),
    ("data.jsonl", None),
    ("a/b/c/d", None),
    ("owner/name:", None),
])
def test_hub_spelling(spec, expected):
    assert HubDataset.parse(spec) == expected


def test_a_missing_file_is_still_named_as_one(tmp_path):
    for missing in (tmp_path / "nope.jsonl", "runs/nope.csv", "nope"):
        with pytest.raises(PeftkitError, match="data file not found: .*nope"):
            read_conversations(missing)


def test_a_folder_reads_through_datasets_by_split(tmp_path):
    folder = tmp_path / "chat"
    write_jsonl(folder / "train.jsonl", [chat(i) for i in range(4)])
    write_jsonl(folder / "test.jsonl", [chat(10)])
    convs = read_conversations(folder)
    assert len(convs) == 4 and convs[1] == [{"role": "system", "content": "Count."},
                                            {"role": "user", "content": "After 1?"},
                                            {"role": "assistant", "content": "2"}]
    write_jsonl(folder / "train.jsonl", [chat(0), {"conversations": [{"from": "bing", "value": "x"}]}])
    with pytest.raises(PeftkitError, match=rf"{folder}: row 2: conversations\[0\]: unknown from 'bing'"):
        read_conversations(folder)
    only_test = tmp_path / "only_test"
    write_jsonl(only_test / "test.jsonl", [chat(0)])
    with pytest.raises(PeftkitError, match=r"cannot load .*only_test: .*split"):
        read_conversations(only_test)


def test_an_arrow_file_reads_through_datasets(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    [arrow] = (tmp_path / "saved").glob("*.arrow")
    assert read_conversations(arrow) == read_conversations(ROWS)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_large_files_stream_through_datasets_with_the_same_rows(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"d{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    whole = read_conversations(path)  # small: read whole by pandas
    calls = []
    real = formats._datasets_rows
    monkeypatch.setattr(formats, "_datasets_rows", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(formats, "STREAM_BYTES", 0)  # every file is "large"
    streamed = read_conversations(path)
    assert calls and calls[0]["streaming"] is True
    assert streamed == whole and whole[2][0]["content"] == "Add" and whole[0][1]["content"] == "1"


def test_limit_stops_reading_before_a_broken_tail(tmp_path, monkeypatch):
    """With a limit, the file is read only as far as needed: a broken line further down is never reached."""
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("instruction,input,output\n")
        f.writelines(f"Add,{i} and 1,{i + 1}\n" for i in range(25_000))
        f.write('Add,"an unterminated quote\n')
    monkeypatch.setattr(formats, "STREAM_BYTES", 0)
    assert len(read_conversations(path, limit=3)) == 3
    with pytest.raises(PeftkitError, match=r"big.csv: cannot read past row \d+: .*EOF inside string"):
        read_conversations(path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n")
    stats = ReadStats()
    assert len(read_conversations(jsonl, limit=4, stats=stats)) == 4 and stats.rows == 4
    with pytest.raises(PeftkitError, match="line 7 is not valid JSON"):
        read_conversations(jsonl)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline machine whose datasets cache holds ``acme/chat`` (splits train and test) as a download of it
    would leave it (``<cache>/acme___chat/default/0.0.0/<commit>``); nothing is fetched."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    files = {"train": str(write_jsonl(tmp_path / "src" / "train.jsonl", [chat(i) for i in range(5)])),
             "test": str(write_jsonl(tmp_path / "src" / "test.jsonl", [chat(i) for i in range(20, 22)]))}
    builder = Json(cache_dir=str(cache), dataset_name="chat", data_files=files, hash="0123abcd")
    builder.download_and_prepare()
    target = cache / "acme___chat" / "default" / "0.0.0" / "0123abcd"
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    return cache


def test_a_hub_dataset_from_the_cache(hub_cache):
    assert [c[1]["content"] for c in read_conversations("acme/chat")] == [f"After {i}?" for i in range(5)]
    assert [c[2]["content"] for c in read_conversations("hub:acme/chat:test")] == ["21", "22"]
    stats = ReadStats()
    read_conversations("acme/chat", limit=2, stats=stats)
    assert stats.where(1) == "acme/chat: row 2"  # as the user spelled it
    with pytest.raises(PeftkitError, match="cannot load the Hub dataset acme/chat:validation .*split"):
        read_conversations("acme/chat:validation")


def test_a_hub_dataset_in_a_training_config(hub_cache, tmp_path):
    from conftest import tiny_llama, tiny_tokenizer

    from peftkit.train import TrainConfig, Trainer

    cfg = TrainConfig.from_dict(dict(data="acme/chat", eval_data="acme/chat:test", output_dir=str(tmp_path / "run"),
                                     precision="fp32", batch_size=1, max_length=128, progress=False, packing=False))
    trainer = Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
    assert trainer.data.tok_stats.examples == 5 and len(trainer.data.eval_examples) == 2


def test_offline_and_not_cached_is_one_clear_line(hub_cache):
    with pytest.raises(PeftkitError) as info:
        read_conversations("acme/missing")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot load the Hub dataset acme/missing:train (no local file or folder has that name)")
    assert "offline (HF_HUB_OFFLINE)" in message and "local file or folder" in message


def test_an_unreachable_hub_is_the_same_line(hub_cache, monkeypatch):
    """Not offline, but no connection (a closed local port stands in for the Hub)."""
    import datasets
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # no waiting between the retries
    with pytest.raises(PeftkitError, match="cannot load the Hub dataset acme/missing:train .*unreachable"):
        read_conversations("acme/missing")
    assert len(read_conversations("acme/chat")) == 5  # what the cache holds still loads


def test_a_local_path_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("acme") / "chat" / "train.jsonl", [chat(7)])
    assert read_conversations("acme/chat")[0][2]["content"] == "8"
