"""Benchmark: `hf download` (huggingface_hub's own CLI, unmodified) of a model through the
agent's gateway against the same command straight from a Hugging Face hub server on
loopback (``agent.testing.hf_server``: the weights behind a CDN redirect, as on the Hub),
in the same run. Each download goes into a fresh Hugging Face cache on the same disk.

Cases:
- ``hub``: `hf download` from the hub server (the baseline);
- ``gateway, cached``: through the gateway of an agent whose cache holds the model;
- ``gateway, room``: through the gateway of an agent whose cache is empty while a room peer
  (a teacher's agent that published it) holds it: the agent pulls it over the LAN data path
  and streams each chunk to the tool as it is proven (its cache is emptied between rounds).

The ratio is the baseline's time over the case's (≥ 1.0: the gateway is at least as fast
as the hub server). Rounds alternate the cases; the table has each one's median.

    .venv/bin/python benchmarks/hf_gateway.py [--size-mb 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing.hf_server import HfHubServer  # noqa: E402
from agent.testing.models import make_model  # noqa: E402

MODEL = "bench/hf-model"
HF = Path(sys.executable).with_name("hf")


def base_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_", "HF_"))}
    env.update(SHOAL_CONFIG=str(root / "none.toml"), SHOAL_MDNS="0", SHOAL_DHT="0", PYTHONPATH=str(REPO),
               MODELSCOPE_ENDPOINT="http://127.0.0.1:9", SHOAL_USE_MODELSCOPE="0")
    return env


class Agent:
    def __init__(self, root: Path, name: str, env: dict):
        self.cache = root / name
        self.env = {**env, "SHOAL_CACHE_DIR": str(self.cache), "SHOAL_GATEWAY_PORT": "0"}
        self.log = open(root / f"{name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent"], env=self.env, stdout=self.log,
                                     stderr=self.log, cwd=REPO)
        deadline = time.monotonic() + 60
        while not (self.cache / "agent.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent {name} did not start; see {root / f'{name}.log'}")
            time.sleep(0.1)
        self.info = json.loads((self.cache / "agent.json").read_text())

    def shoal(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=900, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"shoal {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
        return proc.stdout

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def hf_download(endpoint: str, cache: Path) -> float:
    """Seconds `hf download MODEL` takes into the fresh cache ``cache``."""
    shutil.rmtree(cache, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(cache), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DOWNLOAD_TIMEOUT="600", HF_HUB_ETAG_TIMEOUT="60")
    started = time.monotonic()
    proc = subprocess.run([str(HF), "download", MODEL, "--quiet"], env=env, capture_output=True, text=True,
                          timeout=900)
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"hf download from {endpoint} failed:\n{proc.stderr[-2000:]}")
    return took


def same_files(snapshot_root: Path, model: Path) -> bool:
    import hashlib
    [snapshot] = list((snapshot_root / "hub").glob("models--*/snapshots/*"))
    digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                           for p in root.rglob("*") if p.is_file()}
    return digest(snapshot) == digest(model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-hfgw-"))
    agents: list[Agent] = []
    try:
        model = make_model(root / "origin" / "model", weights_bytes=args.size_mb * 1024 * 1024, shards=2,
                           seed="hf-gateway")
        size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
        with HfHubServer(port=0) as hub:
            hub.add_model(MODEL, model)
            env = {**base_env(root), "HF_ENDPOINT": hub.url}
            swarm = {"SHOAL_SWARM": "1", "SHOAL_SWARM_HOST": "127.0.0.1", "SHOAL_SWARM_SECRET": "bench-room"}
            cached = Agent(root, "cached", env)
            agents.append(cached)
            cached.shoal("pull", MODEL)
            teacher = Agent(root, "teacher", {**env, **swarm})
            agents.append(teacher)
            teacher.shoal("pull", MODEL)
            teacher.shoal("publish", MODEL)
            key = teacher.shoal("id").strip()
            addr = json.loads(teacher.shoal("status", "--json"))["swarm"]["addrs"][0]
            student = Agent(root, "student", {**env, **swarm, "SHOAL_SWARM_PEERS": addr,
                                              "SHOAL_TRUSTED_PUBLISHERS": key})
            agents.append(student)
            deadline = time.monotonic() + 30
            while not [p for p in json.loads(student.shoal("status", "--json"))["peers"] if p["connected"]]:
                if time.monotonic() > deadline:
                    raise SystemExit("the student never met the teacher")
                time.sleep(0.3)
            cases = {"hub": hub.url, "gateway, cached": cached.info["gateway"],
                     "gateway, room": student.info["gateway"]}
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, endpoint in cases.items():
                    if name == "gateway, room":
                        if json.loads(student.shoal("ls", "--json")):
                            student.shoal("rm", MODEL)
                        hub.faults.clear_log()
                    times[name].append(hf_download(endpoint, root / "hf-cache"))
                    if not same_files(root / "hf-cache", model):
                        raise SystemExit(f"{name}: the downloaded files differ from the model")
                    if name == "gateway, room" and hub.faults.data_requests("/__cdn__/"):
                        raise SystemExit("the room case fetched weights from the hub")
    finally:
        for agent in agents:
            agent.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["hub"])
    print(f"\n`hf download` of a {size / 1e6:.0f} MB model ({args.rounds} rounds, median; each into a fresh "
          "Hugging Face cache)\n")
    print("| case | median s | min s | max s | MB/s | ratio (hub s / case s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {median:.2f} | {min(runs):.2f} | {max(runs):.2f} | {size / 1e6 / median:.0f} | "
              f"{base / median:.2f} |")
    print(f"\nreproduce: .venv/bin/python benchmarks/hf_gateway.py --size-mb {args.size_mb} --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
