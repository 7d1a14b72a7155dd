"""Asks on a peer's data port from trio: the one-answer asks (an offer, a room ask, a
content ask) and the keyed connection a HAVE stream opens with (``open_keyed``). The
protocol is ``agent.swarm.datapath``'s; the handshake ``agent.swarm.handshake``'s, driven
here with trio reads. Used by ``agent.swarm.session`` and ``agent.swarm.membership``."""

from __future__ import annotations

import logging

import trio

from agent.errors import KeyRefused, PeerBroken, PeerRefused, ShoalError
from agent.swarm import handshake, wire
from agent.swarm.datawire import (DENIED, MAX_OFFER, MAX_ROOM_ANSWER, MODE_CONTENT, MODE_OFFER, MODE_ROOM, OK,
                                  STATUS_NAMES, Ticket, client_tls)
from agent.swarm.handshake import NotADataPort, certificate_matches
from agent.swarm.protocol import Contact, parse_answer

log = logging.getLogger("shoal.swarm")


class _Reader:
    """Exact reads from a trio stream, bounded."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, bytearray()

    async def frames(self) -> list[bytes]:
        """The bodies of the HAVE frames complete in the buffer, receiving until there is
        at least one (``agent.swarm.wire``: u32 length, then the body; ``PeerBroken`` past
        its bound or when the peer closes)."""
        header = wire.FRAME_HEADER.size
        while True:
            bodies, at = [], 0
            while len(self.buffer) - at >= header:
                length = wire.frame_length(bytes(self.buffer[at:at + header]))
                if len(self.buffer) - at - header < length:
                    break
                bodies.append(bytes(self.buffer[at + header:at + header + length]))
                at += header + length
            if bodies:
                del self.buffer[:at]
                return bodies
            data = await self.stream.receive_some(65536)
            if not data:
                raise PeerBroken("the peer closed its HAVE stream")
            self.buffer += data

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.stream.receive_some(max(65536, n - len(self.buffer)))
            if not data:
                raise PeerBroken("the peer closed its HAVE stream")
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out


async def _open_stream(address: tuple[str, int], tls: bytes | None):
    stream = await trio.open_tcp_stream(*address)
    if tls is None:
        return stream
    secured = trio.SSLStream(stream, client_tls(), server_hostname=None)
    await secured.do_handshake()
    if not certificate_matches(secured.getpeercert(binary_form=True), tls):
        await secured.aclose()
        raise PeerBroken("the peer's TLS certificate is not the one it announced over the swarm")
    return secured


async def open_keyed(contact: Contact, mode: str, scope: str = "", request: bytes = b""):
    """A connection to a peer's data port, past its hello: (stream, reader). ``request``
    (an offer's) goes with the hello. Raises ``KeyRefused``, ``PeerBroken``, ``OSError``."""
    stream = await _open_stream(contact.data, contact.tls)
    try:
        reader = _Reader(stream)
        try:
            status, message = await handshake.drive_async(
                handshake.client(Ticket.decode(contact.key), mode, scope, request), reader.exactly, stream.send_all)
        except NotADataPort as e:
            raise PeerBroken(str(e)) from None
        if status == DENIED:
            raise KeyRefused(f"the peer no longer takes our key: {message}")
        if status != OK:
            raise PeerRefused(status, f"{mode} refused: {STATUS_NAMES.get(status, status)}: {message}")
    except BaseException:
        await stream.aclose()
        raise
    return stream, reader


async def _ask_over(contact: Contact, mode: str, request: bytes, timeout: float, limit: int, what: str) -> bytes:
    """One request of ``mode`` (an ask: its request goes with the hello) and its answer."""
    with trio.fail_after(timeout):
        stream, reader = await open_keyed(contact, mode, "", request)
        async with stream:
            length = int.from_bytes(await reader.exactly(4), "big")
            if length > limit:
                raise PeerBroken(f"{what} of {length} bytes exceeds {limit}")
            return await reader.exactly(length)


async def offer_over(contact: Contact, request: bytes, timeout: float) -> bytes:
    """One offer request on the peer's data port, and its answer (bytes, as the peer sent it)."""
    return await _ask_over(contact, MODE_OFFER, request, timeout, MAX_OFFER, "an offer")


async def room_over(contact: Contact, request: bytes, timeout: float) -> bytes:
    """One room ask (``agent.assign.wire``) on the peer's data port, and its answer."""
    return await _ask_over(contact, MODE_ROOM, request, timeout, MAX_ROOM_ANSWER, "a room answer")


async def content_over(contact: Contact, manifest, timeout: float):
    """A content ask (``agent.swarm.datapath``): which chunks of ``manifest`` the peer holds
    under any model, by BLAKE3. Its offer (``protocol.Answer``), or None when it holds none
    or cannot say now."""
    try:
        with trio.fail_after(timeout):
            stream, reader = await open_keyed(contact, MODE_CONTENT, manifest.id, manifest.encode())
            async with stream:
                length = int.from_bytes(await reader.exactly(4), "big")
                if length > MAX_OFFER:
                    raise PeerBroken(f"a content answer of {length} bytes exceeds {MAX_OFFER}")
                return parse_answer(await reader.exactly(length), known=manifest)
    except LookupError:  # it holds none of it
        return None
    except (OSError, ShoalError, trio.TooSlowError, trio.BrokenResourceError) as e:
        log.debug("content ask: %s", e)
        return None
