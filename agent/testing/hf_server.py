"""A Hugging Face–compatible hub on loopback, serving the endpoints ``huggingface_hub`` and
a mirror's downloaders call (what hf-mirror.com and the Hub itself answer), for models and
datasets.

Endpoints (``{kind}`` is ``models`` or ``datasets``):
- ``GET /api/{kind}/{owner}/{name}[/revision/{revision}][?blobs=true]``  repo info: ``sha``
  (a commit id), ``siblings``; with ``blobs``, each file's size, git blob id and, for LFS
  files, ``lfs.sha256``
- ``GET /api/{kind}/{owner}/{name}/tree/{revision}[/{path}][?recursive=true]``  the tree
- ``POST /api/{kind}/{owner}/{name}/paths-info/{revision}``  (form ``paths=``) those entries
- ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{path}`` (datasets: ``/datasets/...``): a
  small (non-LFS) file is served here with ``ETag`` (its git blob id) and ``X-Repo-Commit``;
  an LFS file answers ``302`` to ``http://localhost:PORT/__cdn__/{sha256}`` with
  ``X-Linked-Etag`` (the SHA-256), ``X-Linked-Size`` and ``X-Repo-Commit``, as the Hub
  redirects to its CDN on another host; both honour ``Range``. A revision may be named by
  its commit id.
Errors are the Hub's: an unknown repo is ``404`` with ``X-Error-Code: RepoNotFound`` to a
caller with a token and ``401`` to one without (a private repo looks missing); a wrong
token is a plain ``401``; ``404`` with ``RevisionNotFound`` / ``EntryNotFound``. With
``token`` set, the hub is private: every request must carry it.
Control: ``POST /__shoal__/faults``, ``DELETE /__shoal__/faults``, ``GET /__shoal__/log``
(as ``agent.testing.hub_server``).

Files of ``lfs_threshold`` bytes or more are LFS files (the Hub's is 10 MB; tests use less).

Run standalone: ``python -m agent.testing.hf_server --model OWNER/NAME=DIR [--dataset
OWNER/NAME=DIR] [--port 0]``; it prints ``{"url": ...}`` on one line once it is listening.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote

from agent.testing.faults import FaultPlan, LoggedRequest
from agent.testing.http import LoopbackServer, ServedApp, fault_control, serve_file, serve_models_main

CONTROL = "/__shoal__/"
CDN = "/__cdn__/"


def _json(respond, status: int, payload: object, error_code: str | None = None, error_message: str | None = None):
    body = json.dumps(payload).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if error_code:
        headers.append(("X-Error-Code", error_code))
    if error_message:
        headers.append(("X-Error-Message", error_message))
    respond(f"{status} {'OK' if status < 400 else 'Error'}", headers)
    return [body]


def _with_headers(respond, extra: list[tuple[str, str]]):
    """``respond`` that adds ``extra`` headers to a success."""
    def wrapped(status_line, headers, exc_info=None):
        return respond(status_line, list(headers) + (extra if status_line[0] == "2" else []), exc_info)
    return wrapped


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub lists as a file's ``blobId``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HfHubServer(ServedApp):
    """Serves model directories under the Hugging Face Hub's API. Thread-safe."""

    def __init__(self, *, port: int = 0, lfs_threshold: int = 1024 * 1024, token: str | None = None):
        self.faults = FaultPlan()
        self.lfs_threshold = lfs_threshold
        self.token = token  # when set, every request must carry it
        self._repos: dict[tuple[str, str], dict[str, Path]] = {}  # (kind, repo id) -> revision -> folder
        self._sha_override: dict[tuple[str, str], str] = {}
        self._cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._server = LoopbackServer(self, port=port)

    def add_model(self, model_id: str, directory: str | os.PathLike, revision: str = "main") -> None:
        with self._lock:
            self._repos.setdefault(("models", model_id), {})[revision] = Path(directory)

    def add_dataset(self, dataset_id: str, directory: str | os.PathLike, revision: str = "main") -> None:
        with self._lock:
            self._repos.setdefault(("datasets", dataset_id), {})[revision] = Path(directory)

    def lie_about(self, model_id: str, path: str, sha256: str) -> None:
        """List ``path`` with a wrong LFS digest (a hub that lies)."""
        with self._lock:
            self._sha_override[(model_id, path)] = sha256

    @staticmethod
    def commit(repo_id: str, revision: str) -> str:
        """The commit id this hub gives ``revision`` of ``repo_id``."""
        return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    # ---------------------------------------------------------------- helpers

    def _digests(self, path: Path) -> tuple[str, str]:
        """(sha256, git blob id) of a file, cached by size and mtime."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
        if cached:
            return cached
        sha, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
        with open(path, "rb") as f:
            while block := f.read(4 * 1024 * 1024):
                sha.update(block)
                blob.update(block)
        result = (sha.hexdigest(), blob.hexdigest())
        with self._lock:
            self._cache[key] = result
        return result

    def _files(self, root: Path) -> list[tuple[str, Path]]:
        return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]

    def _entry(self, repo_id: str, rel: str, path: Path) -> dict:
        """A file as the tree and paths-info list it."""
        size = path.stat().st_size
        sha, blob = self._digests(path)
        entry: dict = {"type": "file", "oid": blob, "size": size, "path": rel}
        if size >= self.lfs_threshold:
            with self._lock:
                sha = self._sha_override.get((repo_id, rel), sha)
            entry["lfs"] = {"oid": sha, "size": size, "pointerSize": 134}
        return entry

    def _info(self, kind: str, repo_id: str, revision: str, root: Path, blobs: bool) -> dict:
        siblings = []
        for rel, path in self._files(root):
            entry: dict = {"rfilename": rel}
            if blobs:
                listed = self._entry(repo_id, rel, path)
                entry.update(size=listed["size"], blobId=listed["oid"])
                if "lfs" in listed:
                    entry["lfs"] = {"size": listed["size"], "sha256": listed["lfs"]["oid"], "pointerSize": 134}
            siblings.append(entry)
        commit = self.commit(repo_id, revision)
        info = {"_id": "local", "id": repo_id, "sha": commit, "private": False, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z"}
        if kind == "models":
            info["modelId"] = repo_id
        return info

    def _revision(self, kind: str, repo_id: str, revision: str) -> tuple[str, Path] | None:
        """(revision name, folder) of a revision named by name or by commit id."""
        with self._lock:
            revisions = dict(self._repos.get((kind, repo_id), {}))
        if revision in revisions:
            return revision, revisions[revision]
        return next(((name, root) for name, root in revisions.items() if self.commit(repo_id, name) == revision),
                    None)

    def _known(self, kind: str, repo_id: str) -> bool:
        with self._lock:
            return (kind, repo_id) in self._repos
    # -------------------------------------------------------------------- wsgi

    def __call__(self, environ, start_response):
        path = unquote(environ.get("PATH_INFO", ""))
        method = environ["REQUEST_METHOD"]
        if path.startswith(CONTROL):
            return self._control(environ, start_response, path[len(CONTROL):], method)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        target = path + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        is_data = "/resolve/" in path or path.startswith(CDN)
        fault = self.faults.take(target, data_request=is_data)
        status_holder: dict = {}

        def respond(status_line, headers, exc_info=None):
            status_holder["status"] = int(status_line.split()[0])
            return start_response(status_line, headers, exc_info)

        try:
            auth = environ.get("HTTP_AUTHORIZATION")
            if path.startswith(CDN):  # a CDN URL is signed on the Hub: no token goes there
                return self._route(path, query, environ, respond, fault, True)
            if self.token and auth is None:  # a private repo looks missing to a stranger, as on the Hub
                return _json(respond, 401, {"error": "Repository not found"}, "RepoNotFound")
            if self.token and auth != f"Bearer {self.token}":
                return _json(respond, 401, {"error": "Invalid credentials in Authorization header"},
                             error_message="Invalid credentials in Authorization header")
            authenticated = auth is not None
            if fault and fault.kind == "slow" and not is_data:
                time.sleep(fault.delay)
            if fault and fault.kind == "status":
                return _json(respond, fault.status, {"error": fault.code or "fault injected"})
            return self._route(path, query, environ, respond, fault if is_data else None, authenticated)
        finally:
            self.faults.record(LoggedRequest(method, target, environ.get("HTTP_RANGE"),
                                             status_holder.get("status", 0), fault.kind if fault else None))

    def _route(self, path, query, environ, respond, fault, authenticated: bool):
        # A missing repo: 404 to a caller with a token, 401 to anyone else (the Hub does not
        # tell strangers whether a private repo exists).
        missing = (404 if authenticated else 401, {"error": "Repository not found"}, "RepoNotFound")
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            kind, repo_id, rest = parts[1], f"{parts[2]}/{parts[3]}", parts[4:]
            if not self._known(kind, repo_id):
                return _json(respond, *missing)
            if rest and rest[0] not in ("revision", "tree", "paths-info") or len(rest) == 1:
                return _json(respond, 404, {"error": "not found"})
            found = self._revision(kind, repo_id, rest[1] if rest else "main")
            if found is None:
                return _json(respond, 404, {"error": f"Invalid rev id: {rest[1]}"}, "RevisionNotFound")
            name, root = found
            if not rest or rest[0] == "revision":
                blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
                return _json(respond, 200, self._info(kind, repo_id, name, root, blobs))
            if rest[0] == "tree":
                return self._tree(respond, repo_id, root, "/".join(rest[2:]),
                                  (query.get("recursive") or ["false"])[0].lower() == "true")
            length = int(environ.get("CONTENT_LENGTH") or 0)
            asked = parse_qs(environ["wsgi.input"].read(min(length, 1 << 20)).decode()).get("paths", [])
            files = dict(self._files(root))
            return _json(respond, 200, [self._entry(repo_id, p, files[p]) for p in asked if p in files])
        if path.startswith(CDN):
            return self._cdn(parts[-1], environ, respond, fault)
        kind = "models"
        if parts[:1] == ["datasets"]:
            kind, parts = "datasets", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, rel = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if not self._known(kind, repo_id):
                return _json(respond, *missing)
            found = self._revision(kind, repo_id, revision)
            if found is None:
                return _json(respond, 404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            commit = self.commit(repo_id, found[0])
            root = found[1]
            target = (root / rel).resolve()
            if root.resolve() not in target.parents or not target.is_file():
                respond("404 Not Found", [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit),
                                          ("Content-Type", "application/json")])
                return [json.dumps({"error": f"{rel} not found"}).encode()]
            entry = self._entry(repo_id, rel, target)
            if "lfs" in entry:
                sha, real = entry["lfs"]["oid"], self._digests(target)[0]  # (a lying hub lists another sha)
                respond("302 Found", [("Location", f"http://localhost:{self._server.port}{CDN}{real}"),
                                      ("Content-Length", "0"), ("ETag", f'"{entry["oid"]}"'),
                                      ("X-Linked-Size", str(entry["size"])), ("X-Linked-Etag", f'"{sha}"'),
                                      ("X-Repo-Commit", commit)])
                return [b""]
            return serve_file(str(target), target.stat().st_size, environ, _with_headers(
                respond, [("ETag", f'"{entry["oid"]}"'), ("X-Repo-Commit", commit)]), fault)
        return _json(respond, 404, {"error": f"{path} not found"})

    def _tree(self, respond, repo_id: str, root: Path, folder: str, recursive: bool):
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        files, folders = [], set()
        for rel, path in self._files(root):
            if not rel.startswith(prefix):
                continue
            below = rel[len(prefix):].split("/")
            folders.update(prefix + "/".join(below[:d]) for d in range(1, len(below)) if recursive or d == 1)
            if recursive or len(below) == 1:
                files.append(self._entry(repo_id, rel, path))
        if prefix and not files and not folders:
            return _json(respond, 404, {"error": f"{folder} not found"}, "EntryNotFound")
        return _json(respond, 200, [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0,
                                     "path": f} for f in sorted(folders)] + files)

    def _cdn(self, sha: str, environ, respond, fault):
        with self._lock:
            roots = [root for revisions in self._repos.values() for root in revisions.values()]
        for root in roots:
            for _, path in self._files(root):
                if path.stat().st_size >= self.lfs_threshold and self._digests(path)[0] == sha:
                    return self._bytes(path, environ, respond, fault)
        return _json(respond, 404, {"error": "no such object"})

    def _bytes(self, target: Path, environ, respond, fault):
        return serve_file(str(target), target.stat().st_size, environ, respond, fault)

    def _control(self, environ, respond, what, method):
        answer = fault_control(self.faults, environ, respond, what, method, _json)
        return answer if answer is not None else _json(respond, 404, {"error": what})


def main(argv: list[str] | None = None) -> int:
    return serve_models_main(HfHubServer, __doc__.splitlines()[0], "main", argv)


if __name__ == "__main__":
    sys.exit(main())
