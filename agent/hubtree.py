"""A dataset as ModelScope's API describes it: its info and its file tree, as
``/api/v1/datasets/{id}`` and ``/api/v1/datasets/{id}/repo/tree`` answer.

The modelscope SDK lists a dataset with ``Recursive=True`` in pages (``PageNumber`` from 1,
``PageSize``; ``modelscope_hub/_legacy_api.py: list_dataset_files_paginated``) and, when
``MsDataset.load`` reads it with the ``datasets`` library, asks for one folder's children
(``Root=/``, ``Recursive=False``) and for a folder's whole subtree (``Root=data``). Pure: the
gateway and the local test hub both answer with it.
"""

from __future__ import annotations

MAX_PAGE_SIZE = 1000
DATASET_TYPE_GENERAL = 4  # modelscope.utils.constant.DatasetFormations.general: a repository of files


def dataset_info(owner: str, name: str, revision: str) -> dict:
    """The ``Data`` of a dataset's info. ``MsDataset.load`` reads ``Id`` and ``Type``
    (``compat/hub_api.py: get_dataset_id_and_type``) and builds later URLs from ``Id``
    (``datasets/{Id}/repo/tree``), so ``Id`` is OWNER/NAME; type 4 makes it read the files
    with the ``datasets`` library through the same endpoints."""
    return {"Id": f"{owner}/{name}", "Name": name, "Namespace": owner, "Owner": owner,
            "Type": DATASET_TYPE_GENERAL, "Revision": revision}


def tree_page(entries: list[dict], query: dict[str, list[str]]) -> list[dict]:
    """The page of ``entries`` (file entries with ``Path``, sorted) that ``query`` (parsed
    ``parse_qs``) asks for; folders appear as ``Type: tree`` entries in a non-recursive page."""
    folder = (query.get("Root") or ["/"])[0].strip("/")
    if folder:
        entries = [e for e in entries if str(e.get("Path", "")).startswith(folder + "/")]
    if (query.get("Recursive") or ["True"])[0].lower() == "false":
        depth = folder.count("/") + 1 if folder else 0
        children, folders = [], set()
        for e in entries:
            parts = str(e.get("Path", "")).split("/")
            if len(parts) == depth + 1:
                children.append(e)
            else:
                folders.add("/".join(parts[:depth + 1]))
        entries = children + [{"Name": f.rsplit("/", 1)[-1], "Path": f, "Type": "tree", "Size": 0}
                              for f in sorted(folders)]
    try:
        number = max(1, int((query.get("PageNumber") or ["1"])[0]))
        size = max(1, min(MAX_PAGE_SIZE, int((query.get("PageSize") or [str(MAX_PAGE_SIZE)])[0])))
    except ValueError:
        number, size = 1, MAX_PAGE_SIZE
    return entries[(number - 1) * size:number * size]
