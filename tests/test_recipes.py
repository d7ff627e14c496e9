"""Every recipe in the repo validates against the config dataclasses; the demo recipe is the demo's config."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama, tiny_tokenizer

from peftkit.demo import DEMO_CONFIG
from peftkit.errors import PeftkitError
from peftkit.hardware import resolve_precision
from peftkit.train import Trainer, load_recipe
from peftkit.train import trainer as trainer_module
from peftkit.train.config import RECIPE_RELATIVE
from peftkit.train.pipeline import check_data

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4
    assert any("qlora" in r.name for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    cfg = load_recipe(recipe)
    expected = dict(raw)
    for key in RECIPE_RELATIVE:  # data shipped beside the recipe is read from there
        if key in raw and (recipe.parent / raw[key]).exists():
            expected[key] = os.path.normpath(recipe.parent / raw[key])
    assert {k: cfg.to_dict()[k] for k in raw} == expected  # every key arrives, with the recipe's value
    settings = cfg.method_settings().to_dict()
    assert {k: settings[k] for k in raw.get("method_config", {})} == raw.get("method_config", {})
    misspelt = tmp_path / recipe.name  # and a key the config does not have is refused, by name
    misspelt.write_text(recipe.read_text() + "\nlearning_rat: 1.0e-3\n")
    with pytest.raises(PeftkitError, match="unknown key 'learning_rat' for TrainConfig"):
        load_recipe(misspelt)


def test_demo_recipe_matches_demo_config():
    recipe = yaml.safe_load((RECIPES[0].parent / "demo_qlora.yaml").read_text())
    assert {k: v for k, v in recipe.items() if k != "data"} == DEMO_CONFIG


def test_qlora_recipe_has_the_papers_choices(monkeypatch):
    cfg = load_recipe(RECIPES[0].parent / "smollm2_qlora_alpaca.yaml")
    assert (cfg.quantize, cfg.double_quant, cfg.precision, cfg.gradient_checkpointing, cfg.optimizer) == (
        "nf4", True, "auto", True, "paged_adamw_32bit")
    # the paper's bf16 compute wherever the hardware computes bf16 natively
    monkeypatch.setenv("PEFTKIT_NATIVE_BF16", "1")
    assert resolve_precision(cfg.precision).compute_dtype == torch.bfloat16
    assert cfg.method == "lora" and cfg.method_config["target_modules"] == "all-linear"


# ------------------------------------------------------------ paths: recipe-relative data, checked before the model
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_find_their_data_from_another_directory(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(recipe)
    check_data(cfg)  # local files found (the Hub ones are references, fetched when read)
    assert cfg.output_dir == yaml.safe_load(recipe.read_text())["output_dir"]  # runs go where you run


def test_the_demo_recipe_trains_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(RECIPES[0].parent / "demo_qlora.yaml",
                      ["quantize=none", "max_steps=1", "limit_examples=4", "output_dir=run"])
    result = Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer()).run()
    assert result.steps == 1 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def write_recipe(folder: Path, data: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(f"data: {data}\nmax_steps: 1\n")
    return folder / "recipe.yaml"


def test_relative_data_prefers_the_recipes_folder_and_overrides_stay_in_the_current_one(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "shipped", "rows.jsonl")
    (tmp_path / "shipped" / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "rows.jsonl").write_text('{"instruction": "c", "output": "d"}\n')
    monkeypatch.chdir(tmp_path / "here")
    assert load_recipe(recipe).data == str(tmp_path / "shipped" / "rows.jsonl")
    assert load_recipe(recipe, ["data=rows.jsonl"]).data == "rows.jsonl"  # an override is typed here: read here
    only_here = write_recipe(tmp_path / "elsewhere", "rows.jsonl")  # not beside the recipe: as written
    assert load_recipe(only_here).data == "rows.jsonl"
    assert load_recipe(write_recipe(tmp_path / "hub", "tatsu-lab/alpaca")).data == "tatsu-lab/alpaca"


def test_missing_data_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(trainer_module, "prepare_model", no_model)
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(write_recipe(tmp_path / "r", "missing.jsonl"), [f"output_dir={tmp_path / 'run'}"])
    start = time.perf_counter()
    with pytest.raises(PeftkitError, match=r"^data: data file not found: missing.jsonl \(a recipe's relative paths"):
        Trainer(cfg)
    assert time.perf_counter() - start < 5
    cfg = load_recipe(None, ["data=rows.jsonl", "eval_data=gone.csv", f"output_dir={tmp_path / 'run'}"])
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(PeftkitError, match="^eval_data: data file not found: gone.csv"):
        Trainer(cfg)
