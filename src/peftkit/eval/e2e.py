"""The E2E NLG Challenge data set (Novikova, Dušek, Rieser 2017): loading and instruction rows.

Each CSV (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``; columns ``mr`` and ``ref``) holds one
human reference per row, and a meaning representation (MR) has several rows. Evaluation needs the
references grouped per MR (:func:`load_e2e`, for :func:`peftkit.eval.metrics.e2e_metrics`); training usually
wants one (MR, reference) pair per row (``group=False``), and :func:`e2e_instruction_rows` turns either into
instruction/input/output rows with the prompt of the reference run in ``SPECS.md`` section 6.

The data is not part of the package: by default it is read from ``../shared/data/e2e`` next to a source
checkout of peftkit; pass ``root`` to read it from elsewhere.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_E2E_ROOT",
    "E2E_INSTRUCTION",
    "E2E_SPLITS",
    "E2EItem",
    "e2e_instruction_rows",
    "load_e2e",
    "read_e2e_csv",
]

E2E_INSTRUCTION = "Write a one-sentence restaurant description from this meaning representation:"
"""The instruction of the reference run (SPECS.md section 6); the MR is the row's input."""

E2E_SPLITS: dict[str, str] = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
"""Split name -> file name in the official release (the test file is the one *with* references)."""

DEFAULT_E2E_ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "e2e"
"""Where a source checkout finds the data: ``<checkout>/../shared/data/e2e``."""

_COLUMNS = ("mr", "ref")


@dataclass
class E2EItem:
    """One meaning representation and its human references.

    Attributes:
        mr: The MR, e.g. ``"name[Blue Spice], eatType[coffee shop], area[city centre]"``.
        refs: Its references, in file order (one when loaded with ``group=False``).
    """

    mr: str
    refs: list[str] = field(default_factory=list)


def read_e2e_csv(path: str | Path, *, group: bool = True) -> list[E2EItem]:
    """Read one E2E CSV file (columns ``mr`` and ``ref``; other columns are ignored).

    Args:
        path: The CSV file.
        group: Group the references per MR, MRs in order of first appearance (the training file does not
            keep an MR's rows together); if false, one item per row, in file order.

    Returns:
        The items. Surrounding whitespace of each field is stripped (a few training references end in a
        newline); inner text is kept as written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A column is missing, or a row has too few fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E2E file not found: {path}")
    items: list[E2EItem] = []
    by_mr: dict[str, E2EItem] = {}
    # utf-8-sig: tolerate a byte-order mark, which would otherwise become part of the first column name.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        for column in _COLUMNS:
            if column not in columns:
                raise ValueError(f"{path}: missing column {column!r} (the header has {columns})")
        for row in reader:
            mr, ref = row["mr"], row["ref"]
            if mr is None or ref is None:
                raise ValueError(f"{path}, line {reader.line_num}: row has fewer fields than the header {columns}")
            mr, ref = mr.strip(), ref.strip()
            if not group:
                items.append(E2EItem(mr, [ref]))
            elif mr in by_mr:
                by_mr[mr].refs.append(ref)
            else:
                by_mr[mr] = E2EItem(mr, [ref])
                items.append(by_mr[mr])
    return items


def load_e2e(split: str, root: str | Path | None = None, *, group: bool = True) -> list[E2EItem]:
    """Load a split of the E2E data set.

    Args:
        split: ``"train"``, ``"dev"`` or ``"test"`` (the test set with references).
        root: The directory with the official CSV files; default :data:`DEFAULT_E2E_ROOT`.
        group: One item per MR with all its references (for evaluation; default), or one item per CSV row
            in file order (for training; e.g. "the first 1000 rows of trainset.csv").

    Returns:
        The items; grouped, the MRs are in order of first appearance.

    Raises:
        ValueError: Unknown split, or a malformed file.
        FileNotFoundError: The file is missing; the message says where it was expected.
    """
    if split not in E2E_SPLITS:
        raise ValueError(f"unknown E2E split {split!r}; choose one of {sorted(E2E_SPLITS)}")
    root = DEFAULT_E2E_ROOT if root is None else Path(root)
    path = root / E2E_SPLITS[split]
    if not path.is_file():
        where = "the default location next to a source checkout" if root == DEFAULT_E2E_ROOT else "root"
        raise FileNotFoundError(
            f"E2E {split} split not found: {path} does not exist. Expected the official E2E NLG CSV files "
            f"({', '.join(E2E_SPLITS.values())}, https://github.com/tuetschek/e2e-dataset) in {root} "
            f"({where}); pass root=<directory with the CSV files> to load them from elsewhere."
        )
    return read_e2e_csv(path, group=group)


def e2e_instruction_rows(items: Iterable[E2EItem], one_row_per_ref: bool) -> list[dict[str, str]]:
    """Turn E2E items into instruction rows: ``instruction`` (:data:`E2E_INSTRUCTION`), ``input`` (the MR),
    ``output`` (a reference).

    Args:
        items: E2E items, e.g. from :func:`load_e2e`.
        one_row_per_ref: One row per (MR, reference) pair (training); otherwise one row per MR with its
            first reference as output (prompts for evaluation: the rows line up with ``items``, whose
            ``refs`` are the references to score against).

    Returns:
        The rows, in item order.

    Raises:
        ValueError: An item has no references.
    """
    rows = []
    for item in items:
        if not item.refs:
            raise ValueError(f"E2E item has no references: {item.mr!r}")
        for ref in item.refs if one_row_per_ref else item.refs[:1]:
            rows.append({"instruction": E2E_INSTRUCTION, "input": item.mr, "output": ref})
    return rows
