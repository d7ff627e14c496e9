"""E2E data loading: grouping, file order, clear errors, instruction rows; the real files when present."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import SHARED_DATA, requires_shared_data

import peftkit
from peftkit.eval.e2e import (
    E2E_INSTRUCTION,
    E2E_SPLITS,
    E2EItem,
    e2e_instruction_rows,
    load_e2e,
    read_e2e_csv,
)

E2E_DIR = SHARED_DATA / "e2e"


def _write_csv(
    path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("mr", "ref"), bom: bool = False
) -> Path:
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [
    ("name[A], area[riverside]", "A is by the river."),
    ("name[B]", "There is B."),
    ("name[A], area[riverside]", " A, riverside.\n"),
    ("name[C]", "C, with a comma, and a \"quote\"."),
    ("name[B]", "B it is."),
]


def test_grouping_keeps_first_appearance_order_and_all_references(tmp_path: Path) -> None:
    items = read_e2e_csv(_write_csv(tmp_path / "x.csv", ROWS))
    assert items == [
        E2EItem("name[A], area[riverside]", ["A is by the river.", "A, riverside."]),
        E2EItem("name[B]", ["There is B.", "B it is."]),
        E2EItem("name[C]", ['C, with a comma, and a "quote".']),
    ]


def test_ungrouped_is_one_item_per_row_in_file_order(tmp_path: Path) -> None:
    items = read_e2e_csv(_write_csv(tmp_path / "x.csv", ROWS), group=False)
    assert [(it.mr, it.refs) for it in items] == [(mr, [ref.strip()]) for mr, ref in ROWS]


def test_load_e2e_from_a_root_with_bom_and_extra_columns(tmp_path: Path) -> None:
    _write_csv(tmp_path / "devset.csv", [(mr, ref, "x") for mr, ref in ROWS], ("mr", "ref", "extra"), bom=True)
    assert [it.mr for it in load_e2e("dev", root=tmp_path)] == ["name[A], area[riverside]", "name[B]", "name[C]"]


def test_missing_file_names_the_path_and_where_data_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_e2e("test", root=tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "testset_w_refs.csv") in message
    assert "root=" in message and "e2e-dataset" in message
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_e2e_csv(tmp_path / "nope.csv")


def test_missing_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    _write_csv(tmp_path / "trainset.csv", [("name[A]", "A.")], header=("mr", "text"))
    with pytest.raises(ValueError, match=r"trainset\.csv: missing column 'ref'"):
        load_e2e("train", root=tmp_path)


def test_short_row_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text('"mr","ref"\n"name[A]","A."\n"name[B]"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.csv, line 3"):
        read_e2e_csv(path)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown E2E split 'validation'"):
        load_e2e("validation")


def test_instruction_rows() -> None:
    items = [E2EItem("name[A]", ["A one.", "A two."]), E2EItem("name[B]", ["B one."])]
    per_ref = e2e_instruction_rows(items, one_row_per_ref=True)
    assert per_ref == [
        {"instruction": E2E_INSTRUCTION, "input": "name[A]", "output": "A one."},
        {"instruction": E2E_INSTRUCTION, "input": "name[A]", "output": "A two."},
        {"instruction": E2E_INSTRUCTION, "input": "name[B]", "output": "B one."},
    ]
    per_mr = e2e_instruction_rows(items, one_row_per_ref=False)
    assert [(r["input"], r["output"]) for r in per_mr] == [("name[A]", "A one."), ("name[B]", "B one.")]
    # the prompt of the reference run (SPECS.md section 6)
    assert E2E_INSTRUCTION == "Write a one-sentence restaurant description from this meaning representation:"
    with pytest.raises(ValueError, match="no references"):
        e2e_instruction_rows([E2EItem("name[C]", [])], one_row_per_ref=True)


def test_the_package_holds_no_e2e_data() -> None:
    package = Path(peftkit.__file__).parent
    assert not [p for p in package.rglob("*") if p.suffix == ".csv" or p.name in E2E_SPLITS.values()]


@requires_shared_data
@pytest.mark.parametrize(
    ("split", "n_mrs", "n_refs"), [("test", 630, 4693), ("dev", 547, 4672), ("train", 4862, 42061)]
)
def test_real_splits(split: str, n_mrs: int, n_refs: int) -> None:
    items = load_e2e(split)
    assert len(items) == n_mrs
    assert sum(len(it.refs) for it in items) == n_refs
    assert len({it.mr for it in items}) == n_mrs
    with (E2E_DIR / E2E_SPLITS[split]).open(encoding="utf-8", newline="") as fh:
        first = next(csv.DictReader(fh))
    assert items[0].mr == first["mr"] and items[0].refs[0] == first["ref"].strip()


@requires_shared_data
def test_real_test_set_order_matches_testset_csv() -> None:
    # testset.csv (MRs only, header "MR") lists the test MRs in the order system outputs are written
    with (E2E_DIR / "testset.csv").open(encoding="utf-8", newline="") as fh:
        mrs = [row["MR"] for row in csv.DictReader(fh)]
    assert [it.mr for it in load_e2e("test")] == mrs
    assert load_e2e("test")[0].refs[:2] == [
        "A coffee shop in the city centre area called Blue Spice.",
        "Blue Spice is a coffee shop in city centre.",
    ]


@requires_shared_data
def test_real_train_rows_in_file_order() -> None:
    # "the first 1000 rows of trainset.csv" (SPECS.md section 6) = the first 1000 ungrouped items
    rows = e2e_instruction_rows(load_e2e("train", group=False)[:1000], one_row_per_ref=True)
    with (E2E_DIR / "trainset.csv").open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        first = [next(reader) for _ in range(1000)]
    assert [(r["input"], r["output"]) for r in rows] == [(f["mr"], f["ref"].strip()) for f in first]
