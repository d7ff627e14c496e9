"""Instruction data: reading formats, chat templates, loss masks, packing."""

from peftkit.data.formats import ReadStats, read_conversations
from peftkit.data.sequences import TEMPLATES, Example, collate, make_rows, prompt_text, tokenize_conversations

__all__ = [
    "TEMPLATES",
    "Example",
    "ReadStats",
    "collate",
    "make_rows",
    "prompt_text",
    "read_conversations",
    "tokenize_conversations",
]
