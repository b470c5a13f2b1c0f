"""Recipes: YAML files mapped onto nested dataclasses, with dotted command-line overrides.

A recipe schema is a tree of dataclasses; the root extends :class:`RunConfig`::

    @dataclass(kw_only=True)
    class OptimConfig:
        lr: float = 0.002
        steps: list[int] = field(default_factory=lambda: [300_000, 525_000])

    @dataclass(kw_only=True)
    class PretrainRecipe(RunConfig):
        optim: OptimConfig = field(default_factory=OptimConfig)

    recipe = load_recipe("recipes/x.yaml", PretrainRecipe, {"optim.lr": "0.01"})

Every value is checked against the field's type annotation (int, float, bool, str, list[T],
tuple[T, ...], dict[str, T], Optional[T] / ``T | None``, Literal[...], nested dataclasses).
Unknown keys, wrong types and missing required keys raise :class:`ConfigError` naming the full
dotted key, before any work starts. A recipe may start from others with ``_base_: other.yaml``
(or a list; paths relative to the recipe), merged key by key, the recipe winning.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

from rclip_core.errors import ConfigError

__all__ = ["RunConfig", "load_recipe", "build_recipe", "apply_overrides", "recipe_to_dict",
           "dump_recipe", "parse_override_args"]

T = TypeVar("T")

BASE_KEY = "_base_"
_MISSING = object()


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` and ``6.0e4`` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``lr: 1e-3``
    would be the string "1e-3"; YAML 1.2 (and every reader's intuition) says float.
    """


_RecipeLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
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


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass(kw_only=True)
class RunConfig:
    """Keys every recipe has.

    output_dir: where the run writes checkpoints, logs and the resolved recipe.
    seed: global random seed (each process adds its rank).
    max_steps: optimizer steps of the whole run.
    checkpoint_every: save every this many steps (0 = only at the end).

    Subclasses that define ``__post_init__`` call ``super().__post_init__()``; a ValueError
    raised there becomes a ConfigError.
    """

    output_dir: str = "runs/rclip"
    seed: int = 0
    max_steps: int = 1000
    checkpoint_every: int = 5000

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")


# ----------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in simple:
        return simple[tp]
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Mismatch(Exception):
    """Internal: value does not fit the type (message says why, key is added by the caller)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against ``tp`` and convert (int -> float, list -> tuple, dict -> dataclass)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, key)
            except _Mismatch as e:
                if e.key != key:  # the failure is inside a nested value: report that one
                    raise
                errors.append(e)
        raise _Mismatch(key, f"must be {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        raise _Mismatch(key, f"must be {_type_name(tp)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch(key, f"must be {_type_name(tp)}, got {_show(value)}")
        return _build(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(key, f"must be a list, got {_show(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(key, f"must be a list of {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch(key, f"must be a mapping, got {_show(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            out[_coerce(k, key_tp, key)] = _coerce(v, val_tp, f"{key}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(key, f"must be true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 6.0e4 written for 60000
        raise _Mismatch(key, f"must be an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no recipe value means "infinite" or "undefined"
                raise _Mismatch(key, f"must be a finite number, got {_show(value)}")
            return float(value)
        raise _Mismatch(key, f"must be a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(key, f"must be a string, got {_show(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(key, f"must be {_type_name(tp)}, got {_show(value)}")
    return value  # unsupported annotation: take the value as it is


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # noqa: BLE001 - unresolved forward refs are a schema bug
        raise TypeError(f"cannot resolve the type annotations of {cls.__name__}: {e}") from e


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown_key_error(key: str, name: str, known: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    msg = f"unknown recipe key {key!r}"
    if close:
        msg += f" (did you mean {prefix + close[0]!r}?)"
    return ConfigError(msg, hint="known keys here: " + ", ".join(prefix + k for k in sorted(known)))


def _build(cls: type[T], data: Mapping[str, Any], prefix_key: str = "") -> T:
    prefix = f"{prefix_key}." if prefix_key else ""
    fields = _fields(cls)
    hints = _hints(cls)
    for name in data:
        if not isinstance(name, str):
            raise ConfigError(f"recipe key {prefix}{name!r} is not a string")
        if name not in fields:
            raise _unknown_key_error(prefix + name, name, list(fields), prefix)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _coerce(data[name], hints.get(name, Any), key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required recipe key {key!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        where = f" in {prefix_key!r}" if prefix_key else ""
        raise ConfigError(f"invalid recipe{where}: {e}") from None


# ----------------------------------------------------------------------------- overrides

def _field_default(cls: Any, name: str) -> Any:
    """The default of dataclass field ``name`` (a fresh copy), or _MISSING."""
    import copy

    f = _fields(cls).get(name)
    if f is None:
        return _MISSING
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    return _MISSING


def _set_dotted(tree: dict[str, Any], cls: Any, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, creating the missing levels.

    A missing mapping-typed level starts from the field's default (so that
    ``loss.weights.x=1`` adds a key to the default dict instead of replacing it); a missing
    dataclass level starts empty (its defaults are filled in when it is built).
    """
    parts = dotted.split(".")
    node = tree
    tp: Any = cls
    for part in parts[:-1]:
        inner = _unwrap_optional(tp)
        child_tp = _hints(inner).get(part, Any) if dataclasses.is_dataclass(inner) else (
            (typing.get_args(inner) or (Any, Any))[1])
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            child_inner = _unwrap_optional(child_tp)
            is_mapping = typing.get_origin(child_inner) is dict or child_inner is dict
            if is_mapping and dataclasses.is_dataclass(inner):
                default = _field_default(inner, part)
                if isinstance(default, dict):
                    child = dict(default)
            node[part] = child
        node = child
        tp = child_tp
    node[parts[-1]] = value


def _field_type_at(cls: type, dotted: str) -> Any:
    """The annotation of the field a dotted key names; ConfigError if there is none."""
    parts = dotted.split(".")
    tp: Any = cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        prefix = ".".join(parts[:i]) + "." if i else ""
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            fields = _fields(inner)
            if part not in fields:
                raise _unknown_key_error(key, part, list(fields), prefix)
            tp = _hints(inner).get(part, Any)
        elif typing.get_origin(inner) is dict or inner is dict:
            args = typing.get_args(inner)
            tp = args[1] if args else Any
        else:
            raise ConfigError(f"recipe key {'.'.join(parts[:i])!r} has no sub-key {part!r}")
    return tp


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(non_none) == 1:
            return non_none[0]
    return tp


def _parse_override_value(raw: str, tp: Any, key: str) -> Any:
    """A YAML scalar/flow value; falls back to the raw text where the field accepts a string."""
    try:
        parsed = _yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        parsed = _MISSING
    first: _Mismatch | None = None
    if parsed is not _MISSING:
        try:
            _coerce(parsed, tp, key)
            return parsed
        except _Mismatch as e:
            first = e
    try:  # e.g. name=123 for a str field, or text YAML could not parse
        _coerce(raw, tp, key)
        return raw
    except _Mismatch as e:
        first = first or e
    raise ConfigError(f"recipe key {first.key!r} {first.message}")


def parse_override_args(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["optim.lr=0.01", "seed=3"]`` -> ``{"optim.lr": "0.01", "seed": "3"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE", hint="e.g. optim.lr=0.01")
        out[key] = value
    return out


def apply_overrides(data: Mapping[str, Any], schema_cls: type, overrides: Mapping[str, Any] | None) -> dict:
    """Return a copy of the raw recipe ``data`` with dotted ``overrides`` applied.

    String values are parsed as YAML (``"0.01"`` -> 0.01, ``"[1,2]"`` -> [1, 2], ``"null"`` ->
    None) and must fit the field's type; other values are used as they are.
    """
    import copy

    tree = copy.deepcopy(dict(data))
    for dotted, raw in (overrides or {}).items():
        if not dotted or any(not p for p in dotted.split(".")):
            raise ConfigError(f"malformed recipe key {dotted!r}")
        tp = _field_type_at(schema_cls, dotted)
        value = _parse_override_value(raw, tp, dotted) if isinstance(raw, str) else raw
        _set_dotted(tree, schema_cls, dotted, value)
    return tree


# ----------------------------------------------------------------------------- loading

def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"recipe {path} includes itself through {BASE_KEY}")
    if not path.exists():
        raise ConfigError(f"recipe not found: {path}")
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        data = _yaml_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in str(problem):
            # e.g. !!python/object: the safe loader builds no Python objects, and says so
            m = re.search(r"'([^']+)'", str(problem))
            tag = (m.group(1) if m else str(problem)).replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"recipe {path}{where}: the YAML tag {tag} is not allowed (recipes are plain "
                              "data, read with the safe loader)") from None
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{BASE_KEY} in {path} must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / b, chain + (path,)))
    return _deep_merge(merged, data)


def _renamed(data: Mapping[str, Any], schema_cls: type, overrides: Mapping[str, Any] | None,
             warnings: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Old key spellings (``schema_cls.RENAMED_KEYS``: old dotted key -> new) moved to their new
    names in the raw recipe and the overrides, with one warning line each."""
    import copy

    tree, over = copy.deepcopy(dict(data)), dict(overrides or {})
    for old, new in getattr(schema_cls, "RENAMED_KEYS", {}).items():
        *parents, last = old.split(".")
        node: Any = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        found = isinstance(node, dict) and last in node
        if found:
            value = node.pop(last)
            over.setdefault(new, value)
        if old in over:
            over.setdefault(new, over.pop(old))
            found = True
        if found and warnings is not None:
            warnings.append(f"recipe key {old!r} is now {new!r} (the old name goes in the next release)")
    return tree, over


def build_recipe(
    data: Mapping[str, Any], schema_cls: type[T], overrides: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> T:
    """Validate a raw mapping (plus overrides) into ``schema_cls``; ConfigError on any problem.
    Deprecated key spellings are renamed, with a line appended to ``warnings`` when given."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a recipe must be a mapping, got {type(data).__name__}")
    data, overrides = _renamed(data, schema_cls, overrides, warnings)
    tree = apply_overrides(data, schema_cls, overrides)
    try:
        return _build(schema_cls, tree)
    except _Mismatch as e:
        raise ConfigError(f"recipe key {e.key!r} {e.message}") from None


def load_recipe(
    path: str | os.PathLike, schema_cls: type[T], overrides: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> T:
    """Read a YAML recipe, apply dotted ``overrides`` (``{"optim.lr": "0.01"}``) and validate.

    Raises:
        ConfigError: unreadable/invalid YAML, unknown keys (with a did-you-mean suggestion),
            wrongly typed or missing values, failed ``__post_init__`` checks - always naming the
            full dotted key.
    """
    return build_recipe(_read_yaml(Path(path)), schema_cls, overrides, warnings)


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """The resolved recipe as plain YAML/JSON-able data (tuples become lists)."""
    if not (dataclasses.is_dataclass(recipe) and not isinstance(recipe, type)):
        raise TypeError("recipe_to_dict needs a dataclass instance")

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Any) -> str:
    """YAML text of :func:`recipe_to_dict`, in field order (loads back with :func:`load_recipe`)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)
