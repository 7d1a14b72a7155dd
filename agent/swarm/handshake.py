"""The data port's handshake, both sides, once, without I/O (``agent.swarm.datapath`` has
the protocol; ``agent.swarm.datawire`` the codecs).

Each side is a generator of steps: it yields ``Read(n)`` (and is sent those ``n`` bytes) or
``Send(data)``, and returns what the handshake decided. The blocking server and chunk
client (threads, ``socket``) and the pull session's asks and HAVE streams (trio) each drive
it with their own reads; before, each wrote the sequence out itself, three times, and the
request framing of the one-answer modes twice.

    server                              client
    MAGIC + nonce                 ->
                                  <-    hello (ticket id, mode, scope, HMAC over the nonce)
                                  <-    the mode's one request, where it has one
    status + message              ->

A read that finds the connection closed is the driver's to report (each side names it in
its own errors); a refusal is the server's answer to send, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

from agent.errors import DataPathError
from agent.swarm.datawire import (BAD_REQUEST, DENIED, HEADER, MAGIC, MAX_CONTENT_ASK, MAX_REQUEST, MAX_ROOM_ASK,
                                  MODE_CONTENT, MODE_OFFER, MODE_ROOM, NONCE_LEN, Ticket, decode_hello,
                                  encode_hello)

OPENING_LEN = len(MAGIC) + NONCE_LEN
MAX_STATUS_MESSAGE = 4096
# The modes whose hello carries one request: its length's size in bytes, and its bound.
REQUEST_FRAMING = {MODE_OFFER: (2, MAX_REQUEST), MODE_ROOM: (2, MAX_ROOM_ASK), MODE_CONTENT: (4, MAX_CONTENT_ASK)}


@dataclass(frozen=True)
class Read:
    n: int


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Granted:
    """A valid hello: who sent it, what it asks, and its one request (None for other modes)."""

    peer: str
    mode: str
    scope: str
    request: bytes | None


@dataclass(frozen=True)
class Refused:
    """The server's answer to a hello it will not serve (the driver sends ``status`` and
    ``message``)."""

    status: int
    message: bytes


class NotADataPort(DataPathError):
    """The other end did not open with this protocol's greeting."""


Steps = Generator["Read | Send", bytes, object]
Checker = Callable[[bytes, bytes, str, str, bytes], "str | None"]  # (ticket id, nonce, mode, scope, mac) -> peer


def certificate_matches(der: bytes | None, pinned: bytes) -> bool:
    """Whether the peer's TLS certificate is the one it announced over libp2p (by SHA-256)."""
    return hmac.compare_digest(hashlib.sha256(der or b"").digest(), pinned)


def frame_request(mode: str, request: bytes) -> bytes:
    """What follows the hello for ``mode``: the length-prefixed request, or nothing."""
    framing = REQUEST_FRAMING.get(mode)
    if framing is None:
        return b""
    size, limit = framing
    if len(request) > limit:
        raise DataPathError(f"a {mode} request of {len(request)} bytes exceeds {limit}")
    return len(request).to_bytes(size, "big") + request


def client(ticket: Ticket, mode: str, scope: str = "", request: bytes = b"") -> Steps:
    """The connecting side; returns (status, message) of the server's answer."""
    opening = yield Read(OPENING_LEN)
    if opening[:len(MAGIC)] != MAGIC:
        raise NotADataPort("not a shoal data port (or an older version)")
    yield Send(encode_hello(ticket, opening[len(MAGIC):], mode, scope) + frame_request(mode, request))
    status, size = HEADER.unpack((yield Read(HEADER.size)))
    message = (yield Read(min(size, MAX_STATUS_MESSAGE))).decode(errors="replace") if size else ""
    return status, message


def server(check: Checker) -> Steps:
    """The listening side, up to its answer; returns ``Granted`` or ``Refused``. ``check``
    finds the peer a hello's key and MAC belong to (``TicketBook.check`` with the
    connection's address)."""
    nonce = secrets.token_bytes(NONCE_LEN)
    yield Send(MAGIC + nonce)
    (length,) = struct.unpack(">H", (yield Read(2)))
    if length > MAX_REQUEST:
        return Refused(BAD_REQUEST, b"hello too large")
    try:
        ticket_id, mode, scope, mac = decode_hello((yield Read(length)))
    except DataPathError as e:
        return Refused(BAD_REQUEST, str(e).encode())
    peer = check(ticket_id, nonce, mode, scope, mac)
    if peer is None:
        return Refused(DENIED, b"unknown, expired or misused key; say hello to the peer again")
    request = None
    framing = REQUEST_FRAMING.get(mode)
    if framing is not None:  # the one request (an offer's, a room ask, a manifest) comes within the same deadline
        size, limit = framing
        length = int.from_bytes((yield Read(size)), "big")
        if length > limit:
            return Refused(BAD_REQUEST, f"no {mode} request, or one too large".encode())
        request = yield Read(length)
    return Granted(peer, mode, scope, request)


def drive(steps: Steps, read: Callable[[int], bytes | None], send: Callable[[bytes], None]):
    """Run a side over blocking I/O: ``read(n)`` gives n bytes or None (closed: the result is
    then None). Exceptions of ``read``/``send`` and of the steps pass through."""
    try:
        step = next(steps)
        while True:
            if isinstance(step, Send):
                send(step.data)
                step = steps.send(None)
            else:
                data = read(step.n)
                if data is None:
                    return None
                step = steps.send(data)
    except StopIteration as done:
        return done.value


async def drive_async(steps: Steps, read, send):
    """``drive`` over async I/O: ``await read(n)`` (raises when closed), ``await send(data)``."""
    try:
        step = next(steps)
        while True:
            if isinstance(step, Send):
                await send(step.data)
                step = steps.send(None)
            else:
                step = steps.send(await read(step.n))
    except StopIteration as done:
        return done.value
