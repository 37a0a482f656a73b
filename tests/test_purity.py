"""The domain stays pure: machines, guards, the engine core and the live engine import no exchange client
library and no database code (DESIGN: keep the domain pure)."""
from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("ccxt", "sqlalchemy", "sqlmodel", "db", "aiohttp", "asyncpg", "aiosqlite", "websockets")
MODULES = ("lifecycle.machines.position", "lifecycle.machines.table", "lifecycle.guards.predicates",
           "lifecycle.guards.cleanup", "lifecycle.guards.stop_lock", "lifecycle.engine", "lifecycle.live",
           "lifecycle.reconcile", "lifecycle.causes", "lifecycle.trailing")


def test_domain_modules_import_no_client_library_and_no_database() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES) +
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"domain modules pulled in {out}"
