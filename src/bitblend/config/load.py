"""YAML -> typed Recipe, with `--set a.b=c` overrides and strict, path-naming validation."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from bitblend.config.adapter import check_adapter
from bitblend.config.classic import check_classic_recipe, is_classic
from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError, quote

_HEADS_LOSSES = {
    "classification": {"cross_entropy"},
    "binary": {"bce"},
    "multilabel": {"bce"},
    "regression": {"mse"},
    "token_classification": {"cross_entropy"},
    "masked_lm": {"cross_entropy"},
    "causal_lm": {"cross_entropy"},
}


# A recipe is a few hundred values; aliases may share subtrees, but a document whose fully
# expanded tree passes this many nodes is an alias bomb ("billion laughs"): nine levels of
# nine aliases is 9**9 values that every later walk (validation, error messages, dumping
# recipe.yaml) would expand. Counting is memoised per node, so the check itself is cheap.
MAX_YAML_NODES = 100_000


class YamlTooBig(yaml.YAMLError):
    """A document that expands past MAX_YAML_NODES, refers to itself, or nests too deeply."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line  # 1-based, when known


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes in the tree `root` stands for once every alias is expanded (a DAG walk).

    Raises YamlTooBig past `limit` or on an alias that refers to a node containing it.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    # Iterative post-order walk: a deeply nested document must not hit Python's recursion limit.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > limit:
                raise YamlTooBig(
                    f"expands to more than {limit:,} values (aliases nested inside aliases); "
                    "write the values out",
                    node.start_mark.line + 1,
                )
            continue
        if key in size:
            continue
        if key in on_path:
            raise YamlTooBig(
                "an alias refers to a value that contains it", node.start_mark.line + 1
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children) if id(c) not in size)
    return size[id(root)]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`1e-4` is a number, not the string PyYAML makes it)
    that refuses alias bombs and self-referencing aliases before building any value."""

    def construct_document(self, node: yaml.Node) -> Any:
        """Check the expanded size of the composed document, then build it."""
        expanded_size(node)
        return super().construct_document(node)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text -> data with the recipe loader (YamlTooBig for bombs and deep nesting)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # PyYAML composes recursively: `[[[[...` about 500 deep
        raise YamlTooBig("nested too deeply for the YAML parser") from None


def builtin_recipes() -> dict[str, Path]:
    """Names and paths of the recipes shipped in the package."""
    root = resources.files("bitblend") / "recipes"
    out: dict[str, Path] = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def resolve_recipe_path(name_or_path: str | None) -> Path:
    """A path to an existing file, or the path of a built-in recipe (`demo` when None)."""
    name = name_or_path or "demo"
    path = Path(name)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if name in builtins:
        return builtins[name]
    if path.suffix in (".yaml", ".yml") or "/" in name:
        raise BitblendError(f"{name}: recipe file not found")
    raise BitblendError(
        f"{name}: not a recipe file nor a built-in recipe (expected one of {', '.join(builtins)})"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping; syntax errors name the file and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BitblendError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise BitblendError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the "
            "recipe as UTF-8"
        ) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = mark.line + 1 if mark is not None else getattr(exc, "line", None)
        where = f"line {at}: " if at is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BitblendError(f"{path}: {where}invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BitblendError(f"{path}: expected a mapping of recipe keys at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` / `tasks.0.weight=2` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BitblendError(f"--set {item}: expected KEY=VALUE, e.g. train.steps=20")
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except YamlTooBig as exc:
            raise BitblendError(f"--set {key}: value {exc.problem}") from None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise BitblendError(
                        f"--set {key}: {where}: expected a list index below {len(node)}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise BitblendError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")
    return data


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is list:
        return f"a list, each {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_describe(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp`, returning the typed value or raising with `path`."""
    origin = get_origin(tp)
    # Built only when raised: quoting is cut short, but most values convert fine.
    bad = _Bad(path, tp, value)
    if origin is Literal:
        # the type too: true is not 1, and "8" is not 8 (Literals may mix "auto" and ints)
        if any(value == a and type(value) is type(a) for a in get_args(tp)):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        specific: BitblendError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except _Bad:
                continue
            except BitblendError as exc:  # the right type with a wrong value: say so
                specific = specific or exc
        raise specific or bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, value_tp = get_args(tp)
        return {str(k): _convert(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # `.nan` / `.inf` are YAML floats, never settings
                raise BitblendError(f"{path}: expected a finite number, got {value}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


class _Bad(BitblendError):
    """`path: expected <type>, got <value>` with the value quoted briefly."""

    def __init__(self, path: str, tp: Any, value: Any) -> None:
        super().__init__(f"{path}: expected {_describe(tp)}, got {quote(value)}")


def _build(cls: Any, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            name = key if isinstance(key, str) and len(key) <= 60 else quote(key)
            raise BitblendError(
                f"{prefix}{name}: unknown key{hint}; expected one of {', '.join(fields)}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BitblendError(f"{prefix}{name}: required key is missing ({f.metadata['doc']})")
    return cls(**kwargs)


def _check(recipe: Recipe) -> None:
    """Cross-field rules that types alone cannot express."""
    if not recipe.tasks:
        raise BitblendError("tasks: expected at least one task")
    seen: set[str] = set()
    for i, task in enumerate(recipe.tasks):
        if not task.name or not task.name.replace("_", "").replace("-", "").isalnum():
            raise BitblendError(f"tasks[{i}].name: expected letters, digits, - or _")
        if task.name in seen:
            raise BitblendError(f"tasks[{i}].name: duplicate task name {task.name!r}")
        seen.add(task.name)
        if task.loss != "auto" and task.loss not in _HEADS_LOSSES[task.head]:
            allowed = ", ".join(sorted(_HEADS_LOSSES[task.head]))
            raise BitblendError(
                f"tasks[{i}].loss: expected auto or {allowed} for a {task.head} head, "
                f"got {task.loss!r}"
            )
        if not 0.0 < task.eval_fraction < 1.0:
            raise BitblendError(f"tasks[{i}].eval_fraction: expected a number in (0, 1)")
        if task.weight < 0:
            raise BitblendError(f"tasks[{i}].weight: expected a number >= 0")
        for key in ("batch_size", "max_length", "image_size", "patch_size"):
            value = getattr(task, key)
            if value is not None and value < 1:
                raise BitblendError(f"tasks[{i}].{key}: expected an integer >= 1, got {value}")
        for key in ("shuffle_buffer", "stream_eval_rows"):  # streamed data (data/streaming.py)
            if getattr(task, key) < 0:
                raise BitblendError(f"tasks[{i}].{key}: expected an integer >= 0")
    _check_mixing(recipe)
    positive = {
        "train.steps": recipe.train.steps,
        "train.batch_size": recipe.train.batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.eval_batch_size": recipe.train.eval_batch_size,
        "train.log_every": recipe.train.log_every,
        "train.pad_to_multiple_of": recipe.train.pad_to_multiple_of,
        "model.max_length": recipe.model.max_length,
    }
    for key, value in positive.items():
        if value < 1:
            raise BitblendError(f"{key}: expected an integer >= 1, got {value}")
    for key, value in {
        "train.eval_every": recipe.train.eval_every,
        "train.checkpoint_every": recipe.train.checkpoint_every,
        "train.keep_checkpoints": recipe.train.keep_checkpoints,
        "schedule.warmup_steps": recipe.schedule.warmup_steps,
        "precision.stuck_steps": recipe.precision.stuck_steps,
        "train.progress_every": recipe.train.progress_every,
        "train.stream_workers": recipe.train.stream_workers,
    }.items():
        if value < 0:
            raise BitblendError(f"{key}: expected an integer >= 0, got {value}")
    if recipe.train.progress_seconds < 0:
        raise BitblendError("train.progress_seconds: expected a number >= 0")
    if recipe.train.epochs is not None and not recipe.train.epochs > 0:
        raise BitblendError(f"train.epochs: expected a number > 0, got {recipe.train.epochs}")
    if recipe.optimizer.lr <= 0:
        raise BitblendError(f"optimizer.lr: expected a number > 0, got {recipe.optimizer.lr}")
    if len(recipe.optimizer.betas) != 2 or not all(0 <= b < 1 for b in recipe.optimizer.betas):
        raise BitblendError("optimizer.betas: expected two numbers in [0, 1)")
    if not 0.0 <= recipe.schedule.warmup_ratio < 1.0:
        raise BitblendError("schedule.warmup_ratio: expected a number in [0, 1)")
    ranges = [
        ("model.dropout", recipe.model.dropout, 0.0, 1.0, True),
        ("model.attention_dropout", recipe.model.attention_dropout, 0.0, 1.0, True),
        ("model.head_dropout", recipe.model.head_dropout, 0.0, 1.0, True),
        ("optimizer.weight_decay", recipe.optimizer.weight_decay, 0.0, math.inf, True),
        ("optimizer.momentum", recipe.optimizer.momentum, 0.0, 1.0, False),
        ("optimizer.alpha", recipe.optimizer.alpha, 0.0, 1.0, False),
        ("schedule.min_lr_ratio", recipe.schedule.min_lr_ratio, 0.0, 1.0, True),
    ]
    for key, value, low, high, closed in ranges:
        if value is None:
            continue
        ok = low <= value <= high if closed else low <= value < high
        if not ok:
            span = f"[{low}, {high}]" if closed else f"[{low}, {high})"
            raise BitblendError(f"{key}: expected a number in {span}, got {value}")
    if recipe.optimizer.new_lr_scale <= 0:
        raise BitblendError("optimizer.new_lr_scale: expected a number > 0")
    if recipe.optimizer.eps <= 0:
        raise BitblendError(f"optimizer.eps: expected a number > 0, got {recipe.optimizer.eps}")
    for key, opt in (
        ("train.threads", recipe.train.threads),
        ("train.eval_max_examples", recipe.train.eval_max_examples),
        *((f"tasks[{i}].max_examples", t.max_examples) for i, t in enumerate(recipe.tasks)),
    ):
        if opt is not None and opt < 1:
            raise BitblendError(f"{key}: expected an integer >= 1 or null, got {opt}")
    if recipe.train.max_grad_norm is not None and recipe.train.max_grad_norm <= 0:
        raise BitblendError("train.max_grad_norm: expected a number > 0 or null")
    _check_classic(recipe)
    check_adapter(recipe)  # model.adapter / precision.base_bits (config/adapter.py)


def _check_classic(recipe: Recipe) -> None:
    """The tfidf-logreg backbone's own rules (config/classic.py)."""
    m = recipe.model
    if m.tfidf_ngrams < 1:
        raise BitblendError(f"model.tfidf_ngrams: expected an integer >= 1, got {m.tfidf_ngrams}")
    if m.tfidf_max_features is not None and m.tfidf_max_features < 1:
        raise BitblendError("model.tfidf_max_features: expected an integer >= 1 or null")
    if m.logreg_c <= 0:
        raise BitblendError(f"model.logreg_c: expected a number > 0, got {m.logreg_c}")
    if is_classic(recipe):
        check_classic_recipe(recipe)


def _check_mixing(recipe: Recipe) -> None:
    mix = recipe.mixing
    names = [t.name for t in recipe.tasks]
    if mix.strategy == "weights":
        if not mix.weights:
            raise BitblendError("mixing.weights: required by strategy weights (task -> weight)")
        for key in mix.weights:
            if key not in names:
                raise BitblendError(
                    f"mixing.weights.{key}: expected a task name ({', '.join(names)})"
                )
        missing = [n for n in names if n not in mix.weights]
        if missing:
            raise BitblendError(f"mixing.weights: no weight for task(s) {', '.join(missing)}")
        if any(w < 0 for w in mix.weights.values()) or sum(mix.weights.values()) <= 0:
            raise BitblendError("mixing.weights: expected weights >= 0 with a positive sum")
    if mix.temperature <= 0:
        raise BitblendError(f"mixing.temperature: expected a number > 0, got {mix.temperature}")
    if mix.size_cap is not None and mix.size_cap < 1:
        raise BitblendError("mixing.size_cap: expected an integer >= 1 or null")
    if not 0 <= mix.dynamic_floor * len(names) < 1:
        raise BitblendError(
            f"mixing.dynamic_floor: expected floor x {len(names)} tasks to be in [0, 1)"
        )
    for key in ("dynamic_every", "dynamic_examples"):
        if getattr(mix, key) < 1:
            raise BitblendError(f"mixing.{key}: expected an integer >= 1")
    if mix.balancing in ("upgrad", "pcgrad") and mix.batches != "mixed":
        raise BitblendError(
            f"mixing.balancing: {mix.balancing} combines per-task gradients of one step; "
            "it needs mixing.batches: mixed"
        )
    if mix.grad_cosine_every < 0:
        raise BitblendError("mixing.grad_cosine_every: expected an integer >= 0")


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a plain dict as a Recipe; errors are prefixed with `source`."""
    try:
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and train.get("epochs") is not None and "steps" in train:
            raise BitblendError(  # (#22: an either-or the typed defaults cannot express)
                "train.epochs: give train.steps or train.epochs, not both (to train by epochs, "
                "remove steps from the recipe; for a built-in, copy it and remove it there)"
            )
        recipe: Recipe = _build(Recipe, data, "")
        _check(recipe)
    except BitblendError as exc:
        raise BitblendError(f"{source}: {exc}") from None
    return recipe


def load_recipe(name_or_path: str | None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by path or built-in name, apply overrides, validate strictly."""
    path = resolve_recipe_path(name_or_path)
    data = read_yaml(path)
    # A built-in is named by its file name, a user's recipe by the path they gave.
    source = path.name if builtin_recipes().get(path.stem) == path else str(path)
    data = apply_overrides(data, overrides or [])
    recipe = recipe_from_dict(data, source)
    if not recipe.name:
        recipe.name = path.stem
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (what `recipe.yaml` in a run holds)."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of the fully resolved recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def field_docs(cls: Any = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, recursively: the source of docs/recipes.md."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        inner = get_args(tp)[0] if get_origin(tp) is list else tp
        if dataclasses.is_dataclass(inner):
            rows.extend(field_docs(inner, f"{key}[i]." if get_origin(tp) is list else f"{key}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((key, default, f"{f.metadata.get('doc', '')} ({_describe(tp)})"))
    return rows
