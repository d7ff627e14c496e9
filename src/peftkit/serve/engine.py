"""Continuous batching: one scheduler thread decodes every request in flight, whatever adapter it asks for.

Each iteration of the loop (`Engine._loop`):

1. runs the adapter loads and unloads asked for since the last one (never during a forward pass);
2. admits waiting requests up to `max_batch` and prefills them together: their prompts left-padded into one
   forward pass (several when they hold more than `max_prefill_tokens` padded tokens), each row with its own
   adapter and the positions it has alone; their KV cache rows then join the batch's;
3. runs one decode step for every row (one forward pass, each row with its own adapter, `LoRABatch`), then
   drops the rows that finished, were cancelled, or hit a stop string.

The batch's KV cache is one `DynamicCache` whose rows are left-padded to the longest: joining a row pads the
shorter side with zeros on the left, and the attention mask masks them; each row keeps its own positions, so it
sees what it would see alone. Dropping rows also drops the columns no remaining row uses. Greedy decoding gives the
tokens the request gets alone (the test suite checks it against `peftkit generate`).

Adapters are checked against the served base when they are added (`Engine.check_adapter`): one whose training
recorded another base (weights fingerprint, `peftkit.core.context.fingerprint`) is refused, since it would answer
garbage without saying so; one trained on a base stored differently (QLoRA's NF4 base served in full precision, or
the other way round) is served with a warning, kept in `Engine.warnings`.

The engine talks to callers through `Event` callbacks, made from the engine thread: `Delta` (new text), then one
`Finished` or `Failed`. Callers in an event loop pass a callback that hands the event over thread-safely.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, DynamicLayer

from peftkit.core.context import Quantization, TrainingContext, fingerprint
from peftkit.errors import PeftkitError
from peftkit.serve.lora_batch import LoRABatch, LoRAWeights

__all__ = [
    "Delta", "Engine", "Event", "Failed", "Finished", "Generation", "SamplingParams", "ServeError",
]  # fmt: skip

log = logging.getLogger("peftkit.serve")


class ServeError(PeftkitError):
    """A request the server refuses; `status` is its HTTP status, `code` the OpenAI error code."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status or self.status
        self.code = code or self.code
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: new tokens at most (the end-of-sequence token counts).
        temperature: 0 is greedy; above 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`.
        seed: seed of this request's sampler (sampling only).
        stop: strings that end the answer (not included in it).
        stop_token_ids: tokens that end the answer like the end-of-sequence token (a chat template's end of turn).
        ignore_eos: keep going past the end-of-sequence token and `stop_token_ids` (benchmarks).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


@dataclasses.dataclass
class Delta:
    text: str


@dataclasses.dataclass
class Finished:
    reason: str  # "stop", "length" or "cancelled"
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Failed:
    message: str
    status: int = 500


Event = Delta | Finished | Failed
_ids = itertools.count()


class Generation:
    """One request inside the engine: its prompt and settings, and what it has produced so far."""

    def __init__(self, model: str, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[Event], None], deltas: bool) -> None:
        self.id = next(_ids)
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit
        self.deltas = deltas
        self.cancelled = False
        self.finish_reason: str | None = None
        self.tokens: list[int] = []  # generated, end-of-sequence token excluded
        self.generated = 0
        self.text = ""
        self.sent = 0  # characters of `text` already sent as deltas
        self.slot = 0
        self.pos = 0  # position of the next token fed to the model
        self.last = 0  # the token fed at the next decode step
        self.sampler = None
        if params.temperature > 0:
            self.sampler = torch.Generator()
            if params.seed is None:
                self.sampler.seed()  # a fresh random seed for this request only
            else:
                self.sampler.manual_seed(params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """The model, its adapters, and the scheduler thread that serves them.

    Args:
        model: the base model (eval mode); a 4-bit peftkit base works like any other.
        tokenizer: its tokenizer.
        base_name: the name requests use for the base model.
        max_batch: rows decoded together at most.
        max_queue: requests waiting for a row at most; more are refused (`ServeError`, 429).
        max_model_len: prompt + new tokens at most (default: the model's maximum positions).
        base_fingerprint: `fingerprint` of the base before it was quantized (default: computed from `model`; a
            quantized `model` has none, and then adapters cannot be checked against it).
        allow_base_mismatch: serve adapters trained on another base (with a warning) instead of refusing them.
        max_prefill_tokens: padded prompt tokens (rows x longest prompt) in one prefill forward pass at most: the
            requests admitted together are prefilled in as few passes as that allows, each at least in its own
            (it bounds the memory of the attention scores, which grows with rows x length^2; 1: one at a time).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_name: str, max_batch: int = 16,
                 max_queue: int = 64, max_model_len: int | None = None, base_fingerprint: str | None = None,
                 allow_base_mismatch: bool = False, max_prefill_tokens: int = 8192) -> None:
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise PeftkitError(f"max_batch and max_prefill_tokens must be >= 1 and max_queue >= 0; got {max_batch}, "
                               f"{max_prefill_tokens} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch, self.max_queue = max_batch, max_queue
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        limits = [x for x in (max_model_len, limit) if x]
        self.max_model_len = min(limits) if limits else 2048
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos = {e for e in eos if e is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad = pad if pad is not None else 0  # any token: padded positions are masked
        self.base_fingerprint = base_fingerprint or fingerprint(model)
        self.quantization = _quantization(model)
        self.allow_base_mismatch = allow_base_mismatch
        self.max_prefill_tokens = max_prefill_tokens
        self.lora = LoRABatch(model)
        self.folders: dict[str, str] = {}
        self.contexts: dict[str, TrainingContext | None] = {}
        self.warnings: dict[str, list[str]] = {}  # adapter name -> what `check_adapter` said when it was added
        self.stats = collections.Counter()
        self._device = next(model.parameters()).device
        self._bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        self._cv = threading.Condition()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._rows: list[Generation] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._commands: list[Callable[[], None]] = []
        self._refs: collections.Counter[str] = collections.Counter()  # requests in flight per model name
        self._draining: dict[str, concurrent.futures.Future] = {}
        self._reserved: set[str] = set()
        self._accepting = True
        self._abort = False
        self._held = 0
        self._thread: threading.Thread | None = None
        self._check_cache()

    # ---- called from any thread

    def start(self) -> None:
        """Start the scheduler thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftkit-serve-engine", daemon=True)
            self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def models(self) -> list[str]:
        """The names requests may use: the base model, then the adapters (those being unloaded left out)."""
        with self._cv:
            return [self.base_name] + [n for n in self.lora.names if n not in self._draining]

    def load(self) -> dict[str, int]:
        """Requests decoding and waiting."""
        with self._cv:
            return {"active": len(self._rows), "waiting": len(self._waiting)}

    def submit(self, model: str, prompt_ids: list[int], params: SamplingParams,
               emit: Callable[[Event], None], deltas: bool = True) -> Generation:
        """Queue a request; `emit` gets its events (from the engine thread).

        Raises:
            ServeError: unknown model (404), prompt + max_tokens over the context (400), queue full (429),
                shutting down (503).
        """
        total = len(prompt_ids) + params.max_tokens
        if not prompt_ids:
            raise ServeError("the prompt is empty", param="prompt")
        if total > self.max_model_len:
            raise ServeError(f"this model's context is {self.max_model_len} tokens; the prompt has "
                             f"{len(prompt_ids)} and max_tokens is {params.max_tokens} ({total} in all)",
                             code="context_length_exceeded", param="max_tokens")
        gen = Generation(model, prompt_ids, params, emit, deltas)
        with self._cv:
            if not self._accepting:
                raise ServeError("the server is shutting down", status=503, code="shutting_down")
            if model != self.base_name and (model not in self.lora.names or model in self._draining):
                raise self._unknown(model)
            free_rows = self.max_batch - len(self._rows)
            if len(self._waiting) - free_rows >= self.max_queue:
                self.stats["rejected"] += 1
                raise ServeError(f"the server is busy ({len(self._rows)} requests decoding, {len(self._waiting)} "
                                 "waiting); retry later", status=429, code="server_busy")
            self._refs[model] += 1
            self._waiting.append(gen)
            self.stats["requests"] += 1
            self._cv.notify_all()
        return gen

    def context(self, model: str) -> TrainingContext | None:
        """What adapter `model`'s training recorded (None for the base model and adapters without a record).

        Raises:
            ServeError: no such model (404).
        """
        with self._cv:
            if model == self.base_name:
                return None
            if model not in self.lora.names or model in self._draining:
                raise self._unknown(model)
            return self.contexts.get(model)

    def _unknown(self, model: str) -> ServeError:
        return ServeError(f"model {model!r} does not exist; available: {', '.join(self.models())}", status=404,
                          code="model_not_found", param="model")

    def check_adapter(self, name: str, weights: LoRAWeights, allow_base_mismatch: bool | None = None) -> list[str]:
        """Check an adapter's recorded training context against the served base; returns the warnings.

        Raises:
            ServeError: its training recorded a base with other weights (400), unless `allow_base_mismatch` (default:
                the engine's) turns that into a warning.
        """
        context = weights.context
        if context is None:
            return []
        warnings = []
        trained = f"{context.base or 'a base'} (fingerprint {context.fingerprint})"
        if context.fingerprint is not None and self.base_fingerprint is None:
            warnings.append(f"adapter {name!r} records the base it was trained on, {trained}, but the served base "
                            "was quantized before its fingerprint was taken: it cannot be checked")
        elif context.fingerprint is not None and context.fingerprint != self.base_fingerprint:
            problem = (f"adapter {name!r} ({weights.folder}) was trained on {trained}, not on the served base "
                       f"{self.base_name} (fingerprint {self.base_fingerprint}): its answers would be garbage")
            allow = self.allow_base_mismatch if allow_base_mismatch is None else allow_base_mismatch
            if not allow:
                raise ServeError(problem + "; serve it on its own base, or allow it (--allow-base-mismatch, or "
                                 '"allow_base_mismatch": true when loading it)', code="base_mismatch", param="path")
            warnings.append(problem + " (served as asked)")
        if not _same_storage(context.quantization, self.quantization):
            warnings.append(f"adapter {name!r} was trained on a {_storage(context.quantization)} base and is served on "
                            f"a {_storage(self.quantization)} one: its answers differ from `peftkit generate`'s "
                            "(start the server with the --quantize it was trained with)")
        return warnings

    def cancel(self, gen: Generation) -> None:
        """Stop a request (its client went away); the engine drops it before its next step."""
        if not gen.done:
            gen.cancelled = True
            with self._cv:
                self._cv.notify_all()

    def add_adapter(self, name: str, weights: LoRAWeights,
                    allow_base_mismatch: bool | None = None) -> concurrent.futures.Future:
        """Check an adapter (`check_adapter`: its warnings go to ``warnings[name]``) and attach it between two
        steps; the future resolves once requests can use it.

        Raises:
            ServeError: the name is taken (409), or the adapter was trained on another base (400).
        """
        with self._cv:
            if name == self.base_name or name in self.lora.names or name in self._reserved:
                raise ServeError(f"a model named {name!r} is already served", status=409, code="model_exists")
        warnings = self.check_adapter(name, weights, allow_base_mismatch)
        with self._cv:
            if name in self.lora.names or name in self._reserved:
                raise ServeError(f"a model named {name!r} is already served", status=409, code="model_exists")
            self._reserved.add(name)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def install() -> None:
            try:
                self.lora.add(name, weights)
                self.folders[name] = weights.folder
                self.contexts[name] = weights.context
                self.warnings[name] = warnings
                future.set_result(name)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
            finally:
                self._reserved.discard(name)

        self._command(install)
        return future

    def remove_adapter(self, name: str) -> concurrent.futures.Future:
        """Stop taking requests for adapter `name`; the future resolves once its last request has finished
        and it is detached."""
        with self._cv:
            if name == self.base_name:
                raise ServeError(f"{name!r} is the base model; only adapters can be unloaded", param="name")
            if name not in self.lora.names:
                raise ServeError(f"no adapter named {name!r} is loaded", status=404, code="model_not_found")
            if name in self._draining:
                return self._draining[name]
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._draining[name] = future
            self._cv.notify_all()
        return future

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Admit no waiting request while inside (rows already decoding go on): e.g. to start several at once."""
        with self._cv:
            self._held += 1
        try:
            yield
        finally:
            with self._cv:
                self._held -= 1
                self._cv.notify_all()

    def close(self) -> None:
        """Take no new requests; the ones accepted go on."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the accepted ones finish for up to `timeout` seconds, fail the rest (503),
        and stop the thread."""
        self.close()
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._rows or self._waiting) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            self._abort = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        for gen in list(self._waiting) + self._rows:  # only when the thread never started or died
            self._fail(gen, "the server shut down before this request finished", 503)
        self._waiting.clear()
        self._rows = []
        self.lora.close()

    # ---- the engine thread

    def _command(self, fn: Callable[[], None]) -> None:
        if self._thread is None:  # not started: nothing runs a forward pass, so it can run now
            fn()
            return
        with self._cv:
            self._commands.append(fn)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._abort and not self._commands and not self._rows and not self._drained() and (
                        not self._waiting or self._held):
                    self._cv.wait()
                if self._abort:
                    for gen in list(self._waiting) + self._rows:
                        self._fail(gen, "the server shut down before this request finished", 503)
                    self._waiting.clear()
                    self._rows, self._cache, self._mask = [], None, None
                    self._cv.notify_all()
                    return
                commands, self._commands = self._commands, []
                admitted = []
                while self._waiting and not self._held and len(self._rows) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            for command in commands:
                command()
            try:
                with torch.inference_mode(), torch.autocast(self._device.type, torch.bfloat16, enabled=self._bf16):
                    self._step(admitted)
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
                log.exception("generation step failed")
                for gen in admitted + self._rows:
                    self._fail(gen, f"generation failed: {type(e).__name__}: {e}", 500)
                self._rows, self._cache, self._mask = [], None, None
            with self._cv:
                self._unload_drained()
                self._cv.notify_all()

    def _drained(self) -> bool:
        return any(self._refs[name] == 0 for name in self._draining)

    def _unload_drained(self) -> None:
        for name in [n for n in self._draining if self._refs[n] == 0]:
            future = self._draining.pop(name)
            self.lora.remove(name)
            for facts in (self.folders, self.contexts, self.warnings):
                facts.pop(name, None)
            future.set_result(name)

    def _step(self, admitted: list[Generation]) -> None:
        for gen in self._rows:
            if gen.cancelled:
                self._finish(gen, "cancelled")
        self._keep([g for g in self._rows if not g.done])
        for gen in admitted:
            if gen.cancelled:
                self._finish(gen, "cancelled")
        fresh = [g for g in admitted if not g.done]
        if self._rows:
            self.stats["joined_running_batch"] += len(fresh)
        for group in _prefill_groups(fresh, self.max_prefill_tokens):
            self._prefill(group)
        self._keep([g for g in self._rows if not g.done])
        if self._rows:
            self._decode()
            self._keep([g for g in self._rows if not g.done])

    def _prefill(self, gens: list[Generation]) -> None:
        """Run the prompts of `gens` in one forward pass, pick each one's first token, and join the rows to the batch.

        The prompts are left-padded to the longest, so that every row's last token is the last column; the mask
        hides the padding and each row gets the positions it has alone (0, 1, ... from its first token).
        """
        started = time.perf_counter()
        width = max(len(g.prompt_ids) for g in gens)
        ids = torch.full((len(gens), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(gens), width), dtype=torch.long)
        for i, gen in enumerate(gens):
            gen.slot = 0 if gen.model == self.base_name else self.lora.slot(gen.model)
            ids[i, width - len(gen.prompt_ids):] = torch.tensor(gen.prompt_ids)
            mask[i, width - len(gen.prompt_ids):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.lora.select([g.slot for g in gens])
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        self.stats["prefills"] += 1
        self.stats["max_prefill_rows"] = max(self.stats["max_prefill_rows"], len(gens))
        self.stats["prompt_tokens"] += int(mask.sum())
        self._join(gens, out.cache, mask)
        for gen, token in zip(gens, self._sample(out.logits[:, -1], gens), strict=True):
            gen.pos = len(gen.prompt_ids)
            self._push(gen, token)
        self.stats["prefill_s"] += time.perf_counter() - started

    def _decode(self) -> None:
        started = time.perf_counter()
        rows = self._rows
        ids = torch.tensor([[g.last] for g in rows], device=self._device)
        positions = torch.tensor([[g.pos] for g in rows], device=self._device)
        mask = F.pad(self._mask, (0, 1), value=1)
        self.lora.select([g.slot for g in rows])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache,
                         use_cache=True)
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += len({g.slot for g in rows}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for gen, token in zip(rows, self._sample(out.logits[:, -1], rows), strict=True):
            gen.pos += 1
            self._push(gen, token)
        self.stats["decode_s"] += time.perf_counter() - started

    def _sample(self, logits: torch.Tensor, rows: list[Generation]) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, gen in enumerate(rows):
            p = gen.params
            if p.temperature > 0:
                probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
                if p.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    outside = sorted_p.cumsum(0) - sorted_p > p.top_p  # the most likely token always stays
                    probs = probs.scatter(0, order[outside], 0.0)
                tokens[i] = int(torch.multinomial(probs, 1, generator=gen.sampler))
        return tokens

    def _push(self, gen: Generation, token: int) -> None:
        """Record one new token of `gen`: text, stop strings, limits, and the delta for its client."""
        gen.generated += 1
        gen.last = token
        self.stats["completion_tokens"] += 1
        if (token in self.eos or token in gen.params.stop_token_ids) and not gen.params.ignore_eos:
            return self._finish(gen, "stop")
        gen.tokens.append(token)
        text = self.tokenizer.decode(gen.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in gen.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            gen.text = text[:cut]
            return self._finish(gen, "stop")
        gen.text = text
        if gen.generated >= gen.params.max_tokens:
            return self._finish(gen, "length")
        safe = _safe_end(text, gen.params.stop)
        if gen.deltas and safe > gen.sent:
            gen.emit(Delta(text[gen.sent:safe]))
            gen.sent = safe

    def _finish(self, gen: Generation, reason: str) -> None:
        gen.finish_reason = reason
        if gen.deltas and len(gen.text) > gen.sent:
            gen.emit(Delta(gen.text[gen.sent:]))
            gen.sent = len(gen.text)
        self._release(gen)
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        gen.emit(Finished(reason, gen.text, len(gen.prompt_ids), gen.generated))

    def _fail(self, gen: Generation, message: str, status: int) -> None:
        if gen.done:
            return
        gen.finish_reason = "error"
        self._release(gen)
        self.stats["failed"] += 1
        gen.emit(Failed(message, status))

    def _release(self, gen: Generation) -> None:
        with self._cv:
            self._refs[gen.model] -= 1

    # ---- the batch's KV cache

    def _check_cache(self) -> None:
        """Refuse models whose cache cannot be left-padded and joined (sliding windows, hybrid layers)."""
        layers = DynamicCache(config=self.model.config).layers
        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise PeftkitError(f"peftkit serve needs a full-attention KV cache in every layer; "
                               f"{type(self.model).__name__} uses {', '.join(sorted(odd))}")

    def _join(self, gens: list[Generation], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add the prefilled rows of `gens` (their cache and mask) to the batch, left-padding the batch or the new
        rows to the longer one."""
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, list(gens)
            return
        width, length = self._mask.shape[1], mask.shape[1]
        pad_batch, pad_new = max(length - width, 0), max(width - length, 0)
        for mine, new in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, pad_batch, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
            mine.values = torch.cat([F.pad(mine.values, (0, 0, pad_batch, 0)),
                                     F.pad(new.values, (0, 0, pad_new, 0))])
        self._mask = torch.cat([F.pad(self._mask, (pad_batch, 0)), F.pad(mask, (pad_new, 0))])
        self._rows.extend(gens)

    def _keep(self, rows: list[Generation]) -> None:
        """Keep only `rows` (a subsequence of the batch) and the cache columns they use."""
        if len(rows) == len(self._rows):
            return
        if not rows:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = {id(g): i for i, g in enumerate(self._rows)}
        keep = torch.tensor([index[id(g)] for g in rows], device=self._device)
        mask = self._mask.index_select(0, keep)
        first = int(mask.any(0).long().argmax())  # leading columns that are padding in every kept row
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, keep)[:, :, first:]
            layer.values = layer.values.index_select(0, keep)[:, :, first:]
        self._rows = rows


def _prefill_groups(gens: list[Generation], budget: int) -> list[list[Generation]]:
    """`gens` in groups of rows x longest prompt <= `budget` tokens (a longer prompt alone), shortest prompts first:
    prompts of similar lengths go together, with little padding."""
    groups: list[list[Generation]] = []
    for gen in sorted(gens, key=lambda g: len(g.prompt_ids)):
        if groups and (len(groups[-1]) + 1) * len(gen.prompt_ids) <= budget:
            groups[-1].append(gen)
        else:
            groups.append([gen])
    return groups


def _quantization(model: nn.Module) -> Quantization | None:
    """How the base's linear layers are stored (the first quantized layer's format), None for full precision."""
    from peftkit.quant import QuantLinear

    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    return None if layer is None else Quantization(layer.format, layer.block_size, layer.double_quant)


def _same_storage(a: Quantization | None, b: Quantization | None) -> bool:
    """Whether two bases store their weights alike (format, block size and double quantization)."""
    if a is None or b is None:
        return a is b
    return (a.format, a.block_size, a.double_quant) == (b.format, b.block_size, b.double_quant)


def _storage(q: Quantization | None) -> str:
    return "full-precision" if q is None else q.describe()


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a trailing partial character, nor the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    return end
