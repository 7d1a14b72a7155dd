"""The ModelScope face for datasets: ``MsDataset.load``, ``snapshot_download(...,
repo_type="dataset")`` and ms-swift's ``--dataset`` through the agent.

Endpoints the SDK calls: ``/api/v1/datasets/{o}/{n}`` (the info ``MsDataset.load`` reads
``Id`` and ``Type`` from: ``compat/hub_api.py: get_dataset_id_and_type``), ``.../revisions``,
``.../repo/tree`` (paged with ``PageNumber``/``PageSize``, ``Root``, ``Recursive``:
``agent.hubtree``) and ``.../repo?Revision=&FilePath=`` (bytes, with ``Range``).
"""

from __future__ import annotations

from agent.errors import UsageError
from agent.gateway.ms_models import listing_entries, ms_answer, ms_data, ms_error, ms_ref
from agent.gateway.serve import Call, Library, Response
from agent.hubtree import dataset_info, tree_page
from agent.manifest import ModelRef


class ModelScopeDatasets:
    """See module docstring."""

    name = "modelscope-datasets"

    def __init__(self, library: Library):
        self.library = library

    async def route(self, call: Call) -> Response | None:
        parts = call.parts
        if len(parts) < 5 or parts[0] not in ("api", "openapi") or parts[1] != "v1" or parts[2] != "datasets":
            return None
        if call.method == "POST":
            return ms_error(405, "the shoal gateway is read-only")
        try:
            ref = ms_ref(call, dataset=True)
        except UsageError as e:
            return ms_error(400, str(e))

        def routes(rest: list[str]):
            if rest == []:
                return self._info(ref, parts[3], parts[4])
            if rest == ["repo", "tree"]:
                return self._tree(ref, call)
            return None
        answer = await ms_answer(self.library, call, ref, parts[5:], True, routes)
        return answer if answer is not None else ms_error(404, f"{call.path} is not an endpoint of the shoal gateway")

    async def _info(self, ref: ModelRef, owner: str, name: str) -> Response:
        await self.library.revision(ref)
        return ms_data(dataset_info(owner, name, ref.revision))

    async def _tree(self, ref: ModelRef, call: Call) -> Response:
        entries = listing_entries(await self.library.revision(ref))
        return ms_data({"Files": tree_page(entries, call.query)})
