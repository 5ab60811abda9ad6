"""Name -> scheme-class registry, plus import paths and entry points for plug-ins.

A scheme is any class whose constructor accepts ``num_heads``, ``head_dim`` and
``rngs`` as keywords (plus its own options) and that implements one or more of the
hooks described in :mod:`relpos.positions.base`. Three ways to make one selectable:

* ``@relpos.positions.register("my_bias")`` on the class (code imported before build);
* an import path as the name: ``build("my_pkg.biases:MyBias", ...)`` (or the
  dotted form ``my_pkg.biases.MyBias``), which is what ``bias.name=...`` in a Hydra
  config passes through;
* a ``relpos.positions`` entry point in the plug-in package's metadata, so that
  ``pip install my-pkg`` alone makes the name appear in :func:`available`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

from flax import nnx

from relpos.positions.base import RelposConfigError

_REGISTRY: dict[str, type] = {}
_ENTRY_POINT_GROUP = "relpos.positions"
_entry_points_loaded = False

T = TypeVar("T", bound=type)

# Keywords that build() supplies itself; they are not user options.
_BUILD_KEYWORDS = ("num_heads", "head_dim", "rngs")


def register(name: str) -> Callable[[T], T]:
    """Class decorator registering a scheme under ``name``."""

    def wrap(cls: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"position scheme {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def available() -> list[str]:
    """Names of all registered schemes (built-in, decorated and entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def _import_path(name: str) -> type:
    """The class at ``module:attr`` (or ``module.attr``). The working directory is
    searched too, as ``python -m`` would: installed console scripts (``relpos-train``)
    do not put it on ``sys.path``, and a user's package often sits there."""
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import position scheme {name!r}: {e} (searched the working "
                         f"directory {cwd} and the installed packages)") from None


def lookup(name: str) -> type:
    """The class for a registered name or an import path; ValueError lists the names."""
    _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name or ":" in name:
        return _import_path(name)
    raise ValueError(
        f"unknown position scheme {name!r}; available: {', '.join(available())} "
        "(or an import path such as 'my_pkg.module:MyBias')"
    )


def options_of(cls: type) -> list[str]:
    """The user options a scheme's constructor accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [
        p for p, spec in params.items()
        if p != "self" and p not in _BUILD_KEYWORDS
        and spec.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def build(name: str, *, num_heads: int, head_dim: int, rngs: nnx.Rngs | None = None,
          seed: int = 0, **options):
    """Build an initialised scheme.

    Args:
      name: registered name (see :func:`available`) or an import path.
      num_heads, head_dim: attention sizes; ``d_model = num_heads * head_dim``.
      rngs: parameter RNGs; if None, ``nnx.Rngs(seed)``.
      **options: scheme-specific options; an unknown one raises an error naming it and
        listing the valid ones.
    """
    cls = lookup(name)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        valid = options_of(cls)
        for key in options:
            if key not in valid:
                raise RelposConfigError(
                    f"{key!r} is not an option of position scheme {name!r}; "
                    f"valid options: {', '.join(valid) or '(none)'}"
                )
    for key, value in options.items():
        if key in params:
            _check_option_type(name, key, value, params[key].default)
    if rngs is None:
        rngs = nnx.Rngs(seed)
    supplied = dict(num_heads=num_heads, head_dim=head_dim, rngs=rngs)
    kwargs = {k: v for k, v in supplied.items() if k in params or accepts_any}
    scheme = cls(**kwargs, **options)
    _check_state(name, scheme)
    return scheme


def _check_option_type(scheme: str, key: str, value, default) -> None:
    """An option whose default is a bool, int, float or str takes a value of that kind
    (an int where a float is expected; None where the default is None), so a typo such
    as ``+bias.width=abc`` fails at start-up rather than inside the first forward pass."""
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    want = kinds.get(type(default))
    if want is None or value is None:
        return
    if not isinstance(value, want) or (isinstance(value, bool) and type(default) is not bool):
        kind = type(default).__name__
        raise RelposConfigError(
            f"option {key!r} of position scheme {scheme!r} must be {'an' if kind == 'int' else 'a'}"
            f" {kind} (its default is {default!r}), got {value!r}")


def _check_state(scheme: str, module) -> None:
    """A scheme keeps its arrays in NNX Variables: a plain array attribute cannot be
    split from the model's parameters (NNX raises a long traceback at training)."""
    if not isinstance(module, nnx.Module):
        return
    for path, value in nnx.state(module).flat_state():
        if not isinstance(value, nnx.Variable):
            attr = ".".join(map(str, path))
            raise RelposConfigError(
                f"position scheme {scheme!r} keeps a plain array in attribute {attr!r}: wrap a "
                f"learned one in nnx.Param(...), keep a fixed one as a tuple or a Python float, "
                f"or compute it in the hook")
