"""The LAN data path: verified chunks over ticketed TCP, real sockets on loopback, real
store and files; refusals for bad tickets, unknown chunks, malformed requests, full slots;
and a hostile peer: connection floods, trickled handshakes, stolen and replayed tickets."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DataPathError, NotFound, SourceUnavailable
from agent.manifest import ModelRef, chunk_span
from agent.mirror import manifest_from_dir
from agent.hashing import blake3_hash
from agent.store import Store
from agent.swarm.datapath import (MAGIC, MAX_PENDING_PER_ADDRESS, NONCE_LEN, DataClient, DataServer,
                                  StoreLocator, TicketBook, decode_hello, decode_request, encode_hello,
                                  encode_request)
from agent.testing.models import make_model

CHUNK = 64 * 1024
REF = ModelRef("lab/peer-model")
HERE = "127.0.0.1"


@pytest.fixture
def served(tmp_path):
    """A store holding a complete model, served by a DataServer with two upload slots."""
    model = make_model(tmp_path / "src", weights_bytes=600_000, shards=2, seed="dp")
    store = Store(tmp_path / "cache")
    manifest = manifest_from_dir(REF, model, CHUNK)
    store.adopt(REF, model, manifest)
    tickets = TicketBook(ttl=60)
    server = DataServer(StoreLocator(store), tickets, slots=2, handshake_timeout=1.0).start()
    yield store, manifest, tickets, server, model
    server.close()
    store.close()


def fetch_first(server, ticket, manifest, client=None) -> bytes:
    entry = manifest.files[0]
    buffer = bytearray(entry.size)
    (client or DataClient()).fetch(server.address, ticket, manifest.id, entry.path, 0, memoryview(buffer),
                                   entry.size, time.monotonic() + 5)
    return bytes(buffer)


def test_every_chunk_arrives_verified(served):
    store, manifest, tickets, server, model = served
    client = DataClient()
    ticket = tickets.issue("peer-b", HERE)
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


def test_a_bad_expired_revoked_or_misused_key_is_refused(served):
    store, manifest, tickets, server, model = served
    other = TicketBook().issue("peer", HERE)  # never issued by this server
    with pytest.raises(SourceUnavailable, match="denied"):
        fetch_first(server, other, manifest)
    for_elsewhere = tickets.issue("peer", "127.0.0.9")  # issued to another address
    with pytest.raises(SourceUnavailable, match="denied"):
        fetch_first(server, for_elsewhere, manifest)
    revoked = tickets.issue("leaver", HERE)
    tickets.revoke("leaver")  # its libp2p connection closed
    with pytest.raises(SourceUnavailable, match="denied"):
        fetch_first(server, revoked, manifest)
    clock = [0.0]
    book = TicketBook(ttl=10, clock=lambda: clock[0])
    ticket = book.issue("peer", HERE)
    nonce = b"n" * NONCE_LEN
    _, mode, scope, mac = decode_hello(encode_hello(ticket, nonce, "get", manifest.id)[2:])
    assert book.check(ticket.id, nonce, mode, scope, mac, HERE) == "peer"
    assert book.check(ticket.id, b"m" * NONCE_LEN, mode, scope, mac, HERE) is None  # replayed elsewhere
    assert book.check(ticket.id, nonce, mode, "ab" * 32, mac, HERE) is None  # for another manifest
    assert book.check(ticket.id, nonce, "sub", scope, mac, HERE) is None  # in another mode
    clock[0] = 11
    assert book.check(ticket.id, nonce, mode, scope, mac, HERE) is None


def test_the_ticket_secret_never_crosses_the_data_connection_and_a_replay_is_refused(served):
    """An eavesdropper on the LAN sees the handshake; what it sees cannot be used again."""
    store, manifest, tickets, server, model = served
    ticket = tickets.issue("peer-b", HERE)
    seen = bytearray()
    listener = socket.create_server((HERE, 0))

    def relay():  # a man in the middle that records what the client sends
        inbound, _ = listener.accept()
        outbound = socket.create_connection(server.address)
        opening = outbound.recv(len(MAGIC) + NONCE_LEN)
        inbound.sendall(opening)
        hello = inbound.recv(4096)
        seen.extend(hello)
        outbound.sendall(hello)
        inbound.sendall(outbound.recv(4096))
        request = inbound.recv(4096)
        seen.extend(request)
        outbound.sendall(request)
        header = outbound.recv(9, socket.MSG_WAITALL)
        inbound.sendall(header + outbound.recv(struct.unpack(">BQ", header)[1], socket.MSG_WAITALL))
        inbound.close()
        outbound.close()
    thread = threading.Thread(target=relay)
    thread.start()
    entry = manifest.files[0]
    buffer = bytearray(entry.size)
    DataClient().fetch(listener.getsockname(), ticket, manifest.id, entry.path, 0, memoryview(buffer), entry.size,
                       time.monotonic() + 5)
    thread.join(timeout=10)
    assert ticket.secret not in bytes(seen)
    # Replaying the recorded hello on a new connection gets nowhere: the nonce is new.
    with socket.create_connection(server.address, timeout=5) as conn:
        conn.recv(len(MAGIC) + NONCE_LEN)
        conn.sendall(bytes(seen[:2 + struct.unpack(">H", seen[:2])[0]]))
        assert conn.recv(9)[0] == 1  # DENIED


def test_a_chunk_not_held_is_missing_and_the_connection_stays_usable(served):
    store, manifest, tickets, server, model = served
    ticket = tickets.issue("peer-b", HERE)
    client = DataClient()
    entry = manifest.files[0]
    buffer = memoryview(bytearray(entry.size))
    with pytest.raises(NotFound):
        client.fetch(server.address, ticket, manifest.id, "no/such/file", 0, buffer, 10, time.monotonic() + 5)
    client.fetch(server.address, ticket, manifest.id, entry.path, 0, buffer, entry.size, time.monotonic() + 5)


def test_only_verified_chunks_of_a_partial_file_are_served(served, tmp_path):
    store, manifest, tickets, server, model = served
    big = max(manifest.files, key=lambda f: f.size)
    # Drop the claim on chunk 1: as if that chunk had not arrived yet.
    store.index.forget_chunks(str(REF), big.path, [1])
    ticket = tickets.issue("peer-b", HERE)
    buffer = memoryview(bytearray(CHUNK))
    client = DataClient()
    client.fetch(server.address, ticket, manifest.id, big.path, 0, buffer, CHUNK, time.monotonic() + 5)
    with pytest.raises(NotFound):
        client.fetch(server.address, ticket, manifest.id, big.path, 1, buffer, CHUNK, time.monotonic() + 5)


def test_a_removed_model_is_not_served_any_more(served):
    store, manifest, tickets, server, model = served
    ticket = tickets.issue("peer-b", HERE)
    fetch_first(server, ticket, manifest)
    store.remove(REF)
    with pytest.raises(NotFound):
        fetch_first(server, ticket, manifest)


def test_sends_beyond_the_upload_slots_are_told_busy_and_idle_connections_hold_none(served):
    """Slots count chunks being sent, not connections: two idle pooled connections leave
    the two slots free; a capped send in progress takes one, and one more send than slots
    is told busy, on a connection that stays usable."""
    store, manifest, tickets, server, model = served  # two slots
    ticket = tickets.issue("c", HERE)
    idle = [DataClient(), DataClient()]
    for client in idle:  # each keeps its connection in its pool
        fetch_first(server, ticket, manifest, client)
    assert fetch_first(server, ticket, manifest) == (model / manifest.files[0].path).read_bytes()
    big = max(manifest.files, key=lambda f: f.size)
    server.rate.set_rate(100_000)  # 100 KB/s: a 64 KiB chunk takes a good half second
    sending = [threading.Thread(target=DataClient().fetch, args=(
        server.address, ticket, manifest.id, big.path, i, memoryview(bytearray(CHUNK)), CHUNK,
        time.monotonic() + 10)) for i in (0, 1)]
    for thread in sending:
        thread.start()
    time.sleep(0.2)
    client = DataClient()
    try:
        with pytest.raises(SourceUnavailable, match="busy"):
            fetch_first(server, ticket, manifest, client)
        for thread in sending:
            thread.join(10)
        server.rate.set_rate(None)
        assert fetch_first(server, ticket, manifest, client) == (model / manifest.files[0].path).read_bytes()
    finally:
        for c in (*idle, client):
            c.close()


def _connect_from(source: str, address) -> socket.socket:
    conn = socket.socket()
    conn.bind((source, 0))
    conn.settimeout(5)
    conn.connect(address)
    return conn


def test_strangers_trickling_bytes_take_no_slot_and_a_member_is_still_served(served):
    """Sixteen connections with no ticket, each sending a byte now and then, fill neither
    the upload slots nor the member's way in; their handshake deadline closes them."""
    store, manifest, tickets, server, model = served
    strangers = []
    for _ in range(16):
        try:
            strangers.append(_connect_from("127.0.0.2", server.address))
        except OSError:
            pass
    try:
        for conn in strangers:
            try:
                conn.sendall(b"\x00")  # the start of a hello that never ends
            except OSError:
                pass
        started = time.monotonic()
        ticket = tickets.issue("member", HERE)
        assert fetch_first(server, ticket, manifest) == (model / manifest.files[0].path).read_bytes()
        assert time.monotonic() - started < 2
        time.sleep(1.5)  # past the handshake deadline (1 s here)
        closed = 0
        for conn in strangers:  # read what the server said (its nonce, if anything) up to its close
            try:
                while conn.recv(4096):
                    pass
                closed += 1
            except OSError:  # reset: closed too
                closed += 1
        assert closed == len(strangers)
        assert server.refused >= len(strangers)
    finally:
        for conn in strangers:
            conn.close()


def test_a_flood_from_one_address_is_capped_and_others_get_in(served):
    store, manifest, tickets, server, model = served
    flood = []
    try:
        for _ in range(100):
            try:
                flood.append(_connect_from("127.0.0.3", server.address))
            except OSError:
                break
        time.sleep(0.3)
        # Only MAX_PENDING_PER_ADDRESS of them got a thread: the rest were closed at once.
        opened = 0
        for conn in flood:
            conn.settimeout(0.5)
            try:
                opened += conn.recv(len(MAGIC)) == MAGIC
            except (socket.timeout, OSError):
                pass
        assert opened <= MAX_PENDING_PER_ADDRESS
        ticket = tickets.issue("member", HERE)
        assert fetch_first(server, ticket, manifest) == (model / manifest.files[0].path).read_bytes()
    finally:
        for conn in flood:
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
    yield server.address, tickets.issue("x", HERE), manifest.id, entry.path, entry.size
    server.close()
    store.close()


@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=200), hello_first=st.booleans())
def test_malformed_hellos_and_requests_get_an_error_and_the_server_keeps_serving(shared_server, garbage,
                                                                               hello_first):
    address, ticket, manifest_id, path, size = shared_server
    with socket.create_connection(address, timeout=5) as conn:
        opening = conn.recv(len(MAGIC) + NONCE_LEN)
        if hello_first:  # a good hello, then a garbage request
            conn.sendall(encode_hello(ticket, opening[len(MAGIC):], "get", manifest_id))
            assert conn.recv(9)[0] == 0
        conn.sendall(struct.pack(">H", len(garbage)) + garbage)
        conn.shutdown(socket.SHUT_WR)
        reply = conn.recv(9)
    assert reply == b"" or reply[0] in (1, 2, 3)  # closed, denied, missing or bad request
    buffer = memoryview(bytearray(size))
    DataClient().fetch(address, ticket, manifest_id, path, 0, buffer, size, time.monotonic() + 5)


def test_the_codecs_round_trip_and_refuse_junk():
    assert decode_request(encode_request("model.safetensors", 7)[2:]) == ("model.safetensors", 7)
    for bad in (b"", b"\x92\xa1a\xc3", encode_request("x", 1)[2:-1]):
        with pytest.raises(DataPathError):
            decode_request(bad)
    ticket = TicketBook().issue("p", HERE)
    ticket_id, mode, scope, mac = decode_hello(encode_hello(ticket, b"n" * NONCE_LEN, "get", "ab" * 32)[2:])
    assert (ticket_id, mode, scope) == (ticket.id, "get", "ab" * 32) and len(mac) == 32
    for bad in (b"", b"\x94\xc4\x01x\xa1a\xa1b\x00", encode_hello(ticket, b"n" * NONCE_LEN, "get", "ab" * 32)[2:-1],
                encode_hello(ticket, b"n" * NONCE_LEN, "get", "not-a-manifest-id")[2:],
                encode_hello(ticket, b"n" * NONCE_LEN, "steal", "ab" * 32)[2:]):
        with pytest.raises(DataPathError):
            decode_hello(bad)


def test_many_threads_share_few_connections_so_a_peer_never_fills_its_slots(served):
    """A thread pool uses whichever threads it likes: connections must not be per thread."""
    store, manifest, tickets, server, model = served  # the server has 2 slots
    client = DataClient()
    ticket = tickets.issue("peer-b", HERE)
    errors = []

    def one_fetch():
        try:
            fetch_first(server, ticket, manifest, client)
        except Exception as e:  # collected for the assertion below
            errors.append(e)
    for _ in range(20):  # twenty threads, one after the other
        thread = threading.Thread(target=one_fetch)
        thread.start()
        thread.join()
    assert errors == []
    client.close()


def test_an_encrypting_server_serves_only_clients_that_pin_its_certificate(served, tmp_path):
    store, manifest, tickets, plain, model = served
    server = DataServer(StoreLocator(store), tickets, slots=4, encrypt=True).start()
    try:
        assert len(server.fingerprint) == 32
        ticket = tickets.issue("peer-b", HERE)
        client = DataClient()
        for entry in manifest.files:
            buffer = bytearray(entry.size)
            for index in range(len(entry.chunks)):
                offset, length = chunk_span(entry.size, manifest.chunk_size, index)
                client.fetch(server.address, ticket, manifest.id, entry.path, index,
                             memoryview(buffer)[offset:offset + length], length, time.monotonic() + 10,
                             tls=server.fingerprint)
            assert bytes(buffer) == (model / entry.path).read_bytes()
        with pytest.raises(SourceUnavailable, match="not the one it announced"):
            fetch_tls = DataClient()
            entry = manifest.files[0]
            fetch_tls.fetch(server.address, ticket, manifest.id, entry.path, 0, memoryview(bytearray(entry.size)),
                            entry.size, time.monotonic() + 5, tls=b"\0" * 32)
        with pytest.raises(SourceUnavailable):  # speaking plain TCP to it gets nowhere
            fetch_first(server, ticket, manifest)
    finally:
        server.close()


def test_a_peer_trickling_a_chunk_below_the_read_mark_is_progress_not_a_stall():
    """LAN reads wake once 256 KiB are queued (fewer wake-ups in a busy room), but a very
    slow peer's chunk trickles in below that: as long as bytes keep coming within ``idle``
    it is progress, never a stall (the fetch gets the whole chunk)."""
    from agent.swarm.datawire import HEADER, OK, Ticket

    body = bytes(range(256)) * 256  # 64 KiB, sent 2 KiB every 50 ms: ~1.6 s in all
    listener = socket.create_server((HERE, 0))

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(MAGIC + b"n" * NONCE_LEN)
            conn.recv(4096)  # the hello: this stand-in takes any key
            conn.sendall(HEADER.pack(OK, 0))
            conn.recv(4096)  # the request
            conn.sendall(HEADER.pack(OK, len(body)))
            for at in range(0, len(body), 2048):
                conn.sendall(body[at:at + 2048])
                time.sleep(0.05)
            conn.recv(1)  # until the client is done with it
    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    buffer = bytearray(len(body))
    client = DataClient()
    try:
        client.fetch(listener.getsockname()[:2], Ticket(b"i" * 16, b"s" * 32), "m" * 64, "f", 0,
                     memoryview(buffer), len(body), time.monotonic() + 20, idle=0.5)
    finally:
        client.close()
        listener.close()
    assert bytes(buffer) == body
    server.join(5)
