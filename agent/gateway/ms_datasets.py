"""The ModelScope face for datasets: ``MsDataset.load``, ``snapshot_download(...,
repo_type="dataset")`` and ms-swift's ``--dataset`` through the agent.

Endpoints the SDK calls: ``/api/v1/datasets/{o}/{n}`` (the info ``MsDataset.load`` reads
``Id`` and ``Type`` from: ``compat/hub_api.py: get_dataset_id_and_type``), ``.../revisions``,
``.../repo/tree`` (paged with ``PageNumber``/``PageSize``, ``Root``, ``Recursive``:
``agent.hubtree``) and ``.../repo?Revision=&FilePath=`` (bytes, with ``Range``).
"""

from __future__ import annotations

from agent.gateway.ms_models import listing_entries, ms_data, ms_route
from agent.gateway.serve import Call, Library, Response
from agent.hubtree import dataset_info, tree_page
from agent.manifest import ModelRef, hub_repo


class ModelScopeDatasets:
    """See module docstring."""

    name = "modelscope-datasets"

    def __init__(self, library: Library):
        self.library = library

    async def route(self, call: Call) -> Response | None:
        def routes(ref: ModelRef, rest: list[str]):
            if rest == []:
                return self._info(ref)
            if rest == ["repo", "tree"]:
                return self._tree(ref, call)
            return None
        return await ms_route(self.library, call, "datasets", routes)

    async def _info(self, ref: ModelRef) -> Response:
        await self.library.revision(ref)
        owner, name = hub_repo(ref.model_id)[1].split("/", 1)
        return ms_data(dataset_info(owner, name, ref.revision))

    async def _tree(self, ref: ModelRef, call: Call) -> Response:
        entries = listing_entries(await self.library.revision(ref))
        return ms_data({"Files": tree_page(entries, call.query)})
