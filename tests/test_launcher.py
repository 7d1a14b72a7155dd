"""Launching on the local device with a real tiny Qwen2 model, pulled through shoal from
the local hub: run, train, serve, jobs and cancel as real processes, ms-swift and the
transformers+peft fallback, and the bad inputs a person would try."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from agent.testing.tiny_llm import write_chat_dataset
from conftest import REPO, TESTS, run_shoal

pytestmark = pytest.mark.timeout(300)

TINY = "lab/tiny-chat"
SWIFT_FLAGS = ["--model-type", "qwen2", "--template", "qwen"]


@pytest.fixture
def launch_env(env, hub, tiny_llm, tmp_path):
    hub.add_model(TINY, tiny_llm)
    env = dict(env)
    del env["SHOAL_OSS_BUCKET"]  # straight from the hub: the OSS path is tested elsewhere
    env["SHOAL_CHUNK_SIZE"] = str(64 * 1024)
    return env


def hidden_swift(env: dict) -> dict:
    env = dict(env)
    env["SHOAL_TEST_PYTHONPATH"] = os.pathsep.join([str(TESTS / "hide_swift"), str(REPO)])
    return env


def jobs(env) -> list[dict]:
    return json.loads(run_shoal(["jobs", "--json"], env, check=True).stdout)


def test_doctor_reports_the_device_and_engines(launch_env):
    report = json.loads(run_shoal(["doctor", "--json"], launch_env, check=True).stdout)
    assert report["device"] in ("cpu", "cuda", "npu", "mps")
    assert report["backends"]["ms-swift"] == "4.6.0" and report["backends"]["torch"].startswith("2.13.0")
    assert report["engines"]["train"] == "swift"


def test_run_pulls_the_model_then_replies(launch_env, hub):
    proc = run_shoal(["run", TINY, "--prompt", "hello", "--max-new-tokens", "8", "--json", *SWIFT_FLAGS],
                     launch_env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "not in the cache yet: pulling it first" in proc.stderr
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(reply["reply"], str) and len(reply["reply"]) > 0
    assert hub.faults.data_requests()  # the weights came through shoal
    [job] = jobs(launch_env)
    assert job["state"] == "done" and job["kind"] == "run" and job["exit_code"] == 0


def _logits(model_dir: Path, adapter: Path | None) -> "list[float]":
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        ids = tokenizer("What does shoal verify?", return_tensors="pt")["input_ids"]
        return model(ids).logits[0, -1].tolist()


@pytest.mark.parametrize("engine", ["swift", "transformers"])
def test_train_reports_loss_per_step_and_registers_an_adapter_that_changes_the_logits(
        launch_env, tmp_path, engine):
    dataset = write_chat_dataset(tmp_path / "chat.jsonl")
    env = launch_env if engine == "swift" else hidden_swift(launch_env)
    proc = run_shoal(["train", TINY, "--dataset", str(dataset), "--name", f"demo-{engine}", "--max-steps", "3",
                      "--rank", "4", "--alpha", "16", "--lr", "0.01", "--json", *SWIFT_FLAGS], env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = [line for line in lines if "step" in line]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["loss"] > 0 for s in steps)
    assert lines[-1]["adapter"] == f"{TINY}+lora/demo-{engine}"
    listed = {m["model"]: m for m in json.loads(run_shoal(["ls", "--json"], env, check=True).stdout)}
    adapter = listed[f"{TINY}+lora/demo-{engine}"]
    assert adapter["state"] == "complete" and adapter["manifest_id"]
    base = Path(listed[TINY]["dir"])
    before, after = _logits(base, None), _logits(base, Path(adapter["dir"]))
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-6
    # ... and it runs, with the same engine.
    proc = run_shoal(["run", TINY, "--adapter", f"demo-{engine}", "--prompt", "hi", "--max-new-tokens", "4",
                      *(["--engine", "transformers"] if engine == "transformers" else SWIFT_FLAGS)], env, timeout=240)
    assert proc.returncode == 0, proc.stderr


def test_fallback_without_swift_says_what_engine_it_uses(launch_env):
    env = hidden_swift(launch_env)
    report = json.loads(run_shoal(["doctor", "--json"], env, check=True).stdout)
    assert report["backends"]["ms-swift"] is None
    assert report["engines"] == {"run": "transformers", "serve": None, "train": "transformers"}
    proc = run_shoal(["serve", TINY], env)
    assert proc.returncode == 2 and "serving needs ms-swift" in proc.stderr


def test_serve_answers_chat_completions_and_cancel_leaves_no_process(launch_env):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_shoal(["serve", TINY, "--port", str(port), "--detach", *SWIFT_FLAGS], launch_env, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert f"http://127.0.0.1:{port}/v1" in proc.stdout
    [job] = [j for j in jobs(launch_env) if j["kind"] == "serve"]
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"model": TINY, "messages": [{"role": "user", "content": "hello"}],
                             "max_tokens": 8, "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] > 0
    finally:
        run_shoal(["cancel", job["id"]], launch_env, check=True)
    assert _group_gone(job["pgid"])
    assert [j for j in jobs(launch_env) if j["id"] == job["id"]][0]["state"] == "cancelled"


def _group_gone(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
    return True


def test_cancel_of_a_running_training_leaves_no_process_behind(launch_env, tmp_path):
    dataset = write_chat_dataset(tmp_path / "chat.jsonl", rows=64)
    proc = run_shoal(["train", TINY, "--dataset", str(dataset), "--name", "long", "--max-steps", "100000",
                      "--detach", *SWIFT_FLAGS], launch_env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    [job] = jobs(launch_env)
    deadline = time.monotonic() + 120
    output = Path(launch_env["SHOAL_CACHE_DIR"]) / "jobs" / job["id"] / "output" / "logging.jsonl"
    while not output.exists() and time.monotonic() < deadline:  # wait until it really trains
        time.sleep(0.5)
    assert output.exists(), run_shoal(["logs", job["id"]], launch_env).stdout[-2000:]
    run_shoal(["cancel", job["id"]], launch_env, check=True)
    [job] = jobs(launch_env)
    assert job["state"] == "cancelled" and _group_gone(job["pgid"])
    # Nothing half-registered.
    assert "lab/tiny-chat+lora/long" not in run_shoal(["ls"], launch_env, check=True).stdout


@pytest.mark.parametrize("content,message", [
    ("not json\n", "is not JSON"),
    ('{"text": "hello"}\n', "is not a chat record"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "ending with the assistant"),
    ("", "holds no records"),
])
def test_a_bad_dataset_is_refused_before_anything_starts(launch_env, tmp_path, content, message):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text(content)
    proc = run_shoal(["train", TINY, "--dataset", str(dataset), "--name", "x"], launch_env)
    assert proc.returncode == 2 and message in proc.stderr
    assert not list(Path(launch_env["SHOAL_CACHE_DIR"]).glob("jobs/*/job.json"))  # no job was started


def test_bad_launch_requests_get_clear_errors(launch_env, tmp_path):
    proc = run_shoal(["run", "lab/no-such-model", "--prompt", "hi"], launch_env)
    assert proc.returncode == 3 and "no model lab/no-such-model" in proc.stderr
    proc = run_shoal(["run", TINY, "--adapter", "nope", "--prompt", "hi"], launch_env)
    assert proc.returncode == 3 and "no adapter 'nope'" in proc.stderr
    report = json.loads(run_shoal(["doctor", "--json"], launch_env, check=True).stdout)
    if report["device"] != "cuda":
        proc = run_shoal(["run", TINY, "--device", "cuda", "--prompt", "hi"], launch_env)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    proc = run_shoal(["logs", "no-such-job"], launch_env)
    assert proc.returncode == 3


def test_ms_swift_given_a_hub_model_id_fetches_it_through_the_gateway(launch_env, hub, tmp_path):
    """Unmodified ms-swift (`--model OWNER/NAME`) pointed at the agent's gateway: the agent
    pulls the model (verified) and serves it; swift loads it and generates."""
    import subprocess
    import sys
    from conftest import AgentProcess, sdk_env
    agent_env = dict(launch_env, SHOAL_GATEWAY_PORT="0")
    agent = AgentProcess(agent_env).start()
    try:
        code = ("from swift.infer_engine import TransformersEngine, InferRequest, RequestConfig\n"
                f"e = TransformersEngine({TINY!r}, model_type='qwen2', template_type='qwen')\n"
                "r = e.infer([InferRequest(messages=[{'role': 'user', 'content': 'hi'}])],"
                " RequestConfig(max_tokens=4, temperature=0))\n"
                "print('REPLY', len(r[0].choices[0].message.content))\n")
        proc = subprocess.run([sys.executable, "-c", code], env=sdk_env(agent.info["gateway"], tmp_path),
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "REPLY" in proc.stdout
        assert hub.faults.data_requests()  # the agent fetched it from the origin, verified
        listed = json.loads(run_shoal(["ls", "--json"], agent_env, check=True).stdout)
        assert [m["model"] for m in listed] == [TINY] and listed[0]["state"] == "complete"
    finally:
        agent.stop()
