"""agent.swarm.handshake: the data port's handshake, both sides run against each other in
memory (the socket and trio drivers are tested through the data path's own tests)."""

from __future__ import annotations

import struct

import pytest

from agent.swarm import handshake
from agent.swarm.datawire import (BAD_REQUEST, DENIED, MAX_REQUEST, MODE_CONTENT, MODE_GET, MODE_OFFER, OK,
                                  TicketBook, encode_hello)
from agent.swarm.handshake import Granted, NotADataPort, Read, Refused, Send

SCOPE = "ab" * 32


def _converse(client, server):
    """Run both sides against each other: what one sends, the other reads. Returns (what the
    server decided, what the client was answered or None when the server stopped first)."""
    to_server, to_client = bytearray(), bytearray()

    def pump(steps, inbox, outbox):  # yields while it waits for bytes; returns the side's result
        try:
            step = next(steps)
            while True:
                if isinstance(step, Send):
                    outbox += step.data
                    step = steps.send(None)
                elif len(inbox) >= step.n:
                    data = bytes(inbox[:step.n])
                    del inbox[:step.n]
                    step = steps.send(data)
                else:
                    yield step
        except StopIteration as done:
            return done.value
    s, c = pump(server, to_server, to_client), pump(client, to_client, to_server)
    decided = answered = None
    for _ in range(10):
        if decided is None:
            try:
                next(s)
            except StopIteration as done:
                decided = done.value
                status, message = (OK, b"") if isinstance(decided, Granted) else (decided.status, decided.message)
                to_client += struct.pack(">BQ", status, len(message)) + message
        if answered is None:
            try:
                next(c)
            except StopIteration as done:
                answered = done.value
        if decided is not None and answered is not None:
            break
    return decided, answered


def _book():
    book = TicketBook()
    return book, book.issue("peer-a", "10.0.0.2")


def test_a_valid_hello_is_granted_with_its_scope():
    book, ticket = _book()
    decided, answered = _converse(handshake.client(ticket, MODE_GET, SCOPE),
                                  handshake.server(lambda *hello: book.check(*hello, "10.0.0.2")))
    assert decided == Granted("peer-a", MODE_GET, SCOPE, None)
    assert answered == (OK, "")


def test_an_ask_carries_its_one_request():
    book, ticket = _book()
    decided, answered = _converse(handshake.client(ticket, MODE_OFFER, "", b"what do you hold"),
                                  handshake.server(lambda *hello: book.check(*hello, "10.0.0.2")))
    assert decided == Granted("peer-a", MODE_OFFER, "", b"what do you hold") and answered == (OK, "")
    manifest = b"m" * 70_000  # a content ask's manifest: more than a u16 length
    decided, _ = _converse(handshake.client(ticket, MODE_CONTENT, SCOPE, manifest),
                           handshake.server(lambda *hello: book.check(*hello, "10.0.0.2")))
    assert decided.request == manifest


def test_a_key_from_another_address_or_revoked_is_refused():
    book, ticket = _book()
    decided, answered = _converse(handshake.client(ticket, MODE_GET, SCOPE),
                                  handshake.server(lambda *hello: book.check(*hello, "10.0.0.9")))
    assert isinstance(decided, Refused) and decided.status == DENIED
    assert answered[0] == DENIED and "say hello to the peer again" in answered[1]
    book.revoke("peer-a")
    decided, _ = _converse(handshake.client(ticket, MODE_GET, SCOPE),
                           handshake.server(lambda *hello: book.check(*hello, "10.0.0.2")))
    assert decided.status == DENIED


def test_a_hello_replayed_against_another_nonce_is_refused():
    book, ticket = _book()
    recorded = encode_hello(ticket, b"\0" * 16, MODE_GET, SCOPE)  # answered to another server's nonce
    steps = handshake.server(lambda *hello: book.check(*hello, "10.0.0.2"))
    assert isinstance(next(steps), Send)
    assert steps.send(None) == Read(2)
    assert steps.send(recorded[:2]) == Read(len(recorded) - 2)
    with pytest.raises(StopIteration) as done:
        steps.send(recorded[2:])
    assert done.value.value.status == DENIED


def test_oversized_or_malformed_hellos_and_requests_are_refused_as_bad():
    book, _ = _book()
    steps = handshake.server(lambda *hello: book.check(*hello, "10.0.0.2"))
    next(steps), steps.send(None)
    with pytest.raises(StopIteration) as done:
        steps.send(struct.pack(">H", MAX_REQUEST + 1))
    assert done.value.value == Refused(BAD_REQUEST, b"hello too large")
    steps = handshake.server(lambda *hello: book.check(*hello, "10.0.0.2"))
    next(steps), steps.send(None), steps.send(struct.pack(">H", 3))
    with pytest.raises(StopIteration) as done:
        steps.send(b"\xc1\xc1\xc1")
    assert done.value.value.status == BAD_REQUEST
    with pytest.raises(Exception, match="exceeds"):
        handshake.frame_request(MODE_OFFER, b"x" * (MAX_REQUEST + 1))


def test_a_server_that_is_not_a_data_port_is_named():
    steps = handshake.client(_book()[1], MODE_GET, SCOPE)
    assert next(steps) == Read(handshake.OPENING_LEN)
    with pytest.raises(NotADataPort, match="not a shoal data port"):
        steps.send(b"HTTP/1.1 400 Bad Request\r\n"[:handshake.OPENING_LEN])


def test_the_blocking_driver_stops_where_the_peer_closes():
    book, _ = _book()
    sent = []
    outcome = handshake.drive(handshake.server(lambda *hello: book.check(*hello, "10.0.0.2")),
                              lambda n: None, sent.append)
    assert outcome is None and sent and sent[0].startswith(b"SHD2")
