"""An OSS-compatible server on loopback: moto's S3 backend with OSS's differences bridged.

What the bridge does, and why (seen with oss2 2.19 against moto 5.2):
- every request goes to moto's S3 app, whatever the ``Authorization`` header says
  (moto's own dispatcher guesses the service from it and fails on OSS signatures);
  it is replaced by a fixed S3 one, since moto checks no signature anyway;
- ``x-oss-meta-*``/``x-oss-copy-source`` request headers become ``x-amz-*`` and response
  ``x-amz-meta-*`` become ``x-oss-meta-*``; every response gets ``x-oss-request-id``;
- the S3 XML namespace is stripped (oss2 parses without one) and ``Contents/Type`` added;
- oss2's empty ``continuation-token=`` query parameter is dropped;
- multipart parts may be as small as 100 KiB (``S3_UPLOAD_PART_MIN_SIZE``);
- object GETs are served straight from moto's stored buffer by range: moto itself copies
  the whole object for every ranged GET, which would make a 1 GiB benchmark measure moto.
Faults (see ``agent.testing.faults``) apply before any of that.

What real OSS does that labs meet, played here (``sts``, ``storage``):
- **STS tokens that expire**: ``/__shoal__/sts/credentials`` issues a token as an
  ``ALIBABA_CLOUD_CREDENTIALS_URI`` endpoint answers (the credentials chain reads it);
  a request carrying a token (``x-oss-security-token``) the server did not issue gets 403
  ``InvalidSecurityToken``, one past its life 403 ``SecurityTokenExpired``. The life it
  enforces and the expiry it advertises are set apart (``sts.configure``), so a token can
  die earlier than it said, as revoked ones do.
- **Storage classes**: an object in Archive / ColdArchive / DeepColdArchive answers GET
  with 403 ``InvalidObjectState`` until a restore was requested (``POST ?restore``) and
  ``storage.restore_delay`` seconds have passed; HEAD shows ``x-oss-storage-class`` and
  ``x-oss-restore``. Restore requests are recorded.
- **Lifecycle rules**: ``PUT/GET/DELETE ?lifecycle`` keep the XML as sent
  (``lifecycles``); nothing is moved by them.

Run standalone: ``python -m agent.testing.oss_server [--port 0]``; it prints
``{"url": ...}`` once listening. Control endpoints as in ``hub_server``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import secrets
import threading
import time
import uuid
from dataclasses import asdict
from email.utils import formatdate
from urllib.parse import parse_qs, unquote

os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(100 * 1024))
os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(8 * 1024 * 1024))

from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.moto_server.werkzeug_app import create_backend_app  # noqa: E402
from moto.s3.models import s3_backends  # noqa: E402

from agent.testing.faults import Fault, FaultPlan, LoggedRequest  # noqa: E402
from agent.testing.http import (LoopbackServer, ServedApp, body_blocks, parse_range,  # noqa: E402
                                serve_until_interrupted)

CONTROL = "/__shoal__/"
_FAKE_S3_AUTH = ("AWS4-HMAC-SHA256 Credential=shoal/20260101/us-east-1/s3/aws4_request, "
                 "SignedHeaders=host, Signature=0")
_NS = re.compile(rb'\s+xmlns="http://s3\.amazonaws\.com/doc/2006-03-01/?"')

_app_lock = threading.Lock()
_s3_app = None


def _moto_s3_app():
    global _s3_app
    with _app_lock:
        if _s3_app is None:
            _s3_app = create_backend_app("s3")
        return _s3_app


def _backend():
    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def _oss_error(status: int, code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{uuid.uuid4().hex}</RequestId>"
            f"<HostId>127.0.0.1</HostId></Error>").encode()


class StsTokens:
    """Tokens this server issued, and how long each lives (module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> when it dies (monotonic)
        self.ttl = 3600.0  # the life the server enforces
        self.advertised = 3600.0  # the life the Expiration field says
        self.issued = 0

    def configure(self, *, ttl: float, advertised: float | None = None) -> None:
        with self._lock:
            self.ttl, self.advertised = ttl, ttl if advertised is None else advertised

    def issue(self) -> dict:
        token = "sts-" + secrets.token_hex(16)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.ttl
            self.issued += 1
            advertised = self.advertised
        return {"Code": "Success", "AccessKeyId": "STS." + secrets.token_hex(8),
                "AccessKeySecret": secrets.token_hex(16), "SecurityToken": token,
                "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + advertised)),
                "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def check(self, token: str) -> str | None:
        """The OSS error code for ``token``, or None when it is good."""
        with self._lock:
            dies = self._tokens.get(token)
        if dies is None:
            return "InvalidSecurityToken"
        return "SecurityTokenExpired" if time.monotonic() >= dies else None


ARCHIVED = ("Archive", "ColdArchive", "DeepColdArchive")


class StorageClasses:
    """Each object's storage class and restore state (module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict] = {}
        self.restore_delay = 2.0
        self.restores: list[dict] = []  # every restore request: bucket, key, tier, days

    def set(self, bucket: str, key: str, storage_class: str) -> None:
        with self._lock:
            self._objects[(bucket, key)] = {"class": storage_class, "ready_at": None}

    def state(self, bucket: str, key: str) -> dict:
        with self._lock:
            return dict(self._objects.get((bucket, key)) or {"class": "Standard", "ready_at": None})

    def readable(self, bucket: str, key: str) -> bool:
        state = self.state(bucket, key)
        return state["class"] not in ARCHIVED or (state["ready_at"] is not None
                                                  and time.monotonic() >= state["ready_at"])

    def restore(self, bucket: str, key: str, tier: str | None, days: int | None) -> int:
        """The HTTP status OSS answers a restore request with."""
        with self._lock:
            state = self._objects.get((bucket, key))
            if state is None or state["class"] not in ARCHIVED:
                return 400
            self.restores.append({"bucket": bucket, "key": key, "tier": tier, "days": days})
            if state["ready_at"] is not None:
                return 409 if time.monotonic() < state["ready_at"] else 200
            state["ready_at"] = time.monotonic() + self.restore_delay
            return 202

    def headers(self, bucket: str, key: str) -> list[tuple[str, str]]:
        state = self.state(bucket, key)
        out = [("x-oss-storage-class", state["class"])]
        if state["class"] in ARCHIVED and state["ready_at"] is not None:
            ongoing = time.monotonic() < state["ready_at"]
            out.append(("x-oss-restore", 'ongoing-request="true"' if ongoing else
                        'ongoing-request="false", expiry-date="' + formatdate(time.time() + 86400, usegmt=True) + '"'))
        return out


class OssServer(ServedApp):
    """See module docstring. Buckets live in moto's process-wide backend."""

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1"):
        self.faults = FaultPlan()
        self.sts = StsTokens()
        self.storage = StorageClasses()
        self.lifecycles: dict[str, str] = {}  # bucket -> the lifecycle XML last put
        self._server = LoopbackServer(self, host=host, port=port)

    def reset(self) -> None:
        """No faults, no issued tokens, every object Standard (between tests)."""
        self.faults.clear()
        self.faults.clear_log()
        self.sts = StsTokens()
        self.storage = StorageClasses()
        self.lifecycles = {}

    def _refuse(self, respond, status: int, code: str, message: str):
        body = _oss_error(status, code, message)
        respond(f"{status} Refused", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def create_bucket(self, name: str) -> None:
        _backend().create_bucket(name, "us-east-1")

    # -------------------------------------------------------------------- wsgi

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        rng = environ.get("HTTP_RANGE")
        if path.startswith(CONTROL):
            return self._control(environ, start_response, path[len(CONTROL):], method)
        target = path + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        # An object's bytes; a sub-resource of it (?tagging, ?acl, ...) goes to moto.
        subresource = bool(set(parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True))
                           & {"tagging", "acl", "symlink", "objectMeta", "uploadId", "uploads", "restore"})
        is_data = method == "GET" and not subresource and self._object(path) is not None
        fault = self.faults.take(target, data_request=is_data)
        status_holder = {}
        request_id = uuid.uuid4().hex.upper()[:24]

        def respond(status_line, headers, exc_info=None):
            status_holder["status"] = int(status_line.split()[0])
            out = []
            for name, value in headers:
                lower = name.lower()
                if lower.startswith("x-amz-meta-"):
                    name = "x-oss-meta-" + name[len("x-amz-meta-"):]
                elif lower in ("x-amz-request-id", "x-amz-id-2"):
                    continue
                out.append((name, value))
            out.append(("x-oss-request-id", request_id))
            return start_response(status_line, out, exc_info)

        try:
            token = environ.get("HTTP_X_OSS_SECURITY_TOKEN") or parse_qs(environ.get("QUERY_STRING", "")).get(
                "security-token", [None])[0]
            refused = self.sts.check(token) if token else None
            if refused:
                return self._refuse(respond, 403, refused, "The security token you provided is not valid now.")
            bucket_key = self._bucket_key(path)
            query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            if bucket_key and method == "POST" and "restore" in query:
                return self._restore(environ, respond, *bucket_key)
            if bucket_key is None and "lifecycle" in query:
                return self._lifecycle(environ, respond, path.strip("/"), method)
            if is_data and not self.storage.readable(*bucket_key):
                return self._refuse(respond, 403, "InvalidObjectState", "The operation is not valid for the "
                                    "object's state (archived: restore it first)")
            if fault and fault.kind == "slow" and not is_data:
                import time
                time.sleep(fault.delay)
            if fault and fault.kind == "status":
                body = _oss_error(fault.status, fault.code or "InternalError", "fault injected")
                respond(f"{fault.status} Fault", [("Content-Type", "application/xml"),
                                                  ("Content-Length", str(len(body)))])
                return [body]
            if is_data:
                return self._get_object(environ, respond, fault)
            return self._to_moto(environ, respond)
        finally:
            self.faults.record(LoggedRequest(method, target, rng, status_holder.get("status", 0),
                                             fault.kind if fault else None))

    @staticmethod
    def _bucket_key(path: str) -> tuple[str, str] | None:
        parts = path.lstrip("/").split("/", 1)
        if len(parts) != 2 or not parts[1]:
            return None
        return unquote(parts[0]), unquote(parts[1])

    def _restore(self, environ, respond, bucket: str, key: str):
        length = min(int(environ.get("CONTENT_LENGTH") or 0), 1 << 16)
        body = environ["wsgi.input"].read(length).decode(errors="replace") if length else ""
        tier = re.search(r"<Tier>(\w+)</Tier>", body)
        days = re.search(r"<Days>(\d+)</Days>", body)
        status = self.storage.restore(bucket, key, tier.group(1) if tier else None,
                                      int(days.group(1)) if days else None)
        if status == 400:
            return self._refuse(respond, 400, "OperationNotSupported", "The object is not archived")
        if status == 409:
            return self._refuse(respond, 409, "RestoreAlreadyInProgress", "The restore is in progress")
        respond(f"{status} OK", [("Content-Length", "0")])
        return [b""]

    def _lifecycle(self, environ, respond, bucket: str, method: str):
        """Lifecycle rules are kept as sent (OSS's XML) and recorded, not enforced."""
        if method == "PUT":
            length = min(int(environ.get("CONTENT_LENGTH") or 0), 1 << 20)
            self.lifecycles[bucket] = environ["wsgi.input"].read(length).decode(errors="replace")
            respond("200 OK", [("Content-Length", "0")])
            return [b""]
        if method == "GET" and bucket in self.lifecycles:
            body = self.lifecycles[bucket].encode()
            respond("200 OK", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if method == "DELETE":
            self.lifecycles.pop(bucket, None)
            respond("204 No Content", [("Content-Length", "0")])
            return [b""]
        return self._refuse(respond, 404, "NoSuchLifecycle", "No lifecycle rules")

    @staticmethod
    def _object(path: str):
        parts = path.lstrip("/").split("/", 1)
        if len(parts) != 2 or not parts[1]:
            return None
        bucket = _backend().buckets.get(unquote(parts[0]))
        if bucket is None:
            return None
        return bucket.keys.get(unquote(parts[1]))

    def _get_object(self, environ, respond, fault: Fault | None):
        key = self._object(environ["PATH_INFO"])
        size = key.size
        rng = None if fault and fault.kind == "ignore_range" else environ.get("HTTP_RANGE")
        try:
            span = parse_range(rng, size) if size else None
        except ValueError:
            body = _oss_error(416, "InvalidRange", "The requested range is not satisfiable")
            respond("416 Range Not Satisfiable", [("Content-Type", "application/xml"),
                                                  ("Content-Length", str(len(body)))])
            return [body]
        start, end = span if span else (0, size - 1)
        headers = [("Content-Type", key.metadata.get("Content-Type") or "application/octet-stream"),
                   ("Accept-Ranges", "bytes"), ("ETag", f'"{key.etag.strip(chr(34))}"'),
                   ("Last-Modified", formatdate(key.last_modified.timestamp(), usegmt=True)),
                   ("x-oss-object-type", "Normal"),
                   ("Content-Length", str(end - start + 1 if size else 0))]
        headers += [(f"x-oss-meta-{k[len('x-amz-meta-'):]}", v) for k, v in key.metadata.items()
                    if k.lower().startswith("x-amz-meta-")]
        if span:
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        respond("206 Partial Content" if span else "200 OK", headers)
        if not size:
            return [b""]

        def read_at(offset: int, length: int) -> bytes:
            with key.lock:
                key._value_buffer.seek(offset)
                return key._value_buffer.read(length)
        return body_blocks(read_at, start, end, fault)

    def _to_moto(self, environ, respond):
        env = dict(environ)
        # moto treats a request without credentials as anonymous (403 on private objects)
        # and cannot parse OSS signatures: give it a fixed S3 one; it checks none.
        env["HTTP_AUTHORIZATION"] = _FAKE_S3_AUTH
        for name in list(env):
            if name.startswith("HTTP_X_OSS_META_"):
                env["HTTP_X_AMZ_META_" + name[len("HTTP_X_OSS_META_"):]] = env.pop(name)
            elif name in ("HTTP_X_OSS_COPY_SOURCE", "HTTP_X_OSS_COPY_SOURCE_RANGE", "HTTP_X_OSS_METADATA_DIRECTIVE"):
                env["HTTP_X_AMZ_" + name[len("HTTP_X_OSS_"):]] = env.pop(name)
        qs = env.get("QUERY_STRING", "")
        if qs:
            env["QUERY_STRING"] = "&".join(p for p in qs.split("&") if p != "continuation-token=")
        captured = {}

        def capture(status_line, headers, exc_info=None):
            captured["status"], captured["headers"] = status_line, headers
            return lambda data: None

        chunks = _moto_s3_app()(env, capture)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        headers = captured["headers"]
        ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
        if body.lstrip().startswith(b"<?xml") or "xml" in ctype:
            body = _NS.sub(b"", body)
            body = re.sub(rb"(?<!</Type>)(\s*)</Contents>", rb"<Type>Normal</Type>\1</Contents>", body)
        if environ["REQUEST_METHOD"] == "HEAD":
            length = next((v for k, v in headers if k.lower() == "content-length"), None)
            headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "x-amz-storage-class")]
            if length is not None:
                headers.append(("Content-Length", length))
            bucket_key = self._bucket_key(environ.get("PATH_INFO", ""))
            if bucket_key and captured["status"].startswith("200"):
                headers += self.storage.headers(*bucket_key)
            respond(captured["status"], headers)
            return [b""]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        respond(captured["status"], headers)
        return [body]

    def _control(self, environ, respond, what, method):
        def reply(status, payload):
            body = json.dumps(payload).encode()
            respond(f"{status} OK", [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))])
            return [body]
        if what == "faults" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length > 1 << 20:
                return reply(413, {"error": "fault list too large"})
            rules = json.loads(environ["wsgi.input"].read(length) or b"[]")
            for rule in rules:
                self.faults.add(Fault(**rule))
            return reply(200, {"added": len(rules)})
        if what == "faults" and method == "DELETE":
            self.faults.clear()
            return reply(200, {"cleared": True})
        if what == "log":
            return reply(200, [asdict(e) for e in self.faults.log()])
        if what == "sts/credentials" and method == "GET":
            return reply(200, self.sts.issue())
        if what == "sts" and method == "POST":
            length = min(int(environ.get("CONTENT_LENGTH") or 0), 1 << 16)
            conf = json.loads(environ["wsgi.input"].read(length) or b"{}")
            self.sts.configure(ttl=float(conf["ttl"]), advertised=conf.get("advertised"))
            return reply(200, {"ttl": self.sts.ttl, "advertised": self.sts.advertised})
        if what.startswith("bucket/") and method == "PUT":
            self.create_bucket(what[len("bucket/"):])
            return reply(200, {"created": what[len("bucket/"):]})
        return reply(404, {"error": f"no control endpoint {what}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bucket", action="append", default=[])
    args = parser.parse_args(argv)
    server = OssServer(port=args.port)
    for bucket in args.bucket:
        server.create_bucket(bucket)
    return serve_until_interrupted(server)


if __name__ == "__main__":
    sys.exit(main())
