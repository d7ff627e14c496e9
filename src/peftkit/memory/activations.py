"""Activation memory: the tensors one training forward keeps for backward, per block and outside the blocks.

Activations, two models (``TrainSetup.activation_model``):

* ``"korthikanti"`` (Korthikanti et al. 2022, GPT block, 16-bit, no flash attention), per block:
  ``s*b*h*(34 + 5*a*s/h)`` bytes; with full recomputation (gradient checkpointing) ``2*s*b*h``. Scaled by 2 for fp32.
* ``"hf"`` (default): what a Hugging Face Llama forward (SDPA attention) actually keeps for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on tiny models (the test suite checks it exactly). Per block and
  token, with ``e`` the compute dtype's bytes:

  - each RMSNorm: its input upcast to fp32 (``4h``) + the fp32 rsqrt (4) + the normalized ``e*h`` only if the norm
    weight is trainable (LayerNorm models: input ``e*h`` + fp32 mean/rstd 8);
  - attention (SDPA / flash): ``q`` after RoPE and the output (``e*q_dim`` each; the output is also the o_proj input),
    ``k``, ``v`` (``e*kv_dim`` each) and the fp32 log-sum-exp per head (``4*heads``); eager attention keeps
    ``q`` and ``k``, ``v`` repeated to all heads (``3*e*q_dim``), the fp32 softmax and its 16-bit cast
    (``heads*s*(4 + e)``, no cast in fp32), and its output is a separate o_proj input;
  - gated MLP: gate output, activation output and up output (``3*e*I``); GELU MLP: the activation input (``e*I``);
  - a linear layer's input (``e*d_in``) only if its weight is trainable or adapted (q/k/v share one input, as do
    gate/up); LoRA adds the ``A x`` output (``e*r``) per adapted matrix, and with dropout > 0 a dropped copy of the
    input plus its mask (``(e + 1)*d_in``); an adapter keeps its input and two bottleneck tensors (``e*(h + 2m)``).

  Only blocks that gradients flow through keep anything (``top_k_layers`` keeps ``k``); the first block is counted
  in full even when nothing below it trains (a slight overestimate). With gradient checkpointing (non-reentrant)
  each block keeps its input (``e*h``) and one block is recomputed at a time (not measured, modelled). Not counted:
  dropout masks (GPT-2, Falcon-7B), the ``b*s*s`` boolean padding mask shared by all blocks; for non-Llama
  families the same structure is an approximation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.memory.arch import Arch
    from peftkit.memory.estimator import TrainSetup

__all__ = ["activation_bytes"]


def activation_bytes(arch: Arch, setup: TrainSetup, s: Any, trainable: list[tuple[str, int]],
                 e: int) -> tuple[int, int, int, int, list[str]]:
    """(no checkpointing, with checkpointing, Korthikanti, one block's) activation bytes, and notes.

    See the module docstring. One block's bytes are those of one block that gradients flow through (with
    checkpointing, the block being recomputed), Korthikanti's per-layer figure under that model.
    """
    method, b, h, L = setup.method, setup.batch_size, arch.hidden, arch.layers
    n_virtual = getattr(s, "num_virtual_tokens", 0)
    seq = setup.seq_len + (n_virtual if method == "prompt_tuning" else 0)
    s_kv = seq + (n_virtual if method == "prefix_tuning" else 0)
    tokens = b * seq
    notes: list[str] = []
    if not trainable:
        return 0, 0, 0, 0, notes
    # Which blocks gradients flow through, and what in a block is trainable.
    block_trainable = method in ("full", "top_k_layers", "intrinsic_said", "sparse")
    active = s.k if method == "top_k_layers" else L
    if method in ("bitfit", "norms"):
        names = {n.split(".", 2)[-1] for n, _ in trainable if n.startswith("layers.")}
        first = min((int(n.split(".")[1]) for n, _ in trainable if n.startswith("layers.")), default=L)
        active = L - first
    else:
        names = set()
    norm_trainable = block_trainable or any("norm" in n for n in names)
    adapted: set[str] = set()
    lora_r = 0
    if method in ("lora", "qlora"):
        a_names = [n for n, _ in trainable if n.endswith(".lora_A.weight")]  # layers.<i>.<linear>.lora_A.weight
        adapted = {n.split(".", 2)[2].removesuffix(".lora_A.weight") for n in a_names}
        lora_r = s.r
    saved_groups = set()
    for lin in arch.linears:
        if block_trainable or lin.name in adapted:  # a trainable bias alone needs no input
            saved_groups.add(lin.group)
    if setup.attention == "sdpa":
        saved_groups.discard("attn_out")  # SDPA keeps its output anyway, and it is the o_proj input

    # Per token of one block.
    # Note: with an fp32 residual stream under torch.autocast (every weight fp32: bf16-autocast, or the embedding
    # trains under bf16 / fp16) the RMSNorm output stays fp32 (kept in fp32 when the norm weight trains), and
    # autocast casts an fp32 input to 16 bits separately for every linear that reads it (it caches casts of
    # parameters only): q, k and v keep one copy each, as do gate and up. Measured with saved-tensor hooks on the
    # bundled model, full fine-tuning, bf16 autocast: 30,380 bytes per token and block, as modelled; LoRA r=8 (no
    # dropout) under bf16-autocast: 26,202 measured, 25,884 modelled.
    autocast = e < 4 and (setup.precision == "bf16-autocast" or any(n == "embed.weight" for n, _ in trainable))
    if arch.norm == "rmsnorm":
        norm_cost = 4 * h + 4 + ((4 if autocast else e) * h if norm_trainable else 0)
    else:
        norm_cost = e * h + 8
    per_tok = arch.norms_per_block * norm_cost
    if setup.attention == "sdpa":  # q (after RoPE), out, k, v, fp32 log-sum-exp
        per_tok += e * 2 * arch.q_dim + e * 2 * arch.kv_dim * s_kv // seq + 4 * arch.heads
    else:  # q, k and v repeated to all heads, fp32 softmax probabilities (+ their cast to the compute dtype)
        per_tok += e * arch.q_dim + e * 2 * arch.q_dim * s_kv // seq + arch.heads * s_kv * (4 + (e if e < 4 else 0))
    per_tok += e * arch.intermediate * (3 if arch.gated_mlp else 1)
    group_size = {lin.group: lin.d_in for lin in arch.linears}
    consumers = {g: 1 for g in saved_groups}
    if autocast:  # inputs read from a norm (fp32) are cast once per linear that keeps its input
        for g in saved_groups - {"attn_out", "mlp_act"}:
            consumers[g] = sum(1 for lin in arch.linears if lin.group == g
                               and (block_trainable or lin.name in adapted))
    per_tok += sum(e * group_size[g] * consumers[g] for g in saved_groups)
    for lin in arch.linears:
        if lin.name in adapted:
            per_tok += e * lora_r + ((e + 1) * lin.d_in if s.lora_dropout > 0 else 0)
    if method in ("houlsby", "pfeiffer"):  # per adapter: its input and the two bottleneck tensors
        for n, k in trainable:
            if n.startswith("layers.0.") and n.endswith(".adapter_down.bias"):
                per_tok += e * (h + 2 * k)
    block = tokens * per_tok

    # Outside the blocks: the final norm and, if the head trains, its input.
    final_norm_cost = norm_cost if arch.norm == "rmsnorm" else e * h + 8
    outer = tokens * final_norm_cost
    head_trainable = method == "full" or (method == "top_k_layers" and s.include_head)
    if head_trainable:
        outer += tokens * e * h
    no_ckpt = active * block + outer
    ckpt = active * tokens * e * h + block + outer
    korth_layer = seq * b * h * (34 + 5 * arch.heads * s_kv / h) * e / 2
    korth = int(active * (2 * seq * b * h * e / 2 if setup.gradient_checkpointing else korth_layer))
    if arch.family != "llama":
        notes.append(f"activations: the HF-Llama model applied to a {arch.family} block is an approximation "
                     "(dropout masks and activation-function internals not counted)")
    one_block = korth // max(active, 1) if setup.activation_model == "korthikanti" else block
    return int(no_ckpt), int(ckpt), korth, int(one_block), notes
