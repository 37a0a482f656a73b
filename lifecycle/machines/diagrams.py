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


# The SVG view (drawn here, no Graphviz needed; the live page shows it with counts and paths on it). Where
# each state sits, in grid units (column, row); a state not placed here goes in a row of its own below.
# Edges between two states are drawn once, labelled with every event between them; the two directions of
# a pair bend to opposite sides.
_LAYOUT: dict[PositionState, tuple[float, float]] = {
    PositionState.PHANTOM: (0.5, 0), PositionState.CLOSED_EXTERNAL: (3, 0.3),
    PositionState.OPENING: (0, 1), PositionState.OPEN: (1, 1), PositionState.TS_ACTIVE: (2, 1),
    PositionState.CLOSING_BY_BOT: (1.5, 2),
    PositionState.CANCELLED: (0.3, 3), PositionState.CLOSED: (1.5, 3),
}
_BOX_W, _BOX_H, _UNIT_X, _UNIT_Y, _MARGIN = 150, 44, 230, 120, 40


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _border(cx: float, cy: float, tx: float, ty: float) -> tuple[float, float]:
    """Where the line from a box's centre (cx, cy) towards (tx, ty) leaves the box."""
    dx, dy = tx - cx, ty - cy
    if dx == 0 and dy == 0:
        return cx, cy
    scale = min(_BOX_W / 2 / abs(dx) if dx else float("inf"), _BOX_H / 2 / abs(dy) if dy else float("inf"))
    return cx + dx * scale, cy + dy * scale


def svg(table: tuple[Edge, ...] = TABLE) -> str:
    """A standalone SVG of the table: `id="state-NAME"` groups (with an empty `count-NAME` text for live
    counts) and `id="edge-SOURCE-DEST"` groups, so that a page can colour states and trace a path."""
    places = dict(_LAYOUT)
    extra = [s for s in PositionState if s not in places]
    bottom = max(row for _, row in places.values()) + 1
    for i, state in enumerate(extra):
        places[state] = (float(i), bottom)
    left = _MARGIN + 40 + _BOX_W / 2
    centre = {s: (left + col * _UNIT_X, _MARGIN + 30 + _BOX_H / 2 + row * _UNIT_Y) for s, (col, row) in places.items()}
    width = int(max(x for x, _ in centre.values()) + _BOX_W / 2 + _MARGIN)
    height = int(max(y for _, y in centre.values()) + _BOX_H / 2 + _MARGIN)
    pairs: dict[tuple[PositionState, PositionState], list[Edge]] = {}
    for edge in table:
        pairs.setdefault((edge.source, edge.dest), []).append(edge)
    out = [
        f"<!-- {HEADER} -->",
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="lifecycle-diagram" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" '
        'markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
    ]
    sx, sy = centre[INITIAL_STATE]
    out.append(f'<circle cx="{_MARGIN}" cy="{sy:.0f}" r="6" fill="#333"/>')
    out.append(f'<path class="initial" d="M{_MARGIN + 6},{sy:.0f} L{sx - _BOX_W / 2:.0f},{sy:.0f}" stroke="#333" '
               'fill="none" marker-end="url(#arrow)"/>')
    for (source, dest), edges in pairs.items():
        label = ", ".join(dict.fromkeys(e.event.value for e in edges))
        title = "; ".join(_label(e) for e in edges)
        x1, y1 = centre[source]
        x2, y2 = centre[dest]
        if source is dest:  # a loop at the box's bottom right corner
            ax, ay = x1 + _BOX_W / 2 - 30, y1 + _BOX_H / 2
            d = f"M{ax:.0f},{ay:.0f} C{ax:.0f},{ay + 34:.0f} {ax + 62:.0f},{ay + 20:.0f} {ax + 30:.0f},{ay - 12:.0f}"
            tx, ty = ax + 40, ay + 34
        else:  # a curve bent to the left of its direction, more where the opposite edge exists
            length = ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5
            bend = (0.2 if (dest, source) in pairs else 0.08) * length
            qx, qy = (x1 + x2) / 2 + (y2 - y1) / length * bend, (y1 + y2) / 2 - (x2 - x1) / length * bend
            ax, ay = _border(x1, y1, qx, qy)
            bx, by = _border(x2, y2, qx, qy)
            d = f"M{ax:.0f},{ay:.0f} Q{qx:.0f},{qy:.0f} {bx:.0f},{by:.0f}"
            tx, ty = 0.25 * ax + 0.5 * qx + 0.25 * bx, 0.25 * ay + 0.5 * qy + 0.25 * by + 4
        out.append(f'<g class="edge" id="edge-{source.value}-{dest.value}" data-source="{source.value}" '
                   f'data-dest="{dest.value}"><title>{_xml(title)}</title>'
                   f'<path d="{d}" stroke="#777" fill="none" marker-end="url(#arrow)"/>'
                   f'<text x="{tx:.0f}" y="{ty:.0f}" text-anchor="middle" font-size="10" fill="#444" '
                   f'stroke="#fff" stroke-width="3" paint-order="stroke">{_xml(label)}</text></g>')
    for state, (x, y) in centre.items():
        kind = "terminal" if state.is_terminal else "live"
        out.append(f'<g class="state {kind}" id="state-{state.value}" data-state="{state.value}">'
                   f'<rect x="{x - _BOX_W / 2:.0f}" y="{y - _BOX_H / 2:.0f}" width="{_BOX_W}" height="{_BOX_H}" '
                   f'rx="9" fill="#fff" stroke="#333" stroke-width="{2 if state.is_terminal else 1.3}"/>'
                   f'<text x="{x:.0f}" y="{y - 3:.0f}" text-anchor="middle" font-weight="bold">{state.value}</text>'
                   f'<text class="count" id="count-{state.value}" x="{x:.0f}" y="{y + 14:.0f}" '
                   'text-anchor="middle" font-size="11"></text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_all() -> dict[str, str]:
    """File name -> content, for every generated artefact."""
    return {"position.mmd": mermaid(), "position.dot": dot(), "position.svg": svg(), "transitions.md": markdown()}


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
