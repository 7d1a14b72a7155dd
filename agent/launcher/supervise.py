"""Runs one job's command and records how it ended (see ``agent.launcher.jobs``).

Started in a new session by ``JobStore.start``; its child inherits the session and process
group, so ``JobStore.cancel`` stops both with one ``killpg``. The supervisor ignores the
SIGTERM of a cancel (after the child is started, so the child does not inherit that) to
be alive to record the outcome once its child is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from agent.launcher.jobs import Job, JobStore


def main(job_dir: str) -> int:
    directory = Path(job_dir)
    store = JobStore(directory.parent.parent)
    job = store.record(directory.name)
    if (directory / "cancel").exists():  # cancelled before it even started
        store.transition(job, "cancel")
        return 0
    # The model (and the adapter, if any) stay "in use" while the job runs: never evicted.
    from agent.manifest import ModelRef
    from agent.store.folders import hold_in_use
    held = [hold_in_use(directory.parent.parent, ModelRef.parse(job.model))]
    if job.detail.get("adapter") and job.kind != "train":
        base = ModelRef.parse(job.model)
        held.append(hold_in_use(directory.parent.parent,
                                ModelRef(f"{base.model_id}+lora/{job.detail['adapter']}", "master")))
    try:
        child = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, cwd=job.detail.get("cwd") or None)
    except OSError as e:
        print(f"shoal: cannot start {job.argv[0]}: {e}", flush=True)
        store.transition(job, "failed", detail={**job.detail, "error": str(e)})
        return 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = store.transition(job, "started", pid=child.pid, pgid=os.getpgrp())
    code = child.wait()
    job = store.record(directory.name)
    if job.final:
        return code
    if (directory / "cancel").exists():
        store.transition(job, "cancel", exit_code=code)
        return code
    if code == 0 and job.detail.get("on_success"):
        try:
            after_success(job, directory)
        except Exception as e:  # reported in the job's record and log, never half-registered
            print(f"shoal: the job succeeded but its last step failed: {e}", flush=True)
            store.transition(job, "exited_error", exit_code=code, detail={**job.detail, "error": str(e)})
            return 1
    store.transition(job, "exited_ok" if code == 0 else "exited_error", exit_code=code)
    return code


def after_success(job: Job, directory: Path) -> None:
    """Steps that turn a finished job's output into something shoal knows (an adapter)."""
    step = job.detail["on_success"].get("register_adapter")
    if step:
        from agent.config import load_settings
        from agent.launcher.launch import find_checkpoint, register_adapter
        from agent.manifest import ModelRef
        settings = load_settings(cache_dir=directory.parent.parent)
        checkpoint = find_checkpoint(directory / "output")
        ref = register_adapter(settings, ModelRef.parse(step["base"]), step["name"], checkpoint)
        print(f"shoal: registered adapter {ref.model_id} from {checkpoint}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
