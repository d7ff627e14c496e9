"""What an adapter remembers of its training: the base model, its quantization, the chat template, the prompt.

An adapter answers well only in the prompt layout it was trained on: the demo's adapter, trained on
``<instruction>\\n\\n<message>`` in SmolLM2's chat template, repeats JSON keys until its token limit when it gets the
bare message. `Trainer` records what the model saw in ``peftkit.json`` beside ``adapter_config.json`` (its own file,
so that peft loads the folder without an "unexpected keyword arguments" warning; folders written before hold the
record under the ``peftkit`` key of ``adapter_config.json`` and still read), and ``peftkit generate``, ``merge``,
``export`` and ``serve`` apply it by default (the base through `peftkit.loading`):

* ``base``: the model as the user named it (``smollm2-135m-instruct``, a hub id, the path given), not the cache
  folder it resolved to, and a fingerprint of its weights (`fingerprint`);
* ``quantization``: how the frozen base was stored while training (QLoRA: format, block size, double
  quantization), or null;
* ``chat_template``: its name (``model``: the tokenizer's own) and its text with the text's SHA-256;
* ``prompt``: the system message and the instruction that all training rows shared (null when they differ), and
  how an instruction and the user's input were joined (`INPUT_FORMAT`).

Adapters without the block (peft's own, or saved without a training context) load with nothing applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError

__all__ = ["CONTEXT_KEY", "FORMATS", "INPUT_FORMAT", "MAX_BLOCK", "MIN_BLOCK", "RECORD_NAME", "Conversation",
           "Quantization", "TrainingContext", "check_block_size", "fingerprint", "read_context"]

CONTEXT_KEY = "peftkit"
RECORD_NAME = "peftkit.json"
"""The record's own file in an adapter folder; older folders hold it under `CONTEXT_KEY` in adapter_config.json."""
VERSION = 1
FINGERPRINT_TENSORS = 4
FINGERPRINT_ELEMENTS = 1 << 20  # per tensor: the fingerprint stays cheap on large models

# The vocabulary the record is written in lives here, below the layers that implement it (core imports neither):
Conversation = list[dict[str, str]]
"""Chat messages (``role``, ``content``), as `peftkit.data.formats` reads them."""

INPUT_FORMAT = "{instruction}\n\n{input}"
"""The user message of an instruction row with an input (Alpaca's ``input``, Dolly's ``context``)."""

FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8")
"""The weight formats of `peftkit.quant`, by name."""

MIN_BLOCK, MAX_BLOCK = 32, 4096
"""The block sizes `peftkit.quant` supports (powers of two in between)."""


def check_block_size(block_size: int) -> int:
    """Validate a block size: a power of two in [32, 4096].

    Raises:
        ValueError: naming the bad value.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block_size}")
    return block_size


def fingerprint(model: nn.Module) -> str | None:
    """A cheap fingerprint of a base model's weights: every parameter's name and shape, and the values of
    `FINGERPRINT_TENSORS` evenly spaced parameters (their first `FINGERPRINT_ELEMENTS` entries).

    Note: values are hashed rounded to bf16, so a base loaded in fp32 and the same base loaded in bf16 agree.
    None for a model whose weights are already quantized (its full-precision weights are gone): a layer whose
    ``weight`` holds integer codes (`peftkit.quant.QuantLinear`), or one without values (on the meta device).
    """
    if any(p.is_meta for p in model.parameters()):
        return None
    if any(isinstance(w := getattr(m, "weight", None), torch.Tensor) and not w.is_floating_point()
           for m in model.modules()):
        return None
    params = list(model.named_parameters())
    if not params:
        return None
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    n = len(params)
    for i in sorted({round(k * (n - 1) / (FINGERPRINT_TENSORS - 1)) for k in range(FINGERPRINT_TENSORS)}):
        values = params[i][1].detach().reshape(-1)[:FINGERPRINT_ELEMENTS].to("cpu", torch.bfloat16)
        digest.update(values.contiguous().view(torch.int16).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:20]


def _dtype(name: str, where: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise PeftkitError(f"{where}unknown dtype {name!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the frozen base was stored while training (`peftkit.quant.quantize_model`'s arguments; applied by
    `peftkit.quant.apply_quantization`).

    Attributes:
        source_dtype: dtype of the weights that were quantized (quantizing bf16 or fp32 weights gives slightly
            different codes); a merge quantizes from the same dtype to get the weights training saw.
    """

    format: str
    block_size: int = 64
    double_quant: bool = True
    source_dtype: str = "float32"
    skip: tuple[str, ...] = ("lm_head",)

    def describe(self) -> str:
        dq = " + double quant" if self.double_quant else ""
        return f"{self.format.upper()}{dq} (block {self.block_size})"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> Quantization:
        if not isinstance(data, dict) or data.get("format") not in FORMATS:
            raise PeftkitError(f"{where}quantization must name a format ({', '.join(FORMATS)}), got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        q = cls(**{k: v for k, v in data.items() if k in known})
        if not isinstance(q.block_size, int) or q.block_size <= 0 or not isinstance(q.double_quant, bool):
            raise PeftkitError(f"{where}quantization: bad block_size or double_quant in {data!r}")
        try:
            check_block_size(q.block_size)
        except ValueError as e:
            raise PeftkitError(f"{where}quantization: {e} (edited by hand?)") from None
        if not isinstance(q.skip, (list, tuple)) or not all(isinstance(x, str) for x in q.skip):
            raise PeftkitError(f"{where}quantization: skip must be a list of module names, got {q.skip!r}")
        _dtype(q.source_dtype, f"{where}quantization: ")
        return dataclasses.replace(q, skip=tuple(q.skip))


@dataclasses.dataclass(frozen=True)
class TrainingContext:
    """What training fed the model; see the module notes.

    Attributes:
        base: the base model as the user named it.
        fingerprint: `fingerprint` of the base before quantization and adaptation.
        quantization: the base's format while training, None for a full-precision base.
        template: the chat template's name (``model`` = the tokenizer's own, or a `TEMPLATES` name), None for a
            template given as text.
        template_text: the template's Jinja text (None if the tokenizer had none to record).
        system: the system message every training conversation started with.
        instruction: the instruction every training row shared; a user's text is put into `input_format` with it.
        input_format: how instruction and input were joined (``{instruction}`` and ``{input}``).
    """

    base: str | None = None
    fingerprint: str | None = None
    quantization: Quantization | None = None
    template: str | None = None
    template_text: str | None = None
    system: str | None = None
    instruction: str | None = None
    input_format: str = INPUT_FORMAT

    def __post_init__(self) -> None:
        fields = {f for _, f, _, _ in string.Formatter().parse(self.input_format) if f is not None}
        if "input" not in fields or not fields <= {"instruction", "input"}:
            raise PeftkitError(f"input_format {self.input_format!r} must hold {{input}} and may hold "
                               "{instruction}, nothing else")

    @property
    def chat_template(self) -> str | None:
        """What `peftkit.data.sequences.prompt_text` renders with: the recorded text, else the name."""
        return self.template_text or self.template

    def conversation(self, text: str) -> Conversation:
        """The messages training would have built around the user's `text`."""
        content = self.input_format.format(instruction=self.instruction, input=text) if self.instruction else text
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": content}]

    def describe(self) -> str:
        """One line: what generation applies."""
        parts = [f"base {self.base or '(not recorded)'}"]
        if self.quantization is not None:
            parts.append(f"{self.quantization.describe()} base")
        parts.append(f"template {self.template or 'given as text'}")
        if self.system:
            parts.append(f"system message {_short(self.system)}")
        if self.instruction:
            parts.append(f"instruction {_short(self.instruction)}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        text = self.template_text
        return {
            "version": VERSION,
            "base": {"name": self.base, "fingerprint": self.fingerprint},
            "quantization": None if self.quantization is None else self.quantization.to_json(),
            "chat_template": {"name": self.template, "text": text,
                              "sha256": None if text is None else hashlib.sha256(text.encode()).hexdigest()},
            "prompt": {"system": self.system, "instruction": self.instruction, "input_format": self.input_format},
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> TrainingContext:
        """Read the ``peftkit`` block; a malformed one is an error naming the part."""
        where = f"{where}{CONTEXT_KEY}: "
        if not isinstance(data, dict):
            raise PeftkitError(f"{where}expected an object, got {type(data).__name__}")
        version = data.get("version", VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
            raise PeftkitError(f"{where}record version {version!r} is not one this peftkit reads (1 to {VERSION}): "
                               "written by a newer peftkit? upgrade it (pip install -U peftkit)")
        parts = {k: data.get(k) or {} for k in ("base", "chat_template", "prompt")}
        for key, value in parts.items():
            if not isinstance(value, dict):
                raise PeftkitError(f"{where}{key} must be an object, got {value!r}")
        template = parts["chat_template"]
        text, sha = template.get("text"), template.get("sha256")
        if text is not None and sha is not None and hashlib.sha256(str(text).encode()).hexdigest() != sha:
            raise PeftkitError(f"{where}chat_template text does not match its sha256 (edited by hand? fix or "
                               "drop the sha256)")
        prompt = parts["prompt"]
        values = {"base": parts["base"].get("name"), "fingerprint": parts["base"].get("fingerprint"),
                  "template": template.get("name"), "template_text": text, "system": prompt.get("system"),
                  "instruction": prompt.get("instruction")}
        for key, value in values.items():
            if value is not None and not isinstance(value, str):
                raise PeftkitError(f"{where}{key} must be a string, got {value!r}")
        input_format = prompt.get("input_format") or INPUT_FORMAT
        if not isinstance(input_format, str):
            raise PeftkitError(f"{where}input_format must be a string, got {input_format!r}")
        quant = data.get("quantization")
        quantization = None if quant is None else Quantization.from_json(quant, where)
        try:
            return cls(**values, input_format=input_format, quantization=quantization)
        except PeftkitError as e:
            raise PeftkitError(f"{where}{e}") from None


def _short(text: str, n: int = 40) -> str:
    line = " ".join(text.split())
    return repr(line if len(line) <= n else line[:n - 1] + "…")


def read_config_json(path: Path) -> Any:
    """A JSON file of an adapter folder, parsed; a missing or unreadable file is a one-line error."""
    if not path.is_file():
        raise PeftkitError(f"adapter file missing: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (an editor's) is fine
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{path} is not valid JSON: {e}") from None


def read_context(folder: str | os.PathLike) -> TrainingContext | None:
    """The training context recorded in an adapter folder, None when it has none (peft's, or saved untrained).

    Read from ``peftkit.json``, or from the ``peftkit`` key of ``adapter_config.json`` in folders written before
    the record had its own file. A malformed record is a one-line error naming its file.
    """
    folder = Path(folder)
    record = folder / RECORD_NAME
    if record.is_file():
        return TrainingContext.from_json(read_config_json(record), where=f"{record}: ")
    path = folder / "adapter_config.json"
    raw = read_config_json(path)
    if not isinstance(raw, dict) or raw.get(CONTEXT_KEY) is None:
        return None
    return TrainingContext.from_json(raw[CONTEXT_KEY], where=f"{path}: ")
