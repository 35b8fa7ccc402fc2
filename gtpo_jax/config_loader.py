"""Typed dataclass trees from YAML plus `key=value` overrides, checked before any work starts."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against annotation `tp` (converting int -> float and dicts -> dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args:  # Optional[X]: X's own message
            return _coerce(value, next(a for a in args if a is not type(None)), key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _unknown(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = f" in {key}" if key else ""
    return ConfigError(f"unknown key {name!r}{where}.{hint} Valid keys: {', '.join(sorted(valid))}")


def _build(cls, values: dict, key: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown(key, name, list(fields))
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join((key + '.' if key else '') + m for m in missing)}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = tree.get(part)
        if node is None:
            node = tree[part] = {}
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
        tree = node
    tree[parts[-1]] = value


def load_config(cls, yaml_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Instance of dataclass `cls` from a YAML file, then `a.b.c=value` overrides (values are
    parsed as YAML: numbers, booleans, lists `[x,y]`, mappings `{k: v}`, null)."""
    values: dict = {}
    if yaml_path:
        try:
            with open(yaml_path) as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {yaml_path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{yaml_path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path} must hold a mapping of config keys at the top level")
        values = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(values, dotted.strip(), value)
    moved = moved_key_problems(values, getattr(cls, "MOVED_KEYS", {}))
    if moved:
        raise ConfigError("renamed config key(s): " + "; ".join(moved) + " (rename them in the YAML file or the "
                          "override; --help lists every key)")
    return _build(cls, values)


def moved_key_problems(values: dict, moved: dict[str, str | None]) -> list[str]:
    """'old is now new' for every key of `values` (a nested mapping) that `moved` renames. `moved`
    maps an old dotted key, or an old section (its keys move with it), to its new place (checked in
    the mapping's order: specific keys before their section); None = the key is gone."""
    lines = []
    for key in flatten(values):
        for old, new in moved.items():
            if key == old or key.startswith(old + "."):
                lines.append(f"{key} no longer exists (no code read it): delete it" if new is None
                             else f"{key} is now {new}{key[len(old):]}")
                break
    return lines


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---- documentation and comparison of config trees ------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """Field name -> its meaning, read from the comments on the field in the dataclass's source:
    the comment at the end of the field's line, else the comment lines right above it. The config
    classes document each key there, once; `--help` and the tests read it from there. Fields a
    class inherits are documented in the class that declares them."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    code_lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.end_lineno) or comments.get(node.lineno)
        if not text:
            above, line = [], node.lineno - 1
            while line >= 1 and line in comments and code_lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            text = " ".join(above)
        docs[node.target.id] = text
    return docs


def _describe_type(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_describe_type(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "(required)"


def iter_keys(cls, prefix: str = ""):
    """(dotted key, type description, default, meaning) of every leaf key of a config tree."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = prefix + field.name
        if _is_dataclass_type(tp):
            yield from iter_keys(tp, key + ".")
        else:
            default = _default(field)
            if dataclasses.is_dataclass(default):
                default = dataclasses.asdict(default)
            yield key, _describe_type(tp), default, docs.get(field.name, "")


def keys_help(cls) -> str:
    """Every key of a config tree, one per line: key, type, default, meaning (for --help)."""
    rows = [(k, t, yaml.safe_dump(d, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
             if not isinstance(d, str) else d, doc) for k, t, d, doc in iter_keys(cls)]
    width = max(len(k) for k, *_ in rows)
    return "\n".join(f"  {k:<{width}}  {t} = {d}" + (f"\n  {'':<{width}}    {doc}" if doc else "")
                     for k, t, d, doc in rows)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (mappings that are values, such as gtpo.rewards, too; an
    empty mapping stays a value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(stored: dict, current: dict, defaults: dict, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every key whose value differs between a stored and the current
    config (a key the stored file lacks counts as its default); keys starting with one of
    `ignore` are skipped. A run directory may be moved or copied: paths inside the stored
    output_dir compare as the same paths inside the current one, and output_dir itself is no change."""
    old, new, base = flatten(stored), flatten(current), flatten(defaults)
    old = {key: _relocated(value, old.get("output_dir"), new.get("output_dir")) for key, value in old.items()}
    lines = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(ignore):
            continue
        before, after = old.get(key, base.get(key)), new.get(key, base.get(key))
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


def _relocated(value, old_dir, new_dir):
    """`value` with the prefix `old_dir` of its paths replaced by `new_dir` (lists element-wise)."""
    if isinstance(value, list):
        return [_relocated(item, old_dir, new_dir) for item in value]
    if not (isinstance(value, str) and isinstance(old_dir, str) and isinstance(new_dir, str)):
        return value
    old_root = os.path.normpath(old_dir)
    if os.path.normpath(value) == old_root:
        return new_dir
    if value.startswith(old_root + os.sep):
        return os.path.join(new_dir, os.path.relpath(value, old_root))
    return value
