"""Imports run one way (DESIGN: keep the domain pure; issue 15: a test enforces it).

* The domain core (machines, guards, events, domain, actions and the other pure modules) imports no exchange
  client, no database library, nothing of db/, exchange/ or scheduler/, and none of the layers above it (the
  live engine, the engine with its books, reconciliation, the service, API, command line, settings, demo).
* The engine layer (engine, live engine, reconciliation) reaches the exchange through its port only: no ccxt,
  no HTTP or WebSocket library, no adapter or simulator, no database, no scheduler, no service code.

Each module is imported alone in a fresh interpreter; what it pulled into `sys.modules` is checked, and a
failure names the forbidden module and the chain of imports that brought it in.
"""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Packages whose every submodule belongs to the core.
CORE_PACKAGES = ("lifecycle.machines", "lifecycle.guards")
CORE_MODULES = (
    "lifecycle.events",
    "lifecycle.domain",
    "lifecycle.actions",
    "lifecycle.errors",
    "lifecycle.causes",
    "lifecycle.trailing",
    "lifecycle.client_ids",
    "lifecycle.metrics",
    "lifecycle.ports",  # the storage and canceller protocols the engine is given
    "lifecycle.journal",  # the journal's rows, the outcome of a transition, the creation payload
    "lifecycle.record_kinds",  # the structured records, one dataclass per kind
    "lifecycle.replay",  # rebuilds a position from its journal through the machine
    "lifecycle.retry",  # the one backoff rule and retry loop
    "lifecycle.config_fields",  # configuration fields with their limits, stated once
)

IO_LIBRARIES = ("ccxt", "sqlalchemy", "sqlmodel", "aiosqlite", "asyncpg", "psycopg", "psycopg2", "alembic",
                "aiohttp", "websockets")
OUTER_LAYERS = ("db", "exchange", "scheduler", "lifecycle.app", "lifecycle.live", "lifecycle.engine", "lifecycle.books",
                "lifecycle.reconciler")
CORE_FORBIDDEN = IO_LIBRARIES + OUTER_LAYERS

ENGINE_MODULES = ("lifecycle.engine", "lifecycle.live", "lifecycle.reconciler")  # with a package's submodules
ENGINE_FORBIDDEN = (*IO_LIBRARIES, "db", "scheduler", "exchange.ccxt_adapter", "exchange.sim", "lifecycle.app")

# The periodic jobs see an account only through `lifecycle.account`'s read-only view and commands.
JOB_MODULES = ("lifecycle.reconciler", "scheduler.jobs")
JOB_FORBIDDEN = (*IO_LIBRARIES, "db", "lifecycle.live", "lifecycle.engine", "lifecycle.books",
                 "exchange.ccxt_adapter", "exchange.sim", "lifecycle.app")

# Run in the fresh interpreter: import one module and report every module it brought in, with the module
# whose import statement asked for it first (so a failure can show the chain).
_PROBE = r"""
import builtins, json, sys
target = sys.argv[1]
importer = {}
real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    parent = (globals or {}).get("__name__", "?")
    before = set(sys.modules)
    module = real_import(name, globals, locals, fromlist, level)
    for new in set(sys.modules) - before:
        importer.setdefault(new, parent)
    return module

builtins.__import__ = recording_import
already = set(sys.modules)
__import__(target)
print(json.dumps({m: importer.get(m, "?") for m in sorted(set(sys.modules) - already)}))
"""


def _with_submodules(names: tuple[str, ...]) -> list[str]:
    """Each name, followed by its submodules when it is a package on disk (so a new one is covered too)."""
    found = []
    for name in names:
        found.append(name)
        path = ROOT.joinpath(*name.split("."))
        if path.is_dir():
            found += [f"{name}.{m.name}" for m in pkgutil.iter_modules([str(path)])]
    return found


def _core_modules() -> list[str]:
    return _with_submodules(CORE_PACKAGES) + list(CORE_MODULES)


def _imported_by(module: str) -> dict[str, str]:
    """Every module importing `module` alone brings in -> the module whose import asked for it."""
    done = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)
    assert done.returncode == 0, f"importing {module} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _chain(imported: dict[str, str], module: str, target: str) -> str:
    chain = [module]
    while chain[-1] != target and chain[-1] in imported and len(chain) < 50:
        chain.append(imported[chain[-1]])
    return " <- ".join(chain)


def _violations(module: str, forbidden: tuple[str, ...]) -> list[str]:
    imported = _imported_by(module)
    hits = {m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)
            and not (m == module or module.startswith(m + ".") or m.startswith(module + "."))}  # its own aside
    # Report where the chain crosses the line (exchange.ccxt_adapter, not the ccxt it brings along), and
    # the module rather than its package when one import statement brought both.
    entries = {m for m in hits if imported[m] not in hits  # "?": loaded by importlib, e.g. a dialect
               and not (imported[m] == "?" and m.split(".")[0] in hits and m.split(".")[0] != m)}
    entries = {m for m in entries if not any(e.startswith(m + ".") and imported[e] == imported[m] for e in entries)}
    return [f"{module} imports {m} (via {_chain(imported, m, module)})" for m in sorted(entries)]


@pytest.mark.parametrize("module", _core_modules())
def test_the_domain_core_imports_no_io_and_no_outer_layer(module: str) -> None:
    problems = _violations(module, CORE_FORBIDDEN)
    assert not problems, "the domain core must stay pure:\n" + "\n".join(problems)


@pytest.mark.parametrize("module", _with_submodules(ENGINE_MODULES))
def test_the_engine_layer_reaches_the_exchange_only_through_its_port(module: str) -> None:
    problems = _violations(module, ENGINE_FORBIDDEN)
    assert not problems, "the engine layer must not import these:\n" + "\n".join(problems)


@pytest.mark.parametrize("module", JOB_MODULES)
def test_the_periodic_jobs_see_an_account_only_through_its_view_and_commands(module: str) -> None:
    problems = _violations(module, JOB_FORBIDDEN)
    assert not problems, "the periodic jobs must not import these:\n" + "\n".join(problems)


def test_the_check_sees_a_forbidden_import_and_names_its_chain() -> None:
    """The probe is not blind: reconciliation (an outer layer) fails the core rule, and the service (which
    builds the exchange client) fails the jobs' rule, and each says why."""
    problems = _violations("lifecycle.reconciler", CORE_FORBIDDEN)
    assert any(p.startswith("lifecycle.reconciler imports exchange.port ") for p in problems), problems
    problems = _violations("lifecycle.app.service", JOB_FORBIDDEN)
    assert any(p.startswith("lifecycle.app.service imports exchange.ccxt_adapter ") for p in problems), problems


def test_every_core_package_module_is_listed() -> None:
    """The discovery finds the modules it should (a typo in CORE_PACKAGES would silently check nothing)."""
    core = _core_modules()
    for module in ("lifecycle.machines.table", "lifecycle.machines.position", "lifecycle.machines.states",
                   "lifecycle.guards.predicates", "lifecycle.guards.cleanup", "lifecycle.guards.stop_lock"):
        assert module in core
