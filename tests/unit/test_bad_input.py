"""Bad input beyond the one-line message (tests/error_catalogue.py has those): bounded cost of
YAML bombs and quoted values, labels of mixed JSON types, the stuck-step counter."""

from __future__ import annotations

import logging
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from bitblend.config.load import MAX_YAML_NODES, YamlTooBig, expanded_size, parse_yaml
from bitblend.config.schema import TaskConfig
from bitblend.data.sources import load_task_data
from bitblend.errors import QUOTE_LIMIT, quote
from bitblend.precision.health import NonFiniteSteps, NonFiniteStuck
from tests.error_catalogue import _bomb


def test_alias_bomb_is_refused_before_expansion() -> None:
    # 9 levels of 9 aliases: 9**10 values once expanded. Before the cap, the first error
    # message quoting it took 4.3 GB; now composing ~100 nodes is all that happens.
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(YamlTooBig, match="expands to more than"):
        parse_yaml(_bomb(9, "model.backbone"))
    took = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20 and took < 5, (peak, took)


def test_shared_aliases_below_the_cap_still_load() -> None:
    text = (
        "base: &b {head: binary, weight: 2}\ntasks:\n  - {<<: *b, name: a}\n  - {<<: *b, name: c}\n"
    )
    data = parse_yaml(text)
    assert data["tasks"][1] == {"head": "binary", "weight": 2, "name": "c"}
    node = yaml.compose(_bomb(3, "model.max_length"), Loader=yaml.SafeLoader)
    assert 9**4 < expanded_size(node) < MAX_YAML_NODES  # counted expanded, not as written


def test_self_reference_is_refused() -> None:
    with pytest.raises(YamlTooBig, match="refers to a value that contains it"):
        parse_yaml("a: &x [1, *x]\n")


def test_quote_is_short_and_cheap_for_huge_or_cyclic_values() -> None:
    huge: list = ["lol"] * 9
    for _ in range(9):
        huge = [huge] * 9  # shares sublists: 9**10 strings if walked in full
    cyclic: list = [1]
    cyclic.append(cyclic)
    t0 = time.perf_counter()
    for value in (huge, cyclic, "x" * 10_000, {"k" * 500: 1}):
        assert len(quote(value)) <= QUOTE_LIMIT
    assert time.perf_counter() - t0 < 1
    assert quote("clf") == "'clf'" and quote(1.5) == "1.5"


def test_json_labels_of_mixed_types_are_read_as_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `datasets` keeps a mixed-type column as JSON text and decodes every string again
    # ("true" -> True, "1" -> 1). Labels are their text: 1 and "1" are one class, with a warning.
    rows = [1, "1", "true", 2, "true", 2, 1, "true"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "t{i}", "label": {y!r}}}\n'.replace("'", '"')
                            for i, y in enumerate(rows)))  # fmt: skip
    task = TaskConfig(name="t", data=str(path), eval_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        data = load_task_data(task, 0, seed=0)
    assert sorted(data.label_names) == ["1", "2", "true"]
    assert "holds both the number 1 and the text '1'" in caplog.text


def test_nonfinite_counter_stops_after_stuck_steps_and_resumes() -> None:
    counter = NonFiniteSteps("bf16-mixed", stuck_steps=3)
    counter.observe(1, stepped=False, module="heads.t.1")
    counter.observe(2, stepped=True, module=None)  # a good step resets the run
    for step, module in ((3, "backbone.encoder.layer.0.output.dense"), (4, "heads.t.1")):
        counter.observe(step, stepped=False, module=module)
        counter.check()
    restored = NonFiniteSteps("bf16-mixed", stuck_steps=3)
    restored.load_state_dict(counter.state_dict())
    restored.observe(5, stepped=False, module="heads.t.1")
    with pytest.raises(NonFiniteStuck, match=r"3 steps in a row .*steps 3-5.*layer\.0\.output"):
        restored.check()
    never = NonFiniteSteps("32-true", stuck_steps=0)
    for step in range(1, 50):
        never.observe(step, stepped=False, module=None)
    never.check()  # 0 = never stop
