"""Run by tests/test_distributed.py under torchrun: train a tiny model, dump what this rank saw and learned.

Modes: ``train`` (one run), ``resume`` (with LoRA dropout: an uninterrupted run, and one killed after step 3 and
resumed from its step-2 checkpoint), ``hang`` (rank 1 freezes at step 3; rank 0 writes the error it ends with).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402

from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.train import TrainConfig, Trainer  # noqa: E402
from peftkit.train import step as step_module  # noqa: E402


def config(data: str, out: str, batch_size: int, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**dict(
        data=data, output_dir=out, precision="fp32", batch_size=batch_size, lr=1e-2, method="lora",
        method_config={"r": 4}, max_length=64, progress=False, packing=False, warmup_ratio=0.0, max_steps=4,
        save_every=2), **kw})


def digest(trainer: Trainer) -> str:
    lora = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return hashlib.sha256(b"".join(lora[n].numpy().tobytes() for n in sorted(lora))).hexdigest()


def main(data: str, out: str, batch_size: int, mode: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    if mode == "resume":
        cfg = config(data, str(Path(out, "straight")), batch_size, method_config={"r": 4, "lora_dropout": 0.3})
        straight = Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
        straight.run()
        cut = cfg.replace(output_dir=str(Path(out, "cut")))
        Trainer(cut, model=tiny_llama(), tokenizer=tiny_tokenizer()).run(until_step=3)  # "killed" after step 3
        if os.environ.get("COLD_RESUME") == "1":  # the resumed start measures the matmul peak again
            from peftkit import hardware

            Path(os.environ["PEFTKIT_CACHE"], "matmul_peak.json").unlink(missing_ok=True)
            hardware._cached_peak.cache_clear()
        resumed = Trainer(cut, model=tiny_llama(), tokenizer=tiny_tokenizer(), resume=True)
        resumed.run()
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "straight": [h["loss"] for h in straight.history], "resumed": [h["loss"] for h in resumed.history],
            "digests": [digest(straight), digest(resumed)],
        }))
        return
    if mode == "hang":
        real, calls = step_module.sequence_loss, [0]

        def freezing(model, batch):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                time.sleep(300)  # a frozen rank: alive, never answering
            return real(model, batch)

        step_module.sequence_loss = freezing
        cfg = config(data, out, batch_size, max_steps=6, dist_timeout=5)
        try:
            Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer()).run()
        except PeftkitError as e:
            Path(out, f"error-rank{rank}.txt").write_text(str(e))
            sys.exit(2)
        return
    trainer = Trainer(config(data, out, batch_size), model=tiny_llama(), tokenizer=tiny_tokenizer())
    trainer.run()
    lora = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.world, "rows": trainer.data.seen_rows, "losses": [h["loss"] for h in trainer.history],
        "digest": digest(trainer), "weights": {n: lora[n].flatten()[:8].tolist() for n in sorted(lora)},
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "train")
