"""The top floors: the control API table (checked parameters, documented in the README,
errors that keep their class over the socket), the one backend every command uses, and
the import structure (nothing imports the CLI; no import cycles in the agent)."""

from __future__ import annotations

import ast
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import api
from agent.errors import AgentNeeded, NotFound, ProtocolError, UsageError
from agent.manifest import ModelRef
from agent.rpc import ControlClient, FrameDecoder, encode_frame
from conftest import REPO, AgentProcess, run_shoal

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Sample:
    model: ModelRef
    count: int = 1
    ratio: float | None = None
    note: str | None = None


def test_parameters_are_checked_against_the_record_before_any_handler_runs():
    parsed = api.parse_params(Sample, {"model": "lab/tiny@v1", "ratio": 2})
    assert parsed == Sample(ModelRef("lab/tiny", "v1"), 1, 2, None)
    with pytest.raises(UsageError, match="'model' .* is required"):
        api.parse_params(Sample, {})
    with pytest.raises(UsageError, match="unknown parameter.*'colour'"):
        api.parse_params(Sample, {"model": "lab/tiny", "colour": "red"})
    with pytest.raises(UsageError, match="'count' must be integer, not str"):
        api.parse_params(Sample, {"model": "lab/tiny", "count": "3"})
    with pytest.raises(UsageError, match="'count' must be integer, not bool"):
        api.parse_params(Sample, {"model": "lab/tiny", "count": True})
    with pytest.raises(UsageError, match="'model' must be"):
        api.parse_params(Sample, {"model": 7})
    with pytest.raises(UsageError):  # the model name's own check
        api.parse_params(Sample, {"model": "../etc"})


def test_every_method_has_a_record_a_doc_and_is_in_the_readme():
    for method in api.METHODS.values():
        assert method.doc and method.params.__dataclass_params__.frozen, method.name
    readme = (REPO / "README.md").read_text()
    table = "\n".join("  " + line for line in api.markdown().splitlines())
    assert table in readme, "README's control API table is stale: paste `python -m agent.api` into it"
    with pytest.raises(ProtocolError, match="unknown method 'nope'.*pull"):
        api.lookup("nope")


def _raw_call(path: str, message: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_frame(message))
        decoder = FrameDecoder()
        while True:
            data = sock.recv(65536)
            assert data, "the agent closed without an answer"
            for frame in decoder.feed(data):
                if "event" not in frame:
                    return frame


@pytest.fixture
def running_agent(env):
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    process = AgentProcess(env).start()
    yield process
    process.stop()


def test_bad_calls_get_the_error_class_and_exit_code_over_the_socket(running_agent):
    path = running_agent.info["socket"]
    client = ControlClient(path, timeout=10)
    with pytest.raises(UsageError, match="'model' .* is required") as missing:
        client.call("pin", {})
    assert missing.value.exit_code == 2
    with pytest.raises(NotFound):
        client.call("pin", {"model": "lab/never-pulled"})
    answer = _raw_call(path, {"method": "job_log", "params": {"job": "x", "bytes": "lots"}})
    assert answer["error"]["type"] == "UsageError" and "'bytes' must be integer" in answer["error"]["message"]
    answer = _raw_call(path, {"method": "status", "params": {"verbose": True}})
    assert "unknown parameter" in answer["error"]["message"]
    assert client.call("status")["pid"] == running_agent.info["pid"]  # still serving


def test_commands_use_the_agent_when_it_runs_and_the_store_when_not(env, running_agent):
    from agent.client import AgentBackend, LocalBackend, open_backend
    from agent.config import load_settings
    settings = load_settings(env=env)
    assert isinstance(open_backend(settings), AgentBackend)
    running_agent.stop()
    local = open_backend(settings)
    assert isinstance(local, LocalBackend) and local.models() == []
    with pytest.raises(AgentNeeded, match="needs the shoal agent"):
        local.call("peers")
    proc = run_shoal(["status"], env)
    assert proc.returncode == 1 and "No agent" in proc.stderr and "shoal agent" in proc.stderr
    assert json.loads(run_shoal(["ls", "--json"], env, check=True).stdout) == []


def _module_imports(path: Path, module: str) -> set[str]:
    """Modules ``module`` imports, at its top or inside a function (a lazy import still
    ties the two modules together)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only are not imports
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules() -> dict[str, Path]:
    modules = {}
    for root in ("agent", "tui"):
        for path in (REPO / root).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def test_nothing_outside_the_cli_imports_it():
    for name, path in _modules().items():
        if name == "agent.cli" or name.startswith("agent.cli."):
            continue
        text = path.read_text()
        assert "from agent.cli import" not in text and "import agent.cli" not in text, name


def test_the_agent_has_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _module_imports(path, name) if m in modules and m != name}
             for name, path in modules.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too.
    for name in list(graph):
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and parent != name:
                graph[name].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                # A package importing its own submodules (which import the package's
                # parents) is how a package is built, not a cycle between concerns.
                if not any(all(m == p or m.startswith(p + ".") for m in cycle) for p in cycle):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2
    for node in graph:
        if node not in state:
            visit(node)


def test_no_module_is_over_about_500_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > 560}
    assert not long, f"split these by concern: {long}"
