"""The Hugging Face Hub face: ``HF_ENDPOINT=http://127.0.0.1:PORT`` and unmodified
``huggingface_hub`` (``hf download``, ``snapshot_download``, ``hf_hub_download``),
``transformers``/``diffusers`` ``from_pretrained``, ``datasets.load_dataset``, vLLM and
the rest of the tools that honour ``HF_ENDPOINT`` download through the agent.

What ``huggingface_hub`` 1.33 asks and checks (read in its ``hf_api.py``,
``file_download.py``, ``_snapshot_download.py``, ``utils/_http.py``):
- ``GET /api/{models|datasets}/{repo}[/revision/{rev}]`` (``HfApi.model_info`` /
  ``dataset_info``; ``repo_info`` in ``snapshot_download``): ``sha`` must be there, it is the
  commit the files are then asked at; ``siblings``, with ``?blobs=true``
  (``files_metadata``) each file's ``size``, ``blobId`` and ``lfs.sha256``.
- ``GET /api/{kind}/{repo}/tree/{rev}[/{path}]?recursive=`` (``list_repo_tree``, which
  ``snapshot_download`` lists a commit with) and ``POST .../paths-info/{rev}``
  (``get_paths_info``, ``HfFileSystem``): ``type``, ``path``, ``size``, ``oid``, ``lfs``.
- ``HEAD /{repo}/resolve/{rev}/{path}`` (``get_hf_file_metadata``): ``X-Repo-Commit`` (its
  absence is a ``FileMetadataError``), ``X-Linked-Etag`` or ``ETag`` (the cache's blob name;
  none is an error), ``X-Linked-Size`` or ``Content-Length``. Then ``GET`` with ``Range`` to
  resume; ``http_get`` checks the size it received against the one the HEAD said.
- errors by ``X-Error-Code`` (``hf_raise_for_status``): ``RepoNotFound`` →
  ``RepositoryNotFoundError``, ``RevisionNotFound``, ``EntryNotFound`` →
  ``EntryNotFoundError``.

Every file is described as the Hub describes an LFS file: ``ETag`` = its SHA-256 (the Hub's
``X-Linked-Etag`` for LFS, so a tool's existing Hugging Face cache already holds the same
blob names), ``oid`` = the git id of its LFS pointer. A revision's ``sha`` is the gateway's
commit id (``serve.commit_of``); a request at that commit finds the same revision again.

Names: a Hugging Face id is the shoal id of the same name unless ``huggingface.names`` maps
it (``SHOAL_HF_NAMES="Qwen/Qwen2.5-0.5B-Instruct=qwen/Qwen2.5-0.5B-Instruct"``: the same
model on ModelScope, one cache entry for both faces); datasets are ``datasets/OWNER/NAME``
on both sides. An id without an owner (``gpt2``) must be mapped. The Hub's ``main`` is
shoal's default revision ``master``; the listing comes through the same pull path as every
request: the cache, the room, the mirror, then the origins (the Hugging Face origin where
``HF_ENDPOINT`` is set in the agent's settings).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from urllib.parse import parse_qs

from agent.config import hf_name_map
from agent.errors import ManifestError, NotFound, ShoalError, UsageError
from agent.gateway.serve import Call, Library, MissingFile, Response, Revision
from agent.manifest import ModelRef, check_model_id, check_revision

COMMIT = re.compile(r"[0-9a-f]{40}")
KINDS = {"models": "model", "datasets": "dataset"}
API_ROUTES = ("revision", "tree", "paths-info")
EPOCH = datetime.fromtimestamp(0, timezone.utc).isoformat().replace("+00:00", ".000Z")
MAX_PATHS = 1000  # paths asked in one paths-info request


def lfs_pointer(sha256_hex: str, size: int) -> bytes:
    """The git LFS pointer file the Hub keeps in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex}\nsize {size}\n".encode()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _error(status: int, code: str | None, message: str) -> Response:
    headers = [("Content-Type", "application/json"), ("X-Error-Message", message[:500].encode(
        "ascii", "replace").decode())]
    if code:
        headers.append(("X-Error-Code", code))
    return Response(status, headers, json.dumps({"error": message}).encode())


def _json(payload: object) -> Response:
    return Response(200, [("Content-Type", "application/json")], json.dumps(payload).encode())


class HubFace:
    """See module docstring."""

    name = "huggingface"

    def __init__(self, library: Library, settings):
        self.library = library
        self.names = hf_name_map(settings.hf_names)

    # ------------------------------------------------------------------ routing

    def _split(self, parts: list[str]) -> tuple[str, str, list[str]] | None:
        """(kind, Hugging Face id, the rest) of an API path after ``/api``, or of a file path."""
        kind = "models"
        if parts and parts[0] == "datasets":
            kind, parts = "datasets", parts[1:]
        prefix = "datasets/" if kind == "datasets" else ""
        if len(parts) >= 1 and prefix + parts[0] in self.names and (len(parts) == 1 or parts[1] in
                                                                     API_ROUTES + ("resolve",)):
            return kind, parts[0], parts[1:]
        if len(parts) >= 2:
            return kind, f"{parts[0]}/{parts[1]}", parts[2:]
        return None

    async def route(self, call: Call) -> Response | None:
        parts = call.parts
        if parts[:1] == ["api"] and parts[1:2] and parts[1] in KINDS:
            split = self._split(["datasets"] + parts[2:] if parts[1] == "datasets" else parts[2:])
            if split is None:
                return None
            kind, hf_id, rest = split
            return await self._answer(call, kind, hf_id, lambda: self._api(call, kind, hf_id, rest))
        split = self._split(parts)
        if split is None or split[2][:1] != ["resolve"] or len(split[2]) < 3:
            return None
        kind, hf_id, rest = split
        return await self._answer(call, kind, hf_id, lambda: self._resolve(call, kind, hf_id, rest[1],
                                                                           "/".join(rest[2:])))

    async def _answer(self, call: Call, kind: str, hf_id: str, handle) -> Response:
        """``handle()``'s answer, or the Hub's error for what the library raised."""
        try:
            return await handle()
        except MissingFile as e:
            return _error(404, "EntryNotFound", str(e))
        except _RevisionNotFound as e:
            return _error(404, "RevisionNotFound", str(e))
        except (NotFound, UsageError, ManifestError) as e:
            # The Hub answers a repository it does not show this caller with RepoNotFound.
            return _error(404, "RepoNotFound", str(e))

    def _ref(self, kind: str, hf_id: str, revision: str) -> ModelRef:
        key = ("datasets/" if kind == "datasets" else "") + hf_id
        shoal_id = self.names.get(key)
        if shoal_id is None:
            if "/" not in hf_id:
                raise NotFound(f"{key} has no owner: shoal names repositories OWNER/NAME; map it in the agent's "
                               f"settings (huggingface.names = {{\"{key}\" = \"OWNER/NAME\"}})")
            shoal_id = check_model_id(key)
        try:
            return ModelRef(shoal_id, check_revision("master" if revision == "main" else revision))
        except UsageError as e:
            raise _RevisionNotFound(f"revision {revision!r} of {hf_id}: {e}") from None

    async def _revision(self, kind: str, hf_id: str, revision: str) -> Revision:
        """The revision a Hugging Face URL names: a commit id this gateway gave, or a branch or tag."""
        ref = self._ref(kind, hf_id, revision)
        if COMMIT.fullmatch(revision):
            known = await self.library.find_commit(ref.model_id, revision)
            if known is not None:
                ref = known
        try:
            return await self.library.revision(ref)
        except NotFound as e:
            if ref.revision == "master":
                raise
            try:  # the Hub tells a missing revision of a repository it has from a missing repository
                await self.library.revision(ModelRef(ref.model_id, "master"))
            except ShoalError:
                raise e from None
            raise _RevisionNotFound(f"{hf_id} has no revision {revision}: {e}") from None

    # ------------------------------------------------------------------ the API

    async def _api(self, call: Call, kind: str, hf_id: str, rest: list[str]) -> Response:
        if call.method == "POST" and (len(rest) != 2 or rest[0] != "paths-info"):
            return _error(405, None, "the shoal gateway is read-only")
        if rest == []:
            return _json(self._info(kind, hf_id, await self._revision(kind, hf_id, "main"), call))
        if len(rest) == 2 and rest[0] == "revision":
            return _json(self._info(kind, hf_id, await self._revision(kind, hf_id, rest[1]), call))
        if len(rest) >= 2 and rest[0] == "tree":
            revision = await self._revision(kind, hf_id, rest[1])
            return _json(_tree(revision, "/".join(rest[2:]), call.arg("recursive", "false").lower() == "true"))
        if len(rest) == 2 and rest[0] == "paths-info" and call.method == "POST":
            revision = await self._revision(kind, hf_id, rest[1])
            return _json(_paths_info(revision, call.body, call.headers.get("content-type", "")))
        return _error(404, None, f"{call.path} is not an endpoint of the shoal gateway")

    def _info(self, kind: str, hf_id: str, revision: Revision, call: Call) -> dict:
        blobs = call.arg("blobs", "false").lower() == "true"
        siblings = []
        for path, size, sha in revision.files:
            sibling: dict = {"rfilename": path}
            if blobs:
                pointer = lfs_pointer(sha.hex(), size)
                sibling.update(size=size, blobId=git_blob_id(pointer),
                               lfs={"size": size, "sha256": sha.hex(), "pointerSize": len(pointer)})
            siblings.append(sibling)
        info = {"_id": revision.commit, "id": hf_id, "author": hf_id.split("/")[0] if "/" in hf_id else None,
                "sha": revision.commit, "lastModified": EPOCH, "createdAt": EPOCH, "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(size for _, size, _ in revision.files)}
        if kind == "models":
            info["modelId"] = hf_id
        else:
            info["cardData"] = {}
        return info

    # ------------------------------------------------------------------ files

    async def _resolve(self, call: Call, kind: str, hf_id: str, rev: str, path: str) -> Response:
        if call.method == "POST":
            return _error(405, None, "the shoal gateway is read-only")
        revision = await self._revision(kind, hf_id, rev)
        _, size, sha = revision.entry(path)
        response = await self.library.file(revision.ref, path, call)
        etag = f'"{sha.hex()}"'
        return (response.header("ETag", etag).header("X-Linked-Etag", etag).header("X-Linked-Size", str(size))
                .header("X-Repo-Commit", revision.commit))


class _RevisionNotFound(ShoalError):
    """A revision no hub could hold (a name with characters shoal's revisions do not take)."""


def _file_entry(path: str, size: int, sha: bytes) -> dict:
    pointer = lfs_pointer(sha.hex(), size)
    return {"type": "file", "oid": git_blob_id(pointer), "size": size, "path": path,
            "lfs": {"oid": sha.hex(), "size": size, "pointerSize": len(pointer)}}


def _folder_entry(revision: Revision, path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(f"{revision.commit}:{path}".encode()).hexdigest(), "size": 0,
            "path": path}


def _tree(revision: Revision, folder: str, recursive: bool) -> list[dict]:
    """``list_repo_tree``'s answer: what ``folder`` ('' for the top) holds, files and folders."""
    folder = folder.strip("/")
    prefix = folder + "/" if folder else ""
    files, folders = [], set()
    for path, size, sha in revision.files:
        if not path.startswith(prefix):
            continue
        below = path[len(prefix):].split("/")
        for depth in range(1, len(below)):
            if recursive or depth == 1:
                folders.add(prefix + "/".join(below[:depth]))
        if recursive or len(below) == 1:
            files.append(_file_entry(path, size, sha))
    if folder and not files and not folders:
        raise MissingFile(f"{folder} is not a folder of {revision.ref}")
    return [_folder_entry(revision, f) for f in sorted(folders)] + files


def _paths_info(revision: Revision, body: bytes, content_type: str) -> list[dict]:
    """``get_paths_info``'s answer: each asked path that is a file or a folder of the revision."""
    if "json" in content_type:
        try:
            asked = json.loads(body or b"{}").get("paths") or []
        except (ValueError, AttributeError):
            raise UsageError("paths-info: the body is not a JSON object with paths") from None
    else:
        asked = parse_qs(body.decode("latin-1")).get("paths", [])
    if not isinstance(asked, list) or len(asked) > MAX_PATHS:
        raise UsageError(f"paths-info: at most {MAX_PATHS} paths in a list")
    files = {path: (size, sha) for path, size, sha in revision.files}
    folders = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    answer = []
    for path in asked:
        path = str(path).strip("/")
        if path in files:
            answer.append(_file_entry(path, *files[path]))
        elif path in folders:
            answer.append(_folder_entry(revision, path))
    return answer
