"""Every parser a peer, a hub, a person or a tool feeds bytes to raises only its documented
errors (``agent.testing.fuzzing``): the seeds, every input the coverage-guided fuzzer
(``benchmarks/fuzz.py``) ever found a bug with (``tests/fuzz_corpus/TARGET/``), and random
bytes and mutated seeds from hypothesis."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.testing.fuzzing import TARGETS, run, seeds

CORPUS = Path(__file__).parent / "fuzz_corpus"


def found_inputs() -> list[tuple[str, Path]]:
    return [(target.name, path) for target in sorted(CORPUS.iterdir()) if target.is_dir()
            for path in sorted(target.iterdir())]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_seeds_parse(name):
    for data in seeds(name):
        run(name, data)


@pytest.mark.parametrize("name,path", found_inputs(), ids=[f"{n}-{p.name}" for n, p in found_inputs()])
def test_inputs_that_once_found_a_bug_are_handled(name, path):
    run(name, path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_and_mutated_bytes_raise_only_documented_errors(name, data):
    base = data.draw(st.sampled_from(seeds(name) + [b""]))
    if base and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(base) - 1))
        blob = base[:at] + data.draw(st.binary(max_size=16)) + base[at + data.draw(st.integers(0, 8)):]
    else:
        blob = data.draw(st.binary(max_size=512))
    run(name, blob)
