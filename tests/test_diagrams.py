"""The committed diagrams and transition table are exactly what the code generates."""
from __future__ import annotations

from pathlib import Path

from lifecycle.machines.diagrams import dot, markdown, mermaid, render_all, stale, write_all
from lifecycle.machines.states import PositionState
from lifecycle.machines.table import TABLE

REPO_DIAGRAMS = Path(__file__).resolve().parent.parent / "diagrams"


def test_committed_diagrams_are_fresh() -> None:
    assert stale(REPO_DIAGRAMS) == [], "diagrams/ is stale: run `lifecycle diagrams` and commit the result"


def test_a_changed_or_missing_file_is_reported_stale(tmp_path: Path) -> None:
    write_all(tmp_path)
    assert stale(tmp_path) == []
    (tmp_path / "position.mmd").write_text("stateDiagram-v2\n", encoding="utf-8")
    (tmp_path / "transitions.md").unlink()
    assert stale(tmp_path) == ["position.mmd", "transitions.md"]


def test_every_edge_and_guard_appears_in_every_view() -> None:
    views = {"mermaid": mermaid(), "dot": dot(), "markdown": markdown()}
    for edge in TABLE:
        for name, text in views.items():
            line = next((l for l in text.splitlines() if edge.source.value in l and edge.event.value in l
                         and edge.dest.value in l), None)
            assert line is not None, f"{name} lacks {edge}"
            for guard in edge.guard_names:
                assert guard in line, f"{name}: guard {guard} missing on {edge.source}-{edge.event}"
    for state in PositionState:
        assert all(state.value in text for text in views.values())
    assert set(render_all()) == {"position.mmd", "position.dot", "transitions.md"}
