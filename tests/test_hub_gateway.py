"""Every Hugging Face tool through the cache: the agent's gateway speaks the Hub's download
API (``agent.gateway.hub``), and the real, unmodified ``huggingface_hub``, ``transformers``
and ``datasets`` fetch through it in their own processes with ``HF_ENDPOINT`` set: from the
cache, the room, the mirror, then the origins (the ModelScope hub and a Hugging Face hub on
loopback here), with the libraries' own checks passing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from agent.testing.hf_server import HfHubServer
from agent.testing.tiny_llm import make_chat_dataset
from conftest import MODEL_ID, REPO, TESTS, AgentProcess, mirror, run_shoal, tree_digest
from test_swarm import agent_env as swarm_env
from test_swarm import offline, wait_connected

pytestmark = pytest.mark.timeout(300)

TOOL = """
import json, sys, os
from pathlib import Path
what = sys.argv[1]
try:
    if what == "snapshot":
        from huggingface_hub import snapshot_download
        print(json.dumps({"path": snapshot_download(sys.argv[2], repo_type=sys.argv[3])}))
    elif what == "file":
        from huggingface_hub import hf_hub_download
        print(json.dumps({"path": hf_hub_download(sys.argv[2], sys.argv[3], revision=sys.argv[4])}))
    elif what == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
        print(json.dumps({"class": type(model).__name__, "parameters": model.num_parameters(),
                          "tokens": tokenizer("hello world")["input_ids"]}))
    elif what == "datasets":
        from datasets import load_dataset
        data = load_dataset(sys.argv[2], split="train")
        print(json.dumps({"rows": len(data), "first": data[0]}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__],
                      "message": str(e)[:2000]}))
"""


def tool(args: list[str], gateway: str, home: Path, timeout: float = 180) -> dict:
    """An unmodified Hugging Face tool in its own process, pointed at ``gateway``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_", "HF_"))}
    env.update(HF_ENDPOINT=gateway, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(TESTS / "loopback_guard") + os.pathsep + str(REPO))
    proc = subprocess.run([sys.executable, "-c", TOOL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert out, proc.stderr[-3000:]
    return out[-1]


def gateway_env(env: dict, tmp_path: Path, **extra) -> dict:
    local = {**env, "SHOAL_GATEWAY_PORT": "0", **extra}
    local.pop("SHOAL_OSS_BUCKET")  # the ModelScope hub is the origin here
    return local


def test_huggingface_hub_gets_a_model_through_the_gateway_and_names_what_is_missing(env, hub, model_dir, tmp_path):
    agent = AgentProcess(gateway_env(env, tmp_path)).start()
    try:
        gateway = agent.info["gateway"]
        got = tool(["snapshot", MODEL_ID, "model"], gateway, tmp_path / "hf-a")
        assert "error" not in got, got
        assert tree_digest(Path(got["path"])) == tree_digest(model_dir)  # the library's own checks passed too
        commit = Path(got["path"]).name
        assert len(commit) == 40
        assert hub.faults.data_requests(), "the cold cache was filled from the origin"
        # A second tool with a cache of its own: nothing asked of the origin, the same commit.
        hub.faults.clear_log()
        again = tool(["snapshot", MODEL_ID, "model"], gateway, tmp_path / "hf-b")
        assert Path(again["path"]).name == commit and tree_digest(Path(again["path"])) == tree_digest(model_dir)
        one = tool(["file", MODEL_ID, "tokenizer/vocab.txt", commit], gateway, tmp_path / "hf-c")
        assert Path(one["path"]).read_bytes() == (model_dir / "tokenizer" / "vocab.txt").read_bytes()
        assert hub.faults.log() == []
        # What is not there is named with the library's own errors.
        missing = tool(["file", "lab/no-such-model", "config.json", "main"], gateway, tmp_path / "hf-d")
        assert missing["error"] == "RepositoryNotFoundError", missing
        missing = tool(["file", MODEL_ID, "no-such-file.json", "main"], gateway, tmp_path / "hf-d")
        assert "EntryNotFoundError" in missing["bases"], missing
        missing = tool(["file", MODEL_ID, "config.json", "v9"], gateway, tmp_path / "hf-d")
        assert missing["error"] == "RevisionNotFoundError", missing
        # The cache holds one copy, listed under the shoal id.
        [row] = json.loads(run_shoal(["ls", "--json"], agent.env, check=True).stdout)
        assert row["model"] == MODEL_ID and row["state"] == "complete"
        # `shoal env` gives the lines for a shell; `shoal doctor` in such a shell finds nothing amiss.
        lines = json.loads(run_shoal(["env", "--json"], agent.env, check=True).stdout)
        assert lines["HF_ENDPOINT"] == lines["MODELSCOPE_ENDPOINT"] == gateway
        before = json.loads(run_shoal(["doctor", "--json"], agent.env, check=True).stdout)["gateway"]
        assert before["running"] and len(before["problems"]) == 2, before
        after = json.loads(run_shoal(["doctor", "--json"], {**agent.env, **lines}, check=True).stdout)["gateway"]
        assert after["url"] == gateway and after["problems"] == [], after
        offline = {**agent.env, **lines, "HF_HUB_OFFLINE": "1"}
        assert "HF_HUB_OFFLINE" in json.loads(run_shoal(["doctor", "--json"], offline, check=True).stdout)[
            "gateway"]["problems"][0]
    finally:
        agent.stop()


def test_transformers_and_datasets_load_through_the_gateway(env, hub, tiny_llm, tmp_path):
    hub.add_model("lab/tiny-llm", tiny_llm)
    hub.add_dataset("lab/chat", make_chat_dataset(tmp_path / "chat", rows=40))
    agent = AgentProcess(gateway_env(env, tmp_path)).start()
    try:
        gateway = agent.info["gateway"]
        loaded = tool(["transformers", "lab/tiny-llm"], gateway, tmp_path / "hf")
        assert loaded.get("class") == "Qwen2ForCausalLM" and loaded["parameters"] > 100_000, loaded
        rows = tool(["datasets", "lab/chat"], gateway, tmp_path / "hf")
        assert rows.get("rows") == 40 and rows["first"]["messages"][0]["role"] == "user", rows
        kinds = {(r["model"], r["kind"]) for r in json.loads(run_shoal(["ls", "--json"], agent.env, check=True).stdout)}
        assert kinds == {("lab/tiny-llm", "model"), ("datasets/lab/chat", "dataset")}
    finally:
        agent.stop()


def test_the_hugging_face_origin_and_a_name_map_share_one_cache(env, hub, model_dir, tmp_path):
    """An id the settings map to a ModelScope id is that cache entry; an id only a Hugging
    Face hub has comes from it (the agent's HF_ENDPOINT), proven by the hub's SHA-256."""
    with HfHubServer(lfs_threshold=64 * 1024) as hf:
        hf.add_model("hf-org/only-here", model_dir)
        agent = AgentProcess(gateway_env(env, tmp_path, HF_ENDPOINT=hf.url,
                                         SHOAL_HF_NAMES=f"Lab/Tiny-Model-HF={MODEL_ID}")).start()
        try:
            gateway = agent.info["gateway"]
            mapped = tool(["snapshot", "Lab/Tiny-Model-HF", "model"], gateway, tmp_path / "hf")
            assert tree_digest(Path(mapped["path"])) == tree_digest(model_dir)
            assert hf.faults.data_requests() == []  # ModelScope had it under the mapped name
            # Only the Hugging Face hub has this one: its listing comes from there (the small
            # git files are read to list their SHA-256, agent.sources.huggingface), and the
            # weights, the same as the mapped model's, are the cache's already: linked, not fetched.
            from_hf = tool(["snapshot", "hf-org/only-here", "model"], gateway, tmp_path / "hf")
            assert tree_digest(Path(from_hf["path"])) == tree_digest(model_dir)
            assert any("/api/models/hf-org/only-here" in e.path for e in hf.faults.log())
            assert hf.faults.data_requests("/__cdn__/") == []
            rows = {r["model"] for r in json.loads(run_shoal(["ls", "--json"], agent.env, check=True).stdout)}
            assert rows == {MODEL_ID, "hf-org/only-here"}
            usage = json.loads(run_shoal(["du", "--json"], agent.env, check=True).stdout)
            assert usage["usage_bytes"] <= sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) * 1.01
        finally:
            agent.stop()


def test_an_offline_student_gets_a_hugging_face_named_model_from_the_teacher(env, hub, oss, model_dir, tmp_path):
    base = {**env}
    del base["SHOAL_OSS_BUCKET"]
    t_env = swarm_env(base, tmp_path, "teacher")
    run_shoal(["pull", MODEL_ID], t_env, check=True)
    run_shoal(["publish", MODEL_ID], t_env, check=True)
    key = run_shoal(["id"], t_env, check=True).stdout.strip()
    teacher = AgentProcess(t_env).start()
    student = None
    try:
        addr = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)["swarm"]["addrs"][0]
        s_env = offline(swarm_env(base, tmp_path, "student", SHOAL_SWARM_PEERS=addr, SHOAL_TRUSTED_PUBLISHERS=key,
                                  SHOAL_DHT="0", SHOAL_HF_NAMES=f"Lab/Tiny={MODEL_ID}"))
        student = AgentProcess(s_env).start()
        wait_connected(s_env)
        hub.faults.clear_log()
        got = tool(["snapshot", "Lab/Tiny", "model"], student.info["gateway"], tmp_path / "hf")
        assert "error" not in got, got
        assert tree_digest(Path(got["path"])) == tree_digest(model_dir)
        assert hub.faults.log() == []  # the hub was never asked: the listing and the bytes came from the room
    finally:
        if student is not None:
            student.stop()
        teacher.stop()


def test_a_file_streams_to_the_tool_as_its_chunks_are_proven(env, oss, model_dir, tmp_path):
    """Under a trusted manifest (the mirror's) each chunk is proven when it lands: a tool's
    GET gets the first bytes while the pull is still fetching the rest."""
    mirror(env, model_dir)
    oss.faults.add(Fault("slow", match="/files/", delay=0.25))
    agent = AgentProcess({**env, "SHOAL_GATEWAY_PORT": "0", "SHOAL_CONCURRENCY": "2"}).start()
    try:
        shard = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*.safetensors"))[-1]
        request = urllib.request.Request(f"{agent.info['gateway']}/{MODEL_ID}/resolve/main/{shard}")
        with urllib.request.urlopen(request, timeout=60) as r:
            first = r.read(64 * 1024)
            pulls = json.loads(run_shoal(["status", "--json"], agent.env, check=True).stdout)["pulls"]
            rest = r.read()
            assert r.headers["X-Linked-Etag"].strip('"') == __import__("hashlib").sha256(
                (model_dir / shard).read_bytes()).hexdigest()
        assert pulls and pulls[0]["done_bytes"] < pulls[0]["total_bytes"], pulls
        assert first + rest == (model_dir / shard).read_bytes()
    finally:
        agent.stop()


def test_an_agent_never_takes_a_gateway_for_its_origin(env, hub, tmp_path):
    """A shell set up for tools (``shoal env``) points HF_ENDPOINT and MODELSCOPE_ENDPOINT at
    the gateway: an agent started from it does not ask itself; and a gateway refuses an
    agent's origin requests (one agent's HF_ENDPOINT set to another's gateway) instead of
    passing them on in a loop."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own = f"http://127.0.0.1:{port}"
    mine = AgentProcess(gateway_env(env, tmp_path / "a", SHOAL_CACHE_DIR=str(tmp_path / "a" / "cache"),
                                    SHOAL_GATEWAY_PORT=str(port), HF_ENDPOINT=own,
                                    MODELSCOPE_ENDPOINT=f"http://localhost:{port}")).start()
    other = None
    try:
        sources = json.loads(run_shoal(["status", "--json"], mine.env, check=True).stdout)["sources"]
        assert not any("hugging" in s.lower() for s in sources), sources
        other = AgentProcess(gateway_env(env, tmp_path / "b", SHOAL_CACHE_DIR=str(tmp_path / "b" / "cache"),
                                         HF_ENDPOINT=own)).start()
        started = time.monotonic()
        got = tool(["file", "lab/not-on-modelscope", "config.json", "main"], other.info["gateway"], tmp_path / "hf",
                   timeout=60)
        assert "error" in got and time.monotonic() - started < 30, got
    finally:
        log = mine.stop()
        other_log = other.stop() if other is not None else ""
    assert "not used as an origin" in log, log[-2000:]
    assert "points at a shoal gateway" in other_log, other_log[-2000:]


# ------------------------------------------------------------------ the face's pure parts

def test_every_file_is_described_as_the_hub_describes_an_lfs_file(tmp_path):
    from agent.gateway.hub import git_blob_id, lfs_pointer
    sha = "ab" * 32
    pointer = lfs_pointer(sha, 1234)
    (tmp_path / "pointer").write_bytes(pointer)
    real = subprocess.run(["git", "hash-object", str(tmp_path / "pointer")], capture_output=True, text=True, check=True)
    assert git_blob_id(pointer) == real.stdout.strip()  # the oid git (and the Hub) give the pointer
    assert pointer.decode() == f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize 1234\n"


def test_tree_and_paths_info_answer_as_the_hub_does():
    from agent.gateway.hub import _paths_info, _tree
    from agent.gateway.serve import MissingFile, Revision
    from agent.manifest import ModelRef
    revision = Revision(ModelRef("lab/x"), (("a.json", 3, b"\x01" * 32), ("d/b.bin", 5, b"\x02" * 32),
                                            ("d/e/c.bin", 7, b"\x03" * 32)), "c" * 40, True)
    top = _tree(revision, "", recursive=False)
    assert [(e["type"], e["path"]) for e in top] == [("directory", "d"), ("file", "a.json")]
    assert {e["path"] for e in _tree(revision, "", recursive=True)} == {"d", "d/e", "a.json", "d/b.bin", "d/e/c.bin"}
    assert [(e["type"], e["path"]) for e in _tree(revision, "d", recursive=False)] == [("directory", "d/e"),
                                                                                      ("file", "d/b.bin")]
    assert _tree(revision, "d", recursive=False)[1]["lfs"] == {"oid": "02" * 32, "size": 5, "pointerSize": 126}
    with pytest.raises(MissingFile):
        _tree(revision, "nope", recursive=True)
    asked = _paths_info(revision, b"paths=a.json&paths=d&paths=missing&expand=False",
                        "application/x-www-form-urlencoded")
    assert [(e["type"], e["path"]) for e in asked] == [("file", "a.json"), ("directory", "d")]
    assert [e["path"] for e in _paths_info(revision, b'{"paths": ["d/e/c.bin"]}', "application/json")] == ["d/e/c.bin"]
    from agent.errors import UsageError
    with pytest.raises(UsageError):
        _paths_info(revision, ("paths=x&" * 1001).encode(), "")


@pytest.mark.parametrize("names,ok", [
    ("Qwen/Qwen2.5-0.5B-Instruct=qwen/Qwen2.5-0.5B-Instruct", True),
    ("gpt2=openai-community/gpt2, datasets/a/b=lab/b", True),
    ("Qwen/X", False),  # no shoal id
    ("a/b=../c", False),
    ("a/b/c/d=lab/x", False),
])
def test_the_name_map_is_checked_when_the_settings_load(tmp_path, names, ok):
    from agent.config import load_settings
    from agent.errors import ConfigError
    env = {"SHOAL_CONFIG": str(tmp_path / "none.toml"), "SHOAL_HF_NAMES": names}
    if ok:
        assert load_settings(env=env).hf_names == names
    else:
        with pytest.raises(ConfigError, match="huggingface.names"):
            load_settings(env=env)
    (tmp_path / "c.toml").write_text('[huggingface.names]\n"Qwen/Qwen2.5-0.5B-Instruct" = "qwen/Qwen2.5-0.5B-Instruct"\n'
                                     '"datasets/a/b" = "lab/b"\n')
    from agent.config import hf_name_map
    kept = load_settings(env={"SHOAL_CONFIG": str(tmp_path / "c.toml")}).hf_names
    assert hf_name_map(kept) == {"Qwen/Qwen2.5-0.5B-Instruct": "qwen/Qwen2.5-0.5B-Instruct",
                                 "datasets/a/b": "datasets/lab/b"}
