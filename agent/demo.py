"""``shoal demo``: a complete pull on one machine, no internet, no cloud account.

It generates a model, serves it from a local ModelScope-compatible hub, mirrors all but
one shard into a local OSS-compatible server (with a corrupt chunk and a burst of 500s
injected), then pulls it with the real CLI code path: most bytes come from the OSS
mirror, the missing shard and the corrupt chunk come from ModelScope, and every byte is
verified on the way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

DEMO_MODEL = "shoal-demo/tiny-chat"
DEMO_DATASET = "shoal-demo/chat-data"
DEMO_LLM = "shoal-demo/tiny-qwen2"  # a real (tiny, random) LLM the LoRA step trains
DEMO_BUCKET = "shoal-demo-mirror"


def run_demo(*, size_mb: int = 256, workdir: Path | None = None, keep: bool = False) -> int:
    try:
        from agent.testing.hub_server import HubServer
        from agent.testing.oss_server import OssServer
    except ImportError as e:
        print(f"shoal demo needs the local servers' packages ({e.name}): "
              "pip install 'shoal[servers]' (bootstrap/demo does this)", file=sys.stderr)
        return 2
    from agent.config import load_settings
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir, push_directory
    from agent.progress import human_bytes
    from agent.pull import event_to_wire, pull, result_to_wire
    from agent.reporter import PullReporter
    from agent.testing.faults import Fault
    from agent.testing.models import make_model

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    try:
        say(f"[1/5] generating a {size_mb} MB model {DEMO_MODEL} in {root / 'origin'}")
        origin_dir = make_model(root / "origin", weights_bytes=size_mb * 1024 * 1024, shards=3, seed="demo")
        with HubServer() as hub, OssServer() as oss:
            hub.add_model(DEMO_MODEL, origin_dir)
            oss.create_bucket(DEMO_BUCKET)
            say(f"[2/5] local ModelScope hub at {hub.url}, local OSS at {oss.url}")
            env = {"SHOAL_CONFIG": str(root / "no-config.toml"), "SHOAL_CACHE_DIR": str(root / "cache"), "OSS_ENDPOINT": oss.url,
                   "SHOAL_OSS_BUCKET": DEMO_BUCKET, "OSS_ACCESS_KEY_ID": "demo-key",
                   "OSS_ACCESS_KEY_SECRET": "demo-secret", "MODELSCOPE_ENDPOINT": hub.url,
                   "SHOAL_CHUNK_TIMEOUT": "20"}
            settings = load_settings(env=env)
            ref = ModelRef(DEMO_MODEL, "master")
            manifest = manifest_from_dir(ref, origin_dir)
            # Mirror every file but the last shard, as a sync job cut short would.
            last = sorted(e.path for e in manifest.files if e.path.endswith(".safetensors"))[-1]
            push_directory(ref, origin_dir, settings, manifest, bucket_name=DEMO_BUCKET,
                           only={e.path for e in manifest.files if e.path != last})
            say(f"[3/5] mirrored {len(manifest.files) - 1} of {len(manifest.files)} files to "
                f"oss://{DEMO_BUCKET} (left out {last}); injecting a corrupt chunk and a burst of 500s")
            first_shard = sorted(e.path for e in manifest.files if e.path.endswith(".safetensors"))[0]
            oss.faults.add(Fault("corrupt", match=first_shard, times=1))
            oss.faults.add(Fault("status", match="files/", status=500, times=6))
            say(f"[4/5] shoal pull {ref}")
            reporter = PullReporter(ref, json_mode=False)
            started = time.monotonic()
            result = trio.run(lambda: pull(ref, settings, emit=lambda e: reporter.event(event_to_wire(e))))
            reporter.finish(result_to_wire(result))
            hub_chunks = len(hub.faults.data_requests())
            oss_chunks = len(oss.faults.data_requests())
            oss_errors = sum(1 for e in oss.faults.log() if e.fault == "status")
            oss_corrupt = sum(1 for e in oss.faults.log() if e.fault == "corrupt")
        say("")
        say(f"Pulled {human_bytes(result.total_size)} in {time.monotonic() - started:.1f} s with "
            f"{oss_chunks} ranged GETs to the OSS mirror and {hub_chunks} to ModelScope.")
        say(f"The mirror answered {oss_errors} requests with HTTP 500 (retried) and sent {oss_corrupt} corrupt "
            f"chunk (caught by BLAKE3, fetched from ModelScope, never written);")
        say(f"{last}, missing from the mirror, came from ModelScope.")
        say(f"Files: {result.directory}" + ("" if keep or workdir else "  (a temp folder, removed now; "
                                                                          "--keep keeps it)"))
        return 0
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        elif keep:
            say(f"kept {root}")


def _all_connected(peers: list[dict]) -> bool:
    return bool(peers) and all(p["connected"] for p in peers)


def _tiny_llm(out: Path) -> Path | None:
    """A tiny real LLM for the LoRA step, or None without ``shoal[run]`` (torch, ms-swift)."""
    import importlib.util
    if importlib.util.find_spec("swift") is None:  # the trainer the step uses
        return None
    try:
        from agent.testing.tiny_llm import make_tiny_llm
        return make_tiny_llm(out)
    except ImportError:
        return None


def _lora_step(shoal, student: tuple[str, dict], llm: Path | None) -> None:
    """``shoal train`` on the student's machine: the LLM and the dataset from the teacher."""
    import json
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    name, env = student
    if llm is None:
        say("\n[5/6] skipped: a LoRA run needs the launcher (pip install 'shoal[run]': torch and ms-swift)")
        return
    say(f"\n[5/6] {name} trains a LoRA adapter for 3 steps on the dataset, offline: "
        f"shoal train {DEMO_LLM} --dataset {DEMO_DATASET} --max-steps 3")
    proc = shoal(["train", DEMO_LLM, "--dataset", DEMO_DATASET, "--name", "classroom", "--max-steps", "3",
                  "--rank", "4", "--alpha", "16", "--lr", "0.01", "--model-type", "qwen2", "--template", "qwen",
                  "--json"], env)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for step in (line for line in lines if "step" in line):
        say(f"      step {step['step']}/{step.get('max_steps', 3)}  loss {step['loss']:.3f}")
    say(f"      adapter {lines[-1].get('adapter')} is in {name}'s cache (shoal run {DEMO_LLM} --adapter classroom)")


def run_lan_demo(*, size_mb: int = 128, workdir: Path | None = None, keep: bool = False) -> int:
    """``shoal demo --lan``: a classroom on loopback. A teacher's agent pulls a model and a
    dataset from the local mirror and publishes them; two students' agents, with the mirror
    and the hub out of reach, pull them from the teacher over the LAN swarm, trusting the
    teacher's key, and one trains a LoRA adapter for 3 steps on the dataset (with
    ``shoal[run]`` installed: a tiny real LLM, also from the teacher)."""
    import json
    import signal
    import socket
    import subprocess

    from agent.testing.hub_server import HubServer
    from agent.testing.oss_server import OssServer
    from agent.testing.models import make_model
    from agent.testing.tiny_llm import make_chat_dataset

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="shoal-lan-demo-"))
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    agents: list[subprocess.Popen] = []

    def shoal(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise SystemExit(f"shoal {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def start_agent(env: dict) -> dict:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        agents.append(proc)
        info = Path(env["SHOAL_CACHE_DIR"]) / "agent.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("an agent did not start; run `shoal agent` by hand to see why")
            time.sleep(0.1)
        return json.loads(shoal(["status", "--json"], env).stdout)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    try:
        say(f"[1/6] generating a {size_mb} MB model and a chat dataset in {root / 'origin'}")
        origin = make_model(root / "origin", weights_bytes=size_mb * 1024 * 1024, shards=2, seed="lan-demo")
        dataset = make_chat_dataset(root / "origin-data", rows=2000)
        llm = _tiny_llm(root / "origin-llm")
        with HubServer() as hub, OssServer() as oss:
            hub.add_model(DEMO_MODEL, origin)
            hub.add_dataset(DEMO_DATASET, dataset)
            oss.create_bucket(DEMO_BUCKET)
            base = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
            base.update(SHOAL_CONFIG=str(root / "no-config.toml"), SHOAL_GATEWAY_PORT="0", SHOAL_SWARM="1",
                        SHOAL_SWARM_HOST="127.0.0.1", SHOAL_MDNS="0", OSS_ACCESS_KEY_ID="demo", OSS_ACCESS_KEY_SECRET="demo")
            teacher = {**base, "SHOAL_CACHE_DIR": str(root / "teacher"), "OSS_ENDPOINT": oss.url,
                       "SHOAL_OSS_BUCKET": DEMO_BUCKET, "MODELSCOPE_ENDPOINT": hub.url}
            repos = [([DEMO_MODEL], origin), (["--dataset", DEMO_DATASET], dataset)]
            if llm is not None:
                repos.append(([DEMO_LLM], llm))
            for name, folder in repos:
                shoal(["mirror", "push", *name, "--from-dir", str(folder)], teacher)
            say("[2/6] the teacher's machine pulls them from the lab mirror and publishes them")
            for name, _ in repos:
                shoal(["pull", *name], teacher)
                key = shoal(["publish", *name], teacher).stdout.split("SHOAL_TRUSTED_PUBLISHERS=")[1].strip()
            address = start_agent(teacher)["swarm"]["addrs"][0]
            say(f"      teacher's agent: {address}\n      teacher's key:   {key}")
            say("[3/6] two students' agents start with the mirror and the hub unreachable (an offline classroom)")
            students = []
            for name in ("student-1", "student-2"):
                env = {**base, "SHOAL_CACHE_DIR": str(root / name), "OSS_ENDPOINT": dead,
                       "SHOAL_OSS_BUCKET": DEMO_BUCKET, "MODELSCOPE_ENDPOINT": dead, "SHOAL_RETRIES": "0",
                       "SHOAL_SWARM_PEERS": address, "SHOAL_TRUSTED_PUBLISHERS": key}
                start_agent(env)
                students.append((name, env))
            for name, env in students:
                deadline = time.monotonic() + 30
                while not _all_connected(json.loads(shoal(["status", "--json"], env).stdout)["peers"]):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{name} could not reach the teacher's agent")
                    time.sleep(0.2)
            say(f"[4/6] each student runs: shoal pull {DEMO_MODEL}; shoal pull --dataset {DEMO_DATASET}")
            for name, env in students:
                for args in ([DEMO_MODEL], ["--dataset", DEMO_DATASET]):
                    proc = shoal(["pull", *args], env)
                    say(f"--- {name}\n{proc.stderr.strip()}")
            say(f"\nThe mirror served {len(oss.faults.data_requests())} ranged GETs (all to the teacher) and the "
                f"hub {len(hub.faults.data_requests())}; the students got every byte from the LAN, each chunk "
                "verified against the manifest the teacher signed.")
            _lora_step(shoal, students[0], llm)

            say("\n[6/6] another room: two agents that know only each other start pulling at once from the "
                "mirror, made slow like a lab's outside link")
            from agent.testing.faults import Fault
            oss.faults.add(Fault("slow", match="/files/", delay=0.25))  # 0.25 s per MiB per request
            room, previous = [], None
            for name in ("room-2-a", "room-2-b"):
                env = {**base, "SHOAL_CACHE_DIR": str(root / name), "OSS_ENDPOINT": oss.url,
                       "SHOAL_OSS_BUCKET": DEMO_BUCKET, "MODELSCOPE_ENDPOINT": dead,
                       **({"SHOAL_SWARM_PEERS": previous} if previous else {})}
                previous = start_agent(env)["swarm"]["addrs"][0]
                room.append((name, env))
            deadline = time.monotonic() + 30
            while not _all_connected(json.loads(shoal(["status", "--json"], room[1][1]).stdout)["peers"]):
                if time.monotonic() > deadline:
                    raise SystemExit("the two agents of the second room could not reach each other")
                time.sleep(0.2)
            oss.faults.clear_log()
            pulls = [(name, subprocess.Popen([sys.executable, "-m", "agent.cli", "pull", DEMO_MODEL], env=env,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)) for name, env in room]
            for name, proc in pulls:
                _, err = proc.communicate(timeout=600)
                if proc.returncode != 0:
                    raise SystemExit(f"{name}'s pull failed:\n{err}")
                say(f"--- {name}\n" + "\n".join(line for line in err.strip().splitlines() if "ETA" not in line))
            served = oss.faults.data_bytes("/files/")
            model_bytes = sum(p.stat().st_size for p in origin.rglob("*") if p.is_file())
            say(f"\nTogether they fetched {served / 1e6:.1f} MB from the mirror for a {model_bytes / 1e6:.1f} MB model "
                f"({served / model_bytes:.2f} copies): each took its share from the mirror and the rest from the other.")
        return 0
    finally:
        for proc in agents:
            proc.send_signal(signal.SIGTERM)
        for proc in agents:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
