"""The ranged GET every HTTP hub origin shares (ModelScope, a Hugging Face hub): one pooled
``requests`` session per source, one chunk per request, the hub's answer mapped onto the
``ChunkSource`` errors."""

from __future__ import annotations

import requests
import urllib3
from requests.adapters import HTTPAdapter

from agent.errors import CredentialsRejected, NotFound, SourceUnavailable
from agent.sources import ChunkRequest, expect_span, read_exact

NETWORK_ERRORS = (OSError, requests.RequestException, urllib3.exceptions.HTTPError)


# What shoal's origin requests say they are; a shoal gateway refuses them (an agent whose
# origin endpoint points at a gateway would ask itself in a loop: agent.gateway.server).
USER_AGENT = "shoal-agent/0.1"


def hub_session(concurrency: int, token: str | None, *, max_redirects: int = 30) -> requests.Session:
    """A session with a connection per chunk in flight (and a few spare), no retries of its
    own (the scheduler retries), the token as a bearer header when there is one."""
    session = requests.Session()
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
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.TooManyRedirects as e:
        raise SourceUnavailable(f"{what}: too many redirects", transient=False) from e
    except NETWORK_ERRORS as e:
        raise SourceUnavailable(f"{what}: cannot reach {hub} ({type(e).__name__})") from e
    whole = False
    try:
        if resp.status_code == 404:
            raise NotFound(f"{what}: not on {hub}")
        if resp.status_code in (401, 403):
            raise CredentialsRejected(f"{what}: {hub} refused the request ({resp.status_code}); {token_hint}")
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise SourceUnavailable(f"{what}: {hub} answered {resp.status_code}")
        length = resp.headers.get("Content-Length")
        expect_span(resp.status_code, int(length) if length and length.isdigit() else None, request, what)
        read_exact(resp.raw.readinto, into, request.length, deadline, what)
        whole = getattr(resp.raw, "length_remaining", None) == 0
    except NETWORK_ERRORS as e:
        raise SourceUnavailable(f"{what}: {type(e).__name__} while reading the body") from e
    finally:
        if whole:  # read to its end: the connection goes back to the pool (a TLS handshake saved per chunk)
            resp.raw.release_conn()
        else:  # anything else closes it: a half-read body must not meet the next request
            resp.close()
