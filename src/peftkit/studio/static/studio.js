// peftkit studio: the pages' behaviour. No framework, no build step; charts are drawn on <canvas> and in SVG here.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const token = new URLSearchParams(location.search).get("token") || sessionStorage.getItem("peftkit-token") || "";
if (token) sessionStorage.setItem("peftkit-token", token);
const COLORS = ["#2d6cdf", "#e8710a", "#1e8e3e", "#d93025", "#9334e6", "#12b5cb", "#f9ab00", "#5f6368"];
const PARTS = {weights_frozen: "#9aa0a6", quant_constants: "#c5cae9", weights_trainable: "#2d6cdf",
  gradients: "#e8710a", optimizer_device: "#1e8e3e", activations: "#9334e6", logits_loss: "#f9ab00",
  temp_weights: "#12b5cb"};

// ---- helpers

async function api(path, body) {
  const opts = {headers: {}};
  if (token) opts.headers.Authorization = "Bearer " + token;
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const j = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(typeof j.error === "string" ? j.error : (j.error && j.error.message) || r.statusText);
  return j;
}

function showError(e) {
  const box = $("#error");
  box.hidden = !e;
  box.textContent = e ? String(e.message || e) : "";
}

async function guarded(fn) {
  try { showError(null); return await fn(); } catch (e) { showError(e); }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node[k] = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const gib = (b) => b >= 2 ** 30 ? (b / 2 ** 30).toFixed(2) + " GiB" : (b / 2 ** 20).toFixed(1) + " MiB";
const num = (n) => n == null ? "" : Number(n).toLocaleString("en-US", {maximumFractionDigits: 4});
const formData = (form) => Object.fromEntries([...form.elements].filter((e) => e.name)
  .map((e) => [e.name, e.type === "checkbox" ? e.checked : e.value]));

function table(node, head, rows) {
  node.replaceChildren(el("tr", {}, ...head.map((h) => el("th", {}, h))),
    ...rows.map((r) => el("tr", r.attrs || {}, ...r.cells.map((c) => el("td", {}, c)))));
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => el("option", {value: v}, v)));
  if (chosen !== undefined) select.value = chosen;
}

// A line chart on a canvas: series = [{name, color, points: [[x, y], ...]}].
function lineChart(canvas, series, title) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 40;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  ctx.fillStyle = "#1d232b"; ctx.font = "12px system-ui"; ctx.fillText(title, pad, 14);
  if (!pts.length) return;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = (x) => pad + (x - x0) / (x1 - x0) * (W - pad - 10), Y = (y) => H - 22 - (y - y0) / (y1 - y0) * (H - 50);
  ctx.strokeStyle = "#d9dde3"; ctx.strokeRect(pad, 24, W - pad - 10, H - 46);
  ctx.fillStyle = "#667";
  ctx.fillText(num(y1.toPrecision(3)), 2, 30); ctx.fillText(num(y0.toPrecision(3)), 2, H - 22);
  ctx.fillText(x0, pad, H - 6); ctx.fillText(x1, W - 30, H - 6);
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color || COLORS[i % COLORS.length]; ctx.lineWidth = 1.5; ctx.beginPath();
    s.points.filter((p) => Number.isFinite(p[1])).forEach(([x, y], j) => j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y)));
    ctx.stroke();
    if (series.length > 1 && s.points.length) { ctx.fillStyle = ctx.strokeStyle; ctx.fillText(s.name, W - 160, 38 + 14 * i); }
  });
}

// A horizontal stacked bar in SVG: parts = [[label, bytes, color]], with a marker at `limit` bytes.
function stackedBar(parts, limit, label) {
  const total = parts.reduce((a, p) => a + p[1], 0), scale = Math.max(total, limit) * 1.05, W = 900;
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} 74`); svg.setAttribute("width", "100%");
  const add = (tag, a, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(a)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    svg.append(n); return n;
  };
  let x = 0;
  parts.forEach(([name, bytes, color], i) => {
    const w = bytes / scale * W;
    add("rect", {x, y: 4, width: w, height: 26, fill: color}).append(document.createElementNS(ns, "title"));
    svg.lastChild.firstChild.textContent = `${name}: ${gib(bytes)}`;
    add("rect", {x: (i % 4) * 225, y: 40 + 16 * Math.floor(i / 4), width: 10, height: 10, fill: color});
    add("text", {x: (i % 4) * 225 + 14, y: 49 + 16 * Math.floor(i / 4), "font-size": 11}, `${name} ${gib(bytes)}`);
    x += w;
  });
  const lx = limit / scale * W;
  add("line", {x1: lx, x2: lx, y1: 0, y2: 34, stroke: "#b3261e", "stroke-width": 2});
  add("text", {x: Math.max(0, lx - 180), y: 12, "font-size": 11, fill: "#b3261e"}, label);
  return svg;
}

// ---- tabs

function show(page) {
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== page; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("on", b.dataset.page === page));
  location.hash = page;
  if (page === "train" || page === "compare" || page === "use") refreshRuns();
}

// ---- plan

let planTimer = null, options = null, compareTables = [];

function planBody() {
  const f = formData($("#plan-form"));
  return {...f, quant: f.quant || null, device_memory: f.device_memory || null,
    batch_size: Number(f.batch_size), seq_len: Number(f.seq_len)};
}

function qualityOf(method) {  // quality and forgetting from `peftkit compare` tables in the workspace
  for (const t of compareTables) {
    const row = t.rows.find((r) => r.method === method || r.label === method);
    if (row) return [row.BLEU ?? row.bleu ?? "", row.probe_loss_increase ?? ""];
  }
  return ["", ""];
}

async function updatePlan() {
  const p = await api("/api/plan", planBody());
  const c = p.chosen, pct = 100 * c.trainable / p.model.params;
  $("#plan-summary").textContent = `${p.model.name}: ${num(c.trainable)} trainable of ${num(p.model.params)} ` +
    `parameters (${pct.toFixed(3)}%) · peak ${gib(c.peak_bytes)} of ${gib(p.device.bytes)} ${p.device.label}` +
    ` · ${p.device.fits ? "fits" : "DOES NOT FIT"} · ${p.precision}`;
  const parts = Object.entries(c.components).filter(([, b]) => b > 0).map(([k, b]) => [k.replace(/_/g, " "), b, PARTS[k]]);
  $("#plan-bar").replaceChildren(stackedBar(parts, p.device.bytes, `${p.device.label} ${gib(p.device.bytes)}`));
  const peak = Math.max(...p.methods.map((m) => m.peak_bytes), 1);
  table($("#plan-methods"), ["method", "trainable", "% of base", "peak memory", "", "quality (BLEU)", "forgetting"],
    p.methods.map((m) => ({
      attrs: {class: m.method === $("#plan-form").method.value ? "chosen pick" : "pick",
        onclick: () => { $("#plan-form").method.value = m.method; schedulePlan(); }},
      cells: [m.method, m.notes.some((n) => n.startsWith("not applicable")) ? m.notes[0] : num(m.trainable),
        (100 * m.trainable / p.model.params).toFixed(3), gib(m.peak_bytes),
        el("div", {class: "bar"}, el("div", {style: `width:${100 * m.peak_bytes / peak}%`})), ...qualityOf(m.method)],
    })));
}

function schedulePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(() => guarded(updatePlan), 200);
}

// ---- data

async function inspectData(ev) {
  if (ev) ev.preventDefault();
  const f = formData($("#data-form"));
  const d = await api("/api/data", {...f, template: f.template || null, max_length: Number(f.max_length)});
  $("#data-summary").textContent = `${d.examples} examples from ${d.rows_read} rows: ${num(d.target_tokens)} loss ` +
    `tokens, ${num(d.prompt_tokens)} prompt tokens; truncated ${d.truncated}, dropped ${d.dropped}; ` +
    `${d.packing.rows} packed rows (${(100 * d.packing.fill).toFixed(0)}% full), ` +
    `${num(d.packing.prefix_tokens_saved)} tokens saved by shared prefixes`;
  $("#data-bad").replaceChildren(...(d.bad_rows || d.rejected ? [el("p", {class: "err"},
    `${d.bad_rows + d.rejected} bad rows skipped`), ...d.bad_reasons.map((r) => el("div", {class: "err"}, r))] : []));
  $("#data-lengths").replaceChildren(histogram(d.lengths, Number(f.max_length)));
  $("#data-packing").replaceChildren(packingBars(d.packing.first_rows, Number(f.max_length)));
  $("#data-rows").replaceChildren(...d.rows.map((r) => el("div", {class: "row"}, el("span", {class: "where"}, r.where),
    ...(r.tokens ? r.tokens.map(([t, loss]) => el("span", {class: loss ? "tok loss" : "tok"}, t))
      : [el("span", {class: "err"}, "dropped (over max length, or the template rejects it)")]))));
}

function histogram(values, max) {
  const c = el("canvas", {width: 420, height: 160}), ctx = c.getContext("2d"), bins = 24;
  const counts = new Array(bins).fill(0);
  values.forEach((v) => counts[Math.min(bins - 1, Math.floor(v / max * bins))]++);
  const top = Math.max(...counts, 1);
  ctx.fillStyle = "#2d6cdf";
  counts.forEach((n, i) => ctx.fillRect(10 + i * 16, 140 - n / top * 120, 14, n / top * 120));
  ctx.fillStyle = "#667"; ctx.font = "11px system-ui";
  ctx.fillText("0", 10, 155); ctx.fillText(String(max), 380, 155); ctx.fillText(`${top} max`, 10, 12);
  return c;
}

function packingBars(rows, max) {
  const c = el("canvas", {width: 420, height: 14 * rows.length + 10}), ctx = c.getContext("2d"), s = 400 / max;
  rows.forEach((r, i) => {
    let x = 10;
    ctx.fillStyle = "#9aa0a6"; ctx.fillRect(x, 5 + i * 14, r.prefix * s, 10); x += r.prefix * s;
    r.examples.forEach((n, j) => { ctx.fillStyle = COLORS[j % COLORS.length]; ctx.fillRect(x, 5 + i * 14, n * s - 1, 10); x += n * s; });
  });
  return c;
}

// ---- train

let runList = [], source = null, records = [], current = null, drawPending = false;
const CHARTS = [["loss", ["loss", "eval_loss"]], ["learning rate", ["lr"]], ["grad norm", ["grad_norm"]],
  ["target tokens/s", ["target_tokens_per_s"]], ["MFU", ["mfu"]]];

async function refreshRuns() {
  runList = (await api("/api/runs")).runs;
  table($("#runs"), ["run", "status", "step", "method", "model", ""], runList.map((r) => ({
    attrs: {class: r.id === current ? "chosen pick" : "pick", onclick: () => selectRun(r.id)},
    cells: [r.id, el("span", {class: "status-" + r.status}, r.status), r.total_steps ? `${r.step} / ${r.total_steps}` : r.step,
      r.method || "", r.model || "", r.error || ""],
  })));
  const pick = (node, filter) => node.replaceChildren(...runList.filter(filter).map((r) =>
    el("label", {}, el("input", {type: "checkbox", value: r.id}), ` ${r.id} `)));
  pick($("#compare-pick"), () => true);
  pick($("#use-pick"), (r) => r.adapter);
  fillSelect($("#export-run"), runList.filter((r) => r.adapter).map((r) => r.id));
}

function launchBody() {
  const f = formData($("#train-form")), recipe = {data: f.data, model: f.model, method: f.method,
    lr: Number(f.lr), batch_size: Number(f.batch_size), max_length: Number(f.max_length)};
  if (f.max_steps) recipe.max_steps = Number(f.max_steps);
  const overrides = [...f.settings.split(/\s+/).filter(Boolean).map((s) => "method_config." + s),
    ...f.extra.split(/\s+/).filter(Boolean)];
  return {name: f.name, recipe, overrides};
}

async function launch(ev) {
  ev.preventDefault();
  const run = await api("/api/runs", launchBody());
  await refreshRuns();
  selectRun(run.id);
}

function selectRun(id) {
  if (source) source.close();
  current = id; records = [];
  sessionStorage.setItem("peftkit-run", id);  // a reload opens it again (its history comes back from offset 0)
  $("#run-view").hidden = false; $("#run-title").textContent = id;
  $("#charts").replaceChildren(...CHARTS.map(([title]) => el("canvas", {width: 380, height: 200, "data-title": title})));
  draw();
  const q = new URLSearchParams({run: id, offset: 0});
  if (token) q.set("token", token);
  source = new EventSource("/api/runs/metrics?" + q);
  source.onmessage = (e) => { records.push(...JSON.parse(e.data)); scheduleDraw(); };
  source.addEventListener("reset", () => { records = []; scheduleDraw(); });
  source.addEventListener("status", (e) => showStatus(JSON.parse(e.data)));
  document.querySelectorAll("#runs tr").forEach((tr) => tr.classList.toggle("chosen", tr.cells[0].textContent === id));
}

function showStatus(s) {
  $("#run-status").textContent = `${s.status} · step ${s.step}${s.total_steps ? " of " + s.total_steps : ""}`;
  $("#run-status").className = "status-" + s.status;
  $("#run-error").textContent = s.error || "";
  $("#run-stop").disabled = s.status !== "running";
  $("#run-resume").disabled = s.status === "running" || s.status === "finished" || !s.resumable;
  refreshRuns().catch(showError);
}

function scheduleDraw() {
  if (!drawPending) { drawPending = true; requestAnimationFrame(() => { drawPending = false; draw(); }); }
}

function draw() {
  const evalNames = [...new Set(records.flatMap((r) => Object.keys(r)).filter((k) => k.startsWith("eval_") && k !== "eval_loss"))];
  const charts = [...CHARTS, ...evalNames.map((k) => [k, [k]])];
  const canvases = $("#charts");
  while (canvases.children.length < charts.length) canvases.append(el("canvas", {width: 380, height: 200}));
  charts.forEach(([title, keys], i) => lineChart(canvases.children[i], keys.map((k) => ({name: k,
    points: records.filter((r) => typeof r[k] === "number").map((r) => [r.step, r[k]])})), title));
}

async function control(action) {
  showStatus(await api("/api/runs/" + action, {run: current}));
  if (action === "resume") selectRun(current);
}

// ---- compare

async function compareRuns() {
  const chosen = [...document.querySelectorAll("#compare-pick input:checked")].map((i) => i.value);
  const d = await api("/api/compare", {runs: chosen});
  lineChart($("#compare-chart"), d.runs.map((r) => ({name: r.id, points: r.curve.map((p) => [p.step, p.loss])})),
    "training loss");
  const keys = [...new Set(d.runs.flatMap((r) => Object.keys(r.final)))];
  table($("#compare-table"), ["run", ...keys.map((k) => k.replace(/_/g, " "))], d.runs.map((r) => ({
    cells: [r.id, ...keys.map((k) => k === "estimated_peak_bytes" && r.final[k] ? gib(r.final[k])
      : typeof r.final[k] === "number" ? num(r.final[k]) : r.final[k] ?? "")]})));
}

async function loadCompareResults() {
  compareTables = (await api("/api/compare/results")).tables;
  $("#compare-results").replaceChildren(...compareTables.map((t) => {
    const keys = [...new Set(t.rows.flatMap((r) => Object.keys(r)))].filter((k) => typeof t.rows[0][k] !== "object");
    const node = el("table");
    table(node, keys, t.rows.map((r) => ({cells: keys.map((k) => typeof r[k] === "number" ? num(r[k]) : r[k] ?? "")})));
    return el("div", {}, el("h2", {}, "peftkit compare: " + t.path), node);
  }));
}

// ---- use

let served = [];

async function loadModels() {
  const runs = [...document.querySelectorAll("#use-pick input:checked")].map((i) => i.value);
  $("#use-models").textContent = "loading...";
  const d = await api("/api/use/load", {runs});
  served = d.models;
  $("#use-models").textContent = "serving: " + served.join(", ");
}

async function ask(model, prompt, maxTokens) {
  const box = el("div", {class: "answer"}, el("b", {}, model), "...");
  $("#use-answers").append(box);
  try {
    const r = await api("/api/use/serve/v1/chat/completions",
      {model, messages: [{role: "user", content: prompt}], max_tokens: maxTokens});
    box.lastChild.textContent = r.choices[0].message.content;
  } catch (e) { box.lastChild.textContent = e.message; box.classList.add("err"); }
}

async function sendAll() {
  if (!served.length) await loadModels();
  $("#use-answers").replaceChildren();
  await Promise.all(served.map((m) => ask(m, $("#use-prompt").value, Number($("#use-max").value))));
}

async function exportRun() {
  let job = await api("/api/use/export", {run: $("#export-run").value, kind: $("#export-kind").value});
  const bar = el("div", {class: "bar busy"}, el("div")), line = el("span"), box = el("div", {}, bar, line);
  $("#export-progress").replaceChildren(box);
  while (job.status === "running") {
    line.textContent = ` ${job.kind} of ${job.run} to ${job.output}: ${job.seconds} s ${job.line}`;
    await new Promise((ok) => setTimeout(ok, 700));
    job = await api("/api/use/jobs?id=" + job.id);
  }
  bar.classList.remove("busy"); bar.firstChild.style.width = "100%";
  line.textContent = job.status === "done" ? ` done in ${job.seconds} s: ${job.output}` : ` failed: ${job.error}`;
  line.className = job.status === "done" ? "status-finished" : "err";
}

// ---- start

async function start() {
  document.querySelectorAll("#tabs button").forEach((b) => { b.onclick = () => show(b.dataset.page); });
  options = await api("/api/plan/options");
  const methods = Object.keys(options.methods);
  fillSelect($("#plan-form").method, methods, "lora");
  fillSelect($("#train-form").method, methods.filter((m) => !options.methods[m].preset_of), "lora");
  fillSelect($("#plan-form").precision, options.precisions, "auto");
  fillSelect($("#plan-form").optimizer, options.optimizers, "adamw");
  $("#plan-form").quant.append(...options.quants.map((q) => el("option", {value: q}, q)));
  $("#models").replaceChildren(...options.presets.map((p) => el("option", {value: p})));
  $("#workspace").textContent = "workspace: " + (await api("/api/workspace")).root;
  const files = (await api("/api/data/files")).files;
  $("#data-files").replaceChildren(...files.map((f) => el("option", {value: f})));
  if (files.length) { $("#data-form").path.value = files[0]; $("#train-form").data.value = files[0]; }
  $("#plan-form").oninput = schedulePlan;
  $("#plan-to-train").onclick = () => {
    const p = $("#plan-form"), t = $("#train-form"), preset = options.methods[p.method.value].preset_of;
    t.model.value = p.model.value; t.method.value = preset || p.method.value; t.settings.value = p.settings.value;
    t.batch_size.value = p.batch_size.value; t.max_length.value = p.seq_len.value;
    if (preset) t.extra.value = "quantize=nf4";
    $("#data-form").model.value = p.model.value;
    show("train");
  };
  $("#data-form").onsubmit = (e) => guarded(() => inspectData(e));
  $("#train-form").onsubmit = (e) => guarded(() => launch(e));
  $("#run-stop").onclick = () => guarded(() => control("stop"));
  $("#run-resume").onclick = () => guarded(() => control("resume"));
  $("#compare-go").onclick = () => guarded(compareRuns);
  $("#use-load").onclick = () => guarded(loadModels);
  $("#use-send").onclick = () => guarded(sendAll);
  $("#export-go").onclick = () => guarded(exportRun);
  await loadCompareResults();
  await updatePlan();
  show((location.hash || "#plan").slice(1));
  const last = sessionStorage.getItem("peftkit-run");
  if (last && (await api("/api/runs")).runs.some((r) => r.id === last)) selectRun(last);
}

guarded(start);
