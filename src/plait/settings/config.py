"""Typed configs: TOML tables into nested dataclasses. An unknown key or a wrong type is an error naming the key.

Each component owns a small `@dataclass(kw_only=True, slots=True)` config and validates its values in
`__post_init__`; this module only maps dictionaries onto those dataclasses and back.

A setting written as text but meaning an object (`sync.consistency = "ssp:3"`) is typed with that object's class
when the class has a `from_setting(text)` classmethod: the text is built into the object once, as the config is
read (its ValueError becomes a ConfigError naming the key), and `to_dict` writes `str(object)` back.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A user's config is wrong; the message names the key."""


class UnknownKey(ConfigError):
    """A key the config's table does not have (`key`: its last part, as written)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        import difflib  # here: a run that starts without a typo does not pay for its import

        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        meant = f"did you mean {(f'{where}.' if where else '') + close[0]!r}? " if close else ""
        raise UnknownKey(f"unknown config key {name!r}; {meant}known keys here: {sorted(fields)}", unknown[0])
    values = {}
    instead = getattr(cls, "INSTEAD", {})  # {(key, value someone may write): where that choice lives here}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        try:
            values[key] = _convert(hints[key], value, name)
        except ConfigError as err:
            hint = instead.get((key, value)) if isinstance(value, (str, int, float)) else None
            if hint is None:
                raise
            raise ConfigError(f"{err} ({value!r} here: {hint})") from err
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        said, last = str(err), where.rsplit(".", 1)[-1]
        # a check that names its key already ("fl.task = ...") is not prefixed with its table again; one that names
        # it from its own table ("compression.ratio ..." under fl.compression) gets the table's whole path
        if where and said.startswith(f"{where}."):
            raise ConfigError(said) from err
        if where and said.startswith(f"{last}."):
            raise ConfigError(f"{where}{said[len(last):]}") from err
        raise ConfigError(f"{where or 'config'}: {said}") from err


def _convert(hint: Any, value: Any, name: str) -> Any:
    origin = get_origin(hint)
    if _built_from_text(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        try:
            return hint.from_setting(value)
        except ValueError as err:
            raise ConfigError(f"{name} = {value!r}: {err}") from err
    if dataclasses.is_dataclass(hint):
        shorthand = getattr(hint, "SHORTHAND", None)  # `model = "pkg:make"` for `[model] factory = "pkg:make"`
        if isinstance(value, str) and shorthand:
            value = {shorthand: value}
        return from_dict(typing.cast(Any, hint), value, name)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{name} = {value!r} is not allowed; choose one of {list(get_args(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name} = {value!r} matches none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        args = get_args(hint)
        item = args[0] if args else Any
        items = [_convert(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        _, vtype = get_args(hint) or (str, Any)
        return {k: _convert(vtype, v, f"{name}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        quote = f" (text that reads as a number: quote it, --set {name}='\"{value}\"')" \
            if hint is str and isinstance(value, (int, float)) else ""
        raise ConfigError(f"{name} must be {hint.__name__}, got {type(value).__name__} {value!r}{quote}")
    return value


def _built_from_text(hint: Any) -> bool:
    """A setting's class that builds itself from the setting's text (see the module docstring)."""
    return isinstance(hint, type) and callable(getattr(hint, "from_setting", None))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain TOML-able data (None values dropped: TOML has no null; an object built from a setting's
    text written back as that text)."""
    def clean(value: Any) -> Any:
        if _built_from_text(type(value)):
            return str(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    cleaned: dict[str, Any] = clean(config)
    return cleaned


def checked(config: T) -> T:
    """`config` built again from its values, so that a field a program set after construction (`config.fl.rounds =
    -1`) gets the checks the constructor gives; an equal config when every field already passed them."""
    return from_dict(type(config), to_dict(config))


def load_toml(path: str | Path) -> dict[str, Any]:
    """The config file's tables. A user-code reference to a file (`"models.py:make_net"`) with a relative path is
    taken from the config file's folder, so a config and its code can travel together."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        hint = ""
        if "Cannot overwrite a value" in str(err):  # `data = "x.npz"` and a [data] table: one key, written twice
            hint = (" (a key written both as a value and as a [table]? a shorthand such as model = \"...\" or "
                    "data = \"...\" goes inside its table when the table is there: [data] source = \"...\")")
        raise ConfigError(f"{path}: invalid TOML: {err}{hint}") from err
    anchored: dict[str, Any] = _anchor_file_references(data, path.resolve().parent)
    return anchored


def _anchor_file_references(value: Any, folder: Path) -> Any:
    if isinstance(value, dict):
        return {k: _anchor_file_references(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_anchor_file_references(v, folder) for v in value]
    if isinstance(value, str) and ".py:" in value:
        file, _, name = value.rpartition(":")
        if file.endswith(".py") and name.isidentifier() and not Path(file).is_absolute():
            return f"{folder / file}:{name}"
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type | None = None) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as TOML, or taken as a bare string) onto nested tables. With the
    config's class as `schema`, a key under a table written as its shorthand (`model = "pkg:make"`, then
    `--set model.options.width=64`) opens the shorthand into its table first (`factory = "pkg:make"`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        table = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            held = table.setdefault(part, {})
            shorthand = getattr(_table_class(schema, parts[:depth + 1]), "SHORTHAND", None)
            if isinstance(held, str) and shorthand:
                held = table[part] = {shorthand: held}
            if not isinstance(held, dict):
                where = ".".join(parts[:depth + 1])
                raise ConfigError(f"override {item!r}: {where} is {held!r} here, not a table: override it whole "
                                  f"(--set {where}=...) or write it as a [{where}] table in the config")
            table = held
        table[parts[-1]] = value
    return data


def _table_class(schema: type | None, path: list[str]) -> type | None:
    """The dataclass that the table at `path` maps onto in the config class `schema` (None: not a table of it)."""
    cls: Any = schema
    for part in path:
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        cls = _table_of(get_type_hints(cls).get(part))
    return typing.cast("type | None", cls)


def _table_of(hint: Any) -> Any:
    """The config class a field's type hint names, through `X | None`, or None when the field is no table."""
    return next((arg for arg in (get_args(hint) or (hint,)) if dataclasses.is_dataclass(arg)), None)


def read_config(cls: type[T], path: str | Path, overrides: list[str]) -> T:
    """The config file at `path` with `--set` overrides, as `cls`."""
    return typed(cls, apply_overrides(load_toml(path), overrides, cls))


def typed(cls: type[T], data: dict[str, Any]) -> T:
    """`from_dict(cls, data)`, and a key put in another table than its own is told where it lives in `cls`
    (`train.lr` of a parameter-server config: "optimizer.lr"), as a user who moves between the planes writes it."""
    try:
        return from_dict(cls, data)
    except UnknownKey as err:
        homes = _paths_named(cls, err.key)
        if not homes:
            raise
        raise ConfigError(f"{err} (in this config, {err.key!r} is {' or '.join(map(repr, homes))})") from err


def _paths_named(cls: Any, key: str, where: str = "") -> list[str]:
    """The dotted paths of the fields called `key` in the config class `cls` and the tables below it."""
    found, hints = [], get_type_hints(cls)
    for name in (f.name for f in dataclasses.fields(cls)):
        hint, path = hints[name], f"{where}{name}"
        if name == key:
            found.append(path)
        table = _table_of(hint)
        if table is not None:
            found += _paths_named(table, key, f"{path}.")
    return found
