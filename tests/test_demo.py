"""The README's first command, run exactly as written in a fresh copy of the project (so a fresh virtual
environment), completes the demo with every ending in its summary; afterwards no output of the run (its
terminal output, logs, records, database) contains the API key or the secret."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENDINGS = ["bot close", "stop-loss fill", "trailing-stop fill", "liquidation", "ADL",
           "manual close by another client", "phantom", "stale REST, the stream catches the close"]


def readme_demo_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("Run the demo"):]
    return re.search(r"```sh\n(.+?)\n```", section, re.S).group(1).strip()  # type: ignore[union-attr]


def fresh_copy(target: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_readme_demo_command_shows_every_ending_and_leaks_no_secret(tmp_path: Path) -> None:
    command = readme_demo_command()
    assert command == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/lifecycle demo"
    repo = fresh_copy(tmp_path / "repo")
    key, secret = "key" + secrets.token_hex(16), "secret" + secrets.token_hex(24)
    env = {**os.environ, "LIFECYCLE_DEMO_PACE": "0.3", "LIFECYCLE_DEMO_API_KEY": key,
           "LIFECYCLE_DEMO_SECRET": secret, "TMPDIR": str(tmp_path)}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    noise = "WARNING: Location"  # this machine's pip configuration names an index directory that is absent
    shown = "\n".join(line for line in output.splitlines() if noise not in line)
    assert result.returncode == 0, shown[-6000:]
    summary = result.stdout[result.stdout.index("summary: every ending"):]
    for ending in ENDINGS:
        row = next((line for line in summary.splitlines() if f" {ending} " in line), None)
        assert row is not None and row.rstrip(" │|").endswith("yes"), f"{ending}: {row}"
    assert "every journal replays to its stored state: yes" in result.stdout
    workdir = Path(re.search(r"work directory: (\S+)", result.stdout).group(1))  # type: ignore[union-attr]
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"lifecycle.sqlite", "lifecycle.log"}
    assert any(p.name.startswith("closure-") for p in files) and any(p.name.startswith("transition-") for p in files)
    for needle in (key, secret):
        assert needle not in output
        for path in files:
            assert needle.encode() not in path.read_bytes(), f"{needle[:6]}... found in {path}"
