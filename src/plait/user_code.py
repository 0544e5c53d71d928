"""User code named in a config by reference: `"package.module:name"` (an importable module) or
`"path/to/file.py:name"` (a file; a relative path is taken from the config file's folder, see
`settings.config.load_toml`). A wrong reference stops the run at start with a message naming the setting."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_reference(value: str) -> bool:
    module, sep, name = value.rpartition(":")
    return bool(sep and module and name.isidentifier() and not value.startswith(("http:", "https:")))


def resolve(reference: str, setting: str) -> Any:
    """The object `reference` names; ValueError naming `setting` and what was found instead."""
    if not is_reference(reference):
        raise ValueError(f"{setting} = {reference!r} must look like 'package.module:name' or 'file.py:name'")
    module_name, _, attribute = reference.rpartition(":")
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name), reference, setting)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{setting} = {reference!r}: cannot import {module_name!r} ({err})") from err
    if not hasattr(module, attribute):
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:20]
        raise ValueError(f"{setting} = {reference!r}: {module_name} has no {attribute!r} (it has {public})")
    return getattr(module, attribute)


def _import_file(path: Path, reference: str, setting: str) -> Any:
    """Import `path` as the module named by its file name, its folder put on sys.path: worker processes (which
    inherit sys.path) then unpickle the classes it defines by the same name."""
    if not path.is_file():
        raise ValueError(f"{setting} = {reference!r}: no file {path}")
    folder, name = str(path.resolve().parent), path.stem
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(name)
    except Exception as err:
        raise ValueError(f"{setting} = {reference!r}: importing {path} failed: {type(err).__name__}: {err}") from err
    if Path(getattr(module, "__file__", "") or "").resolve() != path.resolve():
        raise ValueError(f"{setting} = {reference!r}: another module named {name!r} is already imported "
                         f"(from {getattr(module, '__file__', '?')}); rename {path.name}")
    return module


def resolve_callable(reference: str, setting: str, arguments: dict[str, Any] | None = None) -> Callable[..., Any]:
    """A callable that `reference` names and that accepts `arguments` (by keyword), checked before it is called."""
    found = resolve(reference, setting)
    if not callable(found):
        raise ValueError(f"{setting} = {reference!r} names a {type(found).__name__}, not something to call")
    try:
        inspect.signature(found).bind(**(arguments or {}))
    except TypeError as err:
        raise ValueError(f"{setting} = {reference!r}: cannot be called with {sorted(arguments or {})}: {err}") from err
    except ValueError:
        pass  # no signature to check (some builtins): the call itself will say
    function: Callable[..., Any] = found
    return function


def accepts(reference: str, keyword: str) -> bool:
    """True when the callable `reference` names takes `keyword` (e.g. a data loader taking `client_id`)."""
    try:
        parameters = inspect.signature(resolve(reference, "data.source")).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
