"""The LAN data path: verified chunks over ticketed TCP, real sockets on loopback, real
store and files; refusals for bad tickets, unknown chunks, malformed requests, full slots."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import NotFound, SourceUnavailable
from agent.manifest import ModelRef, chunk_span
from agent.mirror import manifest_from_dir
from agent.store import Store, blake3_hash
from agent.swarm.datapath import (MAGIC, DataClient, DataServer, StoreLocator, TicketBook, decode_request,
                                  encode_request)
from agent.testing.models import make_model

CHUNK = 64 * 1024
REF = ModelRef("lab/peer-model")


@pytest.fixture
def served(tmp_path):
    """A store holding a complete model, served by a DataServer."""
    model = make_model(tmp_path / "src", weights_bytes=600_000, shards=2, seed="dp")
    store = Store(tmp_path / "cache")
    manifest = manifest_from_dir(REF, model, CHUNK)
    store.adopt(REF, model, manifest)
    tickets = TicketBook(ttl=60)
    server = DataServer(StoreLocator(store), tickets, slots=2).start()
    yield store, manifest, tickets, server, model
    server.close()
    store.close()


def test_every_chunk_arrives_verified(served):
    store, manifest, tickets, server, model = served
    client = DataClient()
    ticket = tickets.issue("peer-b")
    for entry in manifest.files:
        data = (model / entry.path).read_bytes()
        for index, digest in enumerate(entry.chunks):
            offset, length = chunk_span(entry.size, manifest.chunk_size, index)
            buffer = bytearray(length)
            client.fetch(server.address, ticket, manifest.id, entry.path, index, memoryview(buffer), length,
                         time.monotonic() + 10)
            assert bytes(buffer) == data[offset:offset + length] and blake3_hash(buffer) == digest
    deadline = time.monotonic() + 5  # the server counts a chunk once sendfile returns
    while server.bytes_served < manifest.total_size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.bytes_served == manifest.total_size
    client.close()


def test_a_bad_or_expired_ticket_is_refused(served):
    store, manifest, tickets, server, model = served
    entry = manifest.files[0]
    buffer = memoryview(bytearray(entry.size))
    with pytest.raises(SourceUnavailable, match="denied"):
        DataClient().fetch(server.address, b"x" * 32, manifest.id, entry.path, 0, buffer, entry.size,
                           time.monotonic() + 5)
    clock = [0.0]
    book = TicketBook(ttl=10, clock=lambda: clock[0])
    ticket = book.issue("peer")
    assert book.check(ticket) == "peer"
    clock[0] = 11
    assert book.check(ticket) is None


def test_a_chunk_not_held_is_missing_and_the_connection_stays_usable(served):
    store, manifest, tickets, server, model = served
    ticket = tickets.issue("peer-b")
    client = DataClient()
    entry = manifest.files[0]
    buffer = memoryview(bytearray(entry.size))
    with pytest.raises(NotFound):
        client.fetch(server.address, ticket, manifest.id, "no/such/file", 0, buffer, 10, time.monotonic() + 5)
    with pytest.raises(NotFound):
        client.fetch(server.address, ticket, "ab" * 32, entry.path, 0, buffer, 10, time.monotonic() + 5)
    client.fetch(server.address, ticket, manifest.id, entry.path, 0, buffer, entry.size, time.monotonic() + 5)


def test_only_verified_chunks_of_a_partial_file_are_served(served, tmp_path):
    store, manifest, tickets, server, model = served
    big = max(manifest.files, key=lambda f: f.size)
    # Drop the claim on chunk 1: as if that chunk had not arrived yet.
    store._forget_chunks(str(REF), big.path, [1])
    ticket = tickets.issue("peer-b")
    buffer = memoryview(bytearray(CHUNK))
    client = DataClient()
    client.fetch(server.address, ticket, manifest.id, big.path, 0, buffer, CHUNK, time.monotonic() + 5)
    with pytest.raises(NotFound):
        client.fetch(server.address, ticket, manifest.id, big.path, 1, buffer, CHUNK, time.monotonic() + 5)


def test_connections_over_the_slots_are_told_busy(served):
    store, manifest, tickets, server, model = served
    held = [socket.create_connection(server.address) for _ in range(2)]
    time.sleep(0.2)
    try:
        entry = manifest.files[0]
        with pytest.raises(SourceUnavailable, match="busy"):
            DataClient().fetch(server.address, tickets.issue("c"), manifest.id, entry.path, 0,
                               memoryview(bytearray(entry.size)), entry.size, time.monotonic() + 5)
    finally:
        for conn in held:
            conn.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for every hypothesis example (a server per example would be slow)."""
    root = tmp_path_factory.mktemp("shared")
    model = make_model(root / "src", weights_bytes=100_000, shards=1, seed="dp2")
    store = Store(root / "cache")
    manifest = manifest_from_dir(REF, model, CHUNK)
    store.adopt(REF, model, manifest)
    tickets = TicketBook()
    server = DataServer(StoreLocator(store), tickets).start()
    entry = manifest.files[0]
    yield server.address, tickets.issue("x"), manifest.id, entry.path, entry.size
    server.close()
    store.close()


@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(shared_server, garbage):
    address, ticket, manifest_id, path, size = shared_server
    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(MAGIC + struct.pack(">H", len(garbage)) + garbage)
        conn.shutdown(socket.SHUT_WR)
        reply = conn.recv(9)
    assert reply == b"" or reply[0] in (1, 3)  # closed, denied or bad request
    buffer = memoryview(bytearray(size))
    DataClient().fetch(address, ticket, manifest_id, path, 0, buffer, size, time.monotonic() + 5)


def test_the_request_codec_round_trips_and_refuses_junk():
    frame = encode_request(b"t" * 32, "ab" * 32, "model.safetensors", 7)
    assert frame[:4] == MAGIC
    assert decode_request(frame[6:]) == (b"t" * 32, "ab" * 32, "model.safetensors", 7)
    from agent.swarm.datapath import DataPathError
    for bad in (b"", b"\x94\xc4\x01x\xa1a\xa1b\x00", frame[6:-1]):
        with pytest.raises(DataPathError):
            decode_request(bad)


def test_many_threads_share_few_connections_so_a_peer_never_fills_its_slots(served):
    """A thread pool uses whichever threads it likes: connections must not be per thread."""
    import threading
    store, manifest, tickets, server, model = served  # the server has 2 slots
    client = DataClient()
    ticket = tickets.issue("peer-b")
    entry = manifest.files[0]
    errors = []

    def one_fetch():
        try:
            client.fetch(server.address, ticket, manifest.id, entry.path, 0, memoryview(bytearray(entry.size)),
                         entry.size, time.monotonic() + 5)
        except Exception as e:  # collected for the assertion below
            errors.append(e)
    for _ in range(20):  # twenty threads, one after the other
        thread = threading.Thread(target=one_fetch)
        thread.start()
        thread.join()
    assert errors == []
    client.close()
