"""Every recipe in the repo validates against the config dataclasses; the demo recipe is the demo's config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from peftkit.demo import DEMO_CONFIG
from peftkit.errors import PeftkitError
from peftkit.hardware import resolve_precision
from peftkit.train import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4
    assert any("qlora" in r.name for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    cfg = load_recipe(recipe)
    assert {k: cfg.to_dict()[k] for k in raw} == raw  # every key arrives, with the recipe's value
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
