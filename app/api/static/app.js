// The service's page: read-only views over the public API. Data is always written with textContent
// or SVG attributes, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function headers() {
  const key = $("key").value || sessionStorage.getItem("spartan-key") || "";
  const h = { "content-type": "application/json" };
  if (key) h.authorization = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    throw new Error(`${response.status} ${error.type || ""}: ${error.message || response.statusText}`);
  }
  return body;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function size(bytes) {
  return bytes == null ? "-" : (bytes / 1048576).toFixed(2) + " MiB";
}

async function loadTasks() {
  const body = $("tasks").tBodies[0];
  try {
    const listing = await api("/v1/tasks");
    body.replaceChildren();
    const select = $("task");
    const chosen = params.get("task") || select.value;
    select.replaceChildren();
    for (const task of listing.tasks) {
      const row = body.insertRow();
      row.dataset.task = task.name;
      cell(row, task.name);
      cell(row, task.task_type || "-");
      cell(row, task.labels.length > 4 ? `${task.labels.length} labels` : task.labels.join(", "));
      cell(row, (task.version || "").slice(0, 12)).title = task.version || "";
      cell(row, task.status);
      cell(row, size(task.status === "loaded" ? task.memory_bytes : task.file_bytes), "num");
      cell(row, String(Object.values(task.requests).reduce((a, b) => a + b, 0)), "num");
      const option = new Option(task.name, task.name, false, task.name === chosen);
      select.add(option);
    }
    $("tasks-error").textContent = "";
  } catch (err) {
    $("tasks-error").textContent = String(err.message);
  }
}

async function predict() {
  const out = $("prediction");
  out.replaceChildren();
  const task = $("task").value;
  try {
    const result = await api(`/v1/tasks/${encodeURIComponent(task)}/predict`, {
      method: "POST",
      body: JSON.stringify({ inputs: [$("text").value], return_all_scores: true }),
    });
    const p = result.predictions[0];
    const head = document.createElement("p");
    const label = document.createElement("strong");
    label.id = "prediction-label";
    label.textContent = p.label ?? String(p.value);
    head.append("→ ", label, p.score == null ? "" : ` (${(100 * p.score).toFixed(1)}%)`);
    out.append(head);
    if (p.scores) {
      const table = document.createElement("table");
      const ranked = Object.entries(p.scores).sort((a, b) => b[1] - a[1]).slice(0, 10);
      for (const [name, score] of ranked) {
        const row = table.insertRow();
        cell(row, name);
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.style.width = `${Math.round(200 * score)}px`;
        row.insertCell().append(bar);
        cell(row, (100 * score).toFixed(1) + "%", "num");
      }
      out.append(table);
    }
    const version = document.createElement("p");
    version.append("memory version ", Object.assign(document.createElement("code"), { textContent: result.version.slice(0, 12) }));
    out.append(version);
    await loadTasks();
    await showRouting();
  } catch (err) {
    out.append(Object.assign(document.createElement("p"), { className: "error", textContent: err.message }));
  }
}

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, String(v));
  return node;
}

// One layer: rows = predicted labels seen so far (the most frequent 12), columns = parents; colour = share of the
// label's parent choices that went to the parent.
function heatmap(layer, labels, numParents) {
  const used = (l) => (layer.counts[l] || []).some((count) => count > 0);
  const rows = labels.filter(used).slice(0, 12);
  const size = 14, left = 90, top = 4;
  const width = left + numParents * size + 4, height = top + rows.length * size + 4;
  const root = svg("svg", { class: "heatmap", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  rows.forEach((label, r) => {
    const counts = layer.counts[label];
    const total = counts.reduce((a, b) => a + b, 0) || 1;
    const text = svg("text", { x: left - 4, y: top + r * size + 11, "text-anchor": "end", "font-size": 10 });
    text.textContent = label.length > 14 ? label.slice(0, 13) + "…" : label;
    root.append(text);
    counts.forEach((count, parent) => {
      const share = count / total;
      const light = Math.round(97 - 60 * Math.min(1, share * 4));
      const rect = svg("rect", { x: left + parent * size, y: top + r * size, width: size - 1, height: size - 1,
                                 fill: `hsl(215 60% ${light}%)` });
      const tip = svg("title", {});
      tip.textContent = `${label}, parent ${parent}: ${count} (${(100 * share).toFixed(1)}%)`;
      rect.append(tip);
      root.append(rect);
    });
  });
  return root;
}

async function showRouting() {
  const task = $("task").value;
  const box = $("routing");
  box.replaceChildren();
  try {
    const routing = await api(`/v1/tasks/${encodeURIComponent(task)}/routing`);
    $("routing-summary").textContent = `${routing.task}: ${routing.rows} rows, ${routing.tokens} tokens since version `
      + `${routing.version.slice(0, 12)}; ${routing.num_parents} parents, top-${routing.top_k}.`;
    const byUse = [...routing.labels].sort((a, b) => total(routing, b) - total(routing, a));
    for (const layer of routing.layers) {
      const figure = document.createElement("figure");
      figure.className = "layer";
      figure.append(heatmap(layer, byUse, routing.num_parents));
      const caption = document.createElement("figcaption");
      caption.textContent = `layer ${layer.layer}: entropy ${layer.parent_entropy_bits.toFixed(2)} bits, `
        + `I(parent; label) ${layer.mutual_information_bits.toFixed(3)} bits`;
      figure.append(caption);
      box.append(figure);
    }
  } catch (err) {
    $("routing-summary").textContent = err.message;
  }
}

function total(routing, label) {
  return routing.layers.length ? (routing.layers[0].counts[label] || []).reduce((a, b) => a + b, 0) : 0;
}

async function start() {
  $("key").addEventListener("change", () => { sessionStorage.setItem("spartan-key", $("key").value); loadTasks(); });
  $("predict").addEventListener("click", predict);
  $("routing-refresh").addEventListener("click", showRouting);
  $("task").addEventListener("change", showRouting);
  try {
    const models = await api("/v1/models");
    $("backbone").textContent = "backbone " + models.data.map((m) => m.id).join(", ");
  } catch (err) { /* the listing needs a key: the tasks table says so */ }
  await loadTasks();
  if (params.get("text")) $("text").value = params.get("text");
  if (params.get("task")) await predict();
  document.body.dataset.ready = "true";
}

start();
