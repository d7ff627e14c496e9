"""The training configuration: one flat dataclass that YAML recipes map onto 1:1."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from peftkit.core.config import Config, parse_override
from peftkit.errors import PeftkitError

__all__ = ["TrainConfig", "load_recipe"]


@dataclasses.dataclass
class TrainConfig(Config):
    """Everything a training run needs. Recipes under ``recipes/`` set these keys.

    Attributes (groups):
        model: model folder, hub id, ``.gguf`` file or ``smollm2-135m-instruct``.
        data / eval_data: instruction data: a JSON, JSONL, CSV, TSV, Parquet or Arrow file, a folder of such
            files, or a Hub dataset ``[hub:]OWNER/NAME[/SUBSET][@REVISION][:SPLIT]`` (`peftkit.data.formats`);
            rows in the Alpaca, Dolly, OpenAI ``messages`` or ShareGPT ``conversations`` layout. ``eval_fraction``
            splits the eval set off the training data when ``eval_data`` is not given. ``limit_examples`` stops
            reading after that many usable rows.
        method / method_config: a registered method and its settings (validated by its config class).
        quantize: freeze the base in a 4/8-bit format first (QLoRA = ``lora`` + ``nf4``).
        precision: ``auto`` (the default: bf16 where the hardware computes it natively, else fp32 on CPU and fp16
            on older GPUs; `peftkit.hardware.resolve_precision` decides and says why), ``bf16`` / ``fp16`` (frozen
            weights stored in 16 bits, trainable weights fp32, 16-bit autocast; fp16 with a gradient scaler),
            ``bf16-autocast`` (all weights fp32, bf16 autocast) or ``fp32``. A 4-bit base dequantizes to the same
            compute dtype.
        batch_size: rows per micro-batch per process; ``grad_accum`` micro-batches per optimizer step. With
            packing (the default) a row holds up to ``max_length`` tokens of several examples, so the default of
            2 rows x 512 tokens is about 7 Alpaca examples, about as many tokens as 8 padded examples; without
            packing a row is one example: raise ``batch_size``.
        packing: several examples per row, each attending only to itself (and to sliding windows as the model's
            config sets them); a model whose attention packed rows cannot honour (chunked, recurrent or
            bidirectional layers: `peftkit.train.packed_attention.packing_problem`) trains unpacked, with one line
            saying why.
        share_prefix: with packing, store the tokens that all examples of a row begin with (system prompt,
            instruction) once per row; same loss and gradients, less compute (`peftkit.data.sequences`).
        skip_bad_steps: a step whose loss or gradients are not finite never reaches the weights, the optimizer
            state or a checkpoint; up to this many such steps are skipped (their update dropped), then the run
            stops (0: stop at the first). A run whose gradients stay exactly zero, or whose loss stays far above
            its start, stops too (`Trainer` names the cause and the last checkpoint).
        replay_data / replay_fraction: against forgetting, general instruction data (as ``data``) whose rows are
            mixed into every micro-batch so that they make up ``replay_fraction`` of its rows (the task rows per
            batch stay ``batch_size``; see `peftkit.train.pipeline.replay_rows_per_batch`). ``replay_data`` alone
            (fraction 0) only serves as the data the EWC Fisher is estimated on.
        eval_every / eval_metric / eval_samples / eval_max_new_tokens / save_best: every ``eval_every`` steps the
            eval loss, and with ``eval_metric`` (``exact_match``, ``bleu``, ``rouge_l``, ``orders`` or a function
            ``package.module:function``, see `peftkit.train.evaluation`) greedy answers to ``eval_samples`` held-out
            prompts scored against their references, logged as ``eval_<name>`` and plotted. ``save_best`` names one
            of them (``eval_loss``, ``exact_match``, ...): the adapter of the best evaluation so far is kept in
            ``<output_dir>/best`` (lower is better for losses, higher for the rest).
        report_to: experiment trackers (``tensorboard``, ``wandb``, ``mlflow``; several allowed; ``none`` by
            default), written under ``output_dir`` and offline (`peftkit.train.tracking`).
        dist_timeout: seconds a process waits for the others in a collective operation (gradient all-reduce,
            barriers) before the job stops with an error naming the cause: a process that died or hangs ends the
            job within it. The default (600 s) leaves room for rank 0 writing a large checkpoint while the others
            wait. Set when the process group starts (the first `Trainer` of a process).
        sharding: ``none`` (the default: each process holds the whole model, DDP), ``full`` (FSDP2: weights,
            gradients and optimizer states split across the processes, gathered per transformer block) or
            ``grad_op`` (gradients and optimizer states split, gathered weights kept through the backward); without
            a distributed launch a sharded run is one rank (`peftkit.train.sharding`).
        objective / beta / label_smoothing / loss_type: ``sft`` (the default: cross-entropy on the answers) or
            preference tuning on rows of prompt / chosen / rejected (`peftkit.data.preference`): ``dpo`` (the
            reference model is the same model with its adapter off: no second copy of the weights) with
            ``loss_type`` ``sigmoid`` (the default; ``label_smoothing`` > 0 is conservative DPO), ``robust``,
            ``hinge`` or ``ipo``, or ``orpo`` (no reference; ``beta`` is its lambda). ``beta`` (0.1) as TRL's
            ``DPOConfig`` / ``ORPOConfig`` (`peftkit.train.preference`).
        ewc_lambda / ewc_batches: elastic weight consolidation, a Fisher-weighted L2 pull of the trainable
            parameters towards their values at the start, added to the per-token loss (0 = off); the diagonal
            Fisher comes from ``ewc_batches`` micro-batches of the replay data (or of the task data without it).
    """

    aliases: ClassVar[dict[str, str]] = {
        "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
        "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length",
    }
    """Hugging Face Trainer / TRL spellings accepted for the same keys."""

    model: str = "smollm2-135m-instruct"
    data: str = ""
    eval_data: str | None = None
    eval_fraction: float = 0.0
    field_map: dict[str, str] = dataclasses.field(default_factory=dict)
    template: str | None = None
    skip_bad_rows: bool = False
    limit_examples: int | None = None
    max_length: int = 512
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    share_prefix: bool = True

    method: str = "lora"
    method_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantize: Literal["none", "nf4", "fp4", "int8", "int4"] = "none"
    double_quant: bool = True
    quant_block_size: int = 64

    precision: Literal["auto", "fp32", "bf16", "bf16-autocast", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    page_budget_bytes: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    skip_bad_steps: int = 0

    batch_size: int = 2
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None

    objective: Literal["sft", "dpo", "orpo"] = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"

    replay_data: str | None = None
    replay_fraction: float = 0.0
    ewc_lambda: float = 0.0
    ewc_batches: int = 4

    output_dir: str = "runs/peftkit"
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_metric: str | None = None
    eval_samples: int = 32
    eval_max_new_tokens: int = 64
    save_best: str | None = None
    report_to: str | list[str] = "none"
    log_every: int = 1
    seed: int = 0
    progress: bool = True
    dist_timeout: float = 600.0
    sharding: Literal["none", "full", "grad_op"] = "none"

    def validate(self) -> None:
        self._validate_schedule()
        self._validate_continual()
        self._validate_safeguards()
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        from peftkit.train.tracking import check_report_to

        check_report_to(self.report_to)
        self._validate_eval()
        self._validate_objective()

    def _validate_objective(self) -> None:
        """Preference tuning's settings, and what it does not combine with."""
        if self.objective == "sft":
            return
        if self.beta <= 0:
            raise PeftkitError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise PeftkitError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        unsupported = {"replay_data": self.replay_data, "ewc_lambda": self.ewc_lambda,
                       "eval_metric": self.eval_metric}
        for key, value in unsupported.items():
            if value:
                raise PeftkitError(f"{key} is for objective=sft; objective={self.objective} trains on preference "
                                   "pairs (unset it)")

    def _validate_schedule(self) -> None:
        """Batch shape, run length, learning rate and its warmup, logging and checkpoint counts."""
        positive = {"max_length": self.max_length, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every}
        for key, value in positive.items():
            if value <= 0:
                raise PeftkitError(f"{key} must be > 0, got {value}")
        if self.lr <= 0:
            raise PeftkitError(f"lr must be > 0, got {self.lr}")
        if self.epochs <= 0 and not self.max_steps:
            raise PeftkitError("epochs must be > 0 (or set max_steps)")
        if self.max_steps is not None and self.max_steps <= 0:
            raise PeftkitError(f"max_steps must be > 0, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise PeftkitError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def _validate_continual(self) -> None:
        """Forgetting control: replayed general data and the EWC penalty."""
        if not 0.0 <= self.replay_fraction < 1.0:
            raise PeftkitError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.replay_fraction > 0 and not self.replay_data:
            raise PeftkitError("replay_fraction > 0 needs replay_data (a file of general instruction data)")
        if self.ewc_lambda < 0:
            raise PeftkitError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.ewc_batches <= 0:
            raise PeftkitError(f"ewc_batches must be > 0, got {self.ewc_batches}")

    def _validate_safeguards(self) -> None:
        """Bad-step skipping, the distributed timeout and the paged-optimizer memory budget."""
        if self.skip_bad_steps < 0:
            raise PeftkitError(f"skip_bad_steps must be >= 0, got {self.skip_bad_steps}")
        if not self.dist_timeout > 0:
            raise PeftkitError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.page_budget_bytes is not None and self.page_budget_bytes <= 0:
            raise PeftkitError(f"page_budget_bytes must be > 0, got {self.page_budget_bytes}")

    def _validate_eval(self) -> None:
        from peftkit.train.evaluation import METRICS, resolve_metric

        if not 0.0 <= self.eval_fraction < 1.0:
            raise PeftkitError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_samples <= 0 or self.eval_max_new_tokens <= 0:
            raise PeftkitError("eval_samples and eval_max_new_tokens must be > 0")
        has_eval = bool(self.eval_data) or self.eval_fraction > 0
        for key in ("eval_metric", "save_best"):
            if getattr(self, key) and not has_eval:
                raise PeftkitError(f"{key} needs held-out data: set eval_data or eval_fraction")
        if self.eval_metric:
            resolve_metric(self.eval_metric)  # a wrong name or import path fails now, not after training
        if self.save_best:
            if not self.eval_every:
                raise PeftkitError("save_best needs eval_every > 0 (the evaluations it compares)")
            name = self.save_best.removeprefix("eval_")
            if name != "loss" and not self.eval_metric:
                raise PeftkitError(f"save_best: {self.save_best!r} needs eval_metric (only eval_loss without it)")
            if name != "loss" and self.eval_metric in METRICS:
                known = METRICS[self.eval_metric][1]
                if name not in known:
                    raise PeftkitError(f"save_best: eval_metric {self.eval_metric} gives {', '.join(known)} "
                                       f"(and eval_loss), not {self.save_best!r}")

    def method_settings(self) -> Config:
        """The validated config object of `method`."""
        from peftkit.core.registry import get_method

        return get_method(self.method).config_cls.from_dict(self.method_config, where="method_config: ")


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe and apply ``key=value`` overrides (``method_config.r=16`` sets a method key)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PeftkitError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise PeftkitError(f"{where}: not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise PeftkitError(f"{path}: a recipe is a mapping of keys to values")
        _beside_recipe(data, path)
    recipe = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("method_config."):
            data.setdefault("method_config", {})[key.split(".", 1)[1]] = value
        else:
            data[key] = value
    try:
        return _validated(data, f"{path}: " if path else "")
    except PeftkitError as e:
        if not overrides:
            raise
        try:
            _validated(recipe, "")
        except PeftkitError:  # the recipe alone is wrong: the first message names its file
            raise e from None
        # the recipe alone is fine: the overrides broke it
        raise PeftkitError(f"override {' '.join(overrides)}: {str(e).removeprefix(f'{path}: ')}") from None


RECIPE_RELATIVE = ("data", "eval_data", "replay_data")
"""Recipe keys whose relative paths are read from the recipe's folder first (data shipped beside a recipe)."""


def _beside_recipe(data: dict[str, Any], recipe: Path) -> None:
    """Point relative data paths at the recipe's folder where the file is there, so a recipe and the data shipped
    beside it work from any directory. Otherwise the value stays as written: a path from the current directory, or
    a Hub dataset. ``output_dir`` (and ``key=value`` overrides) stay relative to the current directory."""
    for key in RECIPE_RELATIVE:
        value = data.get(key)
        if not isinstance(value, str) or not value or value.startswith("hub:") or Path(value).is_absolute():
            continue
        beside = recipe.parent / value
        if beside.exists():
            data[key] = os.path.normpath(beside.absolute())


def _validated(data: dict[str, Any], where: str) -> TrainConfig:
    config = TrainConfig.from_dict(copy.deepcopy(data), where=where)
    config.method_settings()  # validate the method's keys now, not after loading the model
    return config
