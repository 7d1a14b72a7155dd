"""Settings: built-in defaults, then a TOML file, then the environment, then CLI flags.

Names follow the ecosystem so a lab's existing setup just works: ``OSS_*`` as Alibaba's
own tools read them, ``MODELSCOPE_*`` as the modelscope SDK does, and ``SHOAL_*`` for
the rest. Every setting can also be written in the TOML file (``SHOAL_CONFIG``, default
``~/.config/shoal/config.toml``) under the key in the table below.

Secrets are kept out of ``repr`` and logs.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError, ShoalError
from agent.manifest import check_chunk_size

MAX_CONCURRENCY = 64


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shoal"


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = field(default_factory=_default_cache_dir)
    # OSS mirror; no bucket means no mirror.
    oss_endpoint: str | None = None
    oss_region: str | None = None
    oss_bucket: str | None = None
    oss_prefix: str = ""
    oss_access_key_id: str | None = field(default=None, repr=False)
    oss_access_key_secret: str | None = field(default=None, repr=False)
    oss_session_token: str | None = field(default=None, repr=False)
    # ModelScope origin.
    modelscope_endpoint: str = "https://www.modelscope.cn"
    modelscope_token: str | None = field(default=None, repr=False)
    use_modelscope: bool = True
    # Transfer tuning.
    concurrency: int = 8
    chunk_timeout: float = 60.0
    connect_timeout: float = 10.0
    retries: int = 3
    # Chunk size for manifests shoal builds (origin pulls, mirror pushes); None picks one
    # from the model's size (see agent.manifest.default_chunk_size).
    chunk_size: int | None = None
    # With a trusted manifest every chunk is proven by BLAKE3; SHA-256 of whole files is
    # then only re-checked when this is set (it costs ~5 s of CPU per GB here).
    always_sha256: bool = False

    def with_(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# setting name -> (environment variable, TOML key, converter)
_SOURCES: dict[str, tuple[str, str, type]] = {
    "cache_dir": ("SHOAL_CACHE_DIR", "cache_dir", Path),
    "oss_endpoint": ("OSS_ENDPOINT", "oss.endpoint", str),
    "oss_region": ("OSS_REGION", "oss.region", str),
    "oss_bucket": ("SHOAL_OSS_BUCKET", "oss.bucket", str),
    "oss_prefix": ("SHOAL_OSS_PREFIX", "oss.prefix", str),
    "oss_access_key_id": ("OSS_ACCESS_KEY_ID", "oss.access_key_id", str),
    "oss_access_key_secret": ("OSS_ACCESS_KEY_SECRET", "oss.access_key_secret", str),
    "oss_session_token": ("OSS_SESSION_TOKEN", "oss.session_token", str),
    "modelscope_endpoint": ("MODELSCOPE_ENDPOINT", "modelscope.endpoint", str),
    "modelscope_token": ("MODELSCOPE_API_TOKEN", "modelscope.api_token", str),
    "use_modelscope": ("SHOAL_USE_MODELSCOPE", "modelscope.enabled", bool),
    "concurrency": ("SHOAL_CONCURRENCY", "concurrency", int),
    "chunk_timeout": ("SHOAL_CHUNK_TIMEOUT", "chunk_timeout", float),
    "connect_timeout": ("SHOAL_CONNECT_TIMEOUT", "connect_timeout", float),
    "retries": ("SHOAL_RETRIES", "retries", int),
    "chunk_size": ("SHOAL_CHUNK_SIZE", "chunk_size", int),
    "always_sha256": ("SHOAL_ALWAYS_SHA256", "always_sha256", bool),
}
ENV_NAMES = {name: env for name, (env, _, _) in _SOURCES.items()}


def config_path(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    explicit = env.get("SHOAL_CONFIG")
    if explicit:
        return Path(explicit)
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "shoal" / "config.toml"


def _convert(name: str, where: str, kind: type, value: object):
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} = {value!r} is not a valid {kind.__name__} for {name}") from None


def _lookup_toml(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_settings(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Defaults < TOML file < environment < ``overrides`` (CLI flags; ``None`` = unset)."""
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {}
    path = config_path(env)
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}; fix or remove it") from e
        for name, (_, key, kind) in _SOURCES.items():
            raw = _lookup_toml(doc, key)
            if raw is not None:
                values[name] = _convert(name, f"{path}: {key}", kind, raw)
    for name, (var, _, kind) in _SOURCES.items():
        raw = env.get(var)
        if raw not in (None, ""):
            values[name] = _convert(name, f"${var}", kind, raw)
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = raw
    settings = Settings(**values)
    if not 1 <= settings.concurrency <= MAX_CONCURRENCY:
        raise ConfigError(
            f"concurrency {settings.concurrency} is outside 1..{MAX_CONCURRENCY}; "
            f"set {ENV_NAMES['concurrency']} or --concurrency accordingly")
    if settings.retries < 0 or settings.retries > 10:
        raise ConfigError(f"retries {settings.retries} is outside 0..10")
    if settings.chunk_size is not None:
        try:
            check_chunk_size(settings.chunk_size)
        except ShoalError as e:
            raise ConfigError(f"{ENV_NAMES['chunk_size']}: {e}") from None
    if settings.oss_bucket and not settings.oss_endpoint:
        raise ConfigError(
            f"an OSS bucket ({settings.oss_bucket}) is set but no endpoint: set OSS_ENDPOINT, "
            "e.g. https://oss-cn-hangzhou-internal.aliyuncs.com")
    if bool(settings.oss_access_key_id) != bool(settings.oss_access_key_secret):
        raise ConfigError(
            "only one of OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET is set; set both "
            "(and OSS_SESSION_TOKEN for STS credentials) or neither for a public bucket")
    if settings.oss_session_token and not settings.oss_access_key_id:
        raise ConfigError("OSS_SESSION_TOKEN is set without OSS_ACCESS_KEY_ID/SECRET from the same STS grant")
    return settings
