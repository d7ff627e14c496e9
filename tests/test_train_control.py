"""A run watched and controlled from outside: typed step events, stop at the next step boundary, resume after."""

from __future__ import annotations

import json
import queue
import threading

from conftest import tiny_llama, tiny_tokenizer

from peftkit.train import StepEvent, TrainConfig, Trainer
from peftkit.train.checkpoint import latest_checkpoint


def make_cfg(tmp_path, **kw):
    rows = [{"instruction": f"Repeat {i % 7} twice", "output": f"{i % 7}{i % 7}"} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    base = dict(data=str(data), output_dir=str(tmp_path / "run"), precision="fp32", batch_size=4, lr=3e-3,
                method="lora", method_config={"r": 4}, max_length=64, progress=False, packing=False, max_steps=6)
    return TrainConfig.from_dict({**base, **kw})


def trainer(cfg, resume=False):
    return Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer(), resume=resume)


def test_every_step_sends_a_typed_event_with_its_metrics(tmp_path):
    t = trainer(make_cfg(tmp_path, eval_fraction=0.2, eval_every=3, scheduler="constant", warmup_ratio=0.0))
    events: queue.Queue[StepEvent] = queue.Queue()
    t.subscribe(events.put)
    result = t.run()
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert [e.step for e in got] == [1, 2, 3, 4, 5, 6] and all(e.total_steps == 6 for e in got)
    assert [e.loss for e in got] == [round(h["loss"], 6) for h in result.history]
    assert all(e.lr == 3e-3 and e.grad_norm > 0 and e.target_tokens_per_s > 0 for e in got)
    assert [sorted(e.eval) for e in got] == [[], [], ["eval_loss"], [], [], ["eval_loss"]]
    assert got[2].eval["eval_loss"] == result.history[2]["eval_loss"]
    assert not result.stopped and result.adapter_dir is not None and result.final_scores["eval_loss"] > 0


def test_a_stop_request_ends_the_run_at_the_step_boundary_with_a_checkpoint_and_resume_continues(tmp_path):
    cfg = make_cfg(tmp_path)
    t = trainer(cfg)
    t.subscribe(lambda e: t.request_stop() if e.step == 2 else None)
    result = t.run()
    assert result.stopped and result.steps == 2 and result.adapter_dir is None
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"  # save_every is off: the stop wrote it
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = trainer(cfg, resume=True).run()
    assert not resumed.stopped and resumed.steps == 6 and resumed.adapter_dir is not None
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.history[:2] == result.history


def test_a_run_started_in_a_thread_stops_when_another_thread_asks(tmp_path):
    t = trainer(make_cfg(tmp_path))
    reached, go = threading.Event(), threading.Event()

    def hold_at_step_one(event: StepEvent) -> None:
        if event.step == 1:
            reached.set()
            assert go.wait(60)

    t.subscribe(hold_at_step_one)
    handle = t.start()
    assert reached.wait(60) and not handle.done()
    handle.stop()  # from this thread, while the run is inside step 1
    go.set()
    result = handle.result(timeout=120)
    assert handle.done() and result.stopped and result.steps == 1
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-1"


def test_peftkit_train_stops_on_sigterm_like_a_stop_request(tmp_path):
    import os
    import signal

    from peftkit.commands.train import _stop_on_sigterm

    t = trainer(make_cfg(tmp_path))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        _stop_on_sigterm(t)
        t.subscribe(lambda e: os.kill(os.getpid(), signal.SIGTERM) if e.step == 3 else None)  # another process's kill
        result = t.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.stopped and result.steps == 3
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-3"
