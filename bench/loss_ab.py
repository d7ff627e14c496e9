"""In-process A/B of the training loss: the old hooked path (the reference kept in tests/test_loss.py) against
`peftkit.train.loss.sequence_loss`, forward + backward of a LoRA model, alternating, on the same batch.

    PYTHONPATH=src python bench/loss_ab.py [THREADS] [ROUNDS]

Prints min and median wall and CPU (process) time per step; on a shared machine the CPU time is the steadier one.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402
from test_loss import old_sequence_loss
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.core.adapter_io import apply_method
from peftkit.data.sequences import IGNORE
from peftkit.train.loss import sequence_loss

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
cfg = LlamaConfig(vocab_size=16384, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg)
apply_method(model, "lora", {"r": 8})
model.train()
B, L = 8, 256
ids = torch.randint(3, 16384, (B, L))
labels = ids.clone()
labels[:, : L * 3 // 4] = IGNORE  # answers: the last quarter
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
times = {"old": [], "new": []}
cpu = {"old": [], "new": []}
fns = {"old": old_sequence_loss, "new": sequence_loss}
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 12):
    for name in (("old", "new") if r % 2 else ("new", "old")):
        t, c = time.perf_counter(), time.process_time()
        loss, n = fns[name](model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if r >= 2:
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
targets = int(labels[:, 1:].ne(IGNORE).sum())
print(f"{B * L} tokens, {targets} targets, {torch.get_num_threads()} thread(s)")
for what, d in (("wall", times), ("cpu", cpu)):
    for stat in (min, statistics.median):
        old, new = stat(d["old"]), stat(d["new"])
        print(f"{what} {stat.__name__}: old {old * 1e3:.1f} ms, new {new * 1e3:.1f} ms, new/old {new / old:.3f}")
