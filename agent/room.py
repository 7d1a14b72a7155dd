"""A room: the teacher's swarm, joined with one code.

``shoal room create NAME`` (the teacher) makes a swarm secret and prints a **join code**;
``shoal room join CODE`` (each student) writes the agent's room file and reloads the agent.
The code carries exactly what a student machine needs and nothing else:

- the room's secret (16 random bytes; the swarm's pre-shared key is derived from it): it
  admits a machine to the swarm, so whoever holds the code can join the room, fetch what
  its members hold and serve them chunks (which they verify);
- the teacher's publisher key (32 bytes): what the teacher signs with ``shoal publish`` is
  trusted; nothing else is;
- the teacher's addresses (IPv4 and port, up to three) to dial first; the rest of the room
  is found from there (peer exchange, mDNS).

Wire form: version byte, secret, key, address count, addresses (4 + 2 bytes each), name
(length byte, UTF-8, at most ``MAX_NAME`` bytes), then the first 4 bytes of the BLAKE3 of
all that, in base32 (RFC 4648, no padding) in groups of five after ``SHOAL-``. A typo fails
the check (``UsageError`` naming it), and lookalike characters (0/O, 1/I/L, 8/B) are read
as the alphabet's own. The code holds the secret: it is never logged, and the room file is
readable by the agent's user only (and root).

The room file is ``room.toml`` beside the agent's config file (``agent.config``): its
``[swarm]`` section is read after the config file's, so the room's secret, peers and
teacher key win. ``shoal room leave`` removes it.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError, UsageError
from agent.hashing import blake3_hash

VERSION = 1
SECRET_LEN = 16
KEY_LEN = 32
MAX_ADDRS = 3
MAX_NAME = 40
CHECK_LEN = 4
PREFIX = "SHOAL-"
ROOM_PORT = 7100  # the libp2p port a room's members listen on (the data port travels in hellos)
_LOOKALIKE = str.maketrans({"0": "O", "1": "I", "8": "B", "9": "G"})


@dataclass(frozen=True)
class Room:
    name: str
    secret: bytes
    publisher: bytes
    addrs: tuple[tuple[str, int], ...]

    @property
    def swarm_secret(self) -> str:
        """The swarm secret agents are configured with (``swarm.secret``)."""
        return "room-" + self.secret.hex()

    @property
    def publisher_id(self) -> str:
        return self.publisher.hex()

    def peer_addrs(self) -> list[str]:
        """The teacher's multiaddrs: its peer id is its publisher key (the same Ed25519 key)."""
        peer = peer_id_of(self.publisher)
        return [f"/ip4/{ip}/tcp/{port}/p2p/{peer}" for ip, port in self.addrs]


def new_room(name: str, publisher: bytes, addrs: list[tuple[str, int]]) -> Room:
    room = Room(name, secrets.token_bytes(SECRET_LEN), publisher, tuple(addrs))
    decode_code(encode_code(room))  # checks every field on the way
    return room


def encode_code(room: Room) -> str:
    name = room.name.encode()
    if not room.name or len(name) > MAX_NAME:
        raise UsageError(f"a room name is 1 to {MAX_NAME} bytes; {room.name!r} is not")
    if not 1 <= len(room.addrs) <= MAX_ADDRS:
        raise UsageError(f"a room names 1 to {MAX_ADDRS} teacher addresses")
    body = bytearray([VERSION]) + room.secret + room.publisher + bytes([len(room.addrs)])
    for ip, port in room.addrs:
        body += ipaddress.IPv4Address(ip).packed + int(port).to_bytes(2, "big")
    body += bytes([len(name)]) + name
    body += blake3_hash(bytes(body))[:CHECK_LEN]
    text = base64.b32encode(bytes(body)).decode().rstrip("=")
    return PREFIX + "-".join(text[i:i + 5] for i in range(0, len(text), 5))


def decode_code(code: str) -> Room:
    """The room a join code names; ``UsageError`` (saying what to do) when it is mistyped."""
    text = "".join(code.split()).upper().replace("-", "").translate(_LOOKALIKE)
    if text.startswith("SHOAL"):
        text = text[len("SHOAL"):]
    retype = "copy it again from the teacher's screen (`shoal room show` there prints it)"
    if not text or set(text) - set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"):
        raise UsageError(f"this is not a shoal join code (it has characters a code never has); {retype}")
    try:
        body = base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError:
        raise UsageError(f"this join code has a typo (a character missing or one too many); {retype}") from None
    if len(body) < 1 + SECRET_LEN + KEY_LEN + 2 + CHECK_LEN:
        raise UsageError(f"this join code is too short: part of it is missing; {retype}")
    if base64.b32encode(body).decode().rstrip("=") != text:
        # The last character carries bits no byte uses: a typo there would otherwise read
        # as the same code. Only the one spelling the teacher's screen shows is accepted.
        raise UsageError(f"this join code has a typo (its last character); {retype}")
    payload, check = body[:-CHECK_LEN], body[-CHECK_LEN:]
    if blake3_hash(payload)[:CHECK_LEN] != check:
        raise UsageError(f"this join code has a typo (its check does not match); {retype}")
    if payload[0] != VERSION:
        raise UsageError(f"this join code is of version {payload[0]}; this shoal reads version {VERSION}: "
                         "update shoal on this machine or the teacher's")
    at = 1
    secret = payload[at:at + SECRET_LEN]
    at += SECRET_LEN
    publisher = payload[at:at + KEY_LEN]
    at += KEY_LEN
    count = payload[at]
    at += 1
    if not 1 <= count <= MAX_ADDRS or len(payload) < at + 6 * count + 1:
        raise UsageError(f"this join code is malformed; {retype}")
    addrs = []
    for _ in range(count):
        addrs.append((str(ipaddress.IPv4Address(payload[at:at + 4])), int.from_bytes(payload[at + 4:at + 6], "big")))
        at += 6
    length = payload[at]
    at += 1
    if length == 0 or length > MAX_NAME or len(payload) != at + length:
        raise UsageError(f"this join code is malformed; {retype}")
    try:
        name = payload[at:at + length].decode()
    except UnicodeDecodeError:
        raise UsageError(f"this join code is malformed; {retype}") from None
    return Room(name, bytes(secret), bytes(publisher), tuple(addrs))


def peer_id_of(publisher: bytes) -> str:
    """The libp2p peer id of the agent whose identity key has this public half."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(publisher)).to_base58()


# ----------------------------------------------------------------------------- room file

def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def qr_text(code: str) -> str:
    """The join code as a QR code drawn with block characters (two modules per character
    cell, dark on light), for a class to scan from a terminal or the TUI; "" without qrcode."""
    try:
        import qrcode
    except ImportError:
        return ""
    import io
    qr = qrcode.QRCode(border=1)
    qr.add_data(code)
    qr.make(fit=True)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue()


def write_room_file(path: Path, room: Room, *, teacher: bool, port: int = ROOM_PORT,
                    group: str | None = None) -> None:
    """The agent's room settings, readable by the agent's user only: when root writes it
    for the system agent, mode 0640 with ``group`` (the agent's control group, ``shoal``
    unless the lab named another) so the agent's user reads it."""
    lines = ["# Written by `shoal room create/join`; `shoal room leave` removes it. It holds the",
             "# room's secret: keep it readable by the agent only.",
             "[room]", f"name = {_toml_str(room.name)}", f"code = {_toml_str(encode_code(room))}",
             f"teacher = {'true' if teacher else 'false'}", "",
             "[swarm]", "enabled = true", f"secret = {_toml_str(room.swarm_secret)}", f"port = {int(port)}"]
    if not teacher:
        lines.append("peers = [" + ", ".join(_toml_str(a) for a in room.peer_addrs()) + "]")
        lines.append(f"trusted_publishers = [{_toml_str(room.publisher_id)}]")
    data = ("\n".join(lines) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        if os.getuid() == 0:
            try:
                import grp
                os.fchown(fd, 0, grp.getgrnam(group or "shoal").gr_gid)
                os.fchmod(fd, 0o640)
            except KeyError:
                pass  # no such group: a per-user agent run by root reads it as root
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_room_file(path: Path) -> tuple[Room, bool] | None:
    """(the room, whether this machine is its teacher), or None when not in a room."""
    import tomllib
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the room file {path}: {e}; `shoal room leave` removes it") from e
    section = doc.get("room") or {}
    code = section.get("code")
    if not isinstance(code, str):
        raise ConfigError(f"the room file {path} has no join code; `shoal room leave`, then join again")
    return decode_code(code), bool(section.get("teacher"))
