"""Recipe validation: every mistake gets a message naming the field, the value and the fix."""

import pytest
import yaml
from conftest import tiny_teacher

from reattend.convert.rules import Rule, parse_layer_selection, resolve_plan
from reattend.models.adapters import UnsupportedArchitectureError, check_supported
from reattend.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict

BASE = {"model": "embedded:smollm2-135m", "output_dir": "out",
        "convert": {"rules": [{"layers": "all", "target": "linear", "options": {"window": 64}}]}}


def _with(**changes):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw.update(changes)
    return raw


def test_shipped_recipes_validate():
    for path in ("recipes/smollm2-135m/demo.yaml", "recipes/smollm2-135m/lolcats.yaml", "recipes/llama-3-8b/lolcats.yaml"):
        recipe = load_recipe(path)
        assert recipe.convert.rules[0].target == "linear"


def test_unknown_key_is_refused_with_its_path():
    with pytest.raises(RecipeError, match=r"transfer\.tokenz: unknown key"):
        recipe_from_dict(_with(transfer={"tokenz": 5}))
    with pytest.raises(RecipeError, match=r"convert\.rules\.0: .*options\.windw: unknown key"):
        recipe_from_dict(_with(convert={"rules": [{"layers": "all", "target": "linear", "options": {"windw": 3}}]}))


@pytest.mark.parametrize("layers,message", [
    ("7-2", "runs backwards"),
    (-1, "negative"),
    ("first", "not a layer index"),
])
def test_bad_layer_selection(layers, message):
    with pytest.raises(RecipeError, match=rf"convert\.rules\.0\.layers.*{message}"):
        recipe_from_dict(_with(convert={"rules": [{"layers": layers, "target": "linear"}]}))


def test_layer_range_beyond_the_model():
    with pytest.raises(ValueError, match=r"convert\.rules\[0\]\.layers: '0-40' reaches layer 40, but the model has 30"):
        resolve_plan([Rule(layers="0-40", target="linear")], 30)


def test_first_matching_rule_wins_and_unmatched_layers_are_kept():
    rules = [Rule(layers=[0, "2-3"], target="keep"), Rule(layers="0-4", target="linear", options={"window": 8})]
    plan = resolve_plan(rules, 6)
    assert [e["target"] for e in plan] == ["keep", "linear", "keep", "keep", "linear", "keep"]
    assert plan[1]["window"] == 8 and plan[1]["feature_map"] == "hedgehog"
    assert parse_layer_selection(["1", 3]) == [(1, 1), (3, 3)]


def test_bad_target_options():
    with pytest.raises(RecipeError, match="window=1: must be >= 2"):
        recipe_from_dict(_with(convert={"rules": [{"target": "linear", "options": {"window": 1}}]}))
    with pytest.raises(RecipeError, match="feature_map"):
        recipe_from_dict(_with(convert={"rules": [{"target": "linear", "options": {"feature_map": "relu"}}]}))
    with pytest.raises(RecipeError, match="keep' takes no options"):
        recipe_from_dict(_with(convert={"rules": [{"target": "keep", "options": {"window": 4}}]}))
    with pytest.raises(RecipeError, match=r"convert.rules.0.target.*'lineer' is unknown; choose one of \['keep', 'linear'"):
        recipe_from_dict(_with(convert={"rules": [{"target": "lineer"}]}))


def test_missing_data_file_names_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.source.*path.*does-not-exist\.txt"):
        recipe_from_dict(_with(data={"source": {"kind": "text", "path": str(tmp_path / "does-not-exist.txt")}}))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2' is not supported.*llama.*qwen2.*qwen3.*mistral.*gemma3_text"):
        check_supported(GPT2Config())
    check_supported(tiny_teacher("qwen3").config)


def test_overrides_set_nested_fields_and_list_items():
    raw = apply_overrides(_with(), ["transfer.tokens=1000", "convert.rules.0.options.window=32", "seed=3"])
    recipe = recipe_from_dict(raw)
    assert recipe.transfer.tokens == 1000 and recipe.convert.rules[0].options["window"] == 32 and recipe.seed == 3
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides(_with(), ["transfer.tokens"])
    with pytest.raises(RecipeError, match="has no item 5"):
        apply_overrides(_with(), ["convert.rules.5.target=keep"])


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
