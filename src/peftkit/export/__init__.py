"""Export to formats other runtimes read: GGUF for llama.cpp and Ollama."""

from peftkit.export.gguf import GGUF_DTYPES, export_gguf, export_lora_gguf

__all__ = ["GGUF_DTYPES", "export_gguf", "export_lora_gguf"]
