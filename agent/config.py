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
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError, ShoalError
from agent.manifest import check_chunk_size
from agent.units import parse_size  # noqa: F401  (settings' sizes; re-exported)

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
    # Where OSS credentials come from (agent.sources.osscreds): "auto" (the keys above when
    # set, else anonymous) or "chain" (the Alibaba Cloud credentials chain: environment,
    # OIDC, the aliyun CLI profile, ~/.alibabacloud/credentials.ini, ECS RAM role, a
    # credentials URI; STS tokens from it refresh before they expire).
    oss_credentials: str = "auto"
    # Archive / Cold Archive objects: ask OSS to restore them (for a later pull) when a pull
    # meets one; the retrieval tier and how many days the restored copy stays readable.
    oss_restore: bool = False
    oss_restore_tier: str = "Standard"
    oss_restore_days: int = 2
    # ModelScope origin.
    modelscope_endpoint: str = "https://www.modelscope.cn"
    modelscope_token: str | None = field(default=None, repr=False)
    use_modelscope: bool = True
    # A Hugging Face-compatible hub (a lab's hf-mirror), after ModelScope; off unless set.
    hf_endpoint: str | None = None
    hf_token: str | None = field(default=None, repr=False)
    # The gateway's Hugging Face face: which shoal id a Hugging Face id is, where they differ
    # ("HF_ID=SHOAL_ID,...": e.g. the same model on ModelScope; see agent.gateway.hub).
    hf_names: str = ""
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
    # Never ask an origin (the OSS mirror, ModelScope, a Hugging Face hub): pulls take what
    # the cache and the room hold. A complete model pulls without them in any case.
    offline: bool = False
    # Cache limits (None: no quota). Eviction starts above high x quota, stops at low x quota.
    quota: int | None = None
    quota_high: float = 0.9
    quota_low: float = 0.8
    # Bandwidth caps in bytes per second (None: unlimited) and upload slots.
    download_rate: int | None = None
    upload_rate: int | None = None
    # Of the downloads, what may come from outside the room (the OSS mirror, the origins), and
    # the caps by time of day (agent.schedule: "HH:MM-HH:MM CAP=SIZE ...; ...").
    outside_download_rate: int | None = None
    rate_schedule: str = ""
    upload_slots: int = 4
    # The agent: control socket (default: agent.sock in the cache dir), a Unix group whose
    # members may use it besides the agent's own user, and the localhost gateway port.
    socket: Path | None = None
    control_group: str | None = None
    gateway_port: int = 8790
    # Publisher keys (hex Ed25519, what `shoal id` prints) whose signed manifests peers may bring.
    trusted_publishers: str = ""
    # The LAN swarm (agent only): on/off, where the libp2p host and the data server listen,
    # and bootstrap peers (multiaddrs ending in /p2p/<peer id>, comma-separated).
    swarm: bool = False
    swarm_host: str = "0.0.0.0"
    swarm_port: int = 0
    swarm_peers: str = ""
    # Who is in the swarm: holders of this shared secret, and (if set) only these peer ids.
    swarm_secret: str | None = field(default=None, repr=False)
    swarm_allow: str = ""
    # With neither a secret nor an allowlist, the agent refuses to serve a LAN address
    # unless this says the swarm is meant to be open.
    swarm_open: bool = False
    # Encrypt chunk bytes on the LAN data path (TLS 1.3, certificate pinned over libp2p).
    encrypt_data: bool = False
    # Chunks a whole room fetches from the origin at once (agent.swarm.picker): few, so each
    # finishes soon and peers trade it while the next ones arrive. A lone agent ignores it.
    origin_streams: int = 4
    # Discovery besides the bootstrap list: mDNS on the LAN, the Kademlia DHT across subnets.
    mdns: bool = True
    dht: bool = True
    # Peer exchange: hello answers name other members this agent is connected to, and the
    # members they name are dialled. Off: it neither tells nor follows (the DHT still finds).
    peer_exchange: bool = True
    # Where this machine is on a campus, widest first ("campus|building-2|room-204"; empty:
    # its subnet): peers that share more of it are asked first, and each chunk enters a
    # room once and the campus once (agent.swarm.location).
    swarm_location: str = ""
    # Peers a pull follows in each place other than its own (its whole room always): the
    # agents of a room choose different ones, so between them they see every other room.
    follow_per_place: int = 2
    # A room's assignments (agent.assign): act on the teacher's (or take none), keep this many
    # other members' complete copies of each assigned revision before evicting ours, and the
    # links the room's status measures its ETA against (Mbit/s each machine's switch port gives).
    room_accept_assignments: bool = True
    room_keep_copies: int = 2
    room_link_mbit: float = 1000.0

    @property
    def socket_path(self) -> Path:
        return self.socket or Path(self.cache_dir) / "agent.sock"

    def with_(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_OSS_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")

# setting name -> (environment variable, TOML key, converter)
_SOURCES: dict[str, tuple[str, str, object]] = {
    "cache_dir": ("SHOAL_CACHE_DIR", "cache_dir", Path),
    "oss_endpoint": ("OSS_ENDPOINT", "oss.endpoint", str),
    "oss_region": ("OSS_REGION", "oss.region", str),
    "oss_bucket": ("SHOAL_OSS_BUCKET", "oss.bucket", str),
    "oss_prefix": ("SHOAL_OSS_PREFIX", "oss.prefix", str),
    "oss_access_key_id": ("OSS_ACCESS_KEY_ID", "oss.access_key_id", str),
    "oss_access_key_secret": ("OSS_ACCESS_KEY_SECRET", "oss.access_key_secret", str),
    "oss_session_token": ("OSS_SESSION_TOKEN", "oss.session_token", str),
    "oss_credentials": ("SHOAL_OSS_CREDENTIALS", "oss.credentials", str),
    "oss_restore": ("SHOAL_OSS_RESTORE", "oss.restore", bool),
    "oss_restore_tier": ("SHOAL_OSS_RESTORE_TIER", "oss.restore_tier", str),
    "oss_restore_days": ("SHOAL_OSS_RESTORE_DAYS", "oss.restore_days", int),
    "modelscope_endpoint": ("MODELSCOPE_ENDPOINT", "modelscope.endpoint", str),
    "modelscope_token": ("MODELSCOPE_API_TOKEN", "modelscope.api_token", str),
    "use_modelscope": ("SHOAL_USE_MODELSCOPE", "modelscope.enabled", bool),
    "hf_endpoint": ("HF_ENDPOINT", "huggingface.endpoint", str),
    "hf_token": ("HF_TOKEN", "huggingface.token", str),
    "hf_names": ("SHOAL_HF_NAMES", "huggingface.names", "map"),
    "concurrency": ("SHOAL_CONCURRENCY", "concurrency", int),
    "chunk_timeout": ("SHOAL_CHUNK_TIMEOUT", "chunk_timeout", float),
    "connect_timeout": ("SHOAL_CONNECT_TIMEOUT", "connect_timeout", float),
    "retries": ("SHOAL_RETRIES", "retries", int),
    "chunk_size": ("SHOAL_CHUNK_SIZE", "chunk_size", int),
    "always_sha256": ("SHOAL_ALWAYS_SHA256", "always_sha256", bool),
    "offline": ("SHOAL_OFFLINE", "offline", bool),
    "quota": ("SHOAL_QUOTA", "cache.quota", "size"),
    "quota_high": ("SHOAL_QUOTA_HIGH", "cache.high_watermark", float),
    "quota_low": ("SHOAL_QUOTA_LOW", "cache.low_watermark", float),
    "download_rate": ("SHOAL_DOWNLOAD_RATE", "limits.download_rate", "size"),
    "upload_rate": ("SHOAL_UPLOAD_RATE", "limits.upload_rate", "size"),
    "outside_download_rate": ("SHOAL_OUTSIDE_DOWNLOAD_RATE", "limits.outside_download_rate", "size"),
    "rate_schedule": ("SHOAL_RATE_SCHEDULE", "limits.schedule", "schedule"),
    "upload_slots": ("SHOAL_UPLOAD_SLOTS", "limits.upload_slots", int),
    "socket": ("SHOAL_SOCKET", "agent.socket", Path),
    "control_group": ("SHOAL_CONTROL_GROUP", "agent.control_group", str),
    "gateway_port": ("SHOAL_GATEWAY_PORT", "agent.gateway_port", int),
    "trusted_publishers": ("SHOAL_TRUSTED_PUBLISHERS", "swarm.trusted_publishers", "list"),
    "swarm": ("SHOAL_SWARM", "swarm.enabled", bool),
    "swarm_host": ("SHOAL_SWARM_HOST", "swarm.host", str),
    "swarm_port": ("SHOAL_SWARM_PORT", "swarm.port", int),
    "swarm_peers": ("SHOAL_SWARM_PEERS", "swarm.peers", "list"),
    "swarm_secret": ("SHOAL_SWARM_SECRET", "swarm.secret", str),
    "swarm_allow": ("SHOAL_SWARM_ALLOW", "swarm.allow", "list"),
    "swarm_open": ("SHOAL_SWARM_OPEN", "swarm.open", bool),
    "encrypt_data": ("SHOAL_ENCRYPT_DATA", "swarm.encrypt_data", bool),
    "origin_streams": ("SHOAL_ORIGIN_STREAMS", "swarm.origin_streams", int),
    "mdns": ("SHOAL_MDNS", "swarm.mdns", bool),
    "dht": ("SHOAL_DHT", "swarm.dht", bool),
    "peer_exchange": ("SHOAL_PEER_EXCHANGE", "swarm.peer_exchange", bool),
    "swarm_location": ("SHOAL_SWARM_LOCATION", "swarm.location", str),
    "follow_per_place": ("SHOAL_FOLLOW_PER_PLACE", "swarm.follow_per_place", int),
    "room_accept_assignments": ("SHOAL_ROOM_ASSIGNMENTS", "room.accept_assignments", bool),
    "room_keep_copies": ("SHOAL_ROOM_KEEP_COPIES", "room.keep_copies", int),
    "room_link_mbit": ("SHOAL_ROOM_LINK_MBIT", "room.link_mbit", float),
}
ENV_NAMES = {name: env for name, (env, _, _) in _SOURCES.items()}


SYSTEM_CONFIG = Path("/etc/shoal/config.toml")


def room_path(config_file: Path) -> Path:
    """The room file (``agent.room``) beside a config file: read after it."""
    return Path(config_file).parent / "room.toml"


def config_path(env: dict[str, str] | None = None) -> Path:
    """``$SHOAL_CONFIG``, else the user's ``~/.config/shoal/config.toml`` if it exists, else the
    machine's ``/etc/shoal/config.toml`` (which points every user's CLI at the lab agent)."""
    env = os.environ if env is None else env
    explicit = env.get("SHOAL_CONFIG")
    if explicit:
        return Path(explicit)
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    user = Path(base) / "shoal" / "config.toml"
    return user if user.exists() or not SYSTEM_CONFIG.exists() else SYSTEM_CONFIG


def hf_name_map(text: str) -> dict[str, str]:
    """``huggingface.names`` as kept (``"HF_ID=SHOAL_ID,..."``) → {Hugging Face id: shoal id}.
    A Hugging Face id is ``OWNER/NAME``, ``NAME`` or ``datasets/...``; each shoal id is
    checked as ``shoal pull`` checks it (a dataset's gets its ``datasets/``)."""
    from agent.errors import UsageError
    from agent.manifest import ModelRef
    names: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        hf_id, eq, shoal_id = (part.strip() for part in item.partition("="))
        if not eq or not hf_id or not shoal_id:
            raise UsageError(f"entry {item!r} is not HF_ID=SHOAL_ID")
        if not re.fullmatch(r"(datasets/)?([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", hf_id):
            raise UsageError(f"{hf_id!r} is not a Hugging Face repository id")
        names[hf_id] = ModelRef.parse(shoal_id, dataset=hf_id.startswith("datasets/")).model_id
    return names


def _convert(name: str, where: str, kind, value: object):
    try:
        if kind == "size":
            return parse_size(value)
        if kind == "schedule":  # [[limits.schedule]] tables or the kept form (agent.schedule)
            from agent.schedule import from_toml, parse
            text = from_toml(value) if isinstance(value, list) else str(value)
            parse(text)
            return text
        if kind == "map":  # a TOML table or "KEY=VALUE,..." , kept as the latter
            if isinstance(value, dict):
                return ",".join(f"{k}={v}" for k, v in value.items())
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if kind == "list":  # a TOML list or a comma-separated string, kept as the latter
            return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
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
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        kind_name = {"size": "size such as 50GB or 10MB", "map": "table of names", "list": "list"}.get(
            kind, getattr(kind, "__name__", str(kind)))
        raise ConfigError(f"{where} = {value!r} is not a valid {kind_name} for {name}") from None


def _lookup_toml(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


SECRETS = ("oss_access_key_id", "oss_access_key_secret", "oss_session_token", "modelscope_token", "swarm_secret",
           "hf_token")


def describe(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(setting, value with secrets masked, environment variable, TOML key) for `config show`."""
    rows = []
    for name, (env, key, _) in _SOURCES.items():
        value = getattr(settings, name)
        if name in SECRETS and value:
            shown = value[:3] + "***" if name == "oss_access_key_id" else "***"
        else:
            shown = "" if value is None else str(value)
        rows.append((name, shown, env, key))
    return rows


def points_at_gateway(url: str | None, port: int) -> bool:
    """Whether ``url`` is a loopback address on the gateway's ``port``."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url or "")
        return parts.hostname in ("127.0.0.1", "localhost", "::1") and parts.port == port
    except ValueError:
        return False


def _not_through_own_gateway(settings: Settings) -> Settings:
    """A shell set up for tools (``eval "$(shoal env)"``) points ``HF_ENDPOINT`` and
    ``MODELSCOPE_ENDPOINT`` at this machine's gateway; an agent or a local pull started from
    it must not take them as its origins (it would ask itself). Such an origin is dropped:
    the Hugging Face one is off, ModelScope's is the public hub's (the agent says so when it
    starts)."""
    changes = {}
    if points_at_gateway(settings.hf_endpoint, settings.gateway_port):
        changes["hf_endpoint"] = None
    if points_at_gateway(settings.modelscope_endpoint, settings.gateway_port):
        changes["modelscope_endpoint"] = Settings.modelscope_endpoint
    if changes:
        settings = dataclasses.replace(settings, **changes)
    return settings


def load_settings(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Defaults < TOML file < environment < ``overrides`` (CLI flags; ``None`` = unset)."""
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {}
    path = config_path(env)
    # The config file, then the room file beside it (`shoal room join` writes it: its swarm
    # keys win over the config file's; agent.room).
    for source in (path, room_path(path)):
        if not source.exists():
            continue
        import tomllib  # here: a machine without a config file (a lab's usual) skips its import
        try:
            doc = tomllib.loads(source.read_text(encoding="utf-8"))
        except PermissionError:
            if source == path:
                raise ConfigError(f"cannot read config file {path}: permission denied") from None
            continue  # the room's secret is the agent's: a lab user's commands do without it
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {source}: {e}; fix or remove it") from e
        for name, (_, key, kind) in _SOURCES.items():
            raw = _lookup_toml(doc, key)
            if raw is not None:
                values[name] = _convert(name, f"{source}: {key}", kind, raw)
    for name, (var, _, kind) in _SOURCES.items():
        raw = env.get(var)
        if raw not in (None, ""):
            values[name] = _convert(name, f"${var}", kind, raw)
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = raw
    settings = _not_through_own_gateway(Settings(**values))
    if not 1 <= settings.concurrency <= MAX_CONCURRENCY:
        raise ConfigError(
            f"concurrency {settings.concurrency} is outside 1..{MAX_CONCURRENCY}; "
            f"set {ENV_NAMES['concurrency']} or --concurrency accordingly")
    if not 0 < settings.quota_low <= settings.quota_high <= 1:
        raise ConfigError(f"cache watermarks must satisfy 0 < low <= high <= 1 "
                          f"(low {settings.quota_low}, high {settings.quota_high})")
    if not 0 <= settings.gateway_port <= 65535:
        raise ConfigError(f"gateway port {settings.gateway_port} is not a TCP port")
    if settings.trusted_publishers:  # (the trust module imports cryptography: not for every command)
        from agent.swarm.trust import parse_publishers
        parse_publishers(settings.trusted_publishers)  # refuses a malformed key now, naming it
    if settings.hf_names:
        try:
            hf_name_map(settings.hf_names)
        except ShoalError as e:
            raise ConfigError(f"{ENV_NAMES['hf_names']} / huggingface.names: {e}") from None
    if not 0 <= settings.room_keep_copies <= 100:
        raise ConfigError(f"room.keep_copies {settings.room_keep_copies} is outside 0..100")
    if not 0 < settings.room_link_mbit <= 1_000_000:
        raise ConfigError(f"room.link_mbit {settings.room_link_mbit} is not a link speed in Mbit/s")
    if settings.swarm_location:
        from agent.swarm.location import LocationError, parse
        try:
            parse(settings.swarm_location)
        except LocationError as e:
            raise ConfigError(f"{ENV_NAMES['swarm_location']} / {e}") from None
    if not 1 <= settings.follow_per_place <= 64:
        raise ConfigError(f"{ENV_NAMES['follow_per_place']} / swarm.follow_per_place {settings.follow_per_place} "
                          "is outside 1..64 (peers a pull follows in each other place)")
    if not 1 <= settings.origin_streams <= 64:
        raise ConfigError(f"origin streams {settings.origin_streams} is outside 1..64")
    if not 1 <= settings.upload_slots <= 256:
        raise ConfigError(f"upload slots {settings.upload_slots} is outside 1..256")
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
    if settings.oss_bucket and not _OSS_BUCKET_NAME.fullmatch(settings.oss_bucket):
        raise ConfigError(
            f"{settings.oss_bucket!r} is not an OSS bucket name: 3-63 lower-case letters, digits and "
            "hyphens, starting and ending with a letter or digit (SHOAL_OSS_BUCKET / oss.bucket)")
    if settings.oss_credentials not in ("auto", "chain"):
        raise ConfigError(f"oss.credentials is {settings.oss_credentials!r}: use \"auto\" (OSS_ACCESS_KEY_* "
                          "or anonymous) or \"chain\" (the Alibaba Cloud credentials chain)")
    if settings.oss_credentials == "chain" and settings.oss_access_key_id:
        raise ConfigError("oss.credentials = \"chain\" and OSS_ACCESS_KEY_ID are both set: keep one "
                          "(the chain reads ALIBABA_CLOUD_ACCESS_KEY_ID and friends itself)")
    if settings.oss_restore_tier not in ("Expedited", "Standard", "Bulk"):
        raise ConfigError(f"oss.restore_tier is {settings.oss_restore_tier!r}: use Expedited, Standard or Bulk")
    if not 1 <= settings.oss_restore_days <= 365:
        raise ConfigError(f"oss.restore_days {settings.oss_restore_days} is outside 1..365")
    if bool(settings.oss_access_key_id) != bool(settings.oss_access_key_secret):
        raise ConfigError(
            "only one of OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET is set; set both "
            "(and OSS_SESSION_TOKEN for STS credentials) or neither for a public bucket")
    if settings.oss_session_token and not settings.oss_access_key_id:
        raise ConfigError("OSS_SESSION_TOKEN is set without OSS_ACCESS_KEY_ID/SECRET from the same STS grant")
    return settings
