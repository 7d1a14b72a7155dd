"""Pure pieces with a clock: the token bucket (on trio's virtual clock), progress maths,
size parsing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agent.config import parse_size
from agent.progress import Progress
from agent.ratelimit import TokenBucket


async def test_concurrent_takers_share_the_rate(autojump_clock):
    bucket = TokenBucket(1_000_000)
    start = trio.current_time()

    async def taker():
        for _ in range(10):
            await bucket.take(100_000)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(taker)
    # 4 MB at 1 MB/s: four seconds, whatever the interleaving.
    assert trio.current_time() - start == pytest.approx(4.0, abs=0.3)


async def test_a_rate_change_applies_to_waiting_takers(autojump_clock):
    bucket = TokenBucket(100_000)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bucket.take, 1_000_000)  # ten seconds at the old rate
        await trio.sleep(1)
        bucket.set_rate(None)  # lifted at run time
    assert trio.current_time() - start < 1.5


async def test_unlimited_never_waits(autojump_clock):
    bucket = TokenBucket(None)
    start = trio.current_time()
    for _ in range(100):
        await bucket.take(10 ** 9)
    assert trio.current_time() == start


def test_progress_speed_eta_and_split():
    p = Progress(total=1000, already=100)
    p.add("oss", 300, now=10.0)
    p.add("modelscope", 100, now=11.0)
    assert p.done == 500
    assert p.speed(now=11.0) == pytest.approx(400 / 1.0)
    assert p.eta(now=11.0) == pytest.approx(500 / 400)
    assert p.split() == "OSS mirror 75% · ModelScope 25%"


@pytest.mark.parametrize("text,value", [("50GB", 50 * 10 ** 9), ("20GiB", 20 * 2 ** 30), ("10MB/s", 10 ** 7),
                                        ("1500", 1500), ("0", None), ("unlimited", None), (2048, 2048)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-5", "5XB", True])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)
