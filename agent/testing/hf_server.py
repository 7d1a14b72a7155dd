"""A Hugging Face–compatible hub on loopback, serving the endpoints ``huggingface_hub`` and
a mirror's downloaders call (what hf-mirror.com and the Hub itself answer).

Endpoints:
- ``GET /api/models/{owner}/{name}/revision/{revision}[?blobs=true]``  model info; with
  ``blobs``, each file's size, git blob id and, for LFS files, ``lfs.sha256``
- ``GET /api/models/{owner}/{name}``                                   the same, at ``main``
- ``GET /{owner}/{name}/resolve/{revision}/{path}``  a file: a small (non-LFS) file is served
  here; an LFS file answers ``302`` to ``/__cdn__/{sha256}``, as the Hub redirects to its
  CDN; both honour ``Range``
Errors are the Hub's: an unknown repo is ``404`` with ``X-Error-Code: RepoNotFound`` to a
caller with a token and ``401`` to one without (a private repo looks missing); a wrong
token is a plain ``401``; ``404`` with ``RevisionNotFound`` / ``EntryNotFound``. With
``token`` set, the hub is private: every request must carry it.
Control: ``POST /__shoal__/faults``, ``DELETE /__shoal__/faults``, ``GET /__shoal__/log``
(as ``agent.testing.hub_server``).

Files of ``lfs_threshold`` bytes or more are LFS files (the Hub's is 10 MB; tests use less).

Run standalone: ``python -m agent.testing.hf_server --model OWNER/NAME=DIR [--port 0]``;
it prints ``{"url": ...}`` on one line once it is listening.
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


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub lists as a file's ``blobId``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HfHubServer(ServedApp):
    """Serves model directories under the Hugging Face Hub's API. Thread-safe."""

    def __init__(self, *, port: int = 0, lfs_threshold: int = 1024 * 1024, token: str | None = None):
        self.faults = FaultPlan()
        self.lfs_threshold = lfs_threshold
        self.token = token  # when set, every request must carry it
        self._models: dict[str, dict[str, Path]] = {}
        self._sha_override: dict[tuple[str, str], str] = {}
        self._cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._server = LoopbackServer(self, port=port)

    def add_model(self, model_id: str, directory: str | os.PathLike, revision: str = "main") -> None:
        with self._lock:
            self._models.setdefault(model_id, {})[revision] = Path(directory)

    def lie_about(self, model_id: str, path: str, sha256: str) -> None:
        """List ``path`` with a wrong LFS digest (a hub that lies)."""
        with self._lock:
            self._sha_override[(model_id, path)] = sha256

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

    def _info(self, model_id: str, revision: str, root: Path, blobs: bool) -> dict:
        siblings = []
        for rel, path in self._files(root):
            entry: dict = {"rfilename": rel}
            if blobs:
                size = path.stat().st_size
                sha, blob = self._digests(path)
                entry.update(size=size, blobId=blob)
                if size >= self.lfs_threshold:
                    with self._lock:
                        sha = self._sha_override.get((model_id, rel), sha)
                    entry["lfs"] = {"size": size, "sha256": sha, "pointerSize": 134}
            siblings.append(entry)
        return {"_id": "local", "id": model_id, "modelId": model_id, "sha": hashlib.sha1(
                    f"{model_id}@{revision}".encode()).hexdigest(), "private": False, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}

    def _root(self, model_id: str, revision: str) -> Path | None:
        with self._lock:
            return self._models.get(model_id, {}).get(revision)

    def _known(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._models

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
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            model_id = f"{parts[2]}/{parts[3]}"
            if not self._known(model_id):
                return _json(respond, *missing)
            if len(parts) == 4:
                revision = "main"
            elif len(parts) == 6 and parts[4] == "revision":
                revision = parts[5]
            else:
                return _json(respond, 404, {"error": "not found"})
            root = self._root(model_id, revision)
            if root is None:
                return _json(respond, 404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
            return _json(respond, 200, self._info(model_id, revision, root, blobs))
        if path.startswith(CDN):
            return self._cdn(parts[-1], environ, respond, fault)
        if len(parts) >= 5 and parts[2] == "resolve":
            model_id, revision, rel = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if not self._known(model_id):
                return _json(respond, *missing)
            root = self._root(model_id, revision)
            if root is None:
                return _json(respond, 404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            target = (root / rel).resolve()
            if root.resolve() not in target.parents or not target.is_file():
                return _json(respond, 404, {"error": f"{rel} not found"}, "EntryNotFound")
            if target.stat().st_size >= self.lfs_threshold:
                sha, _ = self._digests(target)
                respond("302 Found", [("Location", f"{CDN}{sha}"), ("Content-Length", "0"),
                                      ("X-Linked-Size", str(target.stat().st_size)), ("X-Linked-ETag", f'"{sha}"')])
                return [b""]
            return self._bytes(target, environ, respond, fault)
        return _json(respond, 404, {"error": f"{path} not found"})

    def _cdn(self, sha: str, environ, respond, fault):
        with self._lock:
            roots = [root for revisions in self._models.values() for root in revisions.values()]
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
