// The live page of position-lifecycle: a snapshot on connect, then pushed updates over one WebSocket.
// Every value from the service is set as text (textContent), never parsed as HTML.
"use strict";

const state = {
  positions: new Map(),   // id -> position (live)
  rows: new Map(),        // id -> <tr>
  ended: [],              // closure records, oldest first
  endedIds: new Set(),
  status: null,
  marks: {},              // account -> symbol -> mark
  table: [],              // the transition table: {source, event, dest, guards}
  symbols: {},
  selected: null,
  clockOffset: 0,         // server time - browser time, seconds
  ws: null,
};
// Measured by bench/page.py: the first render after the snapshot, and each update's handling + layout.
window.lifecyclePerf = { snapshotMs: null, firstRenderAt: null, updates: [], received: 0 };

const $ = (sel) => document.querySelector(sel);
const el = (tag, text, cls) => {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
};
const num = (v) => (v === null || v === undefined || v === "" ? null : Number(v));
const show = (v) => (v === null || v === undefined || v === "" ? "-" : String(v));
const money = (v) => (v === null || Number.isNaN(v) ? "-" : (v >= 0 ? "+" : "") + v.toFixed(2));
const ageText = (seconds) => {
  if (seconds < 0 || Number.isNaN(seconds)) return "-";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
};
const now = () => Date.now() / 1000 + state.clockOffset;
// Writing a cell only when its text changes keeps a status message over a thousand rows cheap to lay out.
const createdAt = (p) => (p.createdEpoch === undefined ? (p.createdEpoch = Date.parse(p.created_at) / 1000)
                                                       : p.createdEpoch);
const setText = (node, text) => { if (node.textContent !== text) node.textContent = text; };
const setClass = (node, cls) => { if (node.className !== cls) node.className = cls; };

// --- the WebSocket ------------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  state.ws = ws;
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    window.lifecyclePerf.received += 1;
    const started = performance.now();
    if (message.type === "snapshot") onSnapshot(message);
    else if (message.type === "update") onUpdate(message);
    else if (message.type === "status") onStatus(message);
    const handled = performance.now();
    requestAnimationFrame(() => {
      const painted = performance.now();
      if (message.type === "snapshot") {
        window.lifecyclePerf.snapshotMs = painted - started;
        window.lifecyclePerf.firstRenderAt = painted;
      } else {
        window.lifecyclePerf.updates.push({ type: message.type, handleMs: handled - started, frameMs: painted - started });
        if (window.lifecyclePerf.updates.length > 5000) window.lifecyclePerf.updates.shift();
      }
    });
  };
  ws.onopen = () => setConnection("live", "ok");
  ws.onclose = async () => {
    document.body.dataset.connected = "0";
    setConnection("disconnected: reconnecting", "bad");
    try {  // a session the service no longer accepts (the token changed): back to the login form
      const answer = await fetch("/diagram.svg", { method: "HEAD", credentials: "same-origin" });
      if (answer.status === 401) { location.assign("/"); return; }
    } catch (e) { /* the service is down: try again */ }
    setTimeout(connect, 1000);
  };
}

function setConnection(text, kind) {
  const badge = $("#connection");
  badge.textContent = text;
  badge.className = `badge ${kind}`;
}

// --- messages -----------------------------------------------------------------------------------------

function onSnapshot(m) {
  state.clockOffset = m.at - Date.now() / 1000;
  state.table = m.table;
  state.symbols = m.symbols;
  state.positions.clear();
  state.rows.clear();
  $("#positions tbody").replaceChildren();
  const fragment = document.createDocumentFragment();
  for (const p of m.positions) {
    state.positions.set(p.id, p);
    fragment.appendChild(makeRow(p));
  }
  $("#positions tbody").appendChild(fragment);
  state.ended = [];
  state.endedIds.clear();
  $("#ended tbody").replaceChildren();
  addEnded(m.ended);
  $("#feed").replaceChildren();
  untracked.length = 0;
  addRecords(m.records);
  fillOpenForm();
  onStatus(m);
  updateCounts();
  document.body.dataset.connected = "1";
}

function onUpdate(m) {
  for (const p of m.positions) {
    const known = state.positions.get(p.id);
    state.positions.set(p.id, p);
    if (known) updateRow(state.rows.get(p.id), p);
    else $("#positions tbody").prepend(makeRow(p));
  }
  for (const id of m.gone) {
    state.positions.delete(id);
    const row = state.rows.get(id);
    if (row) row.remove();
    state.rows.delete(id);
  }
  addEnded(m.ended);
  addRecords(m.records);
  updateCounts();
  for (const r of m.ended || []) {  // an ended row shows when it appeared, like a state change
    const row = document.querySelector(`#ended tbody tr[data-id="${CSS.escape(r.position_id)}"]`);
    if (row) row.dataset.changedAt = String(Date.now());
  }
  if (state.selected && (m.gone.includes(state.selected) || m.positions.some((p) => p.id === state.selected))) {
    select(state.selected);
  }
}

function onStatus(m) {
  state.clockOffset = m.at - Date.now() / 1000;
  state.status = m;
  state.marks = m.marks || {};
  for (const [id, row] of state.rows) {
    const p = state.positions.get(id);
    const mark = (state.marks[p.account] || {})[p.symbol];
    if (mark !== undefined) p.mark = mark;
    updateMarkCells(row, p);
  }
  renderHealth(m);
  $("#clock").textContent = new Date(m.at * 1000).toISOString().slice(11, 19) + " UTC";
}

// --- positions ----------------------------------------------------------------------------------------

function makeRow(p) {
  const tr = document.createElement("tr");
  tr.dataset.id = p.id;
  for (const name of ["account", "symbol", "side", "size", "entry", "mark", "stop", "trailing", "upnl", "age",
                      "state", "protected", "action"]) {
    const td = el("td", null, name);
    if (["size", "entry", "mark", "stop", "upnl"].includes(name)) td.classList.add("num");
    tr.appendChild(td);
  }
  const button = el("button", "Close", "close");
  button.type = "button";
  button.addEventListener("click", (event) => { event.stopPropagation(); confirmClose(p.id); });
  tr.cells[12].appendChild(button);
  tr.addEventListener("click", () => select(p.id));
  state.rows.set(p.id, tr);
  updateRow(tr, p);
  return tr;
}

function updateRow(tr, p) {
  const c = tr.cells;
  setText(c[0], p.account);
  setText(c[1], p.symbol);
  setText(c[2], p.side);
  setText(c[3], show(p.quantity));
  setText(c[4], show(p.entry_price));
  setText(c[6], show(p.stop_price));
  const t = p.trailing;
  setText(c[7], !t ? "-" : t.active ? `active, watermark ${show(t.watermark)}, ${show(t.callback_rate)}%`
                                    : `at ${show(t.activation_price)}, ${show(t.callback_rate)}%`);
  if (tr.dataset.state !== p.state) {
    c[10].replaceChildren(el("span", p.state, `state s-${p.state}`));
    tr.dataset.state = p.state;
    tr.dataset.changedAt = String(Date.now());  // when this browser showed the state (tests measure it)
  }
  updateMarkCells(tr, p);
}

function updateMarkCells(tr, p) {
  const c = tr.cells;
  setText(c[5], show(p.mark));
  const entry = num(p.entry_price), mark = num(p.mark), qty = num(p.quantity);
  const pnl = entry === null || mark === null || qty === null ? null : (mark - entry) * qty * (p.side === "long" ? 1 : -1);
  setText(c[8], money(pnl));
  setClass(c[8], `upnl num ${pnl === null ? "" : pnl >= 0 ? "pos" : "neg"}`);
  setText(c[9], ageText(now() - createdAt(p)));
  const account = state.status && state.status.accounts[p.account];
  const missing = account ? account.unprotected.includes(p.id) : false;
  const holds = p.state === "OPEN" || p.state === "TS_ACTIVE";
  setText(c[11], !holds ? "-" : missing ? "MISSING" : p.stop_price ? "yes" : "pending");
  setClass(c[11], `protected ${holds && missing ? "neg" : ""}`);
}

// --- ended positions ----------------------------------------------------------------------------------

const KEEP_ENDED = 500;

function addEnded(closures) {
  if (!closures || !closures.length) return;
  while (state.ended.length + closures.length > KEEP_ENDED && state.ended.length) {
    state.endedIds.delete(state.ended.shift().position_id);  // the counts follow the rows listed
  }
  const body = $("#ended tbody");
  const fragment = document.createDocumentFragment();
  for (const r of closures) {
    if (state.endedIds.has(r.position_id)) continue;
    state.endedIds.add(r.position_id);
    state.ended.push(r);
    const tr = document.createElement("tr");
    tr.dataset.id = r.position_id;
    const pnl = num(r.net_pnl !== undefined && r.net_pnl !== null ? r.net_pnl : r.pnl);
    const latency = r.detection_latency_ms;
    const cells = [show(r.closed_at || r.at).replace("T", " ").slice(0, 23), r.account, r.symbol, r.side,
                   show(r.quantity), null, show(r.cause), show(r.entry_price), show(r.exit_price), money(pnl),
                   show(r.fee), latency === null || latency === undefined ? "-" : `${Number(latency).toFixed(1)} ms`];
    cells.forEach((text, i) => {
      const td = el("td", text);
      if (i === 5) td.appendChild(el("span", r.state, `state s-${r.state}`));
      if (i === 9 && pnl !== null) td.className = `num ${pnl >= 0 ? "pos" : "neg"}`;
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => select(r.position_id));
    fragment.prepend(tr);
  }
  body.prepend(fragment);
  while (body.rows.length > KEEP_ENDED) body.deleteRow(body.rows.length - 1);
}

// --- the diagram --------------------------------------------------------------------------------------

async function loadDiagram() {
  const answer = await fetch("/diagram.svg", { credentials: "same-origin" });
  if (!answer.ok) return;
  $("#diagram").innerHTML = await answer.text(); // our own SVG, generated from the transition table
  updateCounts();
}

function updateCounts() {
  const counts = {};
  for (const p of state.positions.values()) counts[p.state] = (counts[p.state] || 0) + 1;
  for (const r of state.ended) counts[r.state] = (counts[r.state] || 0) + 1;
  document.querySelectorAll("#diagram g.state").forEach((g) => {
    const n = counts[g.dataset.state] || 0;
    const text = g.querySelector("text.count");
    if (text) text.textContent = n ? String(n) : "";
    g.classList.toggle("active", n > 0);
  });
  $("#live-count").textContent = String(state.positions.size);
}

// --- one position: its path and journal ----------------------------------------------------------------

async function select(id) {
  state.selected = id;
  for (const [rowId, row] of state.rows) row.classList.toggle("selected", rowId === id);
  $("#selected-id").textContent = id;
  const answer = await fetch(`/positions/${encodeURIComponent(id)}/journal`, { credentials: "same-origin" });
  if (state.selected !== id) return;
  const list = $("#timeline");
  if (!answer.ok) {
    list.replaceChildren(el("li", `no journal (${answer.status})`, "hint"));
    return;
  }
  const entries = await answer.json();
  document.querySelectorAll("#diagram .on-path").forEach((n) => n.classList.remove("on-path"));
  const items = [];
  for (const e of entries) {
    if (e.source) {
      const edge = document.getElementById(`edge-${e.source}-${e.dest}`);
      if (edge) edge.classList.add("on-path");
    }
    const node = document.getElementById(`state-${e.dest}`);
    if (node) node.classList.add("on-path");
    const row = state.table.find((t) => t.source === e.source && t.event === e.event && t.dest === e.dest);
    const guards = row && row.guards.length ? ` [${row.guards.join(", ")}: held]` : "";
    const li = el("li");
    li.appendChild(el("strong", `${e.source || "(created)"} → ${e.dest}`));
    li.appendChild(el("span", ` on ${e.event}${guards}${e.cause ? `, cause ${e.cause}` : ""}`));
    li.appendChild(el("div", e.at.replace("T", " ").slice(0, 23), "hint"));
    if (e.payload && Object.keys(e.payload).length) li.appendChild(el("div", JSON.stringify(e.payload), "payload"));
    items.push(li);
  }
  list.replaceChildren(...items);
}

// --- health, alerts, records ---------------------------------------------------------------------------

function renderHealth(m) {
  const box = $("#health");
  const alerts = [];
  let worst = "ok";
  const parts = [];
  for (const [name, a] of Object.entries(m.accounts || {})) {
    if (a.status !== "ok") worst = "degraded";
    for (const reason of a.reasons) alerts.push(`${name}: ${reason}`);
    const div = el("div", null, "health-account");
    div.appendChild(el("strong", `${name}: ${a.status}`, a.status === "ok" ? "pos" : "neg"));
    const ul = el("ul");
    for (const [stream, s] of Object.entries(a.streams)) {
      const age = s.last_item_age_s === null ? "no item yet" : `last item ${s.last_item_age_s} s ago`;
      ul.appendChild(el("li", `stream ${stream}: ${s.health}${a.doubted && stream !== "marks" ? " (doubted)" : ""}, `
                              + `${age}, ${s.reconnects} reconnect(s)`));
    }
    for (const [job, j] of Object.entries(a.jobs)) {
      ul.appendChild(el("li", `job ${job}: ${j.outcome}, ${j.age_s === null ? "-" : `${j.age_s} s ago`}, `
                              + `${j.duration_ms} ms`));
    }
    ul.appendChild(el("li", `storage: ${a.storage_backlog} write(s) waiting, ${a.storage_failures} failure(s)`));
    ul.appendChild(el("li", `protection: ${a.live_positions} live, ${a.unprotected.length} without a stop`));
    div.appendChild(ul);
    parts.push(div);
  }
  if (m.records_failing) alerts.push(`records cannot be written: ${m.records_failing}`);
  if (!m.started) alerts.push("the service is starting");
  box.replaceChildren(...parts);
  $("#alerts").replaceChildren(...alerts.map((a) => el("div", a, "alert")));
  for (const r of recentUntracked()) $("#alerts").appendChild(el("div", r, "alert"));
  const overall = $("#overall");
  overall.textContent = worst;
  overall.className = `badge ${worst === "ok" ? "ok" : "bad"}`;
}

const untracked = [];
function recentUntracked() { return untracked.slice(-5); }

function actionError(text) {  // kept until dismissed: a refused close must not flash by with the next status
  const item = el("div", text, "alert");
  const dismiss = el("button", "dismiss", "dismiss");
  dismiss.type = "button";
  dismiss.addEventListener("click", () => item.remove());
  item.appendChild(dismiss);
  $("#action-errors").appendChild(item);
}

function addRecords(records) {
  if (!records || !records.length) return;
  const feed = $("#feed");
  const fragment = document.createDocumentFragment();
  for (const r of records) {
    if (r.event === "untracked_position") {
      if (untracked.length >= 50) untracked.shift();
      untracked.push(`${r.account}: untracked ${r.side} ${r.quantity} ${r.symbol} on the venue (policy ${r.policy})`);
    }
    const detail = { ...r };
    for (const k of ["event", "account", "symbol", "position_id", "at"]) delete detail[k];
    fragment.prepend(el("li", `${show(r.at).slice(11, 23)} ${r.event} ${r.account || ""} ${r.symbol || ""} `
                              + `${r.position_id || ""} ${JSON.stringify(detail)}`));
  }
  feed.prepend(fragment);
  while (feed.children.length > 300) feed.lastElementChild.remove();
}

// --- actions ------------------------------------------------------------------------------------------

async function send(method, path, body) {
  const answer = await fetch(path, {
    method, credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Lifecycle-Page": "1" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await answer.json(); } catch (e) { data = null; }
  if (!answer.ok) throw new Error((data && data.error) || `the service answered ${answer.status}`);
  return data;
}

function confirmClose(id) {
  const p = state.positions.get(id);
  if (!p) return;
  const dialog = $("#confirm");
  $("#confirm-text").textContent = `Close ${p.side} ${p.quantity} ${p.symbol} (${p.account}) at market?`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      await send("POST", `/positions/${encodeURIComponent(id)}/close`, { reason: "operator" });
    } catch (e) {
      actionError(`close of ${p.symbol} ${id} refused: ${e.message}`);
    }
  };
  dialog.showModal();
}

function fillOpenForm() {
  const accounts = Object.keys(state.symbols);
  const accountSelect = $("#open-account");
  const chosen = accountSelect.value;
  if ([...accountSelect.options].map((o) => o.value).join(",") !== accounts.join(",")) {
    accountSelect.replaceChildren(...accounts.map((a) => { const o = el("option", a); o.value = a; return o; }));
    if (accounts.includes(chosen)) accountSelect.value = chosen;
  }
  const fillSymbols = () => {  // the options are replaced only when the list changed (a form being filled in
    const symbols = state.symbols[accountSelect.value] || [];  // keeps its choice across a new snapshot)
    const select = $("#open-symbol");
    if ([...select.options].map((o) => o.value).join(",") === symbols.join(",")) return;
    select.replaceChildren(...symbols.map((s) => { const o = el("option", s); o.value = s; return o; }));
  };
  accountSelect.onchange = fillSymbols;
  fillSymbols();
}

function setupOpenForm() {
  $("#open-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const body = {};
    for (const key of ["account", "symbol", "side", "quantity", "entry_price", "stop_loss_pct", "take_profit"]) {
      const value = String(form.get(key) || "").trim();
      if (value) body[key] = value;
    }
    if (form.get("trailing")) body.trailing = true;
    const result = $("#open-result");
    result.className = "result";
    result.textContent = "opening...";
    try {
      const p = await send("POST", "/positions", body);
      result.className = "result ok";
      result.textContent = `opened ${p.id}: ${p.state}`;
    } catch (e) {
      result.className = "result error";
      result.textContent = e.message;
    }
  });
}

setInterval(() => {  // ages move on between status messages too (a service that stopped pushing shows it)
  if (state.status && Date.now() / 1000 + state.clockOffset - state.status.at < 1.5) return;
  for (const [id, row] of state.rows) {
    const p = state.positions.get(id);
    setText(row.cells[9], ageText(now() - createdAt(p)));
  }
}, 1000);

setupOpenForm();
loadDiagram();
connect();
