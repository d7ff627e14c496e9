"""peftkit: parameter-efficient fine-tuning of LLMs, from first principles in PyTorch.

The public API in one place:

    model, tokenizer = load_model("smollm2-135m-instruct")
    apply_method(model, "lora", {"r": 8})          # or any name in list_methods()
    Trainer(load_recipe("recipes/demo_qlora.yaml")).run()
    save_adapter(model, "adapter/"); load_adapter(fresh_model, "adapter/")
"""

# The layers above train register their metrics for `eval_metric` on import (training never imports them):
# ``bleu`` and ``rouge_l`` (eval), ``orders`` (the demo's task).
import peftkit.demo  # noqa: E402, F401, I001
import peftkit.eval.metrics  # noqa: E402, F401
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.core.merging import merge, merge_and_unload, unmerge
from peftkit.core.registry import get_method, list_methods
from peftkit.errors import PeftkitError
from peftkit.models import load_model
from peftkit.quant import dequantize, quantize, quantize_model
from peftkit.train import TrainConfig, Trainer, count_parameters, load_recipe

__version__ = "0.1.0"
__all__ = [
    "PeftkitError",
    "TrainConfig",
    "Trainer",
    "__version__",
    "apply_method",
    "count_parameters",
    "dequantize",
    "get_method",
    "list_methods",
    "load_adapter",
    "load_model",
    "load_recipe",
    "merge",
    "merge_and_unload",
    "quantize",
    "quantize_model",
    "save_adapter",
    "unmerge",
]
