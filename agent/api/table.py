"""The control API's table and its parameter records (see ``agent.api``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from agent.errors import ProtocolError, UsageError
from agent.manifest import ModelRef


@dataclass(frozen=True)
class Call:
    """Who calls, and how to stream events back (``agent.rpc``'s event frames)."""

    uid: int
    send_event: Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class Method:
    name: str
    params: type
    handler: Callable[[Any, Any, Call], Awaitable[Any]]
    doc: str
    streams: bool = False  # sends event frames before its result
    quiet: bool = False  # logged at DEBUG: read-only and polled (the UI asks status, list, jobs every second)


METHODS: dict[str, Method] = {}


def method(name: str, params: type, doc: str, *, streams: bool = False, quiet: bool = False):
    """Declare a control API method (see module docstring)."""
    def register(handler):
        if name in METHODS:
            raise RuntimeError(f"control API method {name!r} declared twice")
        METHODS[name] = Method(name, params, handler, doc, streams, quiet)
        return handler
    return register


@dataclass(frozen=True)
class NoParams:
    pass


@dataclass(frozen=True)
class ModelParams:
    model: ModelRef


def lookup(name: str) -> Method:
    found = METHODS.get(name)
    if found is None:
        raise ProtocolError(f"unknown method {name!r}; the agent serves: {', '.join(sorted(METHODS))}")
    return found


def _accepts(kind, value) -> tuple[bool, Any]:
    """Whether ``value`` fits the annotation ``kind``; the value to use."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            ok, converted = _accepts(option, value)
            if ok:
                return True, converted
        return False, None
    if kind is type(None):
        return value is None, None
    if kind is ModelRef:
        if not isinstance(value, str):
            return False, None
        return True, ModelRef.parse(value)  # its own error says what is wrong with the name
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is Any:
        return True, value
    return isinstance(value, kind), value


def _type_name(kind) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind) if k is not type(None))
    return {ModelRef: "OWNER/NAME[@REVISION]", str: "string", int: "integer", float: "number",
            bool: "true/false", Any: "any"}.get(kind, getattr(kind, "__name__", str(kind)))


def parse_params(record: type, params: dict):
    """``params`` (a call's map) as an instance of ``record``, or a ``UsageError``."""
    hints = typing.get_type_hints(record)
    fields = {f.name: f for f in dataclasses.fields(record)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise UsageError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; this method takes "
                         f"{', '.join(fields) or 'none'}")
    values = {}
    for name, f in fields.items():
        if name not in params:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsageError(f"'{name}' ({_type_name(hints[name])}) is required")
            continue
        ok, value = _accepts(hints[name], params[name])
        if not ok:
            raise UsageError(f"'{name}' must be {_type_name(hints[name])}, not {type(params[name]).__name__}")
        values[name] = value
    return record(**values)


def describe() -> list[tuple[str, str, str]]:
    """(method, parameters, what it does) for every method, in table order."""
    rows = []
    for m in METHODS.values():
        hints = typing.get_type_hints(m.params)
        parts = []
        for f in dataclasses.fields(m.params):
            optional = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            parts.append(f"`{f.name}`{'?' if optional else ''}: {_type_name(hints[f.name])}")
        rows.append((m.name, ", ".join(parts) or "-", m.doc + (" Streams events." if m.streams else "")))
    return rows


def markdown() -> str:
    lines = ["| Method | Parameters (`?` optional) | What it does |", "|---|---|---|"]
    lines += [f"| `{name}` | {params} | {doc} |" for name, params, doc in describe()]
    return "\n".join(lines)
