"""The LAN data port's wire format and keys (``agent.swarm.datapath`` has the whole
protocol): the hello and request codecs (pure), the key book a server checks hellos
against, TLS material, and the blocking reads both ends share (the handshake itself: ``agent.swarm.handshake``)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from agent.errors import DataPathError
from agent.manifest import HASH_LEN, MAX_PATH_BYTES

MAGIC = b"SHD2"
NONCE_LEN = 16
TICKET_ID_LEN = 16
TICKET_SECRET_LEN = 32
TICKET_LEN = TICKET_ID_LEN + TICKET_SECRET_LEN  # as handed over libp2p: id then secret
MAX_REQUEST = 4 * 1024
OK, DENIED, MISSING, BAD_REQUEST, BUSY = range(5)
STATUS_NAMES = {OK: "ok", DENIED: "denied", MISSING: "missing", BAD_REQUEST: "bad request", BUSY: "busy"}
HEADER = struct.Struct(">BQ")
MAX_TICKETS = 4096
TICKET_TTL = 3600.0
MODE_OFFER, MODE_GET, MODE_SUB, MODE_CONTENT, MODE_ROOM = "offer", "get", "sub", "content", "room"
MODES = (MODE_OFFER, MODE_GET, MODE_SUB, MODE_CONTENT, MODE_ROOM)
ASKS = (MODE_OFFER, MODE_ROOM)  # one request with the hello, one answer; no scope
MAX_ROOM_ASK = 24 * 1024  # agent.assign.wire.MAX_ASK
MAX_ROOM_ANSWER = 256 * 1024  # agent.assign.wire.MAX_ANSWER
MAX_OFFER = 8 * 1024 * 1024  # agent.swarm.protocol.MAX_ANSWER
MAX_CONTENT_ASK = 8 * 1024 * 1024  # the manifest a content ask carries
_DOMAIN = b"shoal-data-v2|"


# ------------------------------------------------------------------------- codec (pure)

@dataclass(frozen=True)
class Ticket:
    id: bytes
    secret: bytes

    def encode(self) -> bytes:
        return self.id + self.secret

    @classmethod
    def decode(cls, data: bytes) -> "Ticket":
        if not isinstance(data, bytes) or len(data) != TICKET_LEN:
            raise DataPathError(f"a ticket is {TICKET_LEN} bytes")
        return cls(data[:TICKET_ID_LEN], data[TICKET_ID_LEN:])


def hello_mac(secret: bytes, nonce: bytes, mode: str, scope: str) -> bytes:
    return hmac.new(secret, _DOMAIN + nonce + f"{mode}|{scope}".encode(), hashlib.sha256).digest()


def _frame(body: bytes) -> bytes:
    if len(body) > MAX_REQUEST:
        raise DataPathError(f"request of {len(body)} bytes exceeds {MAX_REQUEST}")
    return struct.pack(">H", len(body)) + body


def encode_hello(ticket: Ticket, nonce: bytes, mode: str, scope: str = "") -> bytes:
    return _frame(msgpack.packb([ticket.id, mode, scope, hello_mac(ticket.secret, nonce, mode, scope)],
                                use_bin_type=True))


def decode_hello(body: bytes) -> tuple[bytes, str, str, bytes]:
    """(ticket id, mode, scope, mac) of a hello; raises ``DataPathError``."""
    try:
        ticket_id, mode, scope, mac = msgpack.unpackb(
            body, raw=False, max_bin_len=64, max_str_len=128, max_array_len=4, max_map_len=0, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types; any is a bad hello
        raise DataPathError(f"undecodable hello ({type(e).__name__})") from e
    if (not isinstance(ticket_id, bytes) or len(ticket_id) != TICKET_ID_LEN or not isinstance(mac, bytes)
            or len(mac) != 32 or mode not in MODES or not isinstance(scope, str)
            or (mode in ASKS and scope != "")
            or (mode not in ASKS and (len(scope) != 2 * HASH_LEN or any(c not in "0123456789abcdef"
                                                                        for c in scope)))):
        raise DataPathError("malformed hello")
    return ticket_id, mode, scope, mac


def encode_request(path: str, index: int) -> bytes:
    return _frame(msgpack.packb([path, index], use_bin_type=True))


def decode_request(body: bytes) -> tuple[str, int]:
    """Validate the msgpack body of a request (after its length)."""
    try:
        path, index = msgpack.unpackb(body, raw=False, max_bin_len=0, max_str_len=MAX_PATH_BYTES * 4,
                                      max_array_len=2, max_map_len=0, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types; any is a bad request
        raise DataPathError(f"undecodable request ({type(e).__name__})") from e
    if not isinstance(path, str) or not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < 1 << 32:
        raise DataPathError("malformed request")
    return path, index


# ---------------------------------------------------------------------------------- TLS

def make_tls() -> tuple[ssl.SSLContext, bytes]:
    """A server context with a fresh self-signed certificate (EC P-256), and that
    certificate's SHA-256, which peers pin (they learn it over libp2p)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal-data")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files: a private temporary one, removed at once.
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
        os.chmod(pem.name, 0o600)
        pem.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
        pem.write(cert.public_bytes(serialization.Encoding.PEM))
        pem.flush()
        context.load_cert_chain(pem.name)
    return context, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the certificate is pinned by its hash instead (see module docstring)
    context.verify_mode = ssl.CERT_NONE
    return context


# ------------------------------------------------------------------------------ tickets

@dataclass(frozen=True)
class _Issued:
    secret: bytes
    peer: str
    address: str | None
    expires: float


class TicketBook:
    """Keys issued over the authenticated channel, one per peer at a time. Thread-safe, bounded."""

    def __init__(self, ttl: float = TICKET_TTL, clock=time.monotonic):
        self.ttl, self._clock = ttl, clock
        self._tickets: OrderedDict[bytes, _Issued] = OrderedDict()
        self._by_peer: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    def issue(self, peer: str, address: str | None) -> Ticket:
        """A key for ``peer`` to use this data port from ``address`` (its IP as this agent saw
        it; None: any, for tools that have no libp2p connection). The peer's older keys stay
        valid a little (a renewal may cross a connection in flight), two at most."""
        ticket = Ticket(secrets.token_bytes(TICKET_ID_LEN), secrets.token_bytes(TICKET_SECRET_LEN))
        with self._lock:
            self._tickets[ticket.id] = _Issued(ticket.secret, peer, address, self._clock() + self.ttl)
            held = self._by_peer.setdefault(peer, [])
            held.append(ticket.id)
            while len(held) > 2:
                self._tickets.pop(held.pop(0), None)
            while len(self._tickets) > MAX_TICKETS:
                old, issued = self._tickets.popitem(last=False)
                if old in self._by_peer.get(issued.peer, ()):
                    self._by_peer[issued.peer].remove(old)
        return ticket

    def revoke(self, peer: str) -> None:
        """The peer is gone (its libp2p connection closed): its keys end now."""
        with self._lock:
            for ticket_id in self._by_peer.pop(peer, []):
                self._tickets.pop(ticket_id, None)

    def check(self, ticket_id: bytes, nonce: bytes, mode: str, scope: str, mac: bytes, address: str) -> str | None:
        """The peer a valid hello comes from, or None (unknown, revoked or expired key, another
        address, a wrong MAC)."""
        with self._lock:
            issued = self._tickets.get(ticket_id)
            if issued is None:
                return None
            if issued.expires < self._clock():
                del self._tickets[ticket_id]
                return None
        if issued.address is not None and issued.address != address:
            return None
        if not hmac.compare_digest(mac, hello_mac(issued.secret, nonce, mode, scope)):
            return None
        return issued.peer


# ------------------------------------------------------------------------------ locating


def recv_exact(conn: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    """``n`` bytes, or None if the peer closed first. With ``deadline``, the whole read must
    finish by then (a client trickling a byte at a time gains nothing)."""
    data = bytearray()
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            conn.settimeout(left)
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def reply(conn: socket.socket, status: int, message: bytes) -> None:
    try:
        conn.sendall(HEADER.pack(status, len(message)) + message)
    except OSError:
        pass

