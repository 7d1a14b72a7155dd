"""The ModelScope face for models: ``MODELSCOPE_ENDPOINT=http://127.0.0.1:PORT`` and
unmodified ``modelscope download``, ``snapshot_download`` and ms-swift's ``--model`` fetch
through the agent.

Endpoints the modelscope SDK (1.40, ``modelscope_hub`` 0.5) calls:
``/api/v1/models/{o}/{n}`` (and ``/openapi/v1/...``: the model's info),
``.../revisions``, ``.../repo/files?Revision=&Recursive=`` (the listing, with SHA-256) and
``.../repo?Revision=&FilePath=`` (a file's bytes, with ``Range``);
``/api/v1/repos/internalAccelerationInfo`` is answered 404 (no intra-cloud acceleration).
Answers are ModelScope's envelope: ``{"Code", "Success", "Data"}`` or
``{"Code", "Message", "Success": false}``.
"""

from __future__ import annotations

import json

from agent.errors import ManifestError, NotFound, UsageError
from agent.gateway.serve import Call, Library, Response
from agent.manifest import ModelRef

NOT_FOUND_CODE = 10010205001  # what ModelScope answers for a missing model


def ms_json(payload: object, status: int = 200) -> Response:
    return Response(status, [("Content-Type", "application/json")], json.dumps(payload).encode())


def ms_data(data: object) -> Response:
    return ms_json({"Code": 200, "Success": True, "Data": data})


def ms_error(status: int, message: str, code: int | None = None) -> Response:
    return ms_json({"Code": code or status, "Message": message, "Success": False, "RequestId": "shoal-gateway"},
                   status)


def ms_ref(call: Call, *, dataset: bool) -> ModelRef:
    """The revision a ModelScope URL names: OWNER/NAME from the path, ``Revision`` from the query."""
    return ModelRef.parse(f"{call.parts[3]}/{call.parts[4]}@{call.arg('Revision', 'master')}", dataset=dataset)


async def ms_route(library: Library, call: Call, kind: str, routes) -> Response | None:
    """What both ModelScope faces do with a request under ``/api/v1/{kind}/{o}/{n}``
    (``kind``: models or datasets; None for any other path): the revision it names, the
    routes both have (``revisions``, a file's bytes), then ``routes(ref, rest)`` (a coroutine
    of the answer, or None), every error the library raises in ModelScope's words."""
    parts = call.parts
    if len(parts) < 5 or parts[0] not in ("api", "openapi") or parts[1] != "v1" or parts[2] != kind:
        return None
    if call.method == "POST":
        return ms_error(405, "the shoal gateway is read-only")
    try:
        ref = ms_ref(call, dataset=kind == "datasets")
    except UsageError as e:
        return ms_error(400, str(e))
    answer = await _ms_answer(library, call, ref, parts[5:], lambda rest: routes(ref, rest))
    return answer if answer is not None else ms_error(404, f"{call.path} is not an endpoint of the shoal gateway")


async def _ms_answer(library: Library, call: Call, ref: ModelRef, rest: list[str], routes) -> Response | None:
    try:
        if rest == ["revisions"]:
            revisions = sorted(set(await library.cached_revisions(ref.model_id)) | {"master"})
            return ms_data({"RevisionMap": {"Branches": [{"Revision": r} for r in revisions], "Tags": []}})
        if rest == ["repo"]:
            return await library.file(ref, call.arg("FilePath", ""), call)
        answer = routes(rest)
        return await answer if answer is not None else None
    except (UsageError, ManifestError) as e:
        return ms_error(400, str(e))
    except NotFound as e:
        return ms_error(404, str(e), NOT_FOUND_CODE)


def listing_entries(revision) -> list[dict]:
    """A revision's files as ModelScope lists them."""
    return [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": s, "Sha256": h.hex(),
             "Revision": revision.ref.revision} for p, s, h in revision.files]


class ModelScopeModels:
    """See module docstring."""

    name = "modelscope-models"

    def __init__(self, library: Library):
        self.library = library

    async def route(self, call: Call) -> Response | None:
        if call.parts == ["api", "v1", "repos", "internalAccelerationInfo"]:
            return ms_error(404, "no intra-cloud acceleration behind the shoal gateway")

        def routes(ref: ModelRef, rest: list[str]):
            if rest == []:
                return self._info(ref)
            if rest == ["repo", "files"]:
                return self._files(ref)
            return None
        return await ms_route(self.library, call, "models", routes)

    async def _info(self, ref: ModelRef) -> Response:
        await self.library.revision(ref)  # a model no source has is a 404, as on ModelScope
        owner, name = ref.model_id.split("/", 1)
        return ms_data({"Id": ref.model_id, "ModelId": ref.model_id, "Name": name, "Path": owner,
                        "Revision": ref.revision})

    async def _files(self, ref: ModelRef) -> Response:
        return ms_data({"Files": listing_entries(await self.library.revision(ref))})
