"""Credentials for the OSS mirror, as a lab's other Alibaba Cloud tools read them.

- ``oss.credentials = "auto"`` (the default): ``OSS_ACCESS_KEY_ID``/``SECRET`` (and a
  static ``OSS_SESSION_TOKEN``) when set, else anonymous reads, as before.
- ``oss.credentials = "chain"``: the Alibaba Cloud credentials chain of
  ``alibabacloud-credentials`` (its ``DefaultCredentialsProvider``): the
  ``ALIBABA_CLOUD_ACCESS_KEY_ID``/``SECRET``/``SECURITY_TOKEN`` environment, OIDC (RRSA),
  the aliyun CLI's profile (``~/.aliyun/config.json``, incl. ``External`` helpers), the
  credentials file (``~/.alibabacloud/credentials.ini``), the ECS RAM role, and
  ``ALIBABA_CLOUD_CREDENTIALS_URI``. STS tokens from it are refreshed by the library before
  they expire (15 minutes ahead).

oss2 signs each request with what the provider returns at that moment
(``oss2.ProviderAuth``/``ProviderAuthV4``), so a refreshed token is used from the next
request on. OSS may still refuse a token early (revoked, clock skew, a shorter life than
it said): ``RefreshingCredentials.refresh`` throws the cached one away and the source
retries the request once with a new one (``agent.sources.oss``), so a long pull never
falls back to ModelScope for an expired token.
"""

from __future__ import annotations

import threading
import time

import oss2

from agent.errors import CredentialsRejected


def default_chain():
    """The library's default chain (imported here: it reads its environment on import)."""
    from alibabacloud_credentials.provider.default import DefaultCredentialsProvider
    return DefaultCredentialsProvider()


class RefreshingCredentials(oss2.credentials.CredentialsProvider):
    """An oss2 credentials provider over an ``alibabacloud-credentials`` provider, which can
    be thrown away and made again when OSS says its token expired."""

    def __init__(self, make_provider=default_chain):
        self._make = make_provider
        self._lock = threading.Lock()
        self._provider = None
        self.generation = 0  # bumped by each forced refresh
        self.refreshes = 0

    def _current(self):
        with self._lock:
            if self._provider is None:
                self._provider = self._make()
            return self._provider

    def get_credentials(self) -> oss2.credentials.Credentials:
        try:
            found = self._current().get_credentials()
        except Exception as e:  # the library raises CredentialException, ValueError, network errors
            raise CredentialsRejected(
                f"no OSS credentials from the Alibaba Cloud credentials chain ({_short(e)}); set "
                "ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET, a profile in ~/.alibabacloud/credentials.ini or "
                "~/.aliyun/config.json, or ALIBABA_CLOUD_CREDENTIALS_URI; `shoal doctor` shows what is found") from e
        return oss2.credentials.Credentials(found.get_access_key_id(), found.get_access_key_secret(),
                                            found.get_security_token() or "")

    def refresh(self, generation: int) -> None:
        """Drop the cached credentials, unless another request did since ``generation``."""
        with self._lock:
            if generation == self.generation:
                self._provider = None
                self.generation += 1
                self.refreshes += 1

    def describe(self) -> dict:
        """Which source in the chain answered and when its credentials expire; never a secret."""
        provider = self._current()
        found = provider.get_credentials()
        # The default chain's answer omits the expiry; the provider it settled on has it.
        inner = getattr(provider, "_DefaultCredentialsProvider__last_used_provider", None)
        expiration = None
        if inner is not None:
            try:
                expiration = inner.get_credentials().get_expiration()
            except Exception:  # noqa: BLE001 - an expiry we cannot tell is shown as unknown
                expiration = None
        key_id = found.get_access_key_id() or ""
        return {"source": found.get_provider_name(), "access_key_id": key_id[:4] + "***" if key_id else None,
                "sts": bool(found.get_security_token()),
                "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiration)) if expiration else None}


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:300] + "..."


def make_auth(settings):
    """(an oss2 auth object, the refreshing provider or None) for ``settings``."""
    version = oss2.AUTH_VERSION_4 if settings.oss_region else oss2.AUTH_VERSION_1
    if settings.oss_credentials == "chain":
        provider = RefreshingCredentials()
        auth = oss2.ProviderAuthV4(provider) if settings.oss_region else oss2.ProviderAuth(provider)
        return auth, provider
    key_id, secret, token = (settings.oss_access_key_id, settings.oss_access_key_secret,
                             settings.oss_session_token)
    if token:
        return oss2.StsAuth(key_id, secret, token, auth_version=version), None
    if key_id:
        return oss2.make_auth(key_id, secret, version), None
    return oss2.AnonymousAuth(), None


def describe_settings(settings) -> dict:
    """What ``shoal doctor`` shows about the mirror's credentials (no secret)."""
    if settings.oss_credentials == "chain":
        try:
            return {"mode": "chain", **RefreshingCredentials().describe()}
        except Exception as e:  # noqa: BLE001 - doctor reports, it does not fail
            return {"mode": "chain", "source": None, "error": _short(e)}
    if settings.oss_session_token:
        return {"mode": "static", "source": "OSS_SESSION_TOKEN (STS, not refreshed)", "sts": True, "expires": None}
    if settings.oss_access_key_id:
        return {"mode": "static", "source": "OSS_ACCESS_KEY_ID", "sts": False, "expires": None,
                "access_key_id": settings.oss_access_key_id[:4] + "***"}
    return {"mode": "anonymous", "source": None, "sts": False, "expires": None}
