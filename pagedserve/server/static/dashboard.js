// The pagedserve dashboard: polls /dashboard/state and draws it. No dependencies.
"use strict";

const POLL_MS = 500;
const COLORS = { u: "#2563eb", c: "#16a34a", f: "#e5e7eb" };
const dashboard = { state: null, updates: 0 };
window.pagedserveDashboard = dashboard;

function apiKey() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromHash) sessionStorage.setItem("pagedserve-key", fromHash);
  return sessionStorage.getItem("pagedserve-key");
}

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function percent(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %";
}

function drawGrid(kv) {
  const canvas = document.getElementById("grid");
  const cells = kv.cells;
  const columns = cells.length > 2048 ? 128 : 64;
  const size = Math.max(2, Math.floor(canvas.width / columns));
  const rows = Math.ceil(cells.length / columns);
  canvas.height = rows * size;
  canvas.dataset.columns = columns;
  canvas.dataset.cellSize = size;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < cells.length; i++) {
    ctx.fillStyle = COLORS[cells[i]];
    ctx.fillRect((i % columns) * size, Math.floor(i / columns) * size, size - 1, size - 1);
  }
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content);
  else td.textContent = content; // ids come from clients: never parsed as HTML
  row.appendChild(td);
  return td;
}

function bar(done, total, kind, caption) {
  const wrapper = document.createElement("span");
  const outer = document.createElement("span");
  const inner = document.createElement("span");
  outer.className = `bar ${kind}`;
  inner.style.width = `${(100 * (total ? Math.min(1, done / total) : 0)).toFixed(1)}%`; // CSSOM: allowed by the CSP
  outer.appendChild(inner);
  wrapper.append(outer, " " + caption);
  return wrapper;
}

function requestName(r) {
  const id = r.id.length > 24 ? r.id.slice(0, 23) + "…" : r.id;
  return r.index ? `${id} #${r.index}` : id;
}

function fillTable(id, rows, columns, total) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    cell(tr, requestName(r)).title = r.id;
    for (const column of columns) cell(tr, column(r));
    body.appendChild(tr);
  }
  if (total > rows.length) {
    const tr = document.createElement("tr");
    cell(tr, `… and ${total - rows.length} more`).colSpan = 1 + columns.length;
    body.appendChild(tr);
  }
}

function render(state) {
  const kv = state.kv_cache;
  text("model", `${state.model} · max_model_len ${state.max_model_len}`);
  text("usage", percent(kv.usage));
  text("running-count", state.num_running);
  text("waiting-count", state.num_waiting);
  text("tokens-per-s", state.generation_tokens_per_s.toFixed(1));
  text("preemptions", state.num_preemptions);
  text("hit-rate", percent(state.prefix_cache_hit_rate));
  text("used-blocks", kv.used);
  text("cached-blocks", kv.cached_free);
  text("free-blocks", kv.free);
  const perCell = kv.blocks_per_cell > 1 ? `, a cell = ${kv.blocks_per_cell} blocks` : "";
  text("blocks-caption", `${kv.num_blocks} blocks of ${kv.block_size} tokens${perCell}`);
  drawGrid(kv);
  fillTable("running", state.running, [
    (r) => bar(Math.min(r.computed_tokens, r.prompt_tokens), r.prompt_tokens, "prefill", `${r.prompt_tokens}`),
    (r) => bar(r.output_tokens, r.max_tokens, "output", r.max_tokens ? `${r.output_tokens} / ${r.max_tokens}` : `${r.output_tokens}`),
    (r) => `${r.blocks}`,
  ], state.num_running);
  fillTable("waiting", state.waiting, [
    (r) => `${r.prompt_tokens}`, (r) => r.status, (r) => `${r.preemptions}`,
  ], state.num_waiting);
}

async function poll() {
  const key = apiKey();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  try {
    const response = await fetch("/dashboard/state", { headers, cache: "no-store" });
    if (response.status === 401) {
      document.getElementById("key-form").hidden = false;
      setStatus("needs the API key", true);
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    document.getElementById("key-form").hidden = true;
    dashboard.state = state;
    render(state);
    dashboard.updates += 1;
    document.body.dataset.updates = dashboard.updates;
    setStatus(`live · ${new Date(state.time * 1000).toLocaleTimeString()}`);
  } catch (error) {
    setStatus(`disconnected (${error.message})`, true);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("pagedserve-key", document.getElementById("key").value);
});

poll();
