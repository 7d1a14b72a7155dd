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
        assert isinstance(session, HubSession) and session._direct_for(f"{origin.url}/file") is not None
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
            assert session._direct_for(f"{origin.url}/file") is None
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


def test_a_kept_connection_the_hub_closed_is_replaced_once(tmp_path, monkeypatch):
    """A hub that closes an idle keep-alive connection (its timeout): the next GET, which
    finds the connection dead, is sent again on a new one and succeeds; the hub sees two
    connections, one request each."""
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]
    served: list[str] = []

    def serve():  # each connection: one answer that says keep-alive, then closed
        for _ in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    got = conn.recv(4096)
                    if not got:
                        break
                    request += got
                served.append(request.split(b"\r\n", 1)[0].decode())
                body = DATA[100:1100]
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                             b"Content-Range: bytes 100-1099/%d\r\n\r\n" % (len(body), len(DATA)) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    session = hub_session(4, None)
    try:
        url = f"http://127.0.0.1:{port}/file"
        assert _get(session, url) == DATA[100:1100]
        time.sleep(0.2)  # the hub has closed the connection the session keeps
        assert _get(session, url) == DATA[100:1100]
    finally:
        session.close()
        server.close()
        thread.join(timeout=5)
    assert served == ["GET /file HTTP/1.1"] * 2


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, PEM files (cryptography, as a CA would)."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test hub")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "hub.pem", tmp_path / "hub.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_goes_direct_with_the_ca_the_environment_names_and_refuses_a_stranger(origin, tmp_path, monkeypatch):
    """A hub over TLS (as ModelScope is): the direct path verifies the hub's certificate
    against the CA bundle requests would use (REQUESTS_CA_BUNDLE here); with the default
    bundle the self-signed hub is refused, never read."""
    import ssl
    from agent.errors import SourceUnavailable
    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    inner = origin._server
    inner.socket = context.wrap_socket(inner.socket, server_side=True)
    url = f"https://127.0.0.1:{origin.port}/file"
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    session = hub_session(4, None)
    try:
        assert session._direct_for(url) is not None
        assert _get(session, url, 3000) == DATA[3000:4000]
        assert _get(session, url, 9000) == DATA[9000:10000]
    finally:
        session.close()
    assert len({port for _, _, port in origin.seen}) == 1  # one TLS connection, kept alive
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    session = hub_session(4, None)
    try:
        with pytest.raises(SourceUnavailable, match="cannot reach"):
            _get(session, url)
    finally:
        session.close()
