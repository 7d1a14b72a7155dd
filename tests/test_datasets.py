"""Dataset repositories through the same cache: pulled, verified, listed and removed like
models without ever colliding with a model of the same name; served to the unmodified
modelscope SDK (``snapshot_download(repo_type="dataset")``, ``MsDataset.load``) and
ms-swift (``swift sft --dataset OWNER/NAME``) by the gateway; shared by the room; trained on
by ``shoal train --dataset OWNER/NAME``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.testing.tiny_llm import make_chat_dataset
from conftest import MODEL_ID, AgentProcess, run_shoal, sdk_env, tree_digest
from test_swarm import agent_env as swarm_env
from test_swarm import offline, wait_connected

pytestmark = pytest.mark.timeout(300)

DATASET = "lab/tiny-chat-data"
TINY = "lab/tiny-chat"


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """A dataset repository: README.md and a ~140 KB train.jsonl (3 chunks of 64 KiB)."""
    return make_chat_dataset(tmp_path_factory.mktemp("datasets") / "tiny-chat-data", rows=2000)


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


SDK_CODE = """
import json, sys
from modelscope.hub.snapshot_download import snapshot_download
from modelscope.msdatasets import MsDataset
name, local = sys.argv[1], sys.argv[2]
try:
    path = snapshot_download(name, repo_type="dataset", local_dir=local)
    ds = MsDataset.load(name, split="train")
    print(json.dumps({"path": path, "rows": len(ds), "first": ds[0]}))
except Exception as e:
    print(f"{type(e).__module__}.{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
"""


def test_the_sdk_gets_a_dataset_through_the_gateway_on_a_cold_cache(env, hub, dataset_dir, tmp_path):
    hub.add_dataset(DATASET, dataset_dir)
    a_env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    del a_env["SHOAL_OSS_BUCKET"]
    agent = AgentProcess(a_env).start()
    try:
        proc = subprocess.run([sys.executable, "-c", SDK_CODE, DATASET, str(tmp_path / "snap")],
                              env=sdk_env(agent.info["gateway"], tmp_path), capture_output=True, text=True,
                              timeout=180, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [got] = lines(proc.stdout)
        # The SDK's own checks passed (snapshot_download checks each file's SHA-256) and
        # the datasets library read every record the hub has.
        assert tree_digest(tmp_path / "snap") == tree_digest(dataset_dir)
        assert got["rows"] == 2000 and got["first"]["messages"][-1]["content"] == "Every chunk, with BLAKE3."
        # The agent pulled it once, verified, into its datasets/ folder.
        served = hub.faults.data_requests()
        assert served and {r.path.split("FilePath=")[1].split("&")[0] for r in served} == {"README.md", "train.jsonl"}
        assert all("/api/v1/datasets/lab/tiny-chat-data/repo" in r.path for r in served)
        [row] = json.loads(run_shoal(["ls", "--datasets", "--json"], a_env, check=True).stdout)
        assert row["kind"] == "dataset" and row["model"] == f"datasets/{DATASET}" and row["state"] == "complete"
        assert tree_digest(Path(row["dir"])) == tree_digest(dataset_dir)
        assert Path(row["dir"]) == agent.cache / "datasets" / DATASET / "master"
        assert json.loads(run_shoal(["ls", "--models", "--json"], a_env, check=True).stdout) == []
        # A dataset the hub does not have: the SDK's own not-found error.
        proc = subprocess.run([sys.executable, "-c", SDK_CODE, "lab/no-such-data", str(tmp_path / "nope")],
                              env=sdk_env(agent.info["gateway"], tmp_path), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 3 and "404" in proc.stderr, proc.stderr[-2000:]
    finally:
        agent.stop()


def test_a_dataset_and_a_model_of_the_same_name_coexist(env, hub, oss, model_dir, dataset_dir, tmp_path):
    """Same OWNER/NAME, two kinds: two cache folders, two index rows, two manifests, two
    mirror folders; removing one leaves the other; each pulls back from the mirror alone."""
    hub.add_dataset(MODEL_ID, dataset_dir)  # the hub's fixture model has the same name
    local = {**env}
    del local["SHOAL_OSS_BUCKET"]
    for args in (["pull", MODEL_ID], ["pull", "--dataset", MODEL_ID]):
        run_shoal(args + ["--json"], local, check=True)
    rows = {r["kind"]: r for r in json.loads(run_shoal(["ls", "--json"], local, check=True).stdout)}
    assert set(rows) == {"model", "dataset"}
    assert tree_digest(Path(rows["model"]["dir"])) == tree_digest(model_dir)
    assert tree_digest(Path(rows["dataset"]["dir"])) == tree_digest(dataset_dir)
    assert rows["model"]["manifest_id"] != rows["dataset"]["manifest_id"]
    table = run_shoal(["ls"], local, check=True).stdout
    assert f"{MODEL_ID}  dataset" in table and f"{MODEL_ID}  model" in table

    # Both go to the mirror, side by side; a fresh cache with the hub gone pulls each back.
    for args in (["mirror", "push", MODEL_ID], ["mirror", "push", "--dataset", MODEL_ID]):
        run_shoal(args + ["--from-dir", rows["dataset" if "--dataset" in args else "model"]["dir"]], env,
                  check=True)
    import oss2
    keys = {o.key for o in oss2.ObjectIteratorV2(oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket))}
    assert f"{MODEL_ID}/master/manifest.shoal" in keys and f"datasets/{MODEL_ID}/master/manifest.shoal" in keys
    assert f"datasets/{MODEL_ID}/master/files/train.jsonl" in keys
    fresh = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "fresh"), "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"}
    done = lines(run_shoal(["pull", "--dataset", MODEL_ID, "--json", "--no-modelscope"], fresh, check=True).stdout)[-1]
    assert set(done["fetched_by_source"]) == {"oss"}
    assert tree_digest(tmp_path / "fresh" / "datasets" / MODEL_ID / "master") == tree_digest(dataset_dir)
    assert not (tmp_path / "fresh" / "models" / MODEL_ID).exists()

    # Verify, pin and remove address one kind only.
    assert "all files match" in run_shoal(["verify", "--dataset", MODEL_ID], local, check=True).stdout
    run_shoal(["pin", f"datasets/{MODEL_ID}"], local, check=True)
    run_shoal(["rm", "--dataset", MODEL_ID], local, check=True)
    [left] = json.loads(run_shoal(["ls", "--json"], local, check=True).stdout)
    assert left["kind"] == "model" and tree_digest(Path(left["dir"])) == tree_digest(model_dir)
    assert not Path(rows["dataset"]["dir"]).exists()


@pytest.mark.parametrize("entry,message", [
    ({"Path": "../escape.jsonl", "Size": 10, "Sha256": "00" * 32}, "unsafe file path"),
    ({"Path": "data/../../x", "Size": 10, "Sha256": "00" * 32}, "unsafe file path"),
    ({"Path": "train.jsonl", "Size": 1 << 60, "Sha256": "00" * 32}, "absurd size"),
    ({"Path": "train.jsonl", "Size": 10, "Sha256": "nope"}, "no valid SHA-256"),
])
def test_a_hostile_dataset_listing_is_refused(env, hub, dataset_dir, tmp_path, entry, message):
    hub.add_dataset(DATASET, dataset_dir)
    hub.override_listing(DATASET, [{"Name": "x", "Type": "blob", **entry}], kind="dataset")
    local = {**env}
    del local["SHOAL_OSS_BUCKET"]
    proc = run_shoal(["pull", "--dataset", DATASET], local)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert hub.faults.data_requests() == []  # not one byte was asked for
    assert not list(tmp_path.rglob("escape.jsonl")) and not (Path(local["SHOAL_CACHE_DIR"]) / "datasets").exists()


def test_a_student_gets_a_dataset_from_the_teacher_with_the_hub_unreachable(env, hub, dataset_dir, tmp_path):
    hub.add_dataset(DATASET, dataset_dir)
    base = {**env}
    del base["SHOAL_OSS_BUCKET"]
    t_env = swarm_env(base, tmp_path, "teacher")
    run_shoal(["pull", "--dataset", DATASET], t_env, check=True)
    run_shoal(["publish", "--dataset", DATASET], t_env, check=True)
    key = run_shoal(["id"], t_env, check=True).stdout.strip()
    teacher = AgentProcess(t_env).start()
    student = None
    try:
        addr = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)["swarm"]["addrs"][0]
        s_env = offline(swarm_env(base, tmp_path, "student", SHOAL_SWARM_PEERS=addr,
                                  SHOAL_TRUSTED_PUBLISHERS=key, SHOAL_DHT="0"))
        student = AgentProcess(s_env).start()
        wait_connected(s_env)
        hub.faults.clear_log()
        # The unmodified SDK on the student's machine, through its own agent's gateway: the
        # listing is the teacher's signed manifest, the bytes come from the teacher.
        student_gateway = json.loads(run_shoal(["status", "--json"], s_env, check=True).stdout)["gateway"]
        proc = subprocess.run([sys.executable, "-c", SDK_CODE, DATASET, str(tmp_path / "snap")],
                              env=sdk_env(student_gateway, tmp_path), capture_output=True, text=True,
                              timeout=180, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert lines(proc.stdout)[0]["rows"] == 2000
        assert tree_digest(tmp_path / "snap") == tree_digest(dataset_dir)
        assert tree_digest(tmp_path / "student" / "datasets" / DATASET / "master") == tree_digest(dataset_dir)
        [row] = json.loads(run_shoal(["ls", "--json"], s_env, check=True).stdout)
        assert row["kind"] == "dataset" and row["state"] == "complete"
        assert hub.faults.data_requests() == []
        # The CLI on a second student: the same, from the LAN.
        s2_env = offline(swarm_env(base, tmp_path, "student-2", SHOAL_SWARM_PEERS=addr,
                                   SHOAL_TRUSTED_PUBLISHERS=key, SHOAL_DHT="0"))
        student_2 = AgentProcess(s2_env).start()
        try:
            wait_connected(s2_env)
            out = lines(run_shoal(["pull", "--dataset", DATASET, "--json"], s2_env, check=True).stdout)
        finally:
            student_2.stop()
        assert out[0]["plan"].startswith("LAN peer manifest, signed by")
        assert set(out[-1]["fetched_by_source"]) == {"lan"} and out[-1]["chunks_fetched"] >= 3
        assert hub.faults.data_requests() == []
        # The model of the same name is not what the teacher offers for it.
        proc = run_shoal(["pull", DATASET], s_env)
        assert proc.returncode != 0 and not (tmp_path / "student" / "models" / DATASET).exists()
    finally:
        if student is not None:
            student.stop()
        teacher.stop()


def test_train_and_swift_sft_take_a_dataset_id(env, hub, tiny_llm, dataset_dir, tmp_path):
    """`shoal train MODEL --dataset OWNER/NAME` pulls the dataset and trains 3 steps on it;
    unmodified `swift sft --dataset OWNER/NAME` reads it through the agent's gateway."""
    hub.add_model(TINY, tiny_llm)
    hub.add_dataset(DATASET, make_chat_dataset(tmp_path / "small-data", rows=16))
    l_env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    del l_env["SHOAL_OSS_BUCKET"]
    swift = ["--model-type", "qwen2", "--template", "qwen"]
    proc = run_shoal(["train", TINY, "--dataset", DATASET, "--name", "from-data", "--max-steps", "3",
                      "--rank", "4", "--alpha", "16", "--json", *swift], l_env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"training on {DATASET}:" in proc.stderr
    steps = [line for line in lines(proc.stdout) if "step" in line]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["loss"] > 0 for s in steps)
    listed = {m["model"]: m for m in json.loads(run_shoal(["ls", "--json"], l_env, check=True).stdout)}
    assert listed[f"datasets/{DATASET}"]["state"] == "complete"
    assert listed[f"{TINY}+lora/from-data"]["state"] == "complete"
    # A model name where a dataset is wanted, and the other way round: clear refusals.
    proc = run_shoal(["train", f"datasets/{DATASET}", "--dataset", DATASET, "--name", "x"], l_env)
    assert proc.returncode == 2 and "is a dataset" in proc.stderr
    proc = run_shoal(["train", TINY, "--dataset", "lab/no-such-data", "--name", "y"], l_env)
    assert proc.returncode == 3 and "no dataset lab/no-such-data" in proc.stderr

    agent = AgentProcess(l_env).start()
    try:
        # Through the agent (the TUI's training form): a dataset id, pulled by the agent first.
        from agent.client import open_backend
        from agent.config import load_settings
        backend = open_backend(load_settings(env=l_env), need_agent=True)
        backend.call("remove", {"model": f"datasets/{DATASET}@master"})
        events: list[dict] = []
        job = backend.call("train_start", {"model": TINY, "dataset": DATASET, "name": "via-agent", "max_steps": 1,
                                           "model_type": "qwen2", "template": "qwen"},
                           on_event=events.append, timeout=240)
        assert any(e.get("type") == "chunk" for e in events)  # the dataset was pulled for it
        wait_until = time.monotonic() + 200
        while (state := next(j for j in backend.call("jobs") if j["id"] == job["id"])["state"]) in ("starting",
                                                                                                  "running"):
            assert time.monotonic() < wait_until, "the training job did not end"
            time.sleep(0.5)
        assert state == "done"
        assert f"{TINY}+lora/via-agent" in {m["model"] for m in backend.call("list")}
        out = tmp_path / "swift-out"
        proc = subprocess.run(
            [sys.executable, "-m", "swift.cli.sft", "--model", listed[TINY]["dir"], "--dataset", DATASET,
             "--tuner_type", "lora", "--lora_rank", "4", "--lora_alpha", "16", "--target_modules", "all-linear",
             "--output_dir", str(out), "--check_model", "false", "--report_to", "none",
             "--dataloader_num_workers", "0", "--add_version", "false", "--split_dataset_ratio", "0",
             "--logging_steps", "1", "--max_steps", "1", "--save_steps", "1", "--model_type", "qwen2",
             "--template", "qwen"],
            env=sdk_env(agent.info["gateway"], tmp_path), capture_output=True, text=True, timeout=240,
            stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "logging.jsonl").exists()
        assert "pull of datasets/lab/tiny-chat-data@master" not in agent.log()  # it was cached: served, not pulled
    finally:
        agent.stop()


# ------------------------------------------------------------------------ pure parts

def test_dataset_ids_parse_and_never_meet_model_ids(tmp_path):
    from agent.errors import UsageError
    from agent.manifest import ModelRef, check_model_id, hub_repo
    from agent.store.folders import model_dir
    data = ModelRef.parse("lab/x@v1", dataset=True)
    assert data == ModelRef.parse("datasets/lab/x@v1") == ModelRef.parse("datasets/lab/x@v1", dataset=True)
    assert data.is_dataset and hub_repo(data.model_id) == ("dataset", "lab/x")
    model = ModelRef.parse("lab/x@v1")
    assert not model.is_dataset and str(model) != str(data)
    assert model_dir(tmp_path, data) == tmp_path / "datasets" / "lab" / "x" / "v1"
    assert model_dir(tmp_path, model) == tmp_path / "models" / "lab" / "x" / "v1"
    # "datasets" is no model owner, so no model folder or mirror key can be a dataset's.
    for bad in ("datasets/x", "datasets/lab/x+lora/a", "datasets/../x", "datasets/lab/x/y"):
        with pytest.raises(UsageError, match="datasets/OWNER/NAME"):
            check_model_id(bad)


def test_tree_pages_as_the_sdk_reads_them():
    from agent.hubtree import tree_page
    entries = [{"Path": p, "Type": "blob"} for p in ("README.md", "data/a.jsonl", "data/b/c.jsonl", "train.jsonl")]
    assert [e["Path"] for e in tree_page(entries, {"PageNumber": ["1"], "PageSize": ["3"]})] == \
        ["README.md", "data/a.jsonl", "data/b/c.jsonl"]
    assert [e["Path"] for e in tree_page(entries, {"PageNumber": ["2"], "PageSize": ["3"]})] == ["train.jsonl"]
    assert tree_page(entries, {"PageNumber": ["3"], "PageSize": ["3"]}) == []
    top = tree_page(entries, {"Root": ["/"], "Recursive": ["False"]})
    assert [(e["Path"], e["Type"]) for e in top] == [("README.md", "blob"), ("train.jsonl", "blob"), ("data", "tree")]
    assert [e["Path"] for e in tree_page(entries, {"Root": ["data"], "Recursive": ["True"]})] == \
        ["data/a.jsonl", "data/b/c.jsonl"]
    assert [e["Path"] for e in tree_page(entries, {"PageSize": ["junk"]})] == [e["Path"] for e in entries]


def test_a_sync_file_names_datasets_beside_models(tmp_path):
    from agent.errors import ConfigError
    from agent.mirrorsync import read_sync_file
    path = tmp_path / "sync.toml"
    path.write_text('keep = 2\n[[model]]\nid = "lab/x"\n[[dataset]]\nid = "lab/x"\nrevision = "v2"\n')
    assert [str(e.ref) for e in read_sync_file(path).entries] == ["lab/x@master", "datasets/lab/x@v2"]
    path.write_text('[[dataset]]\nid = "lab"\n')
    with pytest.raises(ConfigError, match="dataset #1"):
        read_sync_file(path)


def test_the_training_file_of_a_dataset_is_found_or_the_choice_named(tmp_path):
    from agent.errors import UsageError
    from agent.launcher.launch import dataset_ref, training_file
    from agent.manifest import ModelRef
    ref = ModelRef.parse(DATASET, dataset=True)
    assert dataset_ref(DATASET) == ref and dataset_ref("datasets/lab/x") == ModelRef.parse("lab/x", dataset=True)
    assert dataset_ref("chat/rows.jsonl") is None and dataset_ref(str(tmp_path)) is None
    root = make_chat_dataset(tmp_path / "d")
    assert training_file(root, ref) == root / "train.jsonl"
    (root / "valid.jsonl").write_text("{}\n")
    assert training_file(root, ref) == root / "train.jsonl"  # the train* one
    (root / "train-2.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="holds 3 JSONL files .* --dataset"):
        training_file(root, ref)
    with pytest.raises(UsageError, match="holds no .jsonl file"):
        training_file(tmp_path / "empty", ref)
