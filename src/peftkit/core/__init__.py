"""Core machinery shared by every method: configs, the registry, `inject()`, adapter files."""

from peftkit.core.config import Config, parse_override
from peftkit.core.inject import AdapterModule, InjectReport, adapter_parameters, inject
from peftkit.core.registry import Merging, MethodSpec, get_method, list_methods, register_method

__all__ = [
    "AdapterModule",
    "Config",
    "InjectReport",
    "Merging",
    "MethodSpec",
    "adapter_parameters",
    "get_method",
    "inject",
    "list_methods",
    "parse_override",
    "register_method",
]
