"""Jobs: every launch (run, serve, train) is a process group with an id, a state and a log.

A job lives in ``{cache}/jobs/{id}/``: ``job.json`` (its record), ``log.txt`` (stdout and
stderr of the process) and whatever the job writes (a training run's output). The
process is started by a small supervisor (``python -m agent.launcher.supervise``) in a
new session: the supervisor and its child share one process group, the supervisor
records the exit status, and a cancel stops the whole group, so no worker survives it.

States and transitions (an explicit table; anything else is a bug and raises)::

    starting --started--> running --exited(0)--> done
    starting --failed---> failed    running --exited(!=0)--> failed
    starting|running --cancel--> cancelled
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.errors import NotFound, ShoalError

TRANSITIONS = {
    ("starting", "started"): "running",
    ("starting", "failed"): "failed",
    ("starting", "cancel"): "cancelled",
    ("running", "exited_ok"): "done",
    ("running", "exited_error"): "failed",
    ("running", "cancel"): "cancelled",
}
FINAL = {"done", "failed", "cancelled"}
CANCEL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of a job's process group


# A job runs code the agent did not write (ms-swift, a model's own Python): it gets the
# agent's environment without the agent's credentials (the OSS keys, the swarm secret, hub
# tokens), which it has no use for and must not be able to read or leak.
_SECRET_NAMES = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN", "SHOAL_SWARM_SECRET",
                 "MODELSCOPE_API_TOKEN")
_SECRET_MARKS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")


def job_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without credentials of any kind."""
    env = dict(os.environ if base is None else base)
    return {k: v for k, v in env.items()
            if k not in _SECRET_NAMES and not any(mark in k.upper() for mark in _SECRET_MARKS)}


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ShoalError(f"a job in state {state!r} cannot take {event!r}") from None


@dataclass
class Job:
    id: str
    kind: str  # run | serve | train
    model: str
    argv: list[str]
    state: str = "starting"
    created: float = field(default_factory=time.time)
    ended: float | None = None
    pgid: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    detail: dict = field(default_factory=dict)  # output_dir, port, adapter, engine ...

    @property
    def final(self) -> bool:
        return self.state in FINAL


class JobStore:
    """Jobs on disk, shared by the CLI and the agent (the control API reads the same)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise NotFound(f"no job {job_id!r}")
        return self.root / job_id

    def log_path(self, job_id: str) -> Path:
        return self.dir(job_id) / "log.txt"

    def save(self, job: Job) -> None:
        path = self.dir(job.id) / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(job), indent=1))
        os.replace(tmp, path)

    def record(self, job_id: str) -> Job:
        """The job as last written, without checking its processes (cheap, never sleeps)."""
        job = Job(**json.loads((self.dir(job_id) / "job.json").read_text()))
        if job.pgid is None:
            try:  # written by start() before the supervisor records it itself
                job.pgid = int((self.dir(job_id) / "pgid").read_text())
            except (FileNotFoundError, ValueError):
                pass
        return job

    def get(self, job_id: str) -> Job:
        try:
            job = self.record(job_id)
        except FileNotFoundError:
            raise NotFound(f"no job {job_id!r}; `shoal jobs` lists them") from None
        return self._reconcile(job)

    def list(self) -> list[Job]:
        jobs = []
        for entry in sorted(self.root.iterdir()):
            if (entry / "job.json").exists():
                try:
                    jobs.append(self.get(entry.name))
                except (ValueError, TypeError):
                    continue  # a half-written record of a crashed CLI
        return sorted(jobs, key=lambda j: j.created)

    def transition(self, job: Job, event: str, **changes) -> Job:
        job.state = next_state(job.state, event)
        for key, value in changes.items():
            setattr(job, key, value)
        if job.final and job.ended is None:
            job.ended = time.time()
        self.save(job)
        return job

    def _reconcile(self, job: Job) -> Job:
        """A job whose supervisor died without a word (machine reboot, kill -9) is failed."""
        gone = (not _group_alive(job.pgid)) if job.pgid else (job.pid is not None and not _pid_alive(job.pid))
        if job.state in ("starting", "running") and (job.pgid or job.pid) and gone:
            time.sleep(0.05)  # the supervisor may be writing its final record right now
            fresh = self.record(job.id)
            if fresh.final:
                return fresh
            if (self.dir(job.id) / "cancel").exists():
                return self.transition(fresh, "cancel")
            return self.transition(fresh, "exited_error" if fresh.state == "running" else "failed",
                                   detail={**fresh.detail, "error": "the job's processes vanished"})
        return job

    # ---------------------------------------------------------------- lifecycle

    def new_record(self, kind: str, model: str, argv: list[str], detail: dict | None) -> Job:
        job = Job(id=f"{kind}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}", kind=kind, model=model,
                  argv=list(argv), detail=dict(detail or {}))
        self.dir(job.id).mkdir(parents=True)
        return job

    def start(self, kind: str, model: str, argv: list[str], *, env: dict | None = None,
              cwd: str | None = None, detail: dict | None = None, build_argv=None,
              on_success: dict | None = None) -> Job:
        """Start a supervised job in its own session. ``build_argv(job_dir)`` makes the command
        when it needs the job's folder; ``on_success`` names a step the supervisor runs
        after a clean exit (``{"register_adapter": {"base", "name"}}``)."""
        job = self.new_record(kind, model, argv, detail)
        if build_argv is not None:
            job.argv = list(build_argv(self.dir(job.id)))
        if on_success:
            job.detail["on_success"] = on_success
        self.save(job)
        log = open(self.log_path(job.id), "ab")
        try:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "agent.launcher.supervise", str(self.dir(job.id))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=job_environment(env), cwd=cwd,
                start_new_session=True)
        except OSError as e:
            return self.transition(job, "failed", detail={**job.detail, "error": str(e)})
        finally:
            log.close()
        # The supervisor owns job.json from here on (it records "running" and the end); its
        # process group goes to a file of its own, so the two writers never race.
        (self.dir(job.id) / "pgid").write_text(str(supervisor.pid))
        return self.get(job.id)

    def run_foreground(self, kind: str, model: str, argv: list[str], *, detail: dict | None = None) -> Job:
        """Run an interactive job attached to this terminal (a chat); recorded like any job.

        It stays in the terminal's process group so it can read the keyboard; ``cancel``
        signals its pid.
        """
        job = self.new_record(kind, model, argv, detail)
        self.save(job)
        try:
            child = subprocess.Popen(argv, env=job_environment())
        except OSError as e:
            return self.transition(job, "failed", detail={**job.detail, "error": str(e)})
        job = self.transition(job, "started", pid=child.pid)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.terminate()
            code = child.wait()
        job = self.record(job.id)
        if job.final:
            return job
        if (self.dir(job.id) / "cancel").exists() or code < 0:
            return self.transition(job, "cancel", exit_code=code)
        return self.transition(job, "exited_ok" if code == 0 else "exited_error", exit_code=code)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.final:
            return job
        (self.dir(job.id) / "cancel").touch()
        if job.pgid is None and job.pid:  # a foreground (interactive) job
            try:
                os.kill(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return self.get(job.id)
        if job.pgid:
            _signal_group(job.pgid, signal.SIGTERM)
            deadline = time.monotonic() + CANCEL_GRACE
            while _group_alive(job.pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(job.pgid):
                _signal_group(job.pgid, signal.SIGKILL)
                while _group_alive(job.pgid):
                    time.sleep(0.05)
        job = self.record(job.id)
        return job if job.final else self.transition(job, "cancel")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still counts for killpg; look for any member that is not a zombie.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def is_job_id(cache_dir, target: str) -> bool:
    """Whether ``target`` names a job of this cache (``shoal cancel`` takes a job or a model)."""
    try:
        return (JobStore(cache_dir).dir(target) / "job.json").exists()
    except NotFound:
        return False
