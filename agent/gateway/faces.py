"""What an API face of the gateway is, and the faces it has.

A face knows one hub's URLs and answers (``route``: a ``Response``, or None when the path
is not its own) and asks the shared ``Library`` (``agent.gateway.serve``) for listings and
files. Adding a hub's API is one module with one class, listed in ``make_faces``.
"""

from __future__ import annotations

from typing import Protocol

from agent.gateway.serve import Call, Library, Response


class Face(Protocol):
    name: str

    async def route(self, call: Call) -> Response | None:
        """The answer to ``call``, or None if its path is not this face's."""


def make_faces(library: Library, settings) -> list[Face]:
    from agent.gateway.hub import HubFace
    from agent.gateway.ms_datasets import ModelScopeDatasets
    from agent.gateway.ms_models import ModelScopeModels
    return [ModelScopeModels(library), ModelScopeDatasets(library), HubFace(library, settings)]
