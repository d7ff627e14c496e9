"""Continuous batching: one engine thread decodes every request in flight, whatever adapter it asks for.

`Engine` composes the parts, each in its own module:

* `registry.AdapterRegistry`: the adapters, loaded from disk in one place, checked against the base, attached and
  detached between steps;
* `scheduler.Scheduler`: the queue of waiting requests and the work other threads ask of the engine thread;
* `batch.DecodeBatch`: the rows decoding together, their KV cache, the prefill and decode forward passes;
* `decoder`: the next token of each row, and each request's text (incremental detokenizer, stop strings, deltas).

Each iteration of the engine thread (`Engine._loop`):

1. runs the adapter loads and unloads asked for since the last one (never during a forward pass);
2. admits waiting requests up to `max_batch` and prefills each alone (in chunks of `max_prefill_tokens`); their KV
   caches then join the batch's, one row each;
3. runs one decode step for every row, then drops the rows that finished, were cancelled, or hit a stop string.

Decoding is batch-invariant (`peftkit.serve.rows`): a request gets the same tokens, bit for bit the same logits,
whatever it shares the batch with and whenever it arrives, in every precision (tests/test_serve_invariance.py).
For Llama-shaped models with the compiled kernels (`peftkit.serve.fast`) a decode step is one compiled call (every
layer, each row's LoRA terms, the head; fp32, bf16 or NF4 weights read in place), each row attending over its own
preallocated KV cache, every output summed in a fixed order; other models (and
``PEFTKIT_NATIVE=0``) take the forward-pass path, which pads its rows to a multiple of 4 and attends row by row.
Greedy answers also match `peftkit generate` (the test suite checks it), though not bit for bit in bf16: both paths
sum in another order than a batch of one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.core.context import TrainingContext, fingerprint
from peftkit.errors import PeftkitError
from peftkit.serve.batch import DecodeBatch
from peftkit.serve.decoder import TextStream, sample
from peftkit.serve.lora_batch import LoRABatch, LoRAWeights
from peftkit.serve.registry import AdapterRegistry, quantization_of, resolve_root
from peftkit.serve.request import Delta, Event, Failed, Finished, Generation, SamplingParams, ServeError
from peftkit.serve.scheduler import Scheduler

__all__ = [
    "Delta", "Engine", "Event", "Failed", "Finished", "Generation", "SamplingParams", "ServeError",
]  # fmt: skip

log = logging.getLogger("peftkit.serve")


class Engine:
    """The model, its adapters, and the engine thread that serves them.

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
        max_prefill_tokens: prompt tokens in one prefill forward pass at most: each request is prefilled alone,
            a longer prompt in chunks of this many tokens (it bounds the memory of the attention scores, which grows
            with length^2).
        adapter_root: the folder `load_adapter` reads adapters from (`registry.adapter_folder`); None: anywhere,
            but clients may not load adapters.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_name: str, max_batch: int = 16,
                 max_queue: int = 64, max_model_len: int | None = None, base_fingerprint: str | None = None,
                 allow_base_mismatch: bool = False, max_prefill_tokens: int = 8192,
                 adapter_root: str | os.PathLike | None = None) -> None:
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise PeftkitError(f"max_batch and max_prefill_tokens must be >= 1 and max_queue >= 0; got {max_batch}, "
                               f"{max_prefill_tokens} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        limits = [x for x in (max_model_len, limit) if x]
        self.max_model_len = min(limits) if limits else 2048
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos = {e for e in eos if e is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats: collections.Counter = collections.Counter()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self.scheduler = Scheduler(self._cv, max_batch, max_queue, self.stats)
        root = None if adapter_root is None else resolve_root(adapter_root)
        self.adapters = AdapterRegistry(model, base_name, base_fingerprint or fingerprint(model),
                                        quantization_of(model), allow_base_mismatch, root, self._cv,
                                        self._between_steps)
        self.batch = DecodeBatch(model, self.adapters.lora, pad if pad is not None else 0, self.stats)
        self._bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())

    # ---- the parts' state, as callers read it

    @property
    def lora(self) -> LoRABatch:
        return self.adapters.lora

    @property
    def folders(self) -> dict[str, str]:
        return self.adapters.folders

    @property
    def contexts(self) -> dict[str, TrainingContext | None]:
        return self.adapters.contexts

    @property
    def warnings(self) -> dict[str, list[str]]:
        """Adapter name -> what `check_adapter` said when it was added."""
        return self.adapters.warnings

    @property
    def accepting(self) -> bool:
        return self.scheduler.accepting

    # ---- called from any thread

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftkit-serve-engine", daemon=True)
            self._thread.start()

    def models(self) -> list[str]:
        """The names requests may use: the base model, then the adapters (those being unloaded left out)."""
        with self._cv:
            return self.adapters.names()

    def load(self) -> dict[str, int]:
        """Requests decoding and waiting."""
        with self._cv:
            return {"active": len(self.batch.rows), "waiting": len(self.scheduler.waiting)}

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
        gen = Generation(model, prompt_ids, params, emit, deltas, TextStream(self.tokenizer, params.stop))
        with self._cv:
            if self.scheduler.accepting and not self.adapters.serves(model):
                raise self.adapters.unknown(model)
            self.scheduler.queue(gen, len(self.batch.rows))
            self.adapters.acquire(model)
        return gen

    def context(self, model: str) -> TrainingContext | None:
        """What adapter `model`'s training recorded (None for the base model and adapters without a record).

        Raises:
            ServeError: no such model (404).
        """
        with self._cv:
            if not self.adapters.serves(model):
                raise self.adapters.unknown(model)
            return None if model == self.base_name else self.contexts.get(model)

    def check_adapter(self, name: str, weights: LoRAWeights, allow_base_mismatch: bool | None = None) -> list[str]:
        """`AdapterRegistry.check`: an adapter's recorded training against the served base; returns the warnings."""
        return self.adapters.check(name, weights, allow_base_mismatch)

    def load_adapter(self, name: str, path: str | os.PathLike, allow_base_mismatch: bool | None = None,
                     remote: bool = False) -> concurrent.futures.Future:
        """`AdapterRegistry.load`: read an adapter folder (under the adapter root) and attach it between steps."""
        return self.adapters.load(name, path, allow_base_mismatch, remote)

    def add_adapter(self, name: str, weights: LoRAWeights,
                    allow_base_mismatch: bool | None = None) -> concurrent.futures.Future:
        """`AdapterRegistry.add`: check an adapter already read and attach it between steps."""
        return self.adapters.add(name, weights, allow_base_mismatch)

    def remove_adapter(self, name: str) -> concurrent.futures.Future:
        """`AdapterRegistry.remove`: unload adapter `name` once its last request has finished."""
        return self.adapters.remove(name)

    def cancel(self, gen: Generation) -> None:
        """Stop a request (its client went away); the engine drops it before its next step."""
        if not gen.done:
            gen.cancelled = True
            with self._cv:
                self._cv.notify_all()

    def hold(self) -> AbstractContextManager[None]:
        """Admit no waiting request while inside (rows already decoding go on): e.g. to start several at once."""
        return self.scheduler.hold()

    def close(self) -> None:
        """Take no new requests; the ones accepted go on."""
        self.scheduler.close()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the accepted ones finish for up to `timeout` seconds, fail the rest (503),
        and stop the thread."""
        self.close()
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self.batch.rows or self.scheduler.waiting) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
        self.scheduler.abort()
        if self._thread is not None:
            self._thread.join()
        self._fail_all("the server shut down before this request finished", 503)  # the thread never ran, or died
        self.lora.close()

    # ---- the engine thread

    def _between_steps(self, fn: Callable[[], None]) -> None:
        if self._thread is None:  # not started: nothing runs a forward pass, so it can run now
            fn()
        else:
            self.scheduler.command(fn)

    def _loop(self) -> None:
        while (work := self.scheduler.next_work(self._busy, len(self.batch.rows))) is not None:
            commands, admitted = work
            for command in commands:
                command()
            try:
                with torch.inference_mode(), torch.autocast(self.batch.device.type, torch.bfloat16,
                                                            enabled=self._bf16):
                    self._step(admitted)
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
                log.exception("generation step failed")
                for gen in admitted + self.batch.rows:
                    self._fail(gen, f"generation failed: {type(e).__name__}: {e}", 500)
                self.batch.clear()
            with self._cv:
                self.adapters.unload_drained()
                self._cv.notify_all()
        self._fail_all("the server shut down before this request finished", 503)

    def _busy(self) -> bool:
        return bool(self.batch.rows) or self.adapters.drained()

    def _fail_all(self, message: str, status: int) -> None:
        with self._cv:
            for gen in list(self.scheduler.waiting) + self.batch.rows:
                self._fail(gen, message, status)
            self.scheduler.waiting.clear()
            self.batch.clear()
            self._cv.notify_all()

    def _step(self, admitted: list[Generation]) -> None:
        for gen in self.batch.rows + admitted:
            if gen.cancelled:
                self._finish(gen, "cancelled")
        self.batch.keep([g for g in self.batch.rows if not g.done])
        fresh = [g for g in admitted if not g.done]
        if self.batch.rows:
            self.stats["joined_running_batch"] += len(fresh)
        for gen in fresh:  # alone: its cache and first token depend on its prompt only
            started = time.perf_counter()
            gen.slot = self.adapters.slot(gen.model)
            self._push_all([gen], self.batch.prefill(gen, self.max_prefill_tokens))
            self.stats["prefill_s"] += time.perf_counter() - started
        self.batch.keep([g for g in self.batch.rows if not g.done])
        if self.batch.rows:
            started = time.perf_counter()
            self._push_all(self.batch.rows, self.batch.decode())
            self.stats["decode_s"] += time.perf_counter() - started
            self.batch.keep([g for g in self.batch.rows if not g.done])

    def _push_all(self, rows: list[Generation], logits: torch.Tensor) -> None:
        for gen, token in zip(rows, sample(logits, rows), strict=True):
            self._push(gen, token)

    def _push(self, gen: Generation, token: int) -> None:
        """Record one new token of `gen`: text, stop strings, limits, and the delta for its client."""
        gen.generated += 1
        gen.last = token
        self.stats["completion_tokens"] += 1
        if (token in self.eos or token in gen.params.stop_token_ids) and not gen.params.ignore_eos:
            return self._finish(gen, "stop")
        gen.output.push(token)
        if gen.output.stopped:
            return self._finish(gen, "stop")
        if gen.generated >= gen.params.max_tokens:
            return self._finish(gen, "length")
        if gen.deltas and (text := gen.output.delta()):
            gen.emit(Delta(text))

    def _finish(self, gen: Generation, reason: str) -> None:
        gen.finish_reason = reason
        rest = gen.output.rest()
        if gen.deltas and rest:
            gen.emit(Delta(rest))
        self.adapters.release(gen.model)
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        gen.emit(Finished(reason, gen.output.text, len(gen.prompt_ids), gen.generated))

    def _fail(self, gen: Generation, message: str, status: int) -> None:
        if gen.done:
            return
        gen.finish_reason = "error"
        self.adapters.release(gen.model)
        self.stats["failed"] += 1
        gen.emit(Failed(message, status))
