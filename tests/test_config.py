"""Recipes: YAML onto dataclasses, dotted overrides, type errors and unknown keys named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from rclip_core.config import (
    RunConfig,
    build_recipe,
    dump_recipe,
    load_recipe,
    parse_override_args,
    recipe_to_dict,
)
from rclip_core.errors import ConfigError, InputError


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 0.002
    momentum: float = 0.9
    steps: list[int] = field(default_factory=lambda: [300_000, 525_000])
    warmup_iters: int = 1000


@dataclass(kw_only=True)
class LossConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"distill": 1.0})
    image_text: bool = True


@dataclass(kw_only=True)
class DataConfig:
    regions: Literal["rpn", "random", "gt"] = "rpn"
    concept_pool: Optional[str] = None
    image_size: tuple[int, int] = (800, 1333)


@dataclass(kw_only=True)
class Recipe(RunConfig):
    name: str
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: OptimConfig | None = None


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASIC = """
name: shapes
output_dir: runs/shapes
max_steps: 200
optim:
  lr: 1e-3          # a float, although YAML 1.1 would read a string
  steps: [100, 150]
data:
  regions: random
"""


def test_load_with_defaults_and_nested(tmp_path):
    r = load_recipe(write(tmp_path, BASIC), Recipe)
    assert r.name == "shapes" and r.output_dir == "runs/shapes" and r.max_steps == 200
    assert r.seed == 0 and r.checkpoint_every == 5000  # RunConfig defaults
    assert r.optim.lr == 0.001 and isinstance(r.optim.lr, float)
    assert r.optim.steps == [100, 150] and r.optim.momentum == 0.9
    assert r.data.regions == "random" and r.data.image_size == (800, 1333)
    assert r.teacher is None and r.loss.weights == {"distill": 1.0}


def test_dotted_overrides_parse_yaml_scalars(tmp_path):
    r = load_recipe(write(tmp_path, BASIC), Recipe, {
        "optim.lr": "0.01",
        "optim.steps": "[10, 20, 30]",
        "optim.warmup_iters": "5",
        "seed": "7",
        "loss.image_text": "false",
        "loss.weights.contrastive": "2",
        "data.concept_pool": "pools/coco.txt",
        "data.image_size": "[640, 1000]",
        "name": "123",  # a str field keeps the text as it is
        "teacher.lr": "0.5",  # creates the optional section with its defaults
    })
    assert r.optim.lr == 0.01 and r.optim.steps == [10, 20, 30] and r.optim.warmup_iters == 5
    assert r.seed == 7 and r.loss.image_text is False
    assert r.loss.weights == {"distill": 1.0, "contrastive": 2.0}
    assert r.data.concept_pool == "pools/coco.txt" and r.data.image_size == (640, 1000)
    assert r.name == "123"
    assert r.teacher == OptimConfig(lr=0.5)
    r2 = load_recipe(write(tmp_path, BASIC), Recipe, {"data.concept_pool": "null", "max_steps": "6.0e4"})
    assert r2.data.concept_pool is None and r2.max_steps == 60000


@pytest.mark.parametrize("overrides, message", [
    ({"optim.lrr": "0.1"}, "unknown recipe key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ({"optimm.lr": "0.1"}, "unknown recipe key 'optimm' (did you mean 'optim'?)"),
    ({"optim.lr": "fast"}, "recipe key 'optim.lr' must be a number, got 'fast'"),
    ({"optim.warmup_iters": "2.5"}, "recipe key 'optim.warmup_iters' must be an integer, got 2.5"),
    ({"loss.image_text": "maybe"}, "recipe key 'loss.image_text' must be true or false"),
    ({"data.regions": "grid"}, "recipe key 'data.regions' must be one of 'rpn', 'random', 'gt'"),
    ({"optim.steps": "[1, x]"}, "recipe key 'optim.steps[1]' must be an integer, got 'x'"),
    ({"optim.lr.value": "1"}, "recipe key 'optim.lr' has no sub-key 'value'"),
    ({"max_steps": "0"}, "max_steps must be at least 1"),
])
def test_override_errors_name_the_dotted_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, BASIC), Recipe, overrides)
    assert message in str(e.value)
    assert isinstance(e.value, InputError) and e.value.exit_code == 2


@pytest.mark.parametrize("text, message", [
    (BASIC + "  lrr: 0.1\n", "unknown recipe key 'data.lrr'"),
    (BASIC.replace("steps: [100, 150]", "steps: [100, fast]"),
     "recipe key 'optim.steps[1]' must be an integer"),
    (BASIC.replace("max_steps: 200", "max_steps: true"),
     "recipe key 'max_steps' must be an integer, got True"),
    (BASIC.replace("name: shapes", ""), "missing required recipe key 'name'"),
    (BASIC + "teacher:\n  lr: [1]\n", "recipe key 'teacher.lr' must be a number"),
    (BASIC.replace("regions: random", "regions: 3"), "recipe key 'data.regions' must be one of"),
    ("- a\n- b\n", "must be a mapping"),
    ("name: [unclosed\n", "is not valid YAML at line"),
])
def test_file_errors_name_the_dotted_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), Recipe)
    assert message in str(e.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml", Recipe)
    assert parse_override_args(["optim.lr=0.1", "name=a=b"]) == {"optim.lr": "0.1", "name": "a=b"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override_args(["optim.lr"])


def test_base_recipes_merge(tmp_path):
    write(tmp_path, "name: base\nmax_steps: 50\noptim:\n  lr: 0.1\n  warmup_iters: 7\n", "base.yaml")
    r = load_recipe(write(tmp_path, "_base_: base.yaml\noptim:\n  lr: 0.2\n", "child.yaml"), Recipe)
    assert r.name == "base" and r.max_steps == 50
    assert r.optim.lr == 0.2 and r.optim.warmup_iters == 7  # merged key by key
    write(tmp_path, "_base_: loop_b.yaml\n", "loop_a.yaml")
    write(tmp_path, "_base_: loop_a.yaml\n", "loop_b.yaml")
    with pytest.raises(ConfigError, match="includes itself"):
        load_recipe(tmp_path / "loop_a.yaml", Recipe)


def test_recipe_round_trip(tmp_path):
    r = load_recipe(write(tmp_path, BASIC), Recipe, {"teacher.momentum": "0.5"})
    d = recipe_to_dict(r)
    assert d["optim"] == {"lr": 0.001, "momentum": 0.9, "steps": [100, 150], "warmup_iters": 1000}
    assert d["data"]["image_size"] == [800, 1333]  # tuples become lists
    assert list(d)[:4] == ["output_dir", "seed", "max_steps", "checkpoint_every"]
    again = load_recipe(write(tmp_path, dump_recipe(r), "resolved.yaml"), Recipe)
    assert again == r
    assert build_recipe(d, Recipe) == r
