"""What ``shoal run``, ``serve`` and ``train`` do before and after their job runs.

Resolve the model (pull it if it is not cached), check the device request and the
inputs, build the engine's command line, start the job, read a training run's progress
from the framework's own ``logging.jsonl``, and register a finished adapter in the cache
as a model of its own (``OWNER/NAME+lora/ADAPTER``) so it can be listed, run and shared.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.config import Settings
from agent.errors import NotFound, ShoalError, UsageError
from agent.launcher.devices import MISSING, DeviceReport, engine_for
from agent.manifest import ModelRef, check_relpath, hub_repo

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "additional_config.json", "README.md")
MAX_DATASET_ROWS_CHECKED = 100_000
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class TrainSpec:
    dataset: Path
    name: str
    tuner: str = "lora"  # lora | qlora
    target_modules: str = "all-linear"
    rank: int = 8
    alpha: int = 32
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = 0

    def check(self) -> "TrainSpec":
        if self.tuner not in ("lora", "qlora"):
            raise UsageError(f"tuner {self.tuner!r} is not lora or qlora")
        if not 1 <= self.rank <= 1024 or not 1 <= self.alpha <= 4096:
            raise UsageError(f"rank {self.rank} / alpha {self.alpha} are out of range (rank 1-1024, alpha 1-4096)")
        if not 0 < self.learning_rate < 1:
            raise UsageError(f"learning rate {self.learning_rate} is not between 0 and 1")
        if self.max_steps < 0 or self.epochs <= 0:
            raise UsageError("max steps must be >= 0 and epochs > 0")
        check_adapter_name(self.name)
        validate_dataset(self.dataset)
        return self


TRAIN_KEYS = ("dataset", "name", "tuner", "target_modules", "rank", "alpha", "learning_rate", "epochs", "max_steps")


def train_spec(values: dict) -> TrainSpec:
    """A checked ``TrainSpec`` from settings (flags plus a config file, or the UI's form).
    Blocking: it reads the dataset through."""
    if not values.get("dataset") or not values.get("name"):
        raise UsageError("training needs a dataset (--dataset FILE or OWNER/NAME) and an adapter name (--name NAME)")
    try:
        spec = TrainSpec(**{**values, "dataset": Path(str(values["dataset"]))})
    except TypeError as e:
        raise UsageError(f"unknown training setting: {e}") from None
    return spec.check()


def check_adapter_free(cache_dir: Path, ref: ModelRef, name: str) -> None:
    """Refuse a name an adapter of this model already has (before pulling or training)."""
    from agent.store.folders import model_dir
    if model_dir(cache_dir, adapter_ref(ref, name)).exists():
        raise UsageError(f"an adapter named {name!r} for {ref.model_id} exists already; pick another name")


def start_training(jobs, cache_dir: Path, ref: ModelRef, spec: TrainSpec, model_dir: Path, *, engine: str,
                   device: str, model_type: str | None, template: str | None):
    """Start the training job; its supervisor registers the adapter when it succeeds."""
    require_model(ref, "train")
    check_adapter_free(cache_dir, ref, spec.name)
    return jobs.start(
        "train", str(ref), [], detail={"engine": engine, "device": device, "adapter": spec.name},
        build_argv=lambda job_dir: train_argv(model_dir, spec, job_dir / "output", engine=engine,
                                              model_type=model_type, template=template),
        on_success={"register_adapter": {"base": str(ref), "name": spec.name}})


def check_adapter_name(name: str) -> str:
    try:
        ModelRef.parse(f"a/b+lora/{name}")
    except UsageError:
        raise UsageError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-'") from None
    return name


def load_train_file(path: Path) -> dict:
    """Training settings from a small YAML (or JSON) file; keys as the flags, with '_'."""
    text = Path(path).read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError("reading a YAML training file needs PyYAML (it comes with shoal[run])") from None
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of training settings")
    return data


def dataset_ref(value: str) -> ModelRef | None:
    """The dataset repository a training ``--dataset`` names (``OWNER/NAME[@REV]`` or
    ``datasets/OWNER/NAME``), or None when it is a file (one that exists, or that looks
    like a file: ``.jsonl``/``.json``, or a path starting with ``/``, ``.`` or ``~``)."""
    text = str(value)
    if Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.endswith((".jsonl", ".json")):
        return None
    try:
        return ModelRef.parse(text, dataset=True)
    except UsageError:
        return None


def training_file(directory: Path, ref: ModelRef) -> Path:
    """The JSONL file of a pulled dataset repository to train on: its only one, else its
    only ``train*`` one; otherwise a clear error naming the choices."""
    directory = Path(directory)
    found = sorted(p for p in directory.rglob("*.jsonl")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if len(found) == 1:
        return found[0]
    trains = [p for p in found if p.name.startswith("train")]
    if len(trains) == 1:
        return trains[0]
    name = hub_repo(ref.model_id)[1]
    if not found:
        raise UsageError(f"dataset {name} holds no .jsonl file; shoal trains on JSONL chat records "
                         "(swift sft --dataset takes other formats through the gateway)")
    listed = ", ".join(p.relative_to(directory).as_posix() for p in found[:8])
    raise UsageError(f"dataset {name} holds {len(found)} JSONL files ({listed}); train on one of them: "
                     f"--dataset {directory}/FILE")


def require_model(ref: ModelRef, command: str) -> ModelRef:
    """Refuse a dataset where a command needs a model."""
    if ref.is_dataset:
        raise UsageError(f"{ref} is a dataset; `shoal {command}` takes a model "
                         "(train on a dataset with `shoal train MODEL --dataset OWNER/NAME`)")
    return ref


def validate_dataset(path: Path) -> int:
    """Check a JSONL chat dataset; return its row count. Names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"dataset {path} does not exist")
    rows = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{number} is not JSON; a dataset is JSONL chat records: "
                                 '{"messages": [{"role": "user", "content": ...}, '
                                 '{"role": "assistant", "content": ...}]}') from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                               for m in messages)
                    or messages[-1]["role"] != "assistant"):
                raise UsageError(f"{path}:{number} is not a chat record: it needs \"messages\", a list of "
                                 "{role, content} (roles system/user/assistant/tool) ending with the assistant")
            rows += 1
            if rows >= MAX_DATASET_ROWS_CHECKED:
                break
    if not rows:
        raise UsageError(f"dataset {path} holds no records")
    return rows


def check_device(requested: str | None, report: DeviceReport) -> str:
    """The device to use: the one requested if this machine has it, else the best present."""
    if requested in (None, "auto"):
        return report.kind
    if requested not in ("cuda", "npu", "mps", "cpu"):
        raise UsageError(f"device {requested!r} is not one of cuda, npu, mps, cpu")
    if requested != "cpu" and requested != report.kind:
        raise UsageError(f"this machine has no {requested.upper()} device (found: {report.kind}, "
                         f"{', '.join(report.names)}); use --device {report.kind} or run `shoal doctor`")
    return requested


def choose_engine(command: str, report: DeviceReport, requested: str | None = None) -> str:
    engine = requested or engine_for(command, report)
    if engine is None:
        raise UsageError(MISSING if command != "serve" else
                         "serving needs ms-swift: pip install 'shoal[run]'")
    needs = {"swift": "ms-swift", "vllm": "vllm", "lmdeploy": "lmdeploy", "transformers": "transformers"}
    if not report.has(needs.get(engine, engine)):
        raise UsageError(f"engine {engine} is not installed here; `shoal doctor` lists what is")
    return engine


def _swift_model_flags(model_type: str | None, template: str | None) -> list[str]:
    flags = []
    if model_type:
        flags += ["--model_type", model_type]
    if template:
        flags += ["--template", template]
    return flags


def chat_argv(model_dir: Path, *, adapter_dir: Path | None, prompt: str | None, engine: str, device: str,
              max_new_tokens: int = 64, model_type: str | None = None, template: str | None = None,
              jsonl: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "agent.launcher.runner", "chat", "--model", str(model_dir),
            "--engine", engine, "--device", device, "--max-new-tokens", str(max_new_tokens)]
    if jsonl:
        argv.append("--jsonl")
    if model_type:
        argv += ["--model-type", model_type]
    if template:
        argv += ["--template", template]
    if adapter_dir:
        argv += ["--adapter", str(adapter_dir)]
    if prompt is not None:
        argv += ["--prompt", prompt]
    return argv


def serve_argv(model_dir: Path, *, host: str, port: int, engine: str, adapter: tuple[str, Path] | None,
               model_type: str | None, template: str | None, served_name: str) -> list[str]:
    backend = {"swift": "transformers"}.get(engine, engine)
    argv = [sys.executable, "-m", "swift.cli.deploy", "--model", str(model_dir), "--host", host,
            "--port", str(port), "--infer_backend", backend, "--served_model_name", served_name,
            *_swift_model_flags(model_type, template)]
    if adapter:
        argv += ["--adapters", f"{adapter[0]}={adapter[1]}"]
    return argv


def train_argv(model_dir: Path, spec: TrainSpec, output: Path, *, engine: str, model_type: str | None,
               template: str | None) -> list[str]:
    if engine == "transformers":
        if spec.tuner != "lora":
            raise UsageError("qlora needs ms-swift (pip install 'shoal[run]'); the fallback trainer does lora")
        return [sys.executable, "-m", "agent.launcher.runner", "train", "--model", str(model_dir),
                "--dataset", str(spec.dataset), "--output", str(output), "--rank", str(spec.rank),
                "--alpha", str(spec.alpha), "--target-modules", spec.target_modules,
                "--lr", str(spec.learning_rate), "--max-steps", str(spec.max_steps), "--epochs", str(spec.epochs)]
    argv = [sys.executable, "-m", "swift.cli.sft", "--model", str(model_dir), "--dataset", str(spec.dataset),
            "--tuner_type", "lora", "--lora_rank", str(spec.rank), "--lora_alpha", str(spec.alpha),
            "--target_modules", *spec.target_modules.split(","), "--learning_rate", str(spec.learning_rate),
            "--output_dir", str(output), "--check_model", "false", "--report_to", "none",
            "--dataloader_num_workers", "0", "--add_version", "false", "--split_dataset_ratio", "0",
            "--logging_steps", "1", "--save_total_limit", "1", *_swift_model_flags(model_type, template)]
    if spec.tuner == "qlora":
        argv += ["--quant_method", "bnb", "--quant_bits", "4"]
    if spec.max_steps:
        argv += ["--max_steps", str(spec.max_steps), "--save_steps", str(spec.max_steps)]
    else:
        argv += ["--num_train_epochs", str(spec.epochs)]
    return argv


def read_progress(output: Path) -> tuple[list[dict], dict]:
    """Training steps so far (step, max_steps, loss, learning_rate, remaining) and the final record."""
    steps, final = [], {}
    try:
        lines = (Path(output) / "logging.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return steps, final
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if "loss" in entry and "global_step/max_steps" in entry:
            step, total = (int(x) for x in str(entry["global_step/max_steps"]).split("/"))
            steps.append({"step": step, "max_steps": total, "loss": entry["loss"],
                          "learning_rate": entry.get("learning_rate"), "remaining": entry.get("remaining_time")})
        if "last_model_checkpoint" in entry:
            final = entry
    return steps, final


def find_checkpoint(output: Path) -> Path:
    """The adapter a training run produced: its last checkpoint."""
    _, final = read_progress(output)
    if final.get("last_model_checkpoint") and Path(final["last_model_checkpoint"]).is_dir():
        return Path(final["last_model_checkpoint"])
    found = sorted(Path(output).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                   if p.name.split("-")[-1].isdigit() else -1)
    if not found:
        raise ShoalError(f"the training run left no checkpoint in {output}")
    return found[-1]


def adapter_ref(base: ModelRef, name: str) -> ModelRef:
    return ModelRef(f"{base.model_id}+lora/{check_adapter_name(name)}", "master")


def register_adapter(settings: Settings, base: ModelRef, name: str, checkpoint: Path) -> ModelRef:
    """Copy a finished adapter into the cache as model ``base+lora/name``, with its manifest.

    All or nothing: files are copied to a staging folder and moved into place only once the
    manifest is built; the index learns about the adapter last.
    """
    from agent.mirror import manifest_from_dir
    from agent.store import Store

    ref = adapter_ref(base, name)
    files = [f for f in ADAPTER_FILES if (Path(checkpoint) / f).is_file()]
    if "adapter_config.json" not in files:
        raise ShoalError(f"{checkpoint} holds no adapter (adapter_config.json missing); nothing was registered")
    store = Store(settings.cache_dir)
    try:
        store.lock(ref)
        final = store.default_dir(ref)
        if final.exists():
            raise UsageError(f"an adapter named {name!r} for {base.model_id} exists already; "
                             f"pick another --name or `shoal rm {ref.model_id}`")
        staging = final.with_name(final.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in files:
            check_relpath(f)
            shutil.copy2(Path(checkpoint) / f, staging / f)
        (staging / "shoal_adapter.json").write_text(json.dumps({"base": str(base), "name": name}))
        manifest = manifest_from_dir(ref, staging, settings.chunk_size)
        os.replace(staging, final)
        store.adopt(ref, final, manifest)
        return ref
    finally:
        store.close()


def resolve_adapter(settings: Settings, base: ModelRef, name: str) -> Path:
    from agent.store import Store
    ref = adapter_ref(base, name)
    store = Store(settings.cache_dir)
    try:
        try:
            info = store.find(ref)
        except NotFound:
            known = sorted(m.model_id.split("+lora/", 1)[1] for m in store.models()
                           if m.model_id.startswith(base.model_id + "+lora/"))
            raise NotFound(f"no adapter {name!r} for {base.model_id}; "
                           + (f"known: {', '.join(known)}" if known else
                              f"train one with `shoal train {base.model_id} --dataset FILE --name NAME`")) from None
        if info.state != "complete":
            raise NotFound(f"adapter {ref.model_id} is not complete; `shoal pull {ref.model_id}` finishes it")
        return info.dir
    finally:
        store.close()
