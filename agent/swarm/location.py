"""Where an agent is on a campus, and the one locality rule the swarm follows.

A **location** is a path of segments, widest first: ``campus|building-2|room-204``
(setting ``swarm.location`` / ``SHOAL_SWARM_LOCATION``). Without the setting it is the
agent's subnet (the IPv4 network of the interface its default route leaves by, e.g.
``10.0.3.0/24``): machines on one switch share it, a router's other side does not. Peers
say theirs in the hello answer (``agent.swarm.protocol.Contact``); a peer that says nothing
(an older agent) counts as beside us, which is what every peer was before locations.

The rule (used by ``agent.swarm.view`` and ``agent.swarm.picker``, defined only here):

- **Nearness** is the number of leading segments two locations share; a holder that shares
  more is asked first (``nearness``), like Dragonfly's location-prefix score.
- **Local** means the whole location is the same (the same room): chunks spread inside it
  rarest first, as in a room without locations.
- A chunk held in the campus but not in this room **enters the room once**: one agent of
  the room fetches it (its owner among the room's pullers) from the nearest room that
  holds it, then the room trades it; nobody else crosses the link for it.
- A chunk nobody holds **crosses the outside link once per campus**: its owner is chosen
  in two steps, first the location whose even share of the chunks it is in (``spread``),
  then by rendezvous hashing among that location's pullers (``owner``); an agent needs to
  know only which rooms pull and who pulls in its own, not every machine of the campus.
- So a pull **follows** (asks, and reads the HAVE stream of) every peer of its own room,
  and in each other place only ``PER_PLACE`` of them, chosen by rendezvous hashing on its
  own id among those that pull or hold the model (``neighbours``): the agents of a room
  choose different ones, so between them they see every other room, and a 300-machine
  campus costs each agent its room plus two per other room, not 299 streams.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable

from agent.hashing import blake3_hash

Location = tuple[str, ...]

SEPARATOR = "|"
MAX_SEGMENTS = 8
MAX_SEGMENT = 64
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
UNPLACED: Location = ("local",)  # no setting and no interface with an IPv4 network
PER_PLACE = 2  # peers a pull follows in each place other than its own


class LocationError(ValueError):
    pass


def parse(text: str) -> Location:
    """``campus|building-2|room-204`` -> its segments; ``LocationError`` naming what is wrong."""
    return _valid(tuple(part.strip() for part in text.split(SEPARATOR)), text)


def _valid(segments: tuple[str, ...], shown: str) -> Location:
    if not 1 <= len(segments) <= MAX_SEGMENTS or not all(
            len(s) <= MAX_SEGMENT and _SEGMENT.fullmatch(s) for s in segments):
        raise LocationError(
            f"swarm location {shown[:100]!r} must be 1-{MAX_SEGMENTS} segments joined by '|', widest first, "
            f"each 1-{MAX_SEGMENT} letters, digits or ._:/@+- (e.g. \"campus|building-2|room-204\")")
    return segments


def format_location(location: Location) -> str:
    return SEPARATOR.join(location)


def checked(value) -> Location | None:
    """A location as a peer sent it (a list of strings), validated; None if it sent none.
    ``LocationError`` if it is not one."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise LocationError("a location must be a list of strings")
    return _valid(tuple(value), SEPARATOR.join(value))


def nearness(a: Location | None, b: Location | None) -> int:
    """How many leading segments ``a`` and ``b`` share; a location nobody said (None) is
    taken for the other's (beside it)."""
    if a is None or b is None:
        return MAX_SEGMENTS
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def same_place(a: Location | None, b: Location | None) -> bool:
    """Whether ``a`` and ``b`` are the same room (an unsaid location is beside any)."""
    return a is None or b is None or a == b


def score(name: str, chunk: bytes) -> bytes:
    """``name``'s rendezvous score for ``chunk``: the highest wins it."""
    return blake3_hash(name.encode() + b"|" + chunk)


def owner(chunk: bytes, pullers: Iterable[str], place: Callable[[str], Location],
          share_of: Callable[[tuple[Location, ...]], Location]) -> str:
    """The puller that fetches ``chunk`` (the manifest id and ordinal, as bytes) from
    outside. With one location: plain rendezvous hashing over the pullers. With several:
    the location whose share the chunk is in (``share_of(places)``: ``spread``'s answer
    for this chunk), then rendezvous over the pullers there."""
    by_place: dict[Location, list[str]] = {}
    for peer in pullers:
        by_place.setdefault(place(peer), []).append(peer)
    if len(by_place) > 1:
        candidates = by_place[share_of(tuple(sorted(by_place)))]
    else:
        candidates = next(iter(by_place.values()))
    return max(candidates, key=lambda p: score(p, chunk))


def rank(chunk: bytes, peers: Iterable[str], me: str) -> int:
    """Where ``me`` stands in ``chunk``'s rendezvous ranking over ``peers`` (0: it would own
    it; ``me`` need not be among them)."""
    mine = score(me, chunk)
    return sum(1 for peer in peers if peer != me and score(peer, chunk) > mine)


def neighbours(me: str, here: Location | None, places: dict[str, Location | None],
               idle: set[str] | frozenset[str] = frozenset(), per_place: int = PER_PLACE) -> set[str]:
    """The peers (of ``places``: peer -> where it said it is, None if it has not said yet)
    that ``me`` follows for a pull: every one beside it (``same_place``: a peer whose place
    is not known yet counts as beside, and its hello tells), and in each other place the
    ``per_place`` that rank first by rendezvous hashing on ``me`` among those not ``idle``
    (peers that said they neither pull nor hold the model: one that starts is ranked again)."""
    chosen: set[str] = set()
    elsewhere: dict[Location, list[str]] = {}
    for peer, place in places.items():
        if same_place(here, place):
            chosen.add(peer)
        elif peer not in idle:
            elsewhere.setdefault(place, []).append(peer)
    for peers in elsewhere.values():
        if len(peers) > per_place:
            peers.sort(key=lambda p: _follow_score(me, p), reverse=True)
        chosen.update(peers[:per_place])
    return chosen


@functools.lru_cache(maxsize=65536)
def _follow_score(me: str, peer: str) -> bytes:
    """``neighbours``' ranking key, kept: a pull's session asks for its neighbours on every
    turn of its loop, and a peer's rank for us never changes."""
    return score(me, peer.encode())


def finder(key: str, peers: Iterable[str]) -> str:
    """The one of ``peers`` that does a job for all of them, by rendezvous hashing on
    ``key`` (a room's DHT lookup of a pull's files by content)."""
    return max(peers, key=lambda p: score(p, key.encode()))


def spread(manifest_id: str, total: int, places: tuple[Location, ...]) -> list[Location]:
    """Which place fetches each chunk (by ordinal) from outside: every place an even share
    (at most ``ceil(total / len(places))`` chunks), each chunk to the first place in its
    rendezvous ranking whose share is not full yet, in ordinal order. Each place then sends
    its share on to the others about once: a room that owned many more chunks than the
    others would carry their copies out alone (64 chunks over 10 rooms by rendezvous alone:
    one room sent 1.8 F). Any agent that knows the same places computes the same spread."""
    cap = -(-total // len(places))
    taken = dict.fromkeys(places, 0)
    names = {loc: "@" + format_location(loc) for loc in places}
    chosen: list[Location] = []
    for ordinal in range(total):
        chunk = f"{manifest_id}|{ordinal}".encode()
        for loc in sorted(places, key=lambda loc: score(names[loc], chunk), reverse=True):
            if taken[loc] < cap:
                taken[loc] += 1
                chosen.append(loc)
                break
    return chosen


def default_location() -> Location:
    """This machine's subnet: the IPv4 network of the interface the default route leaves by
    (else of the first interface with one), as one segment; ``UNPLACED`` without either."""
    import psutil  # (libp2p's multiaddr needs it too: it is always installed)
    interfaces = psutil.net_if_addrs()
    preferred = _default_route_interface()
    names = ([preferred] if preferred in interfaces else []) + sorted(n for n in interfaces if n != preferred)
    for name in names:
        for address in interfaces[name]:
            if address.family != socket.AF_INET or not address.netmask or address.address.startswith("127."):
                continue
            network = ipaddress.IPv4Network(f"{address.address}/{address.netmask}", strict=False)
            return (str(network),)
    return UNPLACED


def _default_route_interface() -> str | None:
    """The interface of the IPv4 default route (/proc/net/route), or None."""
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:
                    return fields[0]
    except (OSError, ValueError, StopIteration):
        pass
    return None


__all__ = ["Location", "LocationError", "parse", "format_location", "checked", "nearness", "same_place",
           "owner", "rank", "spread", "neighbours", "finder", "score", "default_location", "UNPLACED", "PER_PLACE"]
