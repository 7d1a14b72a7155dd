"""Launch commands: doctor, run, serve, train, jobs, logs (``shoal cancel JOB`` is in ``cache``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.common import backend_of, settings_of, table
from agent.errors import ShoalError
from agent.manifest import ModelRef, hub_repo

if TYPE_CHECKING:
    from agent.launcher.jobs import Job, JobStore

# The launcher's modules are imported by the commands that use them: `shoal pull` and the
# other cache commands start without them (a classroom starts thirty at once).

SERVE_START_TIMEOUT = 300.0
POLL = 0.2


def ensure_model(args, ref: ModelRef) -> Path:
    """The folder of ``ref`` in the cache, pulled first (with a progress line) if missing."""
    from agent.client import ensure_model as ensure
    from agent.reporter import PullReporter
    reporter = PullReporter(ref, json_mode=False)
    directory, result = ensure(backend_of(args), ref, on_event=reporter.event,
                               on_pull=lambda: print(f"{ref} is not in the cache yet: pulling it first",
                                                     file=sys.stderr))
    if result is not None:
        reporter.finish(result)
    return directory


def _report():
    from agent.launcher.devices import detect
    return detect()


def cmd_doctor(args) -> int:
    from agent.launcher.devices import engine_for
    from agent.sources.osscreds import describe_settings
    report = _report()
    settings = settings_of(args)
    mirror = None
    if settings.oss_bucket:  # which credentials the mirror is read with, never the secret
        mirror = {"bucket": settings.oss_bucket, "endpoint": settings.oss_endpoint,
                  "credentials": describe_settings(settings)}
    gateway = _gateway_check(args)
    if args.json:
        print(json.dumps({"device": report.kind, "names": report.names, "memory": report.memory,
                          "backends": report.backends,
                          "engines": {c: engine_for(c, report) for c in ("run", "serve", "train")},
                          "mirror": mirror, "gateway": gateway}, indent=2))
        return 0
    print(f"device: {report.kind}")
    for i, name in enumerate(report.names):
        memory = f", {report.memory[i] / 2 ** 30:.1f} GiB" if i < len(report.memory) else ""
        print(f"  [{i}] {name}{memory}")
    print("backends:")
    for dist, version in report.backends.items():
        print(f"  {dist:13} {version or 'not installed'}")
    print("engines:")
    for command in ("run", "serve", "train"):
        print(f"  shoal {command:6} -> {engine_for(command, report) or 'none (pip install shoal[run])'}")
    if mirror is None:
        print("mirror: none (SHOAL_OSS_BUCKET unset): pulls go to ModelScope")
    else:
        creds = mirror["credentials"]
        print(f"mirror: oss://{mirror['bucket']} at {mirror['endpoint']}")
        if creds.get("error"):
            print(f"  credentials: {creds['mode']}: none found ({creds['error']})")
        else:
            expires = f", expires {creds['expires']}" if creds.get("expires") else ""
            print(f"  credentials: {creds['mode']}: {creds.get('source') or 'anonymous'}"
                  f"{' (STS)' if creds.get('sts') else ''}{expires}")
    if gateway["url"] is None:
        print("gateway: chosen when the agent starts (SHOAL_GATEWAY_PORT=0); start it, then `shoal env`")
    else:
        print(f"gateway: {gateway['url']} ({'agent running' if gateway['running'] else 'no agent running'})")
        for problem in gateway["problems"]:
            print(f"  {problem}")
        if not gateway["problems"]:
            print("  this shell's Hugging Face and ModelScope tools download through it")
    return 0


def _gateway_check(args) -> dict:
    """Where the gateway is, and what in this shell keeps tools from using it (agent.toolenv)."""
    import os
    from agent.cli.daemon import gateway_url
    from agent.toolenv import shell_problems
    url, running = gateway_url(args)
    return {"url": url, "running": running, "problems": shell_problems(dict(os.environ), url) if url else []}


def _wait_final(jobs: JobStore, job: Job, *, on_tick=None) -> Job:
    try:
        while not job.final:
            time.sleep(POLL)
            job = jobs.get(job.id)
            if on_tick:
                on_tick(job)
    except KeyboardInterrupt:
        print(f"\nshoal: stopping job {job.id} ...", file=sys.stderr)
        jobs.cancel(job.id)
        raise
    return job


def _log_tail(jobs: JobStore, job: Job, lines: int = 15) -> str:
    try:
        text = jobs.log_path(job.id).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _failed(jobs: JobStore, job: Job) -> ShoalError:
    tail = _log_tail(jobs, job, 200).splitlines()
    ours = [line for line in tail if line.startswith("shoal: ")]  # our own diagnosis, when we made one
    shown = "\n".join(ours[-3:]) if ours else "\n".join(tail[-15:])
    error = ShoalError(f"job {job.id} {job.state} (exit {job.exit_code}); from its log "
                       f"(`shoal logs {job.id}` for all):\n{shown}")
    error.title = "Job failed" if job.state == "failed" else "Job cancelled"
    return error


def _common(args):
    from agent.launcher.launch import check_device
    settings = settings_of(args)
    report = _report()
    return settings, report, check_device(args.device, report)


def cmd_run(args) -> int:
    from agent.launcher.jobs import JobStore
    from agent.launcher.launch import choose_engine
    from agent.launcher.launch import chat_argv, require_model, resolve_adapter
    settings, report, device = _common(args)
    engine = choose_engine("run", report, args.engine)
    ref = require_model(ModelRef.parse(args.model), "run")
    adapter = resolve_adapter(settings, ref, args.adapter) if args.adapter else None
    model_dir = ensure_model(args, ref)
    argv = chat_argv(model_dir, adapter_dir=adapter, prompt=args.prompt, engine=engine, device=device,
                     max_new_tokens=args.max_new_tokens, model_type=args.model_type, template=args.template)
    jobs = JobStore(settings.cache_dir)
    detail = {"engine": engine, "device": device, "adapter": args.adapter}
    if args.prompt is None:
        job = jobs.run_foreground("chat", str(ref), argv, detail=detail)
        return 0 if job.state == "done" else 1
    job = jobs.start("run", str(ref), argv, detail=detail)
    job = _wait_final(jobs, job)
    if job.state != "done":
        raise _failed(jobs, job)
    for line in reversed(jobs.log_path(job.id).read_text(errors="replace").splitlines()):
        if line.startswith('{"reply"'):
            reply = json.loads(line)["reply"]
            print(json.dumps({"job": job.id, "reply": reply}) if args.json else reply)
            return 0
    raise ShoalError(f"job {job.id} ended without a reply; see `shoal logs {job.id}`")


def cmd_serve(args) -> int:
    import urllib.error
    import urllib.request
    from agent.launcher.jobs import JobStore
    from agent.launcher.launch import choose_engine
    from agent.launcher.launch import require_model, resolve_adapter, serve_argv
    settings, report, device = _common(args)
    engine = choose_engine("serve", report, args.engine)
    ref = require_model(ModelRef.parse(args.model), "serve")
    adapter = (args.adapter, resolve_adapter(settings, ref, args.adapter)) if args.adapter else None
    model_dir = ensure_model(args, ref)
    argv = serve_argv(model_dir, host=args.host, port=args.port, engine=engine, adapter=adapter,
                      model_type=args.model_type, template=args.template, served_name=ref.model_id)
    jobs = JobStore(settings.cache_dir)
    url = f"http://{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{args.port}"
    job = jobs.start("serve", str(ref), argv, detail={"engine": engine, "url": url + "/v1", "device": device})
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    try:
        while True:
            job = jobs.get(job.id)
            if job.final:
                raise _failed(jobs, job)
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                jobs.cancel(job.id)
                raise ShoalError(f"the server did not answer on {url} within {SERVE_START_TIMEOUT:.0f} s; "
                                 f"stopped it. Its log: `shoal logs {job.id}`")
            time.sleep(0.5)
    except KeyboardInterrupt:
        jobs.cancel(job.id)
        raise
    print(f"serving {ref.model_id} at {url}/v1 (OpenAI-compatible, model name {ref.model_id!r}); "
          f"job {job.id}", flush=True)
    if args.detach:
        print(f"`shoal cancel {job.id}` stops it; `shoal logs {job.id}` shows its log")
        return 0
    print("Ctrl-C stops it", file=sys.stderr, flush=True)
    job = _wait_final(jobs, job)
    return 0 if job.state in ("done", "cancelled") else 1


def cmd_train(args) -> int:
    from agent.launcher.jobs import JobStore
    from agent.launcher.launch import choose_engine
    from agent.launcher.launch import (TRAIN_KEYS, adapter_ref, check_adapter_free, dataset_ref, load_train_file,
                                       read_progress, require_model, start_training, train_spec,
                                       training_file)
    settings, report, device = _common(args)
    engine = choose_engine("train", report, args.engine)
    ref = require_model(ModelRef.parse(args.model), "train")
    values = load_train_file(Path(args.config)) if args.config else {}
    values.update({k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k) is not None})
    data = dataset_ref(values.get("dataset") or "")
    if data is not None:  # a dataset repository: pulled (room, mirror, ModelScope) and verified first
        values["dataset"] = training_file(ensure_model(args, data), data)
        print(f"training on {hub_repo(data.model_id)[1]}: {values['dataset']}", file=sys.stderr)
    spec = train_spec(values)
    target = adapter_ref(ref, spec.name)
    check_adapter_free(settings.cache_dir, ref, spec.name)
    model_dir = ensure_model(args, ref)
    jobs = JobStore(settings.cache_dir)
    job = start_training(jobs, settings.cache_dir, ref, spec, model_dir, engine=engine, device=device,
                         model_type=args.model_type, template=args.template)
    if args.detach:
        print(f"training job {job.id} started; `shoal logs {job.id}` follows it, the adapter is registered "
              f"as {target.model_id} when it ends")
        return 0
    output = jobs.dir(job.id) / "output"
    shown = 0

    def tick(current: Job) -> None:
        nonlocal shown
        steps, _ = read_progress(output)
        for entry in steps[shown:]:
            line = {"job": current.id, **entry} if args.json else (
                f"step {entry['step']}/{entry['max_steps']}  loss {entry['loss']:.4f}  "
                f"lr {entry['learning_rate'] or 0:.2e}  ETA {entry['remaining'] or '-'}")
            print(json.dumps(line) if args.json else line, flush=True)
        shown = len(steps)
    print(f"training {target.model_id} with {engine} on {device} (job {job.id}); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    job = _wait_final(jobs, job, on_tick=tick)
    tick(job)
    if job.state != "done":
        raise _failed(jobs, job)
    message = f"adapter registered as {target.model_id}; try: shoal run {ref.model_id} --adapter {spec.name}"
    print(json.dumps({"job": job.id, "adapter": target.model_id}) if args.json else message)
    return 0


def cmd_jobs(args) -> int:
    from agent.launcher.jobs import JobStore
    jobs = JobStore(settings_of(args).cache_dir).list()
    if args.json:
        from dataclasses import asdict
        print(json.dumps([asdict(j) for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs yet; `shoal run`, `shoal serve` and `shoal train` start them")
        return 0
    rows = [("ID", "KIND", "MODEL", "STATE", "STARTED", "EXIT", "DETAIL")]
    for j in jobs:
        extra = j.detail.get("url") or (f"adapter {j.detail['adapter']}" if j.detail.get("adapter") else "")
        rows.append((j.id, j.kind, j.model, j.state, time.strftime("%m-%d %H:%M:%S", time.localtime(j.created)),
                     "" if j.exit_code is None else str(j.exit_code), extra))
    table(rows)
    return 0


def cmd_logs(args) -> int:
    from agent.launcher.jobs import JobStore
    jobs = JobStore(settings_of(args).cache_dir)
    job = jobs.get(args.job)
    path = jobs.log_path(job.id)
    with open(path, "rb") as f:
        while True:
            data = f.read(65536)
            if data:
                sys.stdout.write(data.decode(errors="replace"))
                sys.stdout.flush()
                continue
            if not args.follow or jobs.get(job.id).final:
                return 0
            time.sleep(POLL)


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what device and backends this machine has, and what each command uses")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    def launch_flags(p, engines):
        p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
        p.add_argument("--adapter", metavar="NAME", help="a LoRA adapter trained with `shoal train --name NAME`")
        p.add_argument("--device", choices=["auto", "cuda", "npu", "mps", "cpu"], default="auto")
        p.add_argument("--engine", choices=engines, help="default: the best installed (see `shoal doctor`)")

    p = sub.add_parser("run", help="chat with a model on this machine (pulls it first if needed)")
    launch_flags(p, ["swift", "vllm", "lmdeploy", "transformers"])
    p.add_argument("--prompt", help="one message; print the reply and exit")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--model-type", help="ms-swift model type, when it cannot tell from the files")
    p.add_argument("--template", help="ms-swift chat template, when it cannot tell from the files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API (ms-swift deploy)")
    launch_flags(p, ["swift", "vllm", "lmdeploy"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-type", help="ms-swift model type, when it cannot tell from the files")
    p.add_argument("--template", help="ms-swift chat template, when it cannot tell from the files")
    p.add_argument("--detach", action="store_true", help="return once serving; stop it with `shoal cancel JOB`")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="LoRA fine-tuning on this machine (ms-swift sft, or transformers+peft)")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.add_argument("--dataset", help="a JSONL file of chat records ({\"messages\": [{\"role\", \"content\"}, ...]}), "
                                     "or a dataset repository OWNER/NAME[@REV], pulled first")
    p.add_argument("--name", help="the adapter's name: it becomes OWNER/NAME+lora/ADAPTER in the cache")
    p.add_argument("--config", help="a YAML or JSON file with these settings (flags win)")
    p.add_argument("--tuner", choices=["lora", "qlora"])
    p.add_argument("--target-modules", dest="target_modules", help="comma-separated, or all-linear")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=int)
    p.add_argument("--lr", dest="learning_rate", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--device", choices=["auto", "cuda", "npu", "mps", "cpu"], default="auto")
    p.add_argument("--engine", choices=["swift", "transformers"])
    p.add_argument("--model-type", help="ms-swift model type, when it cannot tell from the files")
    p.add_argument("--template", help="ms-swift chat template, when it cannot tell from the files")
    p.add_argument("--detach", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("jobs", help="launched jobs and their state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("logs", help="a job's log")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)
