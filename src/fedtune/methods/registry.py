"""Name -> method class. Each method module registers its classes on import."""

from __future__ import annotations

from typing import Any, TypeVar

from fedtune.methods.base import FederatedMethod

_M = TypeVar("_M", bound=type[FederatedMethod])
METHODS: dict[str, type[FederatedMethod]] = {}


def register(cls: _M) -> _M:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[FederatedMethod]:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


def build_method(config: Any) -> FederatedMethod:
    """The method object a run config asks for (wrapped in SCAFFOLD when ``scaffold.enabled``)."""
    method = method_class(config.method).from_config(config)
    scaffold = getattr(config, "scaffold", None)
    if scaffold is not None and scaffold.enabled:
        from fedtune.methods.scaffold import Scaffold  # a wrapper over any registered method

        method = Scaffold.wrap(method, config)
    return method
