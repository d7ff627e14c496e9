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

  What a method adds is its `peftkit.core.registry.MemoryModel` (virtual tokens, key/value positions, the
  linears it adapts, its own modules' tensors, the blocks gradients flow through).
  Only blocks that gradients flow through keep anything (``top_k_layers`` keeps ``k``); the first block is counted
  in full even when nothing below it trains (a slight overestimate). With gradient checkpointing (non-reentrant)
  each block keeps its input (``e*h``) and one block is recomputed at a time (not measured, modelled). Not counted:
  dropout masks (GPT-2, Falcon-7B), the ``b*s*s`` boolean padding mask shared by all blocks; for non-Llama
  families the same structure is an approximation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.core.registry import MemoryModel, Trainable
    from peftkit.memory.arch import Arch
    from peftkit.memory.estimator import TrainSetup

__all__ = ["activation_bytes", "sequence_lengths"]


def sequence_lengths(setup: TrainSetup, memory: MemoryModel, config: Any) -> tuple[int, int]:
    """(positions each block runs over, key/value positions each attention attends to)."""
    seq = setup.seq_len + memory.input_tokens(config)
    return seq, seq + memory.kv_tokens(config)


def _under_autocast(setup: TrainSetup, trainable: Trainable, e: int) -> bool:
    """Whether the residual stream is fp32 under a 16-bit autocast (every weight fp32, or the embedding trains)."""
    return e < 4 and (setup.precision == "bf16-autocast" or any(n == "embed.weight" for n, _ in trainable))


def _norm_cost(arch: Arch, e: int, autocast: bool, norm_trainable: bool) -> int:
    """Bytes per token one norm keeps."""
    if arch.norm != "rmsnorm":
        return e * arch.hidden + 8
    return 4 * arch.hidden + 4 + ((4 if autocast else e) * arch.hidden if norm_trainable else 0)


def _attention_cost(arch: Arch, setup: TrainSetup, e: int, seq: int, s_kv: int) -> int:
    """Bytes per token attention keeps (its input projections' inputs aside)."""
    if setup.attention == "sdpa" and s_kv == seq:  # q (after RoPE), out, k, v, fp32 log-sum-exp
        return e * 2 * arch.q_dim + e * 2 * arch.kv_dim + 4 * arch.heads
    if setup.attention == "sdpa":
        # Note: key/value positions the queries do not line up with (a prefix) need an explicit mask, and with a
        # mask Hugging Face repeats k and v to all heads before SDPA: q, out, k and v of all heads, the log-sum-exp
        # and the mask (one per block, in the compute dtype). Measured on the tiny Llama with prefix tuning.
        return e * 2 * arch.q_dim + e * 2 * arch.q_dim * s_kv // seq + 4 * arch.heads + e * s_kv
    # q, k and v repeated to all heads, fp32 softmax probabilities (+ their cast to the compute dtype)
    return e * arch.q_dim + e * 2 * arch.q_dim * s_kv // seq + arch.heads * s_kv * (4 + (e if e < 4 else 0))


_MLP_GROUPS = frozenset({"mlp_in", "mlp_act", "ln_mlp"})  # the input groups of a block's MLP half


def _linear_inputs_cost(arch: Arch, setup: TrainSetup, e: int, autocast: bool, keeps: set[str]) -> dict[str, int]:
    """Bytes per token of the inputs kept by the linears in `keeps`, by input group (linears sharing an input keep
    it once, but under autocast once per linear that reads it from a norm)."""
    groups = {lin.group for lin in arch.linears if lin.name in keeps}  # a trainable bias alone needs no input
    if setup.attention == "sdpa":
        groups.discard("attn_out")  # SDPA keeps its output anyway, and it is the o_proj input
    group_size = {lin.group: lin.d_in for lin in arch.linears}
    consumers = dict.fromkeys(groups, 1)
    if autocast:  # inputs read from a norm (fp32) are cast once per linear that keeps its input
        for g in groups - {"attn_out", "mlp_act"}:
            consumers[g] = sum(1 for lin in arch.linears if lin.group == g and lin.name in keeps)
    return {g: e * group_size[g] * consumers[g] for g in groups}


def _block_halves(arch: Arch, setup: TrainSetup, memory: MemoryModel, config: Any, trainable: Trainable,
                  e: int) -> tuple[int, int, int, int]:
    """Bytes per token of one block gradients flow through: (its attention half, its MLP half, the method's own
    modules), and those of one norm."""
    seq, s_kv = sequence_lengths(setup, memory, config)
    norm_trainable = any("norm" in n.split(".", 2)[-1] for n, _ in trainable if n.startswith("layers."))
    adapted = set(memory.adapted_linears(trainable))
    keeps = {lin.name for lin in arch.linears} if memory.trains_block_linears else adapted
    # Note: with an fp32 residual stream under torch.autocast (every weight fp32: bf16-autocast, or the embedding
    # trains under bf16 / fp16) the RMSNorm output stays fp32 (kept in fp32 when the norm weight trains), and
    # autocast casts an fp32 input to 16 bits separately for every linear that reads it (it caches casts of
    # parameters only): q, k and v keep one copy each, as do gate and up. Measured with saved-tensor hooks on the
    # bundled model, full fine-tuning, bf16 autocast: 30,380 bytes per token and block, as modelled; LoRA r=8 (no
    # dropout) under bf16-autocast: 26,202 measured, 25,884 modelled.
    autocast = _under_autocast(setup, trainable, e)
    norm = _norm_cost(arch, e, autocast, norm_trainable)
    inputs = _linear_inputs_cost(arch, setup, e, autocast, keeps)
    attn = norm + _attention_cost(arch, setup, e, seq, s_kv)
    attn += sum(cost for g, cost in inputs.items() if g not in _MLP_GROUPS)
    mlp = (arch.norms_per_block - 1) * norm + e * arch.intermediate * (3 if arch.gated_mlp else 1)
    mlp += sum(cost for g, cost in inputs.items() if g in _MLP_GROUPS)
    return attn, mlp, memory.block_activations(arch, config, trainable, e), norm


def _lowest_block(memory: MemoryModel, attn: int, mlp: int, own: int) -> int:
    """Bytes per token of the lowest block gradients flow through: nothing below where the graph starts."""
    if memory.grad_starts == "block_output":
        return own
    if memory.grad_starts == "attn_output":
        return mlp + own
    return attn + mlp + own


def activation_bytes(arch: Arch, setup: TrainSetup, memory: MemoryModel, config: Any, trainable: Trainable,
                     e: int) -> tuple[int, int, int, int, list[str]]:
    """(no checkpointing, with checkpointing, Korthikanti, one block's) activation bytes, and notes.

    See the module docstring. `memory` and `config` are the method's memory model and config, `trainable` what it
    trains, `e` the compute dtype's bytes. One block's bytes are those of one block that gradients flow through
    (with checkpointing, the block being recomputed), Korthikanti's per-layer figure under that model.
    """
    b, h = setup.batch_size, arch.hidden
    if not trainable:
        return 0, 0, 0, 0, []
    seq, s_kv = sequence_lengths(setup, memory, config)
    tokens = b * seq
    active = arch.layers if memory.active_blocks is None else memory.active_blocks(arch, config, trainable)
    attn, mlp, own, norm = _block_halves(arch, setup, memory, config, trainable, e)
    block = tokens * (attn + mlp + own)
    lowest = tokens * _lowest_block(memory, attn, mlp, own) if active else 0
    # Outside the blocks: the final norm and, if the head trains, its input.
    outer = tokens * norm + (tokens * e * h if memory.trains_head(config) else 0)
    no_ckpt = max(active - 1, 0) * block + lowest + outer
    ckpt = active * tokens * e * h + block + outer
    korth_layer = seq * b * h * (34 + 5 * arch.heads * s_kv / h) * e / 2
    korth = int(active * (2 * seq * b * h * e / 2 if setup.gradient_checkpointing else korth_layer))
    notes = []
    if arch.family != "llama":
        notes.append(f"activations: the HF-Llama model applied to a {arch.family} block is an approximation "
                     "(dropout masks and activation-function internals not counted)")
    one_block = korth // max(active, 1) if setup.activation_model == "korthikanti" else block
    return int(no_ckpt), int(ckpt), korth, int(one_block), notes
