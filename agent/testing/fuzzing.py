"""Fuzz targets: every parser a peer, a hub, a person or a local tool can feed bytes to,
each with the errors it is documented to raise. Anything else it raises (or a hang, or a
crash) is a bug. ``benchmarks/fuzz.py`` drives them with atheris (coverage-guided);
``tests/test_fuzz.py`` replays the seeds and every input that ever found a bug
(``tests/fuzz_corpus/TARGET/``).

A target takes the fuzzer's bytes and returns nothing; it raises only the allowed errors.
"""

from __future__ import annotations

import json
from typing import Callable

from agent.errors import ShoalError


def _manifest(data: bytes) -> None:
    from agent.manifest import decode
    manifest = decode(data)
    assert decode(manifest.encode()) == manifest  # one manifest, one encoding


def _listing(data: bytes) -> None:
    """What a hub's listing JSON becomes (``agent.manifest.make_listing``)."""
    from agent.manifest import make_listing
    try:
        entries = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return
    if not isinstance(entries, list):
        return
    make_listing("lab/fuzz", "master", [(e.get("Path"), e.get("Size"), e.get("Sha256")) if isinstance(e, dict)
                                        else (e, e, e) for e in entries[:1000]])


def _swarm_messages(data: bytes) -> None:
    from agent.manifest import build_manifest, FileEntry
    from agent.swarm import protocol
    known = build_manifest("lab/fuzz", "master", 16 * 1024, [FileEntry("a.bin", 40000, b"\x01" * 32, (b"\x02" * 32,) * 3)])
    for parse in (protocol.parse_request, protocol.parse_hello_request, protocol.parse_contact,
                  lambda d: protocol.parse_answer(d, known), protocol.parse_answer):
        try:
            parse(data)
        except (ShoalError, LookupError):
            pass


def _have_stream(data: bytes) -> None:
    from agent.swarm import wire
    total = 1 + (data[0] if data else 0) * 7
    if len(data) >= wire.FRAME_HEADER.size:  # the reader asks only with a whole header
        try:
            wire.frame_length(data[:wire.FRAME_HEADER.size])
        except ShoalError:
            pass
    wire.decode(data[1:], total)


def _data_port(data: bytes) -> None:
    from agent.errors import DataPathError
    from agent.swarm import datawire
    for decode in (datawire.decode_hello, datawire.decode_request):
        try:
            decode(data)
        except DataPathError:
            pass


def _join_code(data: bytes) -> None:
    from agent.room import decode_code, encode_code
    room = decode_code(data.decode("utf-8", errors="replace"))
    assert decode_code(encode_code(room)) == room


def _control_frames(data: bytes) -> None:
    from agent import api
    from agent.rpc import FrameDecoder, check_call
    for message in FrameDecoder().feed(data):
        name, params = check_call(message)
        try:
            method = api.lookup(name)
        except ShoalError:
            continue
        api.parse_params(method.params, params)


def _gateway_request(data: bytes) -> None:
    """A request line's target and Range header as the gateway reads them."""
    from agent.gateway import parse_target
    from agent.hubtree import tree_page
    from agent.httprange import parse_range
    from agent.manifest import ModelRef
    target, _, rest = data.partition(b"\n")
    path, parts, query = parse_target(target)
    if len(parts) >= 5:
        try:
            ModelRef.parse(f"{parts[3]}/{parts[4]}@{(query.get('Revision') or ['master'])[0]}",
                           dataset=parts[2] == "datasets")
        except ShoalError:
            pass
    tree_page([{"Path": f"d{i}/f{i}", "Size": i} for i in range(50)], query)
    try:
        parse_range(rest.decode("latin-1"), 1 << 20)
    except ValueError:  # documented: unsatisfiable (the gateway answers 416)
        pass
    # The Hub face: its path split, and a paths-info body (form or JSON) against a revision.
    from agent.gateway.hub import HubFace, _paths_info, _tree
    from agent.gateway.serve import MissingFile, Revision
    face = HubFace.__new__(HubFace)
    face.names = {"gpt2": "openai-community/gpt2"}
    face._split(parts)
    revision = Revision(ModelRef("lab/fuzz"), (("a.json", 3, b"\x01" * 32), ("d/b.bin", 5, b"\x02" * 32)), "c" * 40,
                        True)
    for content_type in ("application/json", "application/x-www-form-urlencoded"):
        _paths_info(revision, rest, content_type)
    try:
        _tree(revision, path, recursive=bool(rest[:1] == b"r"))
    except MissingFile:
        pass


# name -> (target, errors it may raise)
TARGETS: dict[str, tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]] = {
    "manifest": (_manifest, (ShoalError,)),
    "listing": (_listing, (ShoalError,)),
    "swarm_messages": (_swarm_messages, ()),
    "have_stream": (_have_stream, (ShoalError,)),
    "data_port": (_data_port, ()),
    "join_code": (_join_code, (ShoalError,)),
    "control_frames": (_control_frames, (ShoalError,)),
    "gateway_request": (_gateway_request, (ShoalError,)),
}


def run(name: str, data: bytes) -> None:
    """Feed ``data`` to target ``name``; an error it may raise is swallowed, any other raised."""
    target, allowed = TARGETS[name]
    try:
        target(data)
    except allowed:
        pass


def seeds(name: str) -> list[bytes]:
    """Valid inputs to start each target from (the fuzzer mutates them)."""
    from agent.manifest import FileEntry, build_manifest
    manifest = build_manifest("lab/fuzz", "master", 16 * 1024,
                              [FileEntry("a/b.bin", 40000, b"\x01" * 32, (b"\x02" * 32,) * 3)])
    if name == "manifest":
        return [manifest.encode()]
    if name == "listing":
        return [json.dumps([{"Path": "a.bin", "Size": 3, "Sha256": "ab" * 32}]).encode()]
    if name == "swarm_messages":
        from agent.swarm.protocol import encode_answer, encode_request
        return [encode_request(model="lab/fuzz", revision="master"),
                encode_answer(manifest, manifest.encode(), None, {"a/b.bin": {0, 2}}, True)]
    if name == "have_stream":
        from agent.swarm import wire
        return [b"\x03" + wire.encode_snapshot(1, {0, 1}, {1}, {2}, True, 22)[wire.FRAME_HEADER.size:]]
    if name == "data_port":
        from agent.swarm.datawire import Ticket, encode_hello, encode_request as get
        return [encode_hello(Ticket(b"i" * 16, b"s" * 32), b"n" * 16, "get", "ab" * 32)[2:], get("a/b.bin", 3)[2:]]
    if name == "join_code":
        from agent.room import encode_code, new_room
        return [encode_code(new_room("Lab 3", b"k" * 32, [("10.0.0.5", 4010)])).encode()]
    if name == "control_frames":
        from agent.rpc import encode_frame
        return [encode_frame({"method": "pull", "params": {"model": "lab/fuzz@master", "fresh": True}})]
    if name == "gateway_request":
        return [b"/api/v1/datasets/lab/fuzz/repo/tree?Revision=master&Root=d1&PageSize=2\nbytes=0-99"]
    return []
