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
# The command line: cli.py and the command package; and the simulated agent of `pipeline bench
# --sdk`, a process of its own (python -m consumers.bench_sdk) that wires the SDK in to
# measure it.
COMPOSITION_ROOT = frozenset({CLI, *COMMANDS.glob("*.py"), ROOT / "consumers" / "bench_sdk.py"})
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


# -- the pure core ---------------------------------------------------------------------------

DRIVERS = {"asyncpg", "aiokafka"}
# The modules that hold decisions, formats and settings, not IO: they must not import a driver,
# directly or through another module of the project, so they load and test without one.
# pipeline.retry is not among them: it classifies the drivers' own errors.
PURE = {
    "pipeline.batching",
    "pipeline.config",
    "pipeline.control",
    "pipeline.db_session",
    "pipeline.endpoints",
    "pipeline.errors",
    "pipeline.kafka_settings",
    "pipeline.lag",
    "pipeline.metrics",
    "pipeline.ownership",
    "pipeline.readiness",
    "pipeline.records",
    "pipeline.redrive",
    "pipeline.replay",
    "pipeline.rows",
    "pipeline.schema_plan",
    "pipeline.terminal",
    "pipeline.top",
}


def module_path(module: str) -> Path | None:
    """The file of a module of the project (a package's ``__init__.py``), or None."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(module: str) -> set[str]:
    """Every module ``module`` imports, wherever the import statement stands, with the
    packages each import loads on the way (``pipeline.devstack.kafka`` loads
    ``pipeline.devstack`` and ``pipeline``)."""
    path = module_path(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            # `from pipeline import db` imports the module pipeline.db.
            found.update(
                f"{source}.{alias.name}"
                for alias in node.names
                if module_path(f"{source}.{alias.name}") is not None
            )
    return {
        ".".join(name.split(".")[:depth])
        for name in found
        for depth in range(1, name.count(".") + 2)
    }


def drivers_reached(module: str) -> dict[str, list[str]]:
    """Each driver ``module`` loads, with the chain of project modules through which it
    does (first found, breadth first)."""
    chains = {module: [module]}
    queue = [module]
    reached: dict[str, list[str]] = {}
    while queue:
        current = queue.pop(0)
        for name in sorted(imported_modules(current)):
            top = name.split(".")[0]
            if top in DRIVERS and top not in reached:
                reached[top] = [*chains[current], name]
            if top == "pipeline" and name not in chains and module_path(name) is not None:
                chains[name] = [*chains[current], name]
                queue.append(name)
    return reached


@pytest.mark.parametrize("module", sorted(PURE))
def test_the_pure_core_imports_no_driver_even_through_another_module(module: str) -> None:
    assert drivers_reached(module) == {}


def test_driver_imports_are_followed_through_the_project() -> None:
    # The check is not vacuous: the modules that do IO are seen reaching their drivers, and an
    # import inside a function counts (`pipeline topics` imports pipeline.kafka in its handler).
    assert drivers_reached("pipeline.db")["asyncpg"] == ["pipeline.db", "asyncpg"]
    assert drivers_reached("pipeline.kafka_clients")["aiokafka"][0] == "pipeline.kafka_clients"
    assert set(drivers_reached("pipeline.control_store")) == {"asyncpg"}
    assert set(drivers_reached("pipeline.lag_probe")) == DRIVERS
    assert set(drivers_reached("pipeline.cli")) == DRIVERS
    assert "pipeline.kafka" in imported_modules("pipeline.commands.topics")
    assert "pipeline.devstack.stack" in imported_modules("pipeline.devstack")
    assert "pipeline" in imported_modules("pipeline.config")


def test_the_pure_modules_exist() -> None:
    assert {m for m in PURE if module_path(m) is None} == set()


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


# -- one write path ---------------------------------------------------------------------------
#
# Every batch written to the data tables (the agent's, the replay's, the redrive's) goes
# through consumers/writer.py: the offsets' compare-and-set, the writes, the bisection of
# refused rows in savepoints, the dead letters. The table writer's COPY is pipeline/db.py's
# (TableWriter.write), and a transaction is opened by db.transaction, never by hand.

WRITER = ROOT / "consumers" / "writer.py"
DB = ROOT / "pipeline" / "db.py"
# Who may call what: the steps of a batch's transaction, and asyncpg's hand-made transactions.
ONLY_IN = {
    "advance_offsets": {(WRITER, None)},
    "insert_dead_letters": {(WRITER, None)},
    "write_bisecting": {(WRITER, None)},
    # ... and the partition bench's loading of its own scratch tables (no records, no offsets).
    "copy_records_to_table": {
        (DB, "_write"),
        (ROOT / "consumers" / "bench_partitions.py", "_load"),
    },
    # A table writer is the writer's, and `pipeline bench`'s for its raw COPY limit.
    "TableWriter": {(WRITER, None), (ROOT / "consumers" / "bench.py", None)},
    # conn.transaction() with no argument: only the helper, and the bisection's savepoints.
    "transaction()": {(DB, "transaction"), (WRITER, "_write_range")},
}


def write_path_breaches(path: Path, *, as_if: Path | None = None) -> list[str]:
    """``what:line`` of every step of the write path that ``path`` (judged as the module
    ``as_if``) takes and only its owner may: a call in ``ONLY_IN`` outside its (module,
    function), a SAVEPOINT statement, or an exception class of refused rows (``_RowRejected``)
    outside the writer."""
    judged = as_if or path
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "transaction":  # db.transaction(conn) is the helper itself
                name = None if node.args or node.keywords else "transaction()"
            allowed = ONLY_IN.get(name or "")
            if allowed is not None and not allowed & {(judged, None), (judged, function)}:
                found.append(f"{name}:{node.lineno}")
        elif judged != WRITER:
            # The statement (upper case), not the word in a docstring.
            if isinstance(node, ast.Constant) and "SAVEPOINT" in str(node.value):
                found.append(f"SAVEPOINT:{node.lineno}")
            if isinstance(node, ast.ClassDef) and "Row" in node.name and "Rejected" in node.name:
                found.append(f"class {node.name}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(), filename=str(path)), None)
    return found


def test_every_batch_is_written_through_the_one_write_path() -> None:
    breaches = {
        str(path.relative_to(ROOT)): write_path_breaches(path)
        for package in ("pipeline", "producers", "consumers")
        for path in modules(package)
    }
    assert {path: found for path, found in breaches.items() if found} == {}
    # The rule names steps the writer does take, not stale ones: anywhere else, they breach.
    taken = write_path_breaches(WRITER, as_if=ROOT / "consumers" / "elsewhere.py")
    assert {b.split(":")[0] for b in taken} == {
        "advance_offsets",
        "insert_dead_letters",
        "TableWriter",
        "write_bisecting",
        "transaction()",
        "SAVEPOINT",
        "class _RowRejected",
    }


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
