"""The hub sources' ranged GET (agent.sources.http): the direct urllib3 path a pull of many
small files takes, and the cases where it must step aside for requests' own path (a proxy
in the environment, a redirect), against real servers on loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from agent.sources import ChunkRequest
from agent.sources.http import HubSession, hub_session, ranged_get
from agent.testing.http import LoopbackServer, serve_file

DATA = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def origin(tmp_path):
    """A keep-alive server: /file serves DATA with ranges, /moved redirects to it; it notes
    each request's Authorization header and client port (which connection it came on)."""
    path = tmp_path / "file.bin"
    path.write_bytes(DATA)
    seen: list[tuple[str, str | None, int]] = []

    def app(environ, respond):
        seen.append((environ["PATH_INFO"], environ.get("HTTP_AUTHORIZATION"), int(environ["REMOTE_PORT"])))
        if environ["PATH_INFO"] == "/moved":
            respond("302 Found", [("Location", "/file"), ("Content-Length", "0")])
            return [b""]
        return serve_file(str(path), len(DATA), environ, respond, None)

    server = LoopbackServer(app, keep_alive=True).start()
    server.seen = seen
    yield server
    server.close()


def _get(session, url, offset=100, length=1000):
    into = memoryview(bytearray(length))
    ranged_get(session, url, ChunkRequest("file.bin", offset, length, len(DATA)), into, time.monotonic() + 10,
               (5, 5), what="test", hub="the test hub", token_hint="set the token")
    return bytes(into)


def test_ranged_gets_go_direct_with_the_token_and_reuse_one_connection(origin, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    session = hub_session(4, "secret-token")
    try:
        assert isinstance(session, HubSession) and session._pool_for(f"{origin.url}/file") is not None
        for offset in (0, 5000, 12000):
            assert _get(session, f"{origin.url}/file", offset) == DATA[offset:offset + 1000]
    finally:
        session.close()
    assert [auth for _, auth, _ in origin.seen] == ["Bearer secret-token"] * 3
    assert len({port for _, _, port in origin.seen}) == 1  # one connection, kept alive


def test_a_redirect_is_followed_through_requests(origin, monkeypatch):
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    session = hub_session(4, None)
    try:
        assert _get(session, f"{origin.url}/moved", 7) == DATA[7:1007]
        assert _get(session, f"{origin.url}/moved", 9) == DATA[9:1009]
    finally:
        session.close()
    # The direct try, then requests' path, which it keeps for that host (no second try).
    assert [p for p, _, _ in origin.seen] == ["/moved", "/moved", "/file", "/moved", "/file"]


class _RecordingProxy:
    """A listening socket that answers every request with a fixed 206 and keeps the request
    lines it was sent: what a forward proxy would see."""

    def __init__(self, body: bytes):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._body = body
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                got = conn.recv(4096)
                if not got:
                    return
                request += got
            self.lines.append(request.split(b"\r\n", 1)[0].decode())
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                         b"Content-Range: bytes 100-%d/%d\r\nConnection: close\r\n\r\n"
                         % (len(self._body), 99 + len(self._body), len(DATA)) + self._body)

    def close(self):
        self.sock.close()
        self._thread.join(timeout=5)


def test_a_proxy_in_the_environment_is_used_and_no_proxy_is_honoured(origin, monkeypatch):
    """A lab behind a proxy: the direct path must not bypass it (requests' path takes the
    request to the proxy); a host in NO_PROXY goes direct."""
    proxy = _RecordingProxy(DATA[100:1100])
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        session = hub_session(4, None)
        try:
            assert session._pool_for(f"{origin.url}/file") is None
            assert _get(session, f"{origin.url}/file") == DATA[100:1100]
        finally:
            session.close()
        assert proxy.lines == [f"GET {origin.url}/file HTTP/1.1"]  # the absolute form: it went via the proxy
        assert origin.seen == []
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        session = hub_session(4, None)
        try:
            assert _get(session, f"{origin.url}/file") == DATA[100:1100]
        finally:
            session.close()
        assert [p for p, _, _ in origin.seen] == ["/file"]
    finally:
        proxy.close()
