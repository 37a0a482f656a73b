"""The committed diagrams are exactly what the code generates, and every view draws the expected table."""
from __future__ import annotations

import re
from pathlib import Path

from lifecycle.machines.diagrams import (
    dot,
    markdown,
    mermaid,
    render_all,
    stale,
    svg,
    write_all,
)
from tests.test_transition_table import EXPECTED, EXPECTED_EVENTS, EXPECTED_STATES

REPO_DIAGRAMS = Path(__file__).resolve().parent.parent / "diagrams"


def test_committed_diagrams_are_fresh() -> None:
    assert stale(REPO_DIAGRAMS) == [], "diagrams/ is stale: run `lifecycle diagrams` and commit the result"


def test_a_changed_or_missing_file_is_reported_stale(tmp_path: Path) -> None:
    write_all(tmp_path)
    assert stale(tmp_path) == []
    (tmp_path / "position.mmd").write_text("stateDiagram-v2\n", encoding="utf-8")
    (tmp_path / "transitions.md").unlink()
    assert stale(tmp_path) == ["position.mmd", "transitions.md"]


_STATE = re.compile(r"\b(" + "|".join(sorted(EXPECTED_STATES, key=len, reverse=True)) + r")\b")


def _edge_lines(text: str) -> list[tuple[list[str], str]]:
    """(the two states named, in order; the line) for every line that draws an edge."""
    out = []
    for line in text.splitlines():
        states = _STATE.findall(line)
        if len(states) == 2 and any(re.search(rf"\b{e}\b", line) for e in EXPECTED_EVENTS):
            out.append((states, line))
    return out


def test_every_expected_edge_and_guard_appears_in_every_view_and_no_other() -> None:
    views = {"mermaid": (mermaid(), 1), "dot": (dot(), 1), "markdown": (markdown(), 2)}  # markdown: diagram + table
    for name, (text, copies) in views.items():
        edges = _edge_lines(text)
        for row in EXPECTED:
            lines = [line for states, line in edges
                     if states == [row.source, row.dest] and re.search(rf"\b{row.event}\b", line)
                     and all(re.search(rf"\b{g}\b", line) for g in row.guards)]
            assert len(lines) == copies, \
                f"{name}: {row.source} -{row.event}-> {row.dest} {row.guards} drawn {len(lines)}x"
        assert len(edges) == copies * len(EXPECTED), f"{name} draws {len(edges)} edges, expected {len(EXPECTED)}"
        for state in EXPECTED_STATES:
            assert re.search(rf"\b{state}\b", text), f"{name} lacks state {state}"
    assert set(render_all()) == {"position.mmd", "position.dot", "position.svg", "transitions.md"}


def test_the_svg_draws_every_state_and_every_edge_of_the_table_once() -> None:
    """The page colours states and traces paths by these ids: one group per state, one per (source, dest)
    pair, whose tooltip names every event and guard of the pair's rows."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg().split("-->", 1)[1])
    ns = "{http://www.w3.org/2000/svg}"
    groups = {g.get("id"): g for g in root.iter(f"{ns}g")}
    assert {i for i in groups if i and i.startswith("state-")} == {f"state-{s}" for s in EXPECTED_STATES}
    pairs = {(row.source, row.dest) for row in EXPECTED}
    assert {i for i in groups if i and i.startswith("edge-")} == {f"edge-{a}-{b}" for a, b in pairs}
    for row in EXPECTED:
        title = groups[f"edge-{row.source}-{row.dest}"].find(f"{ns}title")
        assert title is not None and title.text is not None
        assert re.search(rf"\b{row.event}\b", title.text), (row, title.text)
        assert all(re.search(rf"\b{g}\b", title.text) for g in row.guards), (row, title.text)
