"""The control API as one table: each method's name, typed parameters, handler and doc.

A method is declared where it is served, with ``@method(name, Params, doc)`` over an
``async def handler(agent, params, call)``: ``params`` is an instance of ``Params``, a
frozen dataclass whose fields say what the method takes (``ModelRef`` fields are parsed,
``None`` defaults make a field optional); ``call`` carries the caller's uid and
``send_event`` for methods that stream. ``parse_params`` checks a call's map against the
record at the boundary: an unknown key, a missing field or a wrong type is a
``UsageError`` that names it, before any handler runs.

``python -m agent.api`` prints the table as Markdown (the README's "Control API").

Modules: ``table`` (the table, its records and checks), ``cache`` (pulls and the store),
``info`` (status, config, peers, sources), ``jobs`` (jobs, chats, training), ``room`` (a
room's assignments).
"""

from __future__ import annotations

from agent.api import cache, info, jobs, room
from agent.api.table import METHODS, Call, Method, describe, lookup, markdown, method, parse_params

HANDLER_MODULES = (cache, info, jobs, room)  # each declares its methods on import
__all__ = ["METHODS", "Call", "Method", "describe", "lookup", "markdown", "method", "parse_params"]
