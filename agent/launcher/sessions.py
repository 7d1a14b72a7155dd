"""Chat sessions the agent hosts for the TUI: one runner process per session, kept warm.

A session is a ``runner chat --jsonl`` process in its own session (process group),
recorded as a ``chat`` job. ``send`` writes one message and yields the reply's pieces as
they stream. Bounded: a reply line is at most ``MAX_LINE`` bytes, a session at most
``MAX_SESSIONS`` per agent, and each wait at most ``REPLY_TIMEOUT`` seconds.

Resource handling: ``close`` (or the agent stopping) ends the process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import trio

from agent.errors import NotFound, ShoalError
from agent.launcher.jobs import Job, JobStore, job_environment

MAX_LINE = 1024 * 1024
MAX_SESSIONS = 4
LOAD_TIMEOUT = 600.0
REPLY_TIMEOUT = 600.0


class _Lines:
    """Bounded line reader over a trio receive stream."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, bytearray()

    async def next(self) -> dict:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise ShoalError("the chat process sent a line longer than 1 MiB")
            data = await self.stream.receive_some(65536)
            if not data:
                raise ShoalError("the chat process ended; see its job log (`shoal logs`)")
            self.buffer += data
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        try:
            return json.loads(line)
        except ValueError:
            return {"log": line.decode(errors="replace")}


class ChatSession:
    def __init__(self, job: Job, process: trio.Process, jobs: JobStore):
        self.job, self.process, self.jobs = job, process, jobs
        self.lines = _Lines(process.stdout)
        self.lock = trio.Lock()

    async def wait_ready(self) -> None:
        with trio.fail_after(LOAD_TIMEOUT):
            while True:
                message = await self.lines.next()
                if message.get("ready"):
                    return

    async def send(self, content: str, on_delta) -> str:
        async with self.lock:
            await self.process.stdin.send_all((json.dumps({"content": content}) + "\n").encode())
            with trio.fail_after(REPLY_TIMEOUT):
                while True:
                    message = await self.lines.next()
                    if "delta" in message:
                        await on_delta(message["delta"])
                    elif message.get("done"):
                        return message.get("reply", "")
                    elif "error" in message:
                        raise ShoalError(f"chat: {message['error']}")

    def close(self) -> None:
        (self.jobs.dir(self.job.id) / "cancel").touch()  # ended on purpose, not crashed
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        # record(), not get(): get() may wait for a vanishing process, and this runs on the event loop.
        job = self.jobs.record(self.job.id)
        if not job.final:
            self.jobs.transition(job, "cancel")


class ChatSessions:
    def __init__(self, jobs: JobStore):
        self.jobs = jobs
        self.sessions: dict[str, ChatSession] = {}

    async def open(self, model: str, argv: list[str], detail: dict) -> ChatSession:
        if len(self.sessions) >= MAX_SESSIONS:
            raise ShoalError(f"at most {MAX_SESSIONS} chat sessions at once; close one first")
        job = self.jobs.new_record("chat", model, argv, detail)
        log = open(self.jobs.log_path(job.id), "ab")
        try:
            process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                       stderr=log, start_new_session=True, env=job_environment())
        finally:
            log.close()
        self.jobs.save(job)
        job = self.jobs.transition(job, "started", pid=process.pid, pgid=process.pid)
        session = ChatSession(job, process, self.jobs)
        try:
            await session.wait_ready()
        except BaseException:
            session.close()
            raise
        self.sessions[job.id] = session
        return session

    def get(self, session_id: str) -> ChatSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"no chat session {session_id!r}")
        return session

    def close(self, session_id: str) -> None:
        self.get(session_id).close()
        del self.sessions[session_id]

    def close_all(self) -> None:
        for session_id in list(self.sessions):
            self.close(session_id)
