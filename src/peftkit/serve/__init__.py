"""`peftkit serve`: one base model, many LoRA adapters, an OpenAI-compatible HTTP API.

* `lora_batch`: adapters attached by forward hooks, each batch row with its own adapter (gathered A and B);
* `engine`: continuous batching in one engine thread (a KV cache row per request, requests join between steps),
  composed of `registry` (the adapters: loaded from under the adapter root, checked, attached between steps),
  `scheduler` (the queue and the work between steps), `batch` (the KV cache, prefill and decode passes) and
  `decoder` (sampling, and each request's text by an incremental detokenizer with stop strings);
* `request`: a request's settings, its state in the engine, and the events it sends;
* `app`: the FastAPI application (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, adapters).

FastAPI and uvicorn are an optional extra: ``pip install 'peftkit[serve]'``.
"""
