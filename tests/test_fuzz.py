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
    """Every kept input, by target; a folder named after no target is a mistake, not a skip."""
    found = []
    for folder in sorted(p for p in CORPUS.iterdir() if p.is_dir()):
        assert folder.name in TARGETS, f"tests/fuzz_corpus/{folder.name}/ names no fuzz target"
        found += [(folder.name, path) for path in sorted(folder.iterdir())]
    return found


def test_the_corpus_folder_is_in_the_checkout():
    """Git keeps no empty folder: the README keeps this one in a clean clone (CI once failed
    at collection for want of it)."""
    assert (CORPUS / "README.md").is_file()


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
