"""`slot_init`: a faster `__init__` for frozen, slotted dataclasses on the hot path."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["slot_init"]

_T = TypeVar("_T")


class _Missing:
    """The default of a `default_factory` field: the factory is called when it is seen."""


_MISSING = _Missing()


def slot_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass an `__init__` that stores each field through its
    slot's descriptor; put it above `@dataclass(frozen=True, slots=True)`.

    Why: the `__init__` that `dataclass` writes for a frozen class gets past the frozen
    `__setattr__` with `object.__setattr__(self, name, value)` per field, about 0.5 µs
    each; budgets and rate limits build some 30 such values per request (~10% of their
    CPU), and every ext_proc message one event. The slot descriptor's `__set__` is what
    that call ends in. Nothing else changes: same parameters and defaults (a
    `default_factory` is called per instance, as dataclass does), `__post_init__` still
    runs, instances stay frozen (assignment raises FrozenInstanceError), same
    eq/hash/repr.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: slot_init needs @dataclass(frozen=True, slots=True)")
    scope: dict[str, Any] = {"_MISSING": _MISSING}
    args, body = [], []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: slot_init takes plain fields only")
        scope[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        if f.default_factory is not dataclasses.MISSING:
            scope[f"_factory_{f.name}"] = f.default_factory
            args.append(f"{f.name}=_MISSING")
            body.append(f"    if {f.name} is _MISSING: {f.name} = _factory_{f.name}()")
        elif f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            scope[f"_default_{f.name}"] = f.default
            args.append(f"{f.name}=_default_{f.name}")
        body.append(f"    _set_{f.name}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(args)}):\n" + "\n".join(body or ["    pass"])
    # The text is made of the class's own field names (identifiers), as dataclass makes it.
    exec(source, scope)  # noqa: S102
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
