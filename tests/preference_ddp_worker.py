"""Run by tests/test_preference.py, alone or under torchrun (gloo): a DPO run on a tiny model; dumps what this rank
saw, its loss curve, its metrics and its adapter weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_tokenizer  # noqa: E402
from test_train import sharp_llama  # noqa: E402

from peftkit.train import TrainConfig, Trainer  # noqa: E402


def main(data: str, out: str, batch_size: int, objective: str) -> None:
    cfg = TrainConfig.from_dict(dict(
        data=data, output_dir=out, precision="fp32", batch_size=batch_size, lr=1e-2, method="lora",
        method_config={"r": 4}, max_length=64, progress=False, warmup_ratio=0.0, objective=objective, max_steps=4,
        save_every=0))
    trainer = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer())
    trainer.run()
    lora = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    log = Path(out, "metrics.jsonl")  # written by rank 0
    Path(out, f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps({
        "world": trainer.world, "rows": trainer.data.seen_rows,
        "metrics": [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else [],
        "weights": {n: lora[n].flatten()[:8].tolist() for n in sorted(lora)},
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
