"""Run by tests/test_distributed.py under torchrun: train a tiny model, dump what this rank saw and learned."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402

from peftkit.train import TrainConfig, Trainer  # noqa: E402


def main(data: str, out: str, batch_size: int) -> None:
    cfg = TrainConfig.from_dict(dict(
        data=data, output_dir=out, precision="fp32", batch_size=batch_size, lr=1e-2, method="lora",
        method_config={"r": 4}, max_length=64, progress=False, packing=False, warmup_ratio=0.0, max_steps=4,
        save_every=2,
    ))
    trainer = Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
    trainer.run()
    rank = int(os.environ.get("RANK", 0))
    lora = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256(b"".join(lora[n].numpy().tobytes() for n in sorted(lora))).hexdigest()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.world, "rows": trainer.seen_rows, "losses": [h["loss"] for h in trainer.history],
        "digest": digest, "weights": {n: lora[n].flatten()[:8].tolist() for n in sorted(lora)},
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
