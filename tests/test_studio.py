"""`peftkit studio`'s API: every endpoint, and the bad inputs it must refuse in one line (unknown model, impossible
config, a path outside the workspace, a run folder that another run owns).

Runs are real ``peftkit train`` subprocesses on conftest's tiny Llama (launched together once per module)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

pytest.importorskip("fastapi")
from conftest import tiny_llama  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from studio_helpers import TINY_RUN, make_workspace, wait_for  # noqa: E402

from peftkit.core.adapter_io import apply_method  # noqa: E402
from peftkit.studio import create_app  # noqa: E402
from peftkit.studio.runs import _read_new, tail_metrics  # noqa: E402
from peftkit.train import count_parameters  # noqa: E402


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A studio over a fresh workspace, with three runs launched at once: `short` (finishes), `long` (stopped and
    resumed by the tests) and `broken` (fails in the subprocess: an unknown chat template)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    (tmp_path_factory.getbasetemp() / "outside.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with TestClient(create_app(ws)) as client:
        launched = {
            "short": client.post("/api/runs", json={"name": "short", "recipe": {**TINY_RUN, "max_steps": 3},
                                                    "overrides": ["method_config.r=4"]}),
            "long": client.post("/api/runs", json={"name": "long", "recipe": {**TINY_RUN, "max_steps": 400}}),
            "broken": client.post("/api/runs", json={"name": "broken", "recipe": {**TINY_RUN, "max_steps": 2,
                                                                                  "template": "no-such"}}),
        }
        assert all(r.status_code == 200 for r in launched.values()), {k: r.json() for k, r in launched.items()}
        yield client, ws
        for run in ("runs/long", "runs/short", "runs/broken"):  # never leave a run training after the tests
            if client.get("/api/runs/status", params={"run": run}).json().get("status") == "running":
                client.post("/api/runs/stop", json={"run": run})


def status(client, run):
    return client.get("/api/runs/status", params={"run": run}).json()


def one_line_error(response, code):
    assert response.status_code == code, response.json()
    error = response.json()["error"]
    assert isinstance(error, str) and "\n" not in error and error
    return error


# ---- plan


def test_plan_counts_what_training_trains_and_puts_every_method_beside_it(studio):
    client, _ = studio
    got = client.post("/api/plan", json={"model": "tiny", "method": "lora", "settings": "r=4", "precision": "fp32",
                                         "batch_size": 2, "seq_len": 32}).json()
    model = tiny_llama()
    apply_method(model, "lora", {"r": 4})
    assert got["chosen"]["trainable"] == count_parameters(model)["trainable"]
    parts = got["chosen"]["components"]
    assert parts["gradients"] == parts["weights_trainable"] == 4 * got["chosen"]["trainable"]
    assert parts["activations"] > 0 and got["device"]["bytes"] > 0 and got["device"]["fits"] is True
    methods = {m["method"]: m for m in got["methods"]}
    assert {"lora", "qlora", "full", "prompt_tuning"} <= set(methods)
    assert methods["full"]["trainable"] == got["model"]["params"] > methods["lora"]["trainable"]
    assert methods["lora"]["trainable"] == got["chosen"]["trainable"]  # r=4 applies to every method that has r
    small = client.post("/api/plan", json={"model": "tiny", "precision": "fp32", "device_memory": "1KB"}).json()
    assert small["device"] == {"bytes": 1000, "label": "1KB", "fits": False}


def test_plan_options_and_a_hub_sized_preset(studio):
    client, _ = studio
    options = client.get("/api/plan/options").json()
    assert options["methods"]["qlora"]["preset_of"] == "lora" and options["methods"]["lora"]["defaults"]["r"] > 0
    big = client.post("/api/plan", json={"model": "llama-2-7b", "method": "qlora", "precision": "bf16"}).json()
    assert big["chosen"]["components"]["quant_constants"] > 0 and big["model"]["params"] > 6e9


@pytest.mark.parametrize("body, code, words", [
    ({"model": "no-such-model"}, 404, "unknown model"),
    ({"model": "../outside"}, 403, "outside the workspace"),
    ({"model": "/etc"}, 403, "outside the workspace"),
    ({"model": "tiny", "settings": "r=1000"}, 400, "larger than the layer"),
    ({"model": "tiny", "settings": "rank=4"}, 400, "rank"),
    ({"model": "tiny", "method": "no_such_method"}, 400, "no_such_method"),
    ({"model": "tiny", "precision": "fp8"}, 400, "precision"),
    ({"model": "tiny", "batch_size": 0}, 400, "batch_size"),
    ({"model": "tiny", "device_memory": "lots"}, 400, "device_memory"),
])
def test_plan_refuses_bad_input_in_one_line(studio, body, code, words):
    client, _ = studio
    assert words in one_line_error(client.post("/api/plan", json=body), code)


def test_a_symlink_out_of_the_workspace_is_outside_it(studio, tmp_path):
    client, ws = studio
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", ws / "link")
    try:
        assert "outside the workspace" in one_line_error(client.post("/api/plan", json={"model": "link"}), 403)
        assert "outside" in one_line_error(client.post("/api/data", json={"path": "link/x.jsonl", "model": "tiny"}),
                                           403)
    finally:
        os.unlink(ws / "link")


# ---- data


def test_data_renders_rows_with_the_loss_carrying_tokens_and_names_bad_rows(studio):
    client, _ = studio
    got = client.post("/api/data", json={"path": "data/bad.jsonl", "model": "tiny", "max_length": 64,
                                         "show": 2}).json()
    assert got["rows_read"] == 5 and got["examples"] == 4 and got["bad_rows"] == 1
    assert "line 4" in got["bad_reasons"][0] and "output" in got["bad_reasons"][0]
    first = got["rows"][0]
    loss_text = "".join(text for text, loss in first["tokens"] if loss)
    assert loss_text == "00<|im_end|>"  # the answer and the end of turn carry the loss, nothing else does
    assert "Repeat 0 twice" in "".join(text for text, loss in first["tokens"] if not loss)
    assert got["target_tokens"] == 4 * 3 and len(got["lengths"]) == 4
    packing = got["packing"]
    assert packing["rows"] < 4 and packing["prefix_tokens_saved"] > 0  # rows share "<|im_start|>user\nRepeat "
    unpacked = client.post("/api/data", json={"path": "data/bad.jsonl", "model": "tiny", "packing": False}).json()
    assert unpacked["packing"]["rows"] == 4
    assert "data/train.jsonl" in client.get("/api/data/files").json()["files"]


@pytest.mark.parametrize("body, code", [
    ({"path": "../outside.jsonl", "model": "tiny"}, 403),
    ({"path": "data/missing.jsonl", "model": "tiny"}, 404),
    ({"path": "data/train.jsonl", "model": "no-such-model"}, 400),
    ({"path": "data/train.jsonl", "model": "tiny", "overlong": "cut"}, 400),
    ({"path": "data/train.jsonl", "model": "tiny", "template": "no-such"}, 400),
    ({"path": "tiny/config.json", "model": "tiny"}, 400),
])
def test_data_refuses_bad_input_in_one_line(studio, body, code):
    client, _ = studio
    one_line_error(client.post("/api/data", json=body), code)


# ---- runs


def test_a_launched_run_is_an_ordinary_run_with_its_recipe_in_its_folder(studio):
    client, ws = studio
    done = wait_for(lambda: status(client, "runs/short"), lambda s: s["status"] != "running")
    assert done["status"] == "finished", done
    assert done["step"] == done["total_steps"] == 3 and done["adapter"] == "runs/short/adapter"
    assert done["method"] == "lora" and done["resumable"]
    from peftkit.train import load_recipe

    cfg = load_recipe(ws / "runs" / "short" / "recipe.yaml")  # what `peftkit train RECIPE --resume` reads
    assert cfg.method_config == {"r": 4} and cfg.output_dir == str(ws / "runs" / "short")
    assert cfg.data == str(ws / "data" / "train.jsonl") and cfg.model == str(ws / "tiny")
    listed = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert {"runs/short", "runs/long", "runs/broken"} <= set(listed)


def test_a_run_that_fails_shows_the_clis_one_line_error(studio):
    client, _ = studio
    failed = wait_for(lambda: status(client, "runs/broken"), lambda s: s["status"] != "running")
    assert failed["status"] == "failed"
    assert failed["error"].startswith("peftkit train: error: ") and "no-such" in failed["error"]


def test_stop_ends_the_run_at_a_checkpoint_and_resume_continues_it(studio):
    client, ws = studio
    wait_for(lambda: status(client, "runs/long"), lambda s: s["step"] >= 2 or s["status"] != "running")
    stopped = client.post("/api/runs/stop", json={"run": "runs/long"}).json()
    assert stopped["status"] == "running"  # SIGTERM sent: it stops at the next step boundary
    stopped = wait_for(lambda: status(client, "runs/long"), lambda s: s["status"] != "running")
    assert stopped["status"] == "stopped", stopped
    at = stopped["step"]
    assert (ws / "runs" / "long" / f"checkpoint-{at}").is_dir()
    one_line_error(client.post("/api/runs/stop", json={"run": "runs/long"}), 409)  # not running
    assert client.post("/api/runs/resume", json={"run": "runs/long"}).json()["status"] == "running"
    one_line_error(client.post("/api/runs/resume", json={"run": "runs/long"}), 409)  # running already
    wait_for(lambda: status(client, "runs/long"), lambda s: s["step"] > at + 1 or s["status"] != "running")
    client.post("/api/runs/stop", json={"run": "runs/long"})
    wait_for(lambda: status(client, "runs/long"), lambda s: s["status"] != "running")
    steps = [json.loads(line)["step"] for line in (ws / "runs" / "long" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > at  # continued where it stopped, nothing twice


def test_the_studio_lists_runs_the_cli_started_and_a_restarted_studio_knows_every_run(studio):
    client, ws = studio
    cli_run = ws / "cli" / "mine"
    cli_run.mkdir(parents=True)
    (cli_run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    with TestClient(create_app(ws)) as fresh:
        listed = {r["id"]: r for r in fresh.get("/api/runs").json()["runs"]}
        assert listed["cli/mine"]["status"] == "new" and listed["cli/mine"]["step"] == 2
        assert not listed["cli/mine"]["resumable"]
        assert listed["runs/short"]["status"] == "finished"
        assert "the CLI started it" in one_line_error(fresh.post("/api/runs/resume", json={"run": "cli/mine"}), 409)


@pytest.mark.parametrize("body, code, words", [
    ({"name": "short", "recipe": TINY_RUN}, 409, "already holds a run"),  # another run owns the folder
    ({"name": "x", "recipe": {**TINY_RUN, "output_dir": "runs/short/adapter"}}, 409, "inside the run"),
    ({"name": "x", "recipe": {**TINY_RUN, "output_dir": "../escape"}}, 403, "outside the workspace"),
    ({"name": "x", "recipe": {**TINY_RUN, "data": "../outside.jsonl"}}, 403, "outside the workspace"),
    ({"name": "x", "recipe": {**TINY_RUN, "model": "no-such/model-here", "lr": "fast"}}, 400, "lr"),
    ({"name": "x", "recipe": {**TINY_RUN, "learning_rat": 1.0}}, 400, "learning_rat"),
    ({"name": "x", "recipe": TINY_RUN, "overrides": ["method_config.r=1000"]}, 400, "larger than the layer"),
    ({"name": "x", "recipe": TINY_RUN, "overrides": ["nonsense"]}, 400, "key=value"),
    ({"name": "../x", "recipe": TINY_RUN}, 400, "run name"),
])
def test_launch_refuses_bad_input_in_one_line(studio, body, code, words):
    client, ws = studio
    assert words in one_line_error(client.post("/api/runs", json=body), code)
    assert not (ws / "runs" / "x").exists()  # nothing half-written


@pytest.mark.parametrize("path, params", [("/api/runs/status", {"run": "runs/nope"}),
                                          ("/api/runs/metrics", {"run": "data"}),
                                          ("/api/runs/log", {"run": "runs/nope"})])
def test_unknown_runs_are_404(studio, path, params):
    client, _ = studio
    one_line_error(client.get(path, params=params), 404)


def test_the_metrics_stream_sends_each_record_once_from_its_offset(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # the last line is still being written
    inode, offset, lines, reset = _read_new(log, None, 0)
    assert [json.loads(x)["step"] for x in lines] == [1, 2] and not reset
    assert _read_new(log, inode, offset)[2] == []  # nothing new: nothing sent again
    with log.open("a") as f:
        f.write('ss": 1}\n')
    assert _read_new(log, inode, offset)[2] == ['{"step": 3, "loss": 1}']
    log.unlink()
    log.write_text('{"step": 1}\n')  # a resume cut the log back: a new file
    _, offset2, lines, reset = _read_new(log, inode, offset)
    assert reset and lines == ['{"step": 1}'] and offset2 == len('{"step": 1}\n')


def test_the_metrics_events_of_a_run(studio):
    client, ws = studio
    runs = client.app.state.runs

    async def first_events(n):
        stream = tail_metrics(runs, ws / "runs" / "short", None, 0)
        return [await anext(stream) for _ in range(n)]

    data, state = asyncio.run(first_events(2))
    assert data.startswith("id: ") and [r["step"] for r in json.loads(data.split("data: ", 1)[1])] == [1, 2, 3]
    assert state.startswith("event: status") and '"finished"' in state


# ---- compare


def test_compare_overlays_curves_and_tabulates_final_metrics(studio):
    client, ws = studio
    (ws / "cmp").mkdir()
    (ws / "cmp" / "results.json").write_text(json.dumps([{"method": "lora", "BLEU": 0.5, "trainable_params": 10}]))
    got = client.post("/api/compare", json={"runs": ["runs/short", "runs/long"]}).json()["runs"]
    short = got[0]
    assert [p["step"] for p in short["curve"]] == [1, 2, 3] and short["final"]["steps"] == 3
    assert short["final"]["loss"] == short["curve"][-1]["loss"] and short["final"]["estimated_peak_bytes"] > 0
    tables = client.get("/api/compare/results").json()["tables"]
    assert tables == [{"path": "cmp/results.json", "rows": [{"method": "lora", "BLEU": 0.5, "trainable_params": 10}]}]
    one_line_error(client.post("/api/compare", json={"runs": ["runs/short", "runs/short"]}), 400)
    one_line_error(client.post("/api/compare", json={"runs": ["../x"]}), 403)
    one_line_error(client.post("/api/compare", json={"runs": []}), 400)


# ---- use


def test_chat_with_the_base_and_an_adapter_side_by_side(studio):
    client, _ = studio
    one_line_error(client.post("/api/use/serve/v1/chat/completions", json={}), 409)  # nothing loaded yet
    loaded = client.post("/api/use/load", json={"runs": ["runs/short"]}).json()
    assert loaded["models"] == [loaded["base"], "runs/short"]
    answers = {}
    for model in loaded["models"]:
        r = client.post("/api/use/serve/v1/chat/completions",
                        json={"model": model, "messages": [{"role": "user", "content": "Repeat 3 twice"}],
                              "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.json()
        answers[model] = r.json()["choices"][0]["message"]["content"]
    assert all(answers.values())
    one_line_error(client.post("/api/use/load", json={"runs": ["runs/broken"]}), 409)  # no adapter
    one_line_error(client.post("/api/use/load", json={"runs": ["../x"]}), 403)


def test_merge_and_export_run_the_commands_with_progress(studio):
    client, ws = studio
    job = client.post("/api/use/export", json={"run": "runs/short", "kind": "merge"}).json()
    assert job["status"] == "running" and job["output"] == "merged/short"
    job = wait_for(lambda: client.get("/api/use/jobs", params={"id": job["id"]}).json(),
                   lambda j: j["status"] != "running")
    assert job["status"] == "done", job
    assert (ws / "merged" / "short" / "config.json").is_file() and job["seconds"] > 0
    bad = client.post("/api/use/export", json={"run": "runs/short", "kind": "merge", "dtype": "float7"}).json()
    bad = wait_for(lambda: client.get("/api/use/jobs", params={"id": bad["id"]}).json(),
                   lambda j: j["status"] != "running")
    assert bad["status"] == "failed" and bad["error"].startswith("peftkit merge: error:") and "float7" in bad["error"]
    one_line_error(client.post("/api/use/export", json={"run": "runs/short", "output": "/tmp/x.gguf"}), 403)
    one_line_error(client.post("/api/use/export", json={"run": "runs/long"}), 409)  # stopped: no adapter
    one_line_error(client.post("/api/use/export", json={"run": "runs/short", "kind": "zip"}), 400)
    one_line_error(client.get("/api/use/jobs", params={"id": "99"}), 404)


# ---- access


def test_a_token_guards_the_api_but_not_the_pages(tmp_path):
    with TestClient(create_app(tmp_path, token="s3cret")) as client:
        assert client.get("/").status_code == 200 and "studio.js" in client.get("/").text
        assert client.get("/studio.js").status_code == 200
        one_line_error(client.get("/api/runs"), 401)
        one_line_error(client.get("/api/runs", headers={"Authorization": "Bearer wrong"}), 401)
        one_line_error(client.post("/api/use/serve/v1/chat/completions", json={}), 401)
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/api/runs", params={"token": "s3cret"}).status_code == 200


def test_the_command_refuses_a_non_loopback_host_without_a_token(capsys, tmp_path):
    from peftkit.cli import main

    assert main(["studio", "--host", "0.0.0.0", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit studio: error:") and "--token" in err and "\n" not in err

