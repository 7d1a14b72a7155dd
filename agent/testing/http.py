"""A threaded WSGI server on loopback, shared by the local OSS and hub servers.

Resource handling: ``start()`` binds 127.0.0.1 on a free port (or the one given) and
serves from a daemon thread; ``close()`` stops it and is safe to call twice.

Two servers: werkzeug's (the default: it closes the connection after every answer) and
``KeepAliveWSGIServer`` (``keep_alive=True``), HTTP/1.1 with persistent connections as a
real hub's front end keeps them. Per-request costs (a new TCP connection, a new server
thread) are what a benchmark of many small files measures, so it uses the second.
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Callable, Iterator
from urllib.parse import unquote

from werkzeug.serving import WSGIRequestHandler, make_server

from agent.httprange import parse_range  # noqa: F401  (re-exported for the servers)
from agent.testing.faults import Fault

BLOCK = 1024 * 1024


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # the request log lives in FaultPlan
        pass

    def log_error(self, *args, **kwargs):
        pass


def _in_lab(host: str) -> bool:
    """A benchmark's own namespace subnet, named in SHOAL_TEST_ALLOW_NET (agent.testing.netns)."""
    import ipaddress
    from agent.testing.guard import allowed_nets
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in allowed_nets())


MAX_REQUEST_BODY = 16 << 20   # the control endpoints take JSON; nothing larger is read


class _BoundedInput:
    """``wsgi.input`` limited to the request's Content-Length, so that the next request on
    the same connection starts where this one's body ends."""

    def __init__(self, rfile, length: int):
        self._rfile, self.left = rfile, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self._rfile.read(size) if size else b""
        self.left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self._rfile.readline(size) if size else b""
        self.left -= len(data)
        return data


class _KeepAliveHandler(BaseHTTPRequestHandler):
    """One connection, many requests: a WSGI app's answer with a Content-Length keeps the
    connection open; one without, or a body that raises (a fault's reset), closes it."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall
    timeout = 30  # an idle keep-alive connection is closed after this many seconds

    def log_message(self, *args):  # the request log lives in FaultPlan
        pass

    def _serve(self):
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_REQUEST_BODY:
            self.send_error(413, "request body too large")
            return
        body = _BoundedInput(self.rfile, length)
        environ = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query, "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]), "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0], "REMOTE_PORT": str(self.client_address[1]),
            "CONTENT_LENGTH": str(length),
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": body, "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE"):
                environ[key] = value
        started: list = []

        def start_response(status, headers, exc_info=None):
            started[:] = [status, headers]
            return self.wfile.write

        result = self.server.app(environ, start_response)
        try:
            status, headers = started
            self.send_response_only(int(status.split()[0]), status.split(" ", 1)[1])
            names = {k.lower() for k, _ in headers}
            for k, v in headers:
                self.send_header(k, v)
            if "content-length" not in names or self.command == "HEAD":
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                for block in result:
                    self.wfile.write(block)
        except Exception:
            self.close_connection = True  # mid-body: the client sees the connection drop
            raise
        finally:
            if hasattr(result, "close"):
                result.close()
        if body.left:  # the app left some of the body unread: drain it, bounded above
            body.read(body.left)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except OSError:  # the client went away, or sat idle past ``timeout``
            self.close_connection = True


class KeepAliveWSGIServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, app: Callable):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__((host, port), _KeepAliveHandler)

    @property
    def server_port(self) -> int:
        return self.server_address[1]


class LoopbackServer:
    def __init__(self, app: Callable, *, host: str = "127.0.0.1", port: int = 0, keep_alive: bool = False):
        if not host.startswith("127.") and host != "::1" and not _in_lab(host):
            raise ValueError(f"test servers bind loopback (or a lab namespace's subnet) only, not {host}")
        self._host = host
        if keep_alive:
            self._server = KeepAliveWSGIServer(host, port, app)
        else:
            self._server = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
            self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def start(self) -> "LoopbackServer":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def body_blocks(read_at: Callable[[int, int], bytes], start: int, end: int,
                fault: Fault | None) -> Iterator[bytes]:
    """Yield bytes [start, end] in blocks, applying a body fault (reset, corrupt, slow)."""
    pos, total = start, end - start + 1
    sent = 0
    while pos <= end:
        n = min(BLOCK, end - pos + 1)
        data = read_at(pos, n)
        if fault is not None:
            if fault.kind == "corrupt" and sent == 0:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            elif fault.kind == "reset" and sent + n >= total // 2:
                cut = max(0, total // 2 - sent)
                yield data[:cut]
                # Raising from the body makes werkzeug drop the connection mid-body,
                # which is what a reset looks like to the client.
                raise ConnectionResetError("fault: reset mid-body")
            elif fault.kind == "slow" and fault.delay:
                time.sleep(fault.delay)
        yield data
        pos += n
        sent += n


def pread_file(path: str) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)
    return read_at


def serve_file(path: str, size: int, environ, respond, fault: Fault | None) -> list | Iterator[bytes]:
    """A file as a hub serves it: ``Range`` honoured (206, or 416 for a bad range) unless
    the fault says to ignore it, the body through ``body_blocks`` (so faults apply)."""
    rng = None if fault and fault.kind == "ignore_range" else environ.get("HTTP_RANGE")
    try:
        span = parse_range(rng, size) if size else None
    except ValueError:
        respond("416 Range Not Satisfiable", [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")])
        return [b""]
    start, end = span if span else (0, size - 1)
    headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
               ("Content-Length", str(end - start + 1 if size else 0))]
    if span:
        headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
    respond("206 Partial Content" if span else "200 OK", headers)
    if not size:
        return [b""]
    return body_blocks(pread_file(path), start, end, fault)


def fault_control(faults, environ, respond, what: str, method: str, json_reply):
    """The test servers' control endpoint: ``POST faults`` (a JSON list of ``Fault``
    fields, 1 MiB at most), ``DELETE faults``, ``GET log``; None for anything else."""
    import json
    from dataclasses import asdict
    if what == "faults" and method == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > 1 << 20:
            return json_reply(respond, 413, {"error": "fault list too large"})
        rules = json.loads(environ["wsgi.input"].read(length) or b"[]")
        for rule in rules:
            faults.add(Fault(**rule))
        return json_reply(respond, 200, {"added": len(rules)})
    if what == "faults" and method == "DELETE":
        faults.clear()
        return json_reply(respond, 200, {"cleared": True})
    if what == "log":
        return json_reply(respond, 200, [asdict(e) for e in faults.log()])
    return None


class ServedApp:
    """The lifecycle every test server shares: a WSGI app (``__call__``) served by the
    ``LoopbackServer`` in ``self._server``; ``start``/``close`` or ``with``."""

    _server: LoopbackServer

    @property
    def url(self) -> str:
        return self._server.url

    def start(self):
        self._server.start()
        return self

    def close(self) -> None:
        self._server.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def serve_models_main(server_cls, description: str, default_revision: str, argv: list[str] | None) -> int:
    """``python -m agent.testing.<hub> --model OWNER/NAME[@REV]=DIR [--port 0]``: serve until
    Ctrl-C, printing ``{"url": ...}`` on one line once listening."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", action="append", default=[], metavar="OWNER/NAME[@REV]=DIR")
    if hasattr(server_cls, "add_dataset"):
        parser.add_argument("--dataset", action="append", default=[], metavar="OWNER/NAME[@REV]=DIR")
    args = parser.parse_args(argv)
    server = server_cls(port=args.port)
    for adder, specs in ((server.add_model, args.model), (getattr(server, "add_dataset", None),
                                                          getattr(args, "dataset", []))):
        for spec in specs:
            ident, _, directory = spec.partition("=")
            repo_id, _, revision = ident.partition("@")
            adder(repo_id, directory, revision or default_revision)
    return serve_until_interrupted(server)


def serve_until_interrupted(server) -> int:
    """Start ``server``, print ``{"url": ...}`` on one line, serve until Ctrl-C."""
    import json
    server.start()
    print(json.dumps({"url": server.url}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
