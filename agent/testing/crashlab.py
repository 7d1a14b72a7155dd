"""The crash campaign's lab: real `shoal` processes killed with SIGKILL in the middle of a
pull, an eviction, a mirror sync, a removal or an import, then the cache checked as a
restarted agent finds it (``agent.testing.invariants``) and the next pull completed.

A kill lands either at a named moment of the store's moves (``agent.crashpoints``:
``SHOAL_CRASH_AT``), or after a random delay; every run records the last point its
process reached (``SHOAL_CRASH_LOG``), so a campaign can print which it covered. Used by
``benchmarks/crash.py`` (200 runs, and the variants: a small file system filling up, an
index removed or damaged) and ``tests/test_crash.py`` (one run per point).

Loopback only: a local hub (the modelscope SDK's endpoints) and OSS server, in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.testing.hub_server import HubServer
from agent.testing.invariants import check_store
from agent.testing.models import make_model
from agent.testing.oss_server import OssServer

REPO = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024
# Points worth a kill, by the operation that passes them (agent.crashpoints).
POINTS = {
    "pull": ["pull:recorded", "chunk:written", "finish:synced", "finish:adopted", "finish:renamed",
             "finish:recorded", "link:placed", "link:recorded"],
    "evict": ["remove:marked", "remove:unlinked", "remove:forgotten", "remove:blob-forgotten"],
    "rm": ["remove:marked", "remove:unlinked", "remove:forgotten", "remove:blob-forgotten"],
    "import": ["import:placed", "link:placed", "link:recorded"],
    "sync": ["sync:file", "sync:manifest"],
    "gc": ["remove:marked", "remove:blob-forgotten"],
}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Outcome:
    seed: int
    op: str
    target: str
    kill: str  # "point NAME:N", "after 0.12 s", or "none"
    reached: str  # the last crash point the killed process passed
    killed: bool
    violations: list[str] = field(default_factory=list)
    variant: str = ""


class Lab:
    """Servers, origin models and a prepared cache; ``run(seed)`` is one campaign run.

    Models (what a lab has): ``lab/base`` (two shards), ``lab/copy`` (a fine-tune repo with
    the same shards), ``lab/base@v2`` (a revision that changes the config), ``lab/other``
    (other weights). ``lab/base`` and ``lab/copy`` are on the OSS mirror too.

    Resource handling: ``close`` stops the servers and removes the lab's folder."""

    def __init__(self, root: Path, *, weights: int = 3 * 1024 * 1024):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        origin = self.root / "origin"
        base = make_model(origin / "base", weights_bytes=weights, seed="crash")
        copy = origin / "copy"
        shutil.copytree(base, copy)
        (copy / "config.json").write_text('{"fine_tuned_from": "lab/base"}')
        v2 = origin / "v2"
        shutil.copytree(base, v2)
        (v2 / "config.json").write_text('{"model_type": "qwen2", "revision": 2}')
        other = make_model(origin / "other", weights_bytes=weights, seed="other")
        self.models = {"lab/base@master": base, "lab/copy@master": copy, "lab/base@v2": v2,
                       "lab/other@master": other}
        self.hub = HubServer().start()
        for ref, directory in self.models.items():
            name, _, revision = ref.partition("@")
            self.hub.add_model(name, directory, revision=revision)
        self.oss = OssServer().start()
        self.oss.bucket = "crash-lab"
        self.oss.create_bucket(self.oss.bucket)
        self.sync_file = self.root / "sync.toml"
        self.sync_file.write_text('keep = 2\n\n[[model]]\nid = "lab/other"\nrevision = "master"\n')
        for ref in ("lab/base@master", "lab/copy@master"):
            self._mirror(ref)
        self.import_dir = self.root / "download" / "other"  # what a lab downloaded already
        shutil.copytree(other, self.import_dir)

    def env(self, cache: Path, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
        guard = REPO / "tests" / "loopback_guard"
        env.update({
            "SHOAL_CONFIG": str(self.root / "none.toml"), "SHOAL_CACHE_DIR": str(cache),
            "OSS_ENDPOINT": self.oss.url, "SHOAL_OSS_BUCKET": self.oss.bucket,
            "OSS_ACCESS_KEY_ID": "crash-key", "OSS_ACCESS_KEY_SECRET": "crash-secret",
            "MODELSCOPE_ENDPOINT": self.hub.url, "MODELSCOPE_CACHE": str(self.root / "ms-cache"),
            "MODELSCOPE_HOME": str(self.root / "ms-home"), "MODELSCOPE_LOG_LEVEL": "40",
            "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false", "SHOAL_CHUNK_SIZE": str(CHUNK),
            "SHOAL_CHUNK_TIMEOUT": "5", "SHOAL_RETRIES": "1", "SHOAL_CONCURRENCY": "4", "SHOAL_MDNS": "0",
            "PYTHONPATH": os.pathsep.join([str(guard), str(REPO)] if guard.is_dir() else [str(REPO)]),
            **extra})
        return env

    def _mirror(self, ref: str) -> None:
        from agent.config import load_settings
        from agent.manifest import ModelRef
        from agent.mirror import manifest_from_dir, push_directory
        model = ModelRef.parse(ref)
        settings = load_settings(env=self.env(self.root / "mirror-cache"))
        push_directory(model, self.models[ref], settings, manifest_from_dir(model, self.models[ref], CHUNK))

    def close(self) -> None:
        self.hub.close()
        self.oss.close()

    # ---------------------------------------------------------------------- a run

    def shoal(self, args: list[str], env: dict, *, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def plan(self, rng: random.Random, op: str | None = None) -> tuple[list[str], str, list[str], list[str]]:
        """(models pulled first, the operation, its arguments, the models that must be whole after)."""
        refs = list(self.models)
        op = op or rng.choice(["pull", "pull", "pull", "evict", "rm", "import", "sync", "gc"])
        if op == "pull":
            target = rng.choice(refs)
            setup = [r for r in refs if r != target and rng.random() < 0.5]
            return setup, op, ["pull", target], setup + [target]
        if op in ("rm", "gc"):
            setup = rng.sample(refs, rng.randint(2, 4))
            target = rng.choice(setup)
            args = ["rm", target] if op == "rm" else ["gc"]
            return setup, op, args, [r for r in setup if r != target]
        if op == "evict":  # a pull that must evict least recently used models first
            setup = ["lab/base@master", "lab/copy@master", "lab/base@v2"]
            return setup, op, ["pull", "lab/other@master"], ["lab/other@master"]
        if op == "import":
            setup = [r for r in refs if r != "lab/other@master" and rng.random() < 0.5]
            return setup, op, ["import", str(self.import_dir), "--as", "lab/other@master"], \
                setup + ["lab/other@master"]
        return [], "sync", ["mirror", "sync", str(self.sync_file)], []

    def run(self, seed: int, *, op: str | None = None, point: str | None = None, variant: str = "",
            caches: Path | None = None) -> Outcome:
        """One run (see module docstring): ``op`` (else the seed chooses), ``point`` forces a
        kill there (NAME:N); ``caches``: where the run's cache goes (a small file system)."""
        rng = random.Random(seed)
        cache = (caches or self.root) / f"cache-{seed}"
        shutil.rmtree(cache, ignore_errors=True)
        setup, op, args, whole = self.plan(rng, op)
        extra = {}
        if op == "evict" or op == "gc":
            extra["SHOAL_QUOTA"] = str(int(self._size("lab/base@master") * 1.6))
        if op == "sync":  # a mirror of its own: each run's sync starts from nothing
            extra["SHOAL_OSS_PREFIX"] = f"run-{seed}/"
        env = self.env(cache)  # no quota yet: gc and the evicting pull then have something to remove
        for ref in setup:
            self.shoal(["pull", ref], env)
        env = self.env(cache, **extra)
        log = self.root / f"points-{seed}.log"
        log.unlink(missing_ok=True)
        kill_env = {**env, "SHOAL_CRASH_LOG": str(log)}
        if point is None and rng.random() < 0.6:
            point = f"{rng.choice(POINTS[op])}:{rng.randint(1, 3)}"
        if point is not None:
            kill_env["SHOAL_CRASH_AT"] = point
            proc = self.shoal(args, kill_env)
            killed, kill = proc.returncode == -signal.SIGKILL, f"point {point}"
        else:
            delay = rng.uniform(0.3, 3.0)  # past the interpreter's start (~0.4 s)
            child = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], env=kill_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            try:
                child.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait()
                killed = True
            kill = f"after {delay:.2f} s"
        reached = log.read_text().split()[-1] if log.exists() and log.read_text().split() else "(start)"
        outcome = Outcome(seed, op, " ".join(args[1:]) or "-", kill, reached, killed, variant=variant)
        if variant == "index-removed":
            for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
                (cache / name).unlink(missing_ok=True)
        elif variant == "index-damaged":
            (cache / "index.sqlite").write_bytes(b"\x00garbage" * 512)
            for name in ("index.sqlite-wal", "index.sqlite-shm"):
                (cache / name).unlink(missing_ok=True)
        if cache.exists():
            outcome.violations += check_store(cache)
        if op == "sync":
            outcome.violations += self._mirror_pointer_problems(env)
            proc = self.shoal(args, env)
            if proc.returncode != 0:
                outcome.violations.append(f"the next sync failed: {proc.stderr[-300:]}")
            outcome.violations += self._mirror_pointer_problems(env, required=True)
        for ref in whole:  # what the lab expects after: the next pull completes, right
            proc = self.shoal(["pull", ref], env)
            if proc.returncode == 6 and variant == "disk-full":
                continue  # the disk is full: said so (exit 6), and nothing lost (checked below)
            if proc.returncode != 0:
                outcome.violations.append(f"the next pull of {ref} failed ({proc.returncode}): {proc.stderr[-300:]}")
                continue
            name, _, revision = ref.partition("@")
            if tree_digest(cache / "models" / name / revision) != tree_digest(self.models[ref]):
                outcome.violations.append(f"{ref}: after the next pull, its files differ from the origin's")
        if cache.exists():
            outcome.violations += [f"after the next pulls: {v}" for v in check_store(cache)]
        shutil.rmtree(cache, ignore_errors=True)
        log.unlink(missing_ok=True)
        return outcome

    def _size(self, ref: str) -> int:
        return sum(p.stat().st_size for p in self.models[ref].rglob("*") if p.is_file())

    def _mirror_pointer_problems(self, env: dict, *, required: bool = False) -> list[str]:
        """The mirror's pointer names a snapshot whose manifest and every file are there."""
        import oss2
        from agent.config import load_settings
        from agent.manifest import ModelRef, decode
        from agent.sources.oss import file_key, make_bucket, manifest_key, pointer_key
        settings = load_settings(env=env)
        bucket = make_bucket(settings)
        ref = ModelRef("lab/other", "master")
        try:
            pointer = json.loads(bucket.get_object(pointer_key(settings.oss_prefix, ref)).read())
        except oss2.exceptions.NoSuchKey:
            return ["the mirror has no pointer after a completed sync"] if required else []
        folder = pointer["snapshot"]
        try:
            manifest = decode(bucket.get_object(manifest_key(settings.oss_prefix, ref, folder)).read())
        except oss2.exceptions.NoSuchKey:
            return [f"the mirror's pointer names {folder}, which has no manifest"]
        problems = []
        for entry in manifest.files:
            try:
                head = bucket.head_object(file_key(settings.oss_prefix, ref, entry.path, folder))
                if head.content_length != entry.size:
                    problems.append(f"mirror {folder}/{entry.path} is {head.content_length} bytes, not {entry.size}")
            except oss2.exceptions.NotFound:
                problems.append(f"the mirror's pointer names {folder}, which lacks {entry.path}")
        return problems


def small_filesystem(path: Path, size_mb: int) -> bool:
    """Mount a tmpfs of ``size_mb`` at ``path`` (root only); False when it cannot be."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def unmount(path: Path) -> None:
    for _ in range(10):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
