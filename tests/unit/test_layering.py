"""The layering, enforced: the core (``pipeline``) imports neither the SDK (``producers``)
nor the agent and benchmark (``consumers``), except the command line (pipeline/cli.py and
pipeline/commands/), which wires them all together; and ``producers`` and ``consumers`` do not
import each other.

Every import counts: at the top of a module, inside a function, under TYPE_CHECKING.

And one rule of the same kind: every Kafka client is built by pipeline/kafka_clients.py, so
how to reach the cluster (TLS and SASL one day) is said in one place.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "pipeline" / "cli.py"
COMMANDS = ROOT / "pipeline" / "commands"
# The command line: cli.py and the command package.
COMPOSITION_ROOT = frozenset({CLI, *COMMANDS.glob("*.py")})
# What each package must never import.
FORBIDDEN = {
    "pipeline": {"producers", "consumers"},
    "producers": {"consumers"},
    "consumers": {"producers"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_its_layer_must_not(package: str) -> None:
    found = modules(package)
    assert found, f"no modules under {package}/"
    violations = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in found
        if path not in COMPOSITION_ROOT
    }
    assert {path: names for path, names in violations.items() if names} == {}


def test_only_the_command_line_wires_the_layers_together() -> None:
    # The exception above is real, not stale: the command line does import both.
    assert set().union(*map(imported_packages, COMPOSITION_ROOT)) >= {"producers", "consumers"}


def test_imports_anywhere_in_a_module_are_seen(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from consumers.agent import DatabaseAgent\n"
        "def f():\n"
        "    import producers.simulator\n"
        "from . import sibling\n"
    )
    assert imported_packages(module) == {"typing", "consumers", "producers"}


KAFKA_CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient", "AIOKafkaClient"}
FACTORY = ROOT / "pipeline" / "kafka_clients.py"


def kafka_clients_built(path: Path) -> list[str]:
    """``name:line`` of every aiokafka client class called in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in KAFKA_CLIENTS:
                found.append(f"{name}:{node.lineno}")
    return found


def test_every_kafka_client_comes_from_the_factory() -> None:
    built = {
        str(path.relative_to(ROOT)): kafka_clients_built(path)
        for package in ("pipeline", "producers", "consumers", "tests")
        for path in modules(package)
        if path != FACTORY
    }
    assert {path: calls for path, calls in built.items() if calls} == {}
    assert len(kafka_clients_built(FACTORY)) == len(KAFKA_CLIENTS)


def command_modules() -> list[str]:
    """The command families: the modules of pipeline/commands/ not named ``_*``."""
    return sorted(p.stem for p in COMMANDS.glob("*.py") if not p.stem.startswith("_"))


def top_level_functions(path: Path) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_command_module_registers_itself() -> None:
    found = command_modules()
    assert "dev" in found and "control" in found
    lacking = [m for m in found if "register" not in top_level_functions(COMMANDS / f"{m}.py")]
    assert lacking == []


def test_the_command_line_registers_every_command_module() -> None:
    cli = importlib.import_module("pipeline.cli")
    registered = [m.__name__.rpartition(".")[2] for m in cli.COMMANDS]
    assert len(registered) == len(set(registered))
    assert sorted(registered) == command_modules()  # none forgotten, none from elsewhere
    assert all(m.__name__.startswith("pipeline.commands.") for m in cli.COMMANDS)


def test_the_command_line_itself_holds_no_command() -> None:
    """cli.py parses, dispatches and explains errors; each command's options and handler are
    in its module: no handler of ``argparse.Namespace`` and no parser but the root's here."""
    tree = ast.parse(CLI.read_text(), filename=str(CLI))
    handlers = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and any(
            "Namespace" in ast.unparse(a.annotation or ast.Constant("")) for a in node.args.args
        )
    ]
    calls = [
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    ]
    assert handlers == []
    assert calls.count("add_subparsers") == 1
    assert [c for c in calls if c in {"add_parser", "add_argument", "set_defaults"}] == []
