"""Recipes: built-ins validate, `--set` overrides, strict path-naming validation, docs."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from bitblend.config.load import (
    apply_overrides,
    builtin_recipes,
    dump_recipe,
    field_docs,
    load_recipe,
    read_yaml,
    recipe_from_dict,
    recipe_to_dict,
    resolve_recipe_path,
)
from bitblend.config.schema import Recipe, TaskConfig
from bitblend.errors import BitblendError


def base() -> dict[str, Any]:
    """The smallest valid recipe as plain data."""
    return {"tasks": [{"name": "news", "data": "bbc_news"}]}


def error_of(data: dict[str, Any], *overrides: str) -> str:
    """The message of the BitblendError that validating `data` (+ overrides) raises."""
    with pytest.raises(BitblendError) as info:
        recipe_from_dict(apply_overrides(copy.deepcopy(data), list(overrides)))
    return str(info.value)


def one_of(cls: Any, name: str) -> str:
    """The `one of a, b, c` that an error on the enum field `cls.name` lists."""
    values = typing.get_args(typing.get_type_hints(cls)[name])
    return "expected one of " + ", ".join(str(v) for v in values)


HEADS = one_of(TaskConfig, "head")


def build(*overrides: str, data: dict[str, Any] | None = None) -> Recipe:
    """A validated recipe from `data` (default: `base()`) with overrides applied."""
    return recipe_from_dict(apply_overrides(data or base(), list(overrides)))


# -- built-in recipes ----------------------------------------------------------------------


def test_builtin_recipes_include_the_contract_names() -> None:
    names = builtin_recipes()
    assert "demo" in names
    assert all(path.is_file() and path.suffix == ".yaml" for path in names.values())


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_validates(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.tasks, name
    assert recipe.name == name  # each built-in names itself after its file
    assert recipe.description, f"{name}: `bitblend recipes` shows an empty description"


def test_no_recipe_means_demo() -> None:
    assert resolve_recipe_path(None) == builtin_recipes()["demo"]
    assert load_recipe(None).name == "demo"


def test_a_path_wins_over_a_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("name: mine\ntasks: [{name: a, data: bbc_news}]\n")
    assert load_recipe("demo").name == "mine"


def test_recipe_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my-run.yaml"
    path.write_text(yaml.safe_dump(base()))
    assert load_recipe(str(path)).name == "my-run"


# -- --set overrides -----------------------------------------------------------------------


def test_set_nested_keys_and_yaml_typed_values() -> None:
    recipe = build(
        "train.steps=20",
        "optimizer.lr=0.001",
        "train.group_by_length=false",
        "train.max_grad_norm=null",
        "model.backbone=tiny-bert",
        "precision.recipe=bf16-mixed",
        "optimizer.betas=[0.8, 0.95]",
    )
    assert recipe.train.steps == 20 and type(recipe.train.steps) is int
    assert recipe.optimizer.lr == pytest.approx(0.001)
    assert recipe.train.group_by_length is False
    assert recipe.train.max_grad_norm is None
    assert recipe.model.backbone == "tiny-bert"
    assert recipe.precision.recipe == "bf16-mixed"
    assert recipe.optimizer.betas == [0.8, 0.95]


def test_set_creates_a_missing_section() -> None:
    data = base()
    apply_overrides(data, ["schedule.name=cosine"])
    assert data["schedule"] == {"name": "cosine"}
    assert build("schedule.name=cosine").schedule.name == "cosine"


def test_set_int_is_widened_to_float_fields() -> None:
    recipe = build("tasks.0.weight=2")
    assert recipe.tasks[0].weight == 2.0 and type(recipe.tasks[0].weight) is float


def test_set_list_index_addresses_one_task() -> None:
    data = {"tasks": [{"name": "a", "data": "bbc_news"}, {"name": "b", "data": "bbc_news"}]}
    recipe = build("tasks.1.weight=0.5", "tasks.0.head=regression", data=data)
    assert [t.weight for t in recipe.tasks] == [1.0, 0.5]
    assert [t.head for t in recipe.tasks] == ["regression", "classification"]


def test_set_scientific_notation_is_a_number() -> None:
    # PyYAML (YAML 1.1) reads `1e-3` as a string; `--set optimizer.lr=1e-3` is how
    # everyone writes a learning rate, so it must be accepted as the number 0.001.
    assert build("optimizer.lr=1e-3").optimizer.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tasks.3.weight=2", "--set tasks.3.weight: tasks.3: expected a list index below 1"),
        ("tasks.x.weight=2", "--set tasks.x.weight: tasks.x: expected a list index below 1"),
        ("tasks.-1.weight=2", "expected a list index below 1"),
        ("train.steps", "--set train.steps: expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("model.backbone.x=1", "model.backbone is a value, not a section"),
    ],
)
def test_bad_set_is_an_error_naming_it(override: str, expected: str) -> None:
    data = {"model": {"backbone": "tiny-bert"}, **base()}
    with pytest.raises(BitblendError) as info:
        apply_overrides(data, [override])
    assert expected in str(info.value)


def test_set_does_not_bypass_validation() -> None:
    assert "train.steps: expected an integer" in error_of(base(), "train.steps=ten")
    assert "model.backbon: unknown key" in error_of(base(), "model.backbon=tiny-bert")


# -- strict validation ---------------------------------------------------------------------


def test_unknown_key_names_its_path_and_suggests() -> None:
    msg = error_of({**base(), "model": {"backbon": "tiny-bert"}})
    assert "model.backbon: unknown key (did you mean backbone?)" in msg


def test_unknown_top_level_and_task_keys() -> None:
    assert "trian: unknown key (did you mean train?)" in error_of({**base(), "trian": {}})
    msg = error_of({"tasks": [{"name": "a", "data": "bbc_news", "lable_column": "y"}]})
    assert "tasks[0].lable_column: unknown key (did you mean label_column?)" in msg


def test_errors_carry_the_source_prefix() -> None:
    with pytest.raises(BitblendError, match=r"^my.yaml: train.steps: "):
        recipe_from_dict({**base(), "train": {"steps": "x"}}, "my.yaml")


def test_load_recipe_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base(), "train": {"steps": "x"}}))
    with pytest.raises(BitblendError, match=r"r\.yaml: train\.steps: expected an integer"):
        load_recipe(str(path))
    with pytest.raises(BitblendError, match=r"^tiny\.yaml: train\.steps: expected an integer"):
        load_recipe("tiny", ["train.steps=x"])


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"train": {"steps": "ten"}}, "train.steps: expected an integer, got 'ten'"),
        ({"train": {"steps": 2.0}}, "train.steps: expected an integer, got 2.0"),
        ({"train": {"steps": True}}, "train.steps: expected an integer, got True"),
        ({"train": {"batch_size": False}}, "train.batch_size: expected an integer, got False"),
        ({"train": {"group_by_length": 1}}, "train.group_by_length: expected true or false"),
        ({"train": {"group_by_length": "yes-ish"}}, "train.group_by_length: expected true"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got 'fast'"),
        ({"optimizer": {"lr": True}}, "optimizer.lr: expected a number, got True"),
        ({"optimizer": {"betas": 0.9}}, "optimizer.betas: expected a list"),
        ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas[1]: expected a number"),
        ({"model": 3}, "model: expected a mapping, got 3"),
        ({"model": {"backbone": 7}}, "model.backbone: expected a string, got 7"),
        ({"train": {"max_grad_norm": "x"}}, "train.max_grad_norm: expected a number or null"),
        ({"train": {"threads": True}}, "train.threads: expected an integer or null"),
        ({"precision": {"state_bits": 32.0}}, "precision.state_bits: expected one of auto, 32"),
        ({"precision": {"recipe": "fp16"}}, "precision.recipe: expected one of auto, 32-true"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name: expected one of sgd, adam, adamw"),
        ({"schedule": {"name": "step"}}, "schedule.name: expected one of constant, linear"),
        ({"mixing": {"strategy": "x"}}, "mixing.strategy: expected one of proportional"),
    ],
)
def test_wrong_type_or_enum_names_the_path(section: dict[str, Any], expected: str) -> None:
    assert expected in error_of({**base(), **section})


def test_bad_task_enum_names_the_task_index() -> None:
    data = {"tasks": [{"name": "a", "data": "x.csv"}, {"name": "b", "data": "y.csv"}]}
    data["tasks"][1]["head"] = "clf"
    assert "classification" in HEADS and "regression" in HEADS
    assert f"tasks[1].head: {HEADS}, got 'clf'" in error_of(data)
    assert f"tasks[0].head: {HEADS}, got 'clf'" in error_of(base(), "tasks.0.head=clf")


def test_tasks_must_be_a_nonempty_list_of_mappings() -> None:
    assert "tasks: required key is missing" in error_of({})
    assert "tasks: expected at least one task" in error_of({"tasks": []})
    assert "tasks: expected a list" in error_of({"tasks": {"name": "a"}})
    assert "tasks[0]: expected a mapping" in error_of({"tasks": ["bbc_news"]})


@pytest.mark.parametrize("missing", ["name", "data"])
def test_missing_required_task_field(missing: str) -> None:
    task = {"name": "a", "data": "bbc_news"}
    del task[missing]
    assert f"tasks[0].{missing}: required key is missing" in error_of({"tasks": [task]})


def test_duplicate_task_names() -> None:
    data = {"tasks": [{"name": "a", "data": "x.csv"}, {"name": "a", "data": "y.csv"}]}
    assert "tasks[1].name: duplicate task name 'a'" in error_of(data)


def test_task_name_must_be_a_plain_identifier() -> None:
    assert "tasks[0].name: expected letters, digits, - or _" in error_of(base(), "tasks.0.name=a b")
    assert "tasks[0].name" in error_of(base(), "tasks.0.name=''")
    assert build("tasks.0.name=news_2-x").tasks[0].name == "news_2-x"


@pytest.mark.parametrize(
    ("head", "loss"), [("regression", "cross_entropy"), ("classification", "mse")]
)
def test_loss_incompatible_with_head(head: str, loss: str) -> None:
    msg = error_of(base(), f"tasks.0.head={head}", f"tasks.0.loss={loss}")
    assert "tasks[0].loss: expected auto or" in msg
    assert f"for a {head} head, got '{loss}'" in msg


@pytest.mark.parametrize(
    ("head", "loss"),
    [("classification", "cross_entropy"), ("regression", "mse"), ("regression", "auto")],
)
def test_loss_compatible_with_head(head: str, loss: str) -> None:
    recipe = build(f"tasks.0.head={head}", f"tasks.0.loss={loss}")
    assert (recipe.tasks[0].head, recipe.tasks[0].loss) == (head, loss)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=0", "train.steps: expected an integer >= 1, got 0"),
        ("train.steps=-5", "train.steps: expected an integer >= 1, got -5"),
        ("train.batch_size=0", "train.batch_size: expected an integer >= 1"),
        ("train.grad_accum=0", "train.grad_accum: expected an integer >= 1"),
        ("train.eval_batch_size=0", "train.eval_batch_size: expected an integer >= 1"),
        ("train.log_every=0", "train.log_every: expected an integer >= 1"),
        ("train.pad_to_multiple_of=0", "train.pad_to_multiple_of: expected an integer >= 1"),
        ("model.max_length=0", "model.max_length: expected an integer >= 1"),
        ("train.eval_every=-1", "train.eval_every: expected an integer >= 0"),
        ("train.checkpoint_every=-1", "train.checkpoint_every: expected an integer >= 0"),
        ("train.keep_checkpoints=-1", "train.keep_checkpoints: expected an integer >= 0"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps: expected an integer >= 0"),
        ("schedule.warmup_ratio=1.0", "schedule.warmup_ratio: expected a number in [0, 1)"),
        ("schedule.warmup_ratio=-0.1", "schedule.warmup_ratio: expected a number in [0, 1)"),
        ("optimizer.lr=0", "optimizer.lr: expected a number > 0"),
        ("optimizer.lr=-0.1", "optimizer.lr: expected a number > 0"),
        ("optimizer.betas=[0.9]", "optimizer.betas: expected two numbers in [0, 1)"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas: expected two numbers in [0, 1)"),
        ("train.max_grad_norm=0", "train.max_grad_norm: expected a number > 0 or null"),
        ("tasks.0.weight=-1", "tasks[0].weight: expected a number >= 0"),
        ("tasks.0.eval_fraction=0", "tasks[0].eval_fraction: expected a number in (0, 1)"),
        ("tasks.0.eval_fraction=1", "tasks[0].eval_fraction: expected a number in (0, 1)"),
    ],
)
def test_out_of_range_numbers(override: str, expected: str) -> None:
    assert expected in error_of(base(), override)


# Values the types accept but torch, the data loader or the schedule cannot use: today
# they pass validation and end in a traceback (dropout, eps, threads, eval_max_examples),
# a misleading data error (max_examples=0) or an lr that grows past its peak
# (min_lr_ratio > 1). Validation must reject them with a message naming the key.
@pytest.mark.parametrize(
    "override",
    [
        "model.dropout=1.5",
        "model.dropout=-0.1",
        "model.attention_dropout=1.5",
        "model.head_dropout=-0.1",
        "model.head_dropout=1.5",
        "optimizer.eps=-1",
        "optimizer.weight_decay=-0.1",
        "optimizer.momentum=-1",
        "optimizer.alpha=1.5",
        "schedule.min_lr_ratio=1.5",
        "schedule.min_lr_ratio=-0.5",
        "train.threads=-1",
        "train.eval_max_examples=0",
        "tasks.0.max_examples=0",
    ],
)
def test_unusable_values_are_rejected_by_validation(override: str) -> None:
    key = override.split("=")[0]
    path = key.replace("tasks.0.", "tasks[0].")
    assert f"{path}: expected" in error_of(base(), override)


def test_zero_weight_and_zero_warmup_are_fine() -> None:
    recipe = build("tasks.0.weight=0", "schedule.warmup_steps=0", "train.eval_every=0")
    assert recipe.tasks[0].weight == 0.0


# -- YAML files ----------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  backbone: tiny-bert\n  max_length: 16\n bad: x\ntasks: []\n")
    with pytest.raises(BitblendError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: line 4: invalid YAML")
    assert "\n" not in msg


def test_unterminated_flow_mapping_names_a_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {backbone: a\n")
    with pytest.raises(BitblendError, match=r"broken\.yaml: line \d+: invalid YAML"):
        read_yaml(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(BitblendError, match=r"list\.yaml: expected a mapping of recipe keys"):
        read_yaml(path)


def test_missing_recipe_file_and_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(BitblendError, match=r"missing\.yaml: recipe file not found"):
        resolve_recipe_path(str(tmp_path / "missing.yaml"))
    with pytest.raises(BitblendError) as info:
        resolve_recipe_path("no-such-recipe")
    assert "no-such-recipe: not a recipe file nor a built-in recipe" in str(info.value)
    assert "demo" in str(info.value)


# -- docs and round trip -------------------------------------------------------------------


def _leaf_fields(cls: Any, prefix: str = "") -> dict[str, dataclasses.Field[Any]]:
    """Every leaf field of the schema, keyed the way field_docs keys them."""
    out: dict[str, dataclasses.Field[Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        is_list = typing.get_origin(tp) is list
        inner = typing.get_args(tp)[0] if is_list else tp
        if dataclasses.is_dataclass(inner):
            sub = f"{prefix}{f.name}[i]." if is_list else f"{prefix}{f.name}."
            out.update(_leaf_fields(inner, sub))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def _all_fields(cls: Any) -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every field of every dataclass in the schema, sections included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append((f"{cls.__name__}.{f.name}", f))
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(inner):
            out.extend(_all_fields(inner))
    return out


def test_field_docs_cover_every_field() -> None:
    rows = field_docs()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(_leaf_fields(Recipe))
    for key, default, text in rows:
        assert default, key
        # The row is "<doc> (<type>)"; the doc itself must not be empty.
        assert text.split(" (")[0].strip(), f"{key}: empty doc"


def test_every_schema_field_has_a_doc() -> None:
    for name, f in _all_fields(Recipe):
        assert str(f.metadata.get("doc", "")).strip(), f"{name}: no doc"


def test_field_docs_name_the_contract_keys() -> None:
    keys = {key for key, _, _ in field_docs()}
    # The keys docs and checks rely on (DESIGN.md, "Interface contract").
    contract = {
        "model.backbone",
        "model.max_length",
        "precision.recipe",
        "precision.state_bits",
        "optimizer.name",
        "optimizer.lr",
        "schedule.name",
        "train.steps",
        "train.batch_size",
        "train.grad_accum",
        "train.seed",
        "train.eval_every",
        "train.checkpoint_every",
        "mixing.strategy",
        "mixing.temperature",
        "distributed.strategy",
    } | {f"tasks[i].{k}" for k in ("name", "data", "modality", "head", "loss", "weight")}
    assert contract <= keys
    rows = {key: (default, text) for key, default, text in field_docs()}
    assert rows["tasks[i].name"][0] == "required"
    assert rows["train.steps"][0] == "100"
    assert HEADS.removeprefix("expected ") in rows["tasks[i].head"][1]


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_dump_round_trip_gives_an_equal_recipe(name: str) -> None:
    recipe = load_recipe(name, ["tasks.0.weight=2", "train.max_grad_norm=null"])
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)), "recipe.yaml")
    assert again == recipe
    assert recipe_to_dict(again) == recipe_to_dict(recipe)


def test_resolved_dump_has_every_section(tmp_path: Path) -> None:
    recipe = build("train.steps=3", "name=mine")
    data = yaml.safe_load(dump_recipe(recipe))
    assert set(data) == {f.name for f in dataclasses.fields(Recipe)}
    assert data["train"]["steps"] == 3
    assert data["tasks"][0]["head"] == "classification"
    # The dump is itself a valid recipe file.
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(str(path)) == recipe
