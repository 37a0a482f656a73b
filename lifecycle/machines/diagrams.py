"""Mermaid, Graphviz and Markdown views of TABLE. Generated, committed, and checked for staleness."""
from __future__ import annotations

from pathlib import Path

from lifecycle.machines.states import PositionState
from lifecycle.machines.table import INITIAL_STATE, TABLE, Edge

HEADER = "generated from lifecycle/machines/table.py by `lifecycle diagrams`; do not edit"


def _label(edge: Edge) -> str:
    guards = " and ".join(edge.guard_names)
    return f"{edge.event.value} [{guards}]" if guards else edge.event.value


def mermaid(table: tuple[Edge, ...] = TABLE) -> str:
    lines = [f"%% {HEADER}", "stateDiagram-v2", f"    [*] --> {INITIAL_STATE.value}"]
    for edge in table:
        lines.append(f"    {edge.source.value} --> {edge.dest.value} : {_label(edge)}")
    for state in PositionState:
        if state.is_terminal:
            lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines) + "\n"


def dot(table: tuple[Edge, ...] = TABLE) -> str:
    lines = [
        f"// {HEADER}",
        "digraph position {",
        "    rankdir=LR;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
        "    __start [shape=point];",
    ]
    for state in PositionState:
        attrs = ', peripheries=2' if state.is_terminal else ""
        lines.append(f'    {state.value} [label="{state.value}"{attrs}];')
    lines.append(f"    __start -> {INITIAL_STATE.value};")
    for edge in table:
        lines.append(f'    {edge.source.value} -> {edge.dest.value} [label="{_label(edge)}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def markdown(table: tuple[Edge, ...] = TABLE) -> str:
    lines = [
        f"<!-- {HEADER} -->",
        "# Position transitions",
        "",
        f"Initial state: `{INITIAL_STATE.value}`. Terminal states (the cleanup hook runs on entry to each): "
        + ", ".join(f"`{s.value}`" for s in PositionState if s.is_terminal)
        + ".",
        "",
        "Every (state, event) pair not listed is refused: logged, counted, state unchanged.",
        "",
        "```mermaid",
        *mermaid(table).splitlines()[1:],
        "```",
        "",
        "Rows with the same source and event are alternatives tried in order; the first whose guards hold wins.",
        "",
        "| source | event | destination | guards | note |",
        "|---|---|---|---|---|",
    ]
    for edge in table:
        guards = ", ".join(f"`{g}`" for g in edge.guard_names) or "-"
        dest = f"{edge.dest.value} (internal)" if edge.internal else edge.dest.value
        lines.append(f"| {edge.source.value} | {edge.event.value} | {dest} | {guards} | {edge.note} |")
    lines += ["", "## States", "", "| state | terminal | events accepted |", "|---|---|---|"]
    for state in PositionState:
        events = sorted({e.event.value for e in table if e.source is state})
        lines.append(f"| {state.value} | {'yes' if state.is_terminal else 'no'} | {', '.join(events) or '-'} |")
    return "\n".join(lines) + "\n"


def render_all() -> dict[str, str]:
    """File name -> content, for every generated artefact."""
    return {"position.mmd": mermaid(), "position.dot": dot(), "transitions.md": markdown()}


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_all().items():
        path = directory / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of generated files that are missing or differ from what the code generates now."""
    out = []
    for name, content in render_all().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            out.append(name)
    return out
