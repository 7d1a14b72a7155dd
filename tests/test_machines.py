"""State machines and policies with recording fakes: the job transition table, and the
scheduler's per-chunk source order, retries and fallback (real store and files; fake
sources at the outermost edge, on trio's virtual clock)."""

from __future__ import annotations

import hashlib
import sys

import pytest

from agent.config import load_settings
from agent.errors import CredentialsRejected, NotFound, ShoalError, SourceUnavailable
from agent.launcher.jobs import FINAL, TRANSITIONS, JobStore, next_state
from agent.swarm.lifecycle import TRANSITIONS as PEER_TRANSITIONS, next_state as next_peer_state
from agent.manifest import ModelRef, chunk_count, chunk_span
from agent.scheduler import ChunkFetched, ChunkRejected, FileTask, Scheduler, SourceState, SourceTrouble
from agent.sources import ChunkSource
from agent.hashing import blake3_hash
from agent.store import Store

# ------------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("state,event,after", sorted((s, e, a) for (s, e), a in TRANSITIONS.items()))
def test_every_job_transition_in_the_table(state, event, after):
    assert next_state(state, event) == after


@pytest.mark.parametrize("state,event", [("done", "cancel"), ("failed", "started"), ("cancelled", "exited_ok"),
                                         ("starting", "exited_ok"), ("running", "started")])
def test_transitions_outside_the_table_are_refused(state, event):
    with pytest.raises(ShoalError, match="cannot take"):
        next_state(state, event)


def test_final_states_have_no_way_out():
    assert not [key for key in TRANSITIONS if key[0] in FINAL]


def test_a_job_records_its_exit_status(tmp_path):
    jobs = JobStore(tmp_path)
    job = jobs.start("run", "lab/x", [sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"])
    import time
    deadline = time.monotonic() + 30
    while not jobs.get(job.id).final and time.monotonic() < deadline:
        time.sleep(0.05)
    job = jobs.get(job.id)
    assert (job.state, job.exit_code) == ("failed", 3)
    assert "bye" in jobs.log_path(job.id).read_text()


# ------------------------------------------------------------- a peer in a pull


@pytest.mark.parametrize("state,event,after", sorted((s, e, a) for (s, e), a in PEER_TRANSITIONS.items()))
def test_every_peer_transition_in_the_table(state, event, after):
    assert next_peer_state(state, event) == after


@pytest.mark.parametrize("state,event", [("new", "heard"), ("followed", "ask"), ("idle", "failed"),
                                         ("passed", "interest"), ("probing", "pass"), ("resting", "heard")])
def test_peer_transitions_outside_the_table_are_refused(state, event):
    with pytest.raises(ShoalError, match="cannot take"):
        next_peer_state(state, event)


def test_a_peer_that_fails_rests_longer_each_time_and_is_unheard_only_while_asked():
    from agent.swarm import lifecycle
    now = [100.0]
    life = lifecycle.PeerLifecycle(clock=lambda: now[0])
    assert life.of("p") == lifecycle.NEW
    life.move("p", "ask")
    assert life.unheard == {"p"}  # the picker presumes it pulls until it answers
    life.heard("p")
    assert (life.of("p"), life.unheard) == (lifecycle.FOLLOWED, set())
    rests = []
    for _ in range(7):
        life.move("p", "failed")
        rests.append(life.soonest({"p"}) - now[0])
        assert not life.due("p", now[0])
        assert life.due("p", now[0] + rests[-1])
        life.move("p", "due")
        life.move("p", "ask", known=True)  # its offer is in the view: not unheard
        assert life.unheard == set()
    assert rests == [*lifecycle.RETRY, lifecycle.RETRY[-1], lifecycle.RETRY[-1]]
    # A peer that holds none by name is probed by content once; "none": idle again; its
    # interest (it started pulling) makes it new, to be asked.
    life.move("q", "not_followed")
    life.move("q", "probe")
    assert "q" in life.unheard and "q" in life.content_asked
    life.move("q", "none")
    assert (life.of("q"), life.unheard) == (lifecycle.IDLE, set())
    assert life.move("q", "interest") == lifecycle.NEW
    # Another place's peer passed over, chosen again later.
    assert life.move("r", "pass") == lifecycle.PASSED and life.move("r", "chosen") == lifecycle.NEW


# -------------------------------------------------------------------------- scheduler

CHUNK = 16 * 1024
DATA = bytes(range(256)) * 200  # 51200 bytes: 4 chunks
REF = ModelRef("lab/fake")


class RecordingSource(ChunkSource):
    """Serves DATA, failing as scripted; records every request."""

    def __init__(self, name, *, failures=(), lacks=False, corrupt=False):
        self.name = name
        self.failures = list(failures)  # exceptions to raise, in order, before serving
        self.lacks, self.corrupt = lacks, corrupt
        self.requests = []

    def fetch(self, ref, request, into, deadline):
        self.requests.append(request.offset // CHUNK)
        if self.lacks:
            raise NotFound(f"{self.name} lacks it")
        if self.failures:
            raise self.failures.pop(0)
        data = DATA[request.offset:request.offset + request.length]
        if self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        into[:request.length] = data


def plan_task(tmp_path, trusted: bool):
    store = Store(tmp_path / "cache")
    spans = [chunk_span(len(DATA), CHUNK, i) for i in range(chunk_count(len(DATA), CHUNK))]
    expected = tuple(blake3_hash(DATA[o:o + n]) for o, n in spans) if trusted else None
    directory = tmp_path / "model"
    store.begin(REF, directory, CHUNK, [("weights.bin", len(DATA), hashlib.sha256(DATA).digest())])
    model = store.open_dir(directory, create=True)
    pf = store.open_file(REF, model, "weights.bin", len(DATA), hashlib.sha256(DATA).digest(), CHUNK, expected)
    return store, FileTask(pf, expected, check_sha256=not trusted), model


async def run(tmp_path, sources, trusted=True, retries=2):
    settings = load_settings(env={"SHOAL_CONFIG": str(tmp_path / "none.toml")}, concurrency=2)
    settings = settings.with_(retries=retries)
    store, task, model = plan_task(tmp_path, trusted)
    events = []
    try:
        await Scheduler(REF, [SourceState(s) for s in sources], settings, events.append,
                        finish=store.finish_files).run([task])
    finally:
        model.close()
        store.close()
    return events, model.path


async def test_transient_errors_are_retried_on_the_same_source_first(tmp_path, autojump_clock):
    flaky = RecordingSource("oss", failures=[SourceUnavailable("500"), SourceUnavailable("reset")])
    origin = RecordingSource("modelscope")
    events, directory = await run(tmp_path, [flaky, origin])
    assert origin.requests == []
    assert len(flaky.requests) == 4 + 2  # every chunk once, plus one retry per failure
    assert (directory / "weights.bin").read_bytes() == DATA
    assert {e.source for e in events if isinstance(e, ChunkFetched)} == {"oss"}


async def test_a_chunk_moves_on_after_its_retries_run_out(tmp_path, autojump_clock):
    down = RecordingSource("oss", failures=[SourceUnavailable("timeout")] * 100)
    origin = RecordingSource("modelscope")
    events, directory = await run(tmp_path, [down, origin], retries=1)
    assert (directory / "weights.bin").read_bytes() == DATA
    assert sorted(origin.requests) == [0, 1, 2, 3]
    assert max(down.requests.count(i) for i in range(4)) <= 2  # 1 try + 1 retry per chunk


async def test_404_credentials_and_bad_hashes_fall_through_at_once(tmp_path, autojump_clock):
    missing = RecordingSource("lan", lacks=True)
    refused = RecordingSource("oss", failures=[CredentialsRejected("403")] * 100)
    origin = RecordingSource("modelscope")
    events, directory = await run(tmp_path, [missing, refused, origin])
    assert (directory / "weights.bin").read_bytes() == DATA
    assert len(missing.requests) <= 2 and len(refused.requests) <= 2  # learned once, not per chunk
    assert any(isinstance(e, SourceTrouble) and "403" in e.message for e in events)

    liar = RecordingSource("oss", corrupt=True)
    events, directory = await run(tmp_path / "again", [liar, RecordingSource("modelscope")])
    assert (directory / "weights.bin").read_bytes() == DATA
    assert len([e for e in events if isinstance(e, ChunkRejected)]) == 4


async def test_every_source_failing_keeps_what_was_verified(tmp_path, autojump_clock):
    class HalfSource(RecordingSource):
        def fetch(self, ref, request, into, deadline):
            if request.offset // CHUNK >= 2:
                raise SourceUnavailable("gone")
            super().fetch(ref, request, into, deadline)
    half = HalfSource("oss")
    with pytest.raises(ShoalError, match="could not be fetched from any source"):
        await run(tmp_path, [half], retries=0)
    store = Store(tmp_path / "cache")
    try:
        assert sorted(store.chunk_hashes(REF, "weights.bin")) == [0, 1]
    finally:
        store.close()


def test_a_running_job_keeps_its_model_in_use(tmp_path):
    import time
    from agent.store import Store
    jobs = JobStore(tmp_path)
    job = jobs.start("run", "lab/x@master", [sys.executable, "-c", "import time; time.sleep(30)"])
    store = Store(tmp_path)
    try:
        deadline = time.monotonic() + 20
        while jobs.get(job.id).state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.in_use(ModelRef("lab/x"))  # so eviction leaves it alone
        jobs.cancel(job.id)
        assert not store.in_use(ModelRef("lab/x"))
    finally:
        store.close()
