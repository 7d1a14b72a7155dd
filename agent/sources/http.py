"""The ranged GET every HTTP hub origin shares (ModelScope, a Hugging Face hub): one pooled
``requests`` session per source, one chunk per request, the hub's answer mapped onto the
``ChunkSource`` errors."""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from agent.errors import CredentialsRejected, NotFound, SourceUnavailable
from agent.sources import ChunkRequest, expect_span, read_exact

NETWORK_ERRORS = (OSError, requests.RequestException, urllib3.exceptions.HTTPError)


# What shoal's origin requests say they are; a shoal gateway refuses them (an agent whose
# origin endpoint points at a gateway would ask itself in a loop: agent.gateway.server).
USER_AGENT = "shoal-agent/0.1"


class HubSession(requests.Session):
    """A ``requests`` session with a fast path for the one request a pull makes thousands
    of times: a ranged GET of the hub's own URL.

    Why: in a pull of 2,000 small files ``requests``' own work per request was the largest
    cost of the client, more than the HTTP: it walks the whole of ``os.environ`` twice per
    request for proxies (``get_environ_proxies``), merges settings, prepares and re-parses
    the URL, wraps the answer and extracts cookies (yappi, benchmarks/small_files.py). So:

    - the environment's proxy, CA and netrc settings are read once per (scheme, host) for
      the session's life, as a process reads its environment once;
    - ``ranged`` sends the GET straight through a urllib3 pool when nothing of requests'
      is needed for that host: no proxy, no netrc entry. A redirect, a proxy or a netrc
      host takes requests' own path (``get``) unchanged, with its redirect and
      credential-stripping rules.
    """

    MAX_HOSTS = 64  # a redirect may reach a CDN host; a bound, not a limit anyone meets

    def __init__(self, pool_maxsize: int = 12):
        super().__init__()
        self._environment: dict[tuple, dict] = {}
        self._direct: dict[tuple, bool] = {}
        self._environment_lock = threading.Lock()
        self._pools = urllib3.PoolManager(num_pools=4, maxsize=pool_maxsize, block=False)
        self._pools_verified: dict[str, urllib3.PoolManager] = {}

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

    def _pool_for(self, url: str) -> urllib3.PoolManager | None:
        """The urllib3 pools a direct request to ``url`` may use, or None when requests'
        own path is needed (a proxy, a netrc entry, a client certificate, odd settings)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        with self._environment_lock:
            direct = self._direct.get(key)
        if direct is None:
            settings = self.merge_environment_settings(url, {}, True, None, None)
            direct = (parts.scheme in ("http", "https") and not self.auth and self.cert is None
                      and settings["cert"] is None and not requests.utils.select_proxy(url, settings["proxies"])
                      and not (self.trust_env and requests.utils.get_netrc_auth(url)))
            with self._environment_lock:
                if len(self._direct) < self.MAX_HOSTS:
                    self._direct[key] = direct
        if not direct:
            return None
        if parts.scheme == "http":
            return self._pools
        verify = self.merge_environment_settings(url, {}, True, None, None)["verify"]
        ca = requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
        if not isinstance(ca, str):  # verify=False: requests' path, which warns as it should
            return None
        with self._environment_lock:
            pools = self._pools_verified.get(ca)
            if pools is None:
                import os
                where = {"ca_cert_dir": ca} if os.path.isdir(ca) else {"ca_certs": ca}
                pools = self._pools_verified[ca] = urllib3.PoolManager(
                    num_pools=4, maxsize=self._pools.connection_pool_kw["maxsize"], block=False,
                    cert_reqs="CERT_REQUIRED", **where)
        return pools

    def ranged(self, url: str, headers: dict[str, str], timeout: tuple[float, float]):
        """GET ``url`` with ``headers`` added to the session's; the answer's status, headers
        and a raw urllib3 response to read the body from (``readinto``, ``release_conn``).
        Goes through requests (``get``) where the direct path does not apply, or when the
        hub redirects."""
        pools = self._pool_for(url)
        if pools is not None:
            sent = dict(self.headers)
            sent.update(headers)
            raw = pools.urlopen("GET", url, headers=sent, redirect=False, retries=False, preload_content=False,
                                decode_content=False, timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
            if not (300 <= raw.status < 400 and raw.headers.get("Location")):
                return raw.status, raw.headers, raw
            raw.drain_conn()
            raw.release_conn()
            parts = urlsplit(url)  # a host that redirects (to a CDN, say) goes through requests from now on
            with self._environment_lock:
                self._direct[(parts.scheme, parts.netloc)] = False
        resp = self.get(url, headers=headers, stream=True, timeout=timeout)
        return resp.status_code, resp.headers, resp.raw

    def close(self) -> None:
        super().close()
        self._pools.clear()
        for pools in self._pools_verified.values():
            pools.clear()


def hub_session(concurrency: int, token: str | None, *, max_redirects: int = 30) -> requests.Session:
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


def ranged_get(session: requests.Session, url: str, request: ChunkRequest, into: memoryview, deadline: float,
               timeout: tuple[float, float], *, what: str, hub: str, token_hint: str) -> None:
    """Fill ``into[:request.length]`` with the bytes of ``request`` from ``url``.

    ``hub`` names the hub in messages ("ModelScope"); ``token_hint`` says which setting to
    fix when it refuses us ("set MODELSCOPE_API_TOKEN ...")."""
    headers = {"Range": f"bytes={request.offset}-{request.offset + request.length - 1}",
               "Accept-Encoding": "identity"}
    try:
        if isinstance(session, HubSession):
            status, answer_headers, raw = session.ranged(url, headers, timeout)
        else:
            resp = session.get(url, headers=headers, stream=True, timeout=timeout)
            status, answer_headers, raw = resp.status_code, resp.headers, resp.raw
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
