"""Control API methods on launched work: jobs, job_cancel, job_log, job_progress,
chat_open, chat_send, chat_close, train_start."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from agent.api.table import Call, NoParams, method
from agent.api.cache import follow_wire
from agent.errors import NotFound, ShoalError, UsageError
from agent.manifest import ModelRef

MAX_LOG_TAIL = 512 * 1024


class DeviceProbe:
    """What device and engines this machine has. Detection imports torch: it runs once, in
    a child process (``shoal doctor --json``), so the agent never loads torch itself."""

    def __init__(self):
        self._report: dict | None = None

    async def report(self) -> dict:
        if self._report is None:
            from agent.launcher.jobs import job_environment
            result = await trio.run_process([sys.executable, "-m", "agent.cli", "doctor", "--json"],
                                            capture_stdout=True, capture_stderr=True, check=False,
                                            env=job_environment())
            if result.returncode != 0:
                raise ShoalError(f"device detection failed: {result.stderr.decode(errors='replace')[-500:]}")
            self._report = json.loads(result.stdout)
        return self._report

    async def engine(self, command: str, requested: str | None) -> tuple[str, str]:
        """(engine, device kind) for ``command`` (run, serve, train)."""
        from agent.launcher.devices import DeviceReport
        from agent.launcher.launch import choose_engine
        report = await self.report()
        device = DeviceReport(report["device"], report["names"], report["memory"], report["backends"])
        return choose_engine(command, device, requested), device.kind


async def ensure_model(agent, ref: ModelRef, call: Call) -> Path:
    """The folder of ``ref``, pulled first (its events streamed) when missing or incomplete."""
    try:
        info = await trio.to_thread.run_sync(agent.store.find, ref)
        if info.state == "complete":
            return info.dir
    except NotFound:
        pass
    return Path((await follow_wire(agent, ref, None, call))["directory"])


@dataclass(frozen=True)
class JobParams:
    job: str


@dataclass(frozen=True)
class JobLogParams:
    job: str
    bytes: int = 64 * 1024  # at most MAX_LOG_TAIL


@method("jobs", NoParams, "Launched jobs (chats, runs, servers, training) and their state.", quiet=True)
async def jobs(agent, p: NoParams, call: Call):
    return [asdict(j) for j in await trio.to_thread.run_sync(agent.jobs.list)]


@method("job_cancel", JobParams, "Stop a job (or close a chat session); its record.")
async def job_cancel(agent, p: JobParams, call: Call):
    if p.job in agent.chats.sessions:
        agent.chats.close(p.job)
        return asdict(await trio.to_thread.run_sync(agent.jobs.record, p.job))
    return asdict(await trio.to_thread.run_sync(agent.jobs.cancel, p.job))


@method("job_log", JobLogParams, "The last `bytes` of a job's log.", quiet=True)
async def job_log(agent, p: JobLogParams, call: Call):
    if not 0 < p.bytes <= MAX_LOG_TAIL:
        raise UsageError("'bytes' is at most 512 KiB")
    path = agent.jobs.log_path(p.job)

    def tail() -> str:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - p.bytes))
            return f.read().decode(errors="replace")
    try:
        return {"job": p.job, "log": await trio.to_thread.run_sync(tail)}
    except FileNotFoundError:
        raise NotFound(f"no job {p.job!r}") from None


@method("job_progress", JobParams, "A training job's record, its logged steps and final metrics.", quiet=True)
async def job_progress(agent, p: JobParams, call: Call):
    from agent.launcher.launch import read_progress
    job = await trio.to_thread.run_sync(agent.jobs.get, p.job)
    steps, final = await trio.to_thread.run_sync(read_progress, agent.jobs.dir(job.id) / "output")
    return {"job": asdict(job), "steps": steps, "final": final}


@dataclass(frozen=True)
class ChatOpenParams:
    model: ModelRef
    adapter: str | None = None
    engine: str | None = None
    max_new_tokens: int = 128
    model_type: str | None = None
    template: str | None = None


@method("chat_open", ChatOpenParams, "Start a chat session with a model (pulled first if needed); its id.",
        streams=True)
async def chat_open(agent, p: ChatOpenParams, call: Call):
    from agent.launcher.launch import chat_argv, resolve_adapter
    engine, device = await agent.devices.engine("run", p.engine)
    adapter = None
    if p.adapter:
        adapter = await trio.to_thread.run_sync(resolve_adapter, agent.settings, p.model, p.adapter)
    model_dir = await ensure_model(agent, p.model, call)
    argv = chat_argv(model_dir, adapter_dir=adapter, prompt=None, engine=engine, device=device,
                     max_new_tokens=p.max_new_tokens, jsonl=True, model_type=p.model_type, template=p.template)
    session = await agent.chats.open(str(p.model), argv, {"engine": engine, "device": device, "adapter": p.adapter})
    return {"session": session.job.id, "engine": engine, "device": device}


@dataclass(frozen=True)
class ChatSendParams:
    session: str
    content: str


@method("chat_send", ChatSendParams, "Send a message to a chat session; the reply (streamed as deltas).",
        streams=True)
async def chat_send(agent, p: ChatSendParams, call: Call):
    session = agent.chats.get(p.session)
    if not p.content.strip():
        raise UsageError("'content' (the message) is required")

    async def delta(text: str) -> None:
        await call.send_event({"type": "delta", "text": text})
    return {"reply": await session.send(p.content, delta)}


@dataclass(frozen=True)
class ChatCloseParams:
    session: str


@method("chat_close", ChatCloseParams, "End a chat session.")
async def chat_close(agent, p: ChatCloseParams, call: Call):
    agent.chats.close(p.session)
    return {"closed": p.session}


@dataclass(frozen=True)
class TrainParams:
    model: ModelRef
    dataset: str  # JSONL chat records, a path on the agent's machine; or a dataset OWNER/NAME[@REV]
    name: str  # the adapter's name
    tuner: str | None = None
    target_modules: str | None = None
    rank: int | None = None
    alpha: int | None = None
    learning_rate: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    engine: str | None = None
    model_type: str | None = None
    template: str | None = None


@method("train_start", TrainParams, "Start LoRA training of a model (pulled first if needed); the job.",
        streams=True)
async def train_start(agent, p: TrainParams, call: Call):
    from agent.launcher.launch import (TRAIN_KEYS, check_adapter_free, dataset_ref, require_model, start_training,
                                       train_spec, training_file)
    require_model(p.model, "train")
    values = {k: getattr(p, k) for k in TRAIN_KEYS if getattr(p, k) is not None}
    # Both look at the disk (is it a file? which file of the repository?): not on the event loop.
    data = await trio.to_thread.run_sync(dataset_ref, values["dataset"])
    if data is not None:  # a dataset repository: pulled first, its events streamed
        folder = await ensure_model(agent, data, call)
        values["dataset"] = await trio.to_thread.run_sync(training_file, folder, data)
    spec = await trio.to_thread.run_sync(train_spec, values)
    check_adapter_free(agent.settings.cache_dir, p.model, spec.name)
    engine, device = await agent.devices.engine("train", p.engine)
    model_dir = await ensure_model(agent, p.model, call)
    job = await trio.to_thread.run_sync(lambda: start_training(
        agent.jobs, agent.settings.cache_dir, p.model, spec, model_dir, engine=engine, device=device,
        model_type=p.model_type, template=p.template))
    return asdict(job)
