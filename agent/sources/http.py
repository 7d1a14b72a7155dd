"""The ranged GET every HTTP hub origin shares (ModelScope, a Hugging Face hub): one
``HubSession`` per source (kept-alive connections of its own, ``requests`` where a proxy,
a netrc entry or a redirect needs it), one chunk per request, the hub's answer mapped onto
the ``ChunkSource`` errors."""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from agent.errors import CredentialsRejected, NotFound, SourceUnavailable
from agent.sources import ChunkRequest, expect_span, read_exact

NETWORK_ERRORS = (OSError, requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException)
# What a kept connection the hub closed while it was idle raises on its next request.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


# What shoal's origin requests say they are; a shoal gateway refuses them (an agent whose
# origin endpoint points at a gateway would ask itself in a loop: agent.gateway.server).
USER_AGENT = "shoal-agent/0.1"


class _Direct:
    """Keep-alive HTTP/1.1 connections to one host, straight on ``http.client`` (the
    standard library's): a ranged GET here costs half the CPU it costs through urllib3's
    pool (its retries, URL parsing and bookkeeping per request; same run, 2,000 GETs on
    loopback: 0.62 against 1.04 CPU-s), and a pull of many small files is its requests.
    At most ``max_idle`` connections are kept between requests; one taken from the idle
    list that turns out closed by the hub (a keep-alive timeout) is replaced once."""

    def __init__(self, scheme: str, netloc: str, context: ssl.SSLContext | None, max_idle: int):
        self.scheme, self.netloc, self.context, self.max_idle = scheme, netloc, context, max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _new(self, connect_timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.netloc, timeout=connect_timeout, context=self.context)
        return http.client.HTTPConnection(self.netloc, timeout=connect_timeout)

    def get(self, target: str, headers: dict[str, str], timeout: tuple[float, float]) -> "_DirectResponse":
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        if idle is not None:
            try:
                return self._send(idle, target, headers, timeout)
            except _STALE:
                pass  # the hub closed it while it was idle (already closed here): once more, on a new one
        return self._send(self._new(timeout[0]), target, headers, timeout)

    def _send(self, conn: http.client.HTTPConnection, target: str, headers: dict[str, str],
              timeout: tuple[float, float]) -> "_DirectResponse":
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.settimeout(timeout[1])
            conn.request("GET", target, headers=headers)
            return _DirectResponse(self, conn, conn.getresponse())
        except BaseException:
            conn.close()
            raise

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _DirectResponse:
    """The answer of a ``_Direct`` GET, with the face ``ranged_get`` reads (urllib3's):
    ``status``, ``headers``, ``readinto``, ``length_remaining``, ``release_conn``, ``close``."""

    def __init__(self, direct: _Direct, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self._direct, self._conn, self._resp = direct, conn, resp
        self.status, self.headers = resp.status, resp.headers

    def readinto(self, buffer) -> int:
        return self._resp.readinto(buffer)

    @property
    def length_remaining(self) -> int | None:
        return self._resp.length

    def release_conn(self) -> None:
        """Back to the idle list when the body was read to its end and the hub keeps the
        connection; closed otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._resp.length == 0 and not self._resp.will_close:
            self._resp.read()  # (marks it done; nothing is left to read)
            self._direct.put(conn)
        else:
            self._resp.close()
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._resp.close()
        if conn is not None:
            conn.close()


class HubSession(requests.Session):
    """A ``requests`` session with a fast path for the one request a pull makes thousands
    of times: a ranged GET of the hub's own URL.

    Why: in a pull of 2,000 small files ``requests``' own work per request was the largest
    cost of the client, more than the HTTP: it walks the whole of ``os.environ`` twice per
    request for proxies (``get_environ_proxies``), merges settings, prepares and re-parses
    the URL, wraps the answer and extracts cookies (yappi, benchmarks/small_files.py). So:

    - the environment's proxy, CA and netrc settings are read once per (scheme, host) for
      the session's life, as a process reads its environment once;
    - ``ranged`` sends the GET on a kept-alive connection of its own (``_Direct``) when
      nothing of requests' is needed for that host: no proxy, no netrc entry, no client
      certificate. A host that redirects, or one behind a proxy, takes requests' own path
      (``get``) unchanged, with its redirect and credential-stripping rules.
    """

    MAX_HOSTS = 64  # a redirect may reach a CDN host; a bound, not a limit anyone meets

    def __init__(self, pool_maxsize: int = 12):
        super().__init__()
        self._environment: dict[tuple, dict] = {}
        self._direct: dict[tuple, _Direct | None] = {}
        self._environment_lock = threading.Lock()
        self._max_idle = pool_maxsize

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if proxies or not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, stream, verify, cert if not isinstance(cert, list) else tuple(cert))
        with self._environment_lock:
            known = self._environment.get(key)
        if known is None:
            known = super().merge_environment_settings(url, {}, stream, verify, cert)
            with self._environment_lock:
                if len(self._environment) < self.MAX_HOSTS:
                    self._environment[key] = known
        return dict(known, proxies=dict(known["proxies"]))

    def _direct_for(self, url: str, parts=None) -> _Direct | None:
        """The direct connections to ``url``'s host (``parts``: its ``urlsplit``), or None
        when requests' own path is needed (a proxy, a netrc entry, a client certificate,
        verify=False, a redirect)."""
        parts = parts or urlsplit(url)
        key = (parts.scheme, parts.netloc)
        with self._environment_lock:
            if key in self._direct:
                return self._direct[key]
        direct = self._make_direct(url, parts)
        with self._environment_lock:
            if key in self._direct:  # another thread made one meanwhile
                if direct is not None:
                    direct.close()
                return self._direct[key]
            if len(self._direct) < self.MAX_HOSTS:
                self._direct[key] = direct
        return direct

    def _make_direct(self, url: str, parts) -> _Direct | None:
        settings = self.merge_environment_settings(url, {}, True, None, None)
        if (parts.scheme not in ("http", "https") or self.auth or self.cert is not None
                or settings["cert"] is not None or requests.utils.select_proxy(url, settings["proxies"])
                or (self.trust_env and requests.utils.get_netrc_auth(url))):
            return None
        context = None
        if parts.scheme == "https":
            verify = settings["verify"]
            ca = requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
            if not isinstance(ca, str):  # verify=False: requests' path, which warns as it should
                return None
            context = ssl.create_default_context(**({"capath": ca} if os.path.isdir(ca) else {"cafile": ca}))
        return _Direct(parts.scheme, parts.netloc, context, self._max_idle)

    def ranged(self, url: str, headers: dict[str, str], timeout: tuple[float, float]):
        """GET ``url`` with ``headers`` added to the session's; the answer's status, headers
        and a raw response to read the body from (``readinto``, ``release_conn``). Goes
        through requests (``get``) where the direct path does not apply, or when the hub
        redirects."""
        parts = urlsplit(url)
        direct = self._direct_for(url, parts)
        if direct is not None:
            sent = dict(self.headers)
            sent.update(headers)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            raw = direct.get(target, sent, timeout)
            if not (300 <= raw.status < 400 and raw.headers.get("Location")):
                return raw.status, raw.headers, raw
            raw.close()
            # A host that redirects (to a CDN, say) goes through requests from now on.
            with self._environment_lock:
                self._direct[(parts.scheme, parts.netloc)] = None
            direct.close()
        resp = self.get(url, headers=headers, stream=True, timeout=timeout)
        return resp.status_code, resp.headers, resp.raw

    def close(self) -> None:
        super().close()
        with self._environment_lock:
            directs, self._direct = [d for d in self._direct.values() if d is not None], {}
        for direct in directs:
            direct.close()


def hub_session(concurrency: int, token: str | None, *, max_redirects: int = 30) -> HubSession:
    """A session with a connection per chunk in flight (and a few spare), no retries of its
    own (the scheduler retries), the token as a bearer header when there is one."""
    session = HubSession(pool_maxsize=concurrency + 4)
    session.max_redirects = max_redirects
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=concurrency + 4, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def ranged_get(session: HubSession, url: str, request: ChunkRequest, into: memoryview, deadline: float,
               timeout: tuple[float, float], *, what: str, hub: str, token_hint: str) -> None:
    """Fill ``into[:request.length]`` with the bytes of ``request`` from ``url``.

    ``hub`` names the hub in messages ("ModelScope"); ``token_hint`` says which setting to
    fix when it refuses us ("set MODELSCOPE_API_TOKEN ...")."""
    headers = {"Range": f"bytes={request.offset}-{request.offset + request.length - 1}",
               "Accept-Encoding": "identity"}
    try:
        status, answer_headers, raw = session.ranged(url, headers, timeout)
    except requests.TooManyRedirects as e:
        raise SourceUnavailable(f"{what}: too many redirects", transient=False) from e
    except NETWORK_ERRORS as e:
        raise SourceUnavailable(f"{what}: cannot reach {hub} ({type(e).__name__})") from e
    whole = False
    try:
        if status == 404:
            raise NotFound(f"{what}: not on {hub}")
        if status in (401, 403):
            raise CredentialsRejected(f"{what}: {hub} refused the request ({status}); {token_hint}")
        if status >= 500 or status in (408, 429):
            raise SourceUnavailable(f"{what}: {hub} answered {status}")
        length = answer_headers.get("Content-Length")
        expect_span(status, int(length) if length and length.isdigit() else None, request, what)
        read_exact(raw.readinto, into, request.length, deadline, what)
        whole = getattr(raw, "length_remaining", None) == 0
    except NETWORK_ERRORS as e:
        raise SourceUnavailable(f"{what}: {type(e).__name__} while reading the body") from e
    finally:
        if whole:  # read to its end: the connection goes back to the pool (a TLS handshake saved per chunk)
            raw.release_conn()
        else:  # anything else closes it: a half-read body must not meet the next request
            raw.close()
            raw.release_conn()
