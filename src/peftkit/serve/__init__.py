"""`peftkit serve`: one base model, many LoRA adapters, an OpenAI-compatible HTTP API.

* `lora_batch`: adapters attached by forward hooks, each batch row with its own adapter (gathered A and B);
* `engine`: continuous batching in one scheduler thread (a KV cache row per request, requests join between steps);
* `app`: the FastAPI application (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, adapters).

FastAPI and uvicorn are an optional extra: ``pip install 'peftkit[serve]'``.
"""
