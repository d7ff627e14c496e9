"""peftkit: parameter-efficient fine-tuning of LLMs, from first principles in PyTorch."""

__version__ = "0.1.0"
__all__ = ["__version__"]
