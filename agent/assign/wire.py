"""The room ask on a peer's data port (mode ``room``): what a member tells and asks another
about the room's assignments. Pure codecs, bounded and validated.

    ask    = msgpack {"seq": N (the newest record the asker holds, 0: none),
                      "push": ENVELOPE or None (a newer record the asker hands on),
                      "status": bool (the asker wants this member's status report),
                      "holds": [REF...] (assigned revisions the asker holds whole)}
    answer = msgpack {"record": ENVELOPE or None (ours, when newer than the asker's),
                      "holds": [REF...] (assigned revisions this member holds whole),
                      "status": STATUS or None}

A status report (``agent.assign.keeper.RoomWork.report``) is a map of plain values: the
member's name, its assignments' states and progress, what it is stuck on. Its size is
bounded by ``MAX_ANSWER``; unknown keys are ignored, so a newer member can say more.
"""

from __future__ import annotations

import msgpack

from agent.assign.record import MAX_ENVELOPE, MAX_ITEMS
from agent.errors import DataPathError, PeerBroken

MAX_ASK = MAX_ENVELOPE + 64
MAX_ANSWER = 256 * 1024


def encode_ask(seq: int, push: bytes | None = None, status: bool = False, holds: list[str] = ()) -> bytes:
    return msgpack.packb({"seq": seq, "push": push, "status": status, "holds": list(holds)[:MAX_ITEMS]},
                         use_bin_type=True)


def parse_ask(data: bytes) -> tuple[int, bytes | None, bool, list[str]]:
    try:
        doc = msgpack.unpackb(data, raw=False, max_bin_len=MAX_ENVELOPE, max_str_len=512, max_map_len=4,
                              max_array_len=MAX_ITEMS)
        seq, push, status, holds = doc["seq"], doc.get("push"), doc.get("status", False), doc.get("holds") or []
        if type(seq) is not int or seq < 0 or not (push is None or isinstance(push, bytes)) \
                or not isinstance(status, bool) or not isinstance(holds, list) \
                or not all(isinstance(h, str) for h in holds):
            raise ValueError("bad fields")
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise DataPathError(f"a malformed room ask ({type(e).__name__})") from None
    return seq, push, status, holds


def encode_answer(record: bytes | None, holds: list[str], status: dict | None) -> bytes:
    data = msgpack.packb({"record": record, "holds": holds[:MAX_ITEMS], "status": status}, use_bin_type=True)
    if len(data) > MAX_ANSWER:  # a status too large to send is left out, never the record
        data = msgpack.packb({"record": record, "holds": holds[:MAX_ITEMS], "status": None}, use_bin_type=True)
    return data


def parse_answer(data: bytes) -> tuple[bytes | None, list[str], dict | None]:
    if len(data) > MAX_ANSWER:
        raise PeerBroken(f"a room answer of {len(data)} bytes exceeds {MAX_ANSWER}")
    try:
        doc = msgpack.unpackb(data, raw=False, max_bin_len=MAX_ENVELOPE, max_str_len=4096,
                              max_array_len=max(MAX_ITEMS, 256), max_map_len=64)
        record, holds, status = doc.get("record"), doc.get("holds") or [], doc.get("status")
        if not (record is None or isinstance(record, bytes)) or not isinstance(holds, list) \
                or not all(isinstance(h, str) for h in holds) or not (status is None or isinstance(status, dict)):
            raise ValueError("bad fields")
    except Exception as e:
        raise PeerBroken(f"a malformed room answer ({type(e).__name__})") from None
    return record, holds[:MAX_ITEMS], status
