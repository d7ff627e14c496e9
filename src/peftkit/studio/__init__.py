"""`peftkit studio`: the whole workflow in the browser: plan, inspect data, train, watch, compare, chat, export.

One process on FastAPI, pages served from the package (plain HTML, one small script, no external requests). It is
one more client of the same parts as the CLI: the estimator (`peftkit.memory`), the data readers and tokenization
(`peftkit.data`), ordinary ``peftkit train`` runs whose folders hold their whole state, the serve engine, and the
merge and export commands. Files are read and written only under its workspace (`workspace.Workspace`).
"""

from peftkit.studio.app import create_app

__all__ = ["create_app"]
