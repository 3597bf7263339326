// stepdiff studio page: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const FINAL = new Set(["finished", "cancelled", "failed", "interrupted"]);
let current = null;        // the job this page follows (id)
let currentTotal = 0;
let steerTimer = null;
let oldest = null;         // history cursor
let socket = null;

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

async function api(path, options = {}) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = "Bearer " + token;
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { body, status: response.status });
  return body;
}

function showError(message) { $("error").textContent = message || ""; }

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function formJob() {
  const [w, h] = $("size").value.split("x").map(Number);
  const job = {
    prompt: $("prompt").value, negative_prompt: $("negative").value || null, seed: numberOrNull("seed"),
    steps: numberOrNull("steps"), width: w, height: h, guidance: numberOrNull("guidance"),
    scheduler: $("scheduler").value || null, cfg_cutoff: numberOrNull("cutoff"), fast: $("fast").checked,
    num_images: numberOrNull("num-images") || 1,
    preview: { every: numberOrNull("preview-every"), method: $("preview-method").value, source: "denoised" },
  };
  if (!$("model-label").hidden) job.model = $("model-select").value;
  return job;
}

async function upload(blob) {
  // A picture for a job: the canvas as PNG, read by the server as the CLI reads a file.
  const headers = { "content-type": "image/png" };
  if (token) headers.authorization = "Bearer " + token;
  const response = await fetch("/api/uploads", { method: "POST", body: blob, headers });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function useSettings(p) {
  $("prompt").value = p.prompt;
  $("negative").value = p.negative_prompt || "";
  $("seed").value = p.seed;
  $("steps").value = p.steps;
  const size = `${p.width}x${p.height}`;
  if (![...$("size").options].some((o) => o.value === size)) $("size").add(new Option(size, size));
  $("size").value = size;
  $("guidance").value = p.guidance;
  $("scheduler").value = p.scheduler || "";
  $("cutoff").value = p.cfg_cutoff === null ? "" : p.cfg_cutoff;
  $("fast").checked = Boolean(p.fast);
  const preview = p.preview || {};
  $("preview-every").value = preview.every ?? "";
  $("preview-method").value = preview.method || "auto";
  $("num-images").value = p.num_images || 1;
  $("strength").value = p.strength ?? "";
  if (p.control_scale != null) $("control-scale").value = p.control_scale;
  if (p.control_end != null) $("control-end").value = p.control_end;
  if (p.model && [...$("model-select").options].some((o) => o.value === p.model)) $("model-select").value = p.model;
  Inputs.setMode(p.control ? "control" : p.mask ? "inpaint" : p.init_image ? "image" : Inputs.mode());
  if (p.init_image || p.control) Inputs.load(withToken(`/api/uploads/${p.init_image || p.control}.png`)).catch(() => {});
  $("prompt").focus();
  checkWords();
}

async function generate() {
  showError("");
  try {
    const job = formJob();
    const inputs = await Inputs.fields(upload);
    if (inputs.init_image) { delete job.width; delete job.height; }
    const made = await api("/api/jobs", { method: "POST", body: JSON.stringify({ ...job, ...inputs }) });
    follow(made);
    return;
  } catch (e) {
    showError(e.message);
  }
}

function follow(job) {
  current = job.id;
  currentTotal = job.total;
  $("progress").max = job.total;
  $("progress").value = job.steps_completed;
  $("steer").value = job.guidance;
  $("steer-value").textContent = job.guidance;
  const p = job.params || {};
  $("steer-cutoff").value = p.cfg_cutoff ?? 1;
  $("steer-cutoff-value").textContent = p.cfg_cutoff ?? "none";
  $("steer-control-box").hidden = !p.control;
  if (p.control) { $("steer-control").value = p.control_scale; $("steer-control-value").textContent = p.control_scale; }
  const policies = cachePolicies(p);
  for (const [box, slider, value] of [["steer-cache-box", "steer-cache", policies.interval],
                                      ["steer-threshold-box", "steer-threshold", policies.threshold]]) {
    $(box).hidden = value == null;
    if (value != null) { $(slider).value = value; $(`${slider}-value`).textContent = value; }
  }
  $("rows-saved").textContent = job.rows_saved || 0;
  setRunning(!FINAL.has(job.state));
  $("status").textContent = job.state === "queued" ? `queued (position ${job.position})` : job.state;
  if (FINAL.has(job.state)) finished(job);
}

// The steerable step caching of a job: DeepCache's interval (fast: 3) and First-Block-Cache's threshold.
function cachePolicies(p) {
  const out = { interval: p.fast ? 3 : null, threshold: null };
  for (const part of (p.cache || "").split(",")) {
    const [name, value] = part.split(":");
    if (name === "deepcache") out.interval = Number(value);
    if (name === "fbc") out.threshold = Number(value);
  }
  return out;
}

function setRunning(running) {
  $("stop").disabled = !running;
  for (const id of Object.keys(steerFields)) $(id).disabled = !running;
  document.body.classList.toggle("running", running);
}

async function stop() {
  if (!current) return;
  try { await api(`/api/jobs/${current}/cancel`, { method: "POST" }); } catch (e) { showError(e.message); }
}

// Each slider steers the running job from its next step; the server records every change.
const steerFields = { steer: "guidance", "steer-cutoff": "cfg_cutoff", "steer-control": "control_scale",
                      "steer-cache": "cache_interval", "steer-threshold": "cache_threshold" };
function steer(e) {
  const id = current, slider = e.target.id, field = steerFields[slider];
  $(`${slider}-value`).textContent = $(slider).value;
  clearTimeout(steerTimer);
  steerTimer = setTimeout(async () => {
    try {
      await api(`/api/jobs/${id}/steer`, { method: "POST", body: JSON.stringify({ [field]: Number($(slider).value) }) });
    } catch (e) { if (e.status !== 409) showError(e.message); }
  }, 40);
}

function onStep(e) {
  $("progress").max = e.total;
  $("progress").value = e.step + 1;
  let preview = "";
  if (e.frame_method) preview = ` · preview ${e.frame_method}` + (e.frame_every > 1 ? ` every ${e.frame_every} steps` : "");
  $("status").textContent = `step ${e.step + 1} / ${e.total} · guidance ${e.guidance}${preview}`;
  $("rows-saved").textContent = 2 * (e.step + 1) - e.model_rows;
  if (e.frame) { $("preview").src = e.frame; $("preview").hidden = false; }
}

function finished(job) {
  setRunning(false);
  const rec = job.record;
  let text = job.state;
  if (rec && rec.interrupted) text += ` at step ${rec.steps_completed} of ${rec.steps_total}`;
  if (job.error) text += `: ${job.error}`;
  $("status").textContent = text;
  if (rec) {
    $("progress").value = rec.steps_completed;
    $("rows-saved").textContent = job.rows_saved;
  }
  if (job.image) { $("preview").src = withToken(job.image); $("preview").hidden = false; }
  addCard(job, true);
}

function button(text, cls, onClick) {
  const b = document.createElement("button");
  b.className = cls;
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function card(job) {
  const p = job.params || {};  // a row the server could not read still has a card (its error says why)
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.job = job.id;
  div.dataset.state = job.state;
  const images = job.images && job.images.length ? job.images : job.image ? [job.image] : [];
  const thumb = document.createElement("div");
  thumb.className = "thumb" + (images.length > 1 ? " many" : "");
  for (const url of images) {
    const img = document.createElement("img");
    img.alt = p.prompt;
    img.className = "loading";  // shown once loaded: no black or broken card meanwhile
    img.addEventListener("load", () => img.classList.remove("loading"));
    img.addEventListener("click", () => openViewer(url));
    img.src = withToken(url);
    thumb.appendChild(img);
  }
  div.appendChild(thumb);
  const meta = document.createElement("div");
  meta.className = "meta";
  const rec = job.record;
  const kind = p.control ? " · control" : p.mask ? " · inpaint" : p.init_image ? ` · image ${p.strength}` : "";
  meta.textContent = `${p.prompt} · seed ${p.seed} · ${p.steps} steps · guidance ${p.guidance}` + kind +
    (p.cfg_cutoff != null ? ` · cutoff ${p.cfg_cutoff}` : "") + (p.fast ? " · fast" : "") +
    (p.num_images > 1 ? ` · ${p.num_images} images` : "") + (p.model ? ` · ${p.model}` : "") +
    (p.cache ? ` · cache ${p.cache}` : "") + (rec ? ` · ${rec.model_rows} rows` : "");
  div.appendChild(meta);
  if (job.state !== "finished") {
    const tag = document.createElement("div");
    tag.className = "tag";
    tag.textContent = rec && rec.interrupted ? `${job.state} at step ${rec.steps_completed}` : job.state;
    div.appendChild(tag);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.appendChild(button("Use these settings", "use", () => useSettings(p)));
  if (images.length) {
    actions.appendChild(button("Use as input", "use-input", () => useAsInput(images[0])));
    actions.appendChild(button("Open", "open", () => openViewer(images[0])));
    const a = document.createElement("a");
    a.className = "download";
    a.textContent = "Download";
    a.href = withToken(images[0]);
    a.download = `${job.id}.png`;
    actions.appendChild(a);
  }
  actions.appendChild(button("Delete", "delete", () => removeJob(job.id)));
  div.appendChild(actions);
  return div;
}

function useAsInput(url) {
  if (Inputs.mode() === "text") Inputs.setMode("image");
  Inputs.load(withToken(url)).catch((e) => showError(e.message));
}

async function removeJob(id) {
  try {
    await api(`/api/jobs/${id}`, { method: "DELETE" });
    const old = document.querySelector(`.card[data-job="${id}"]`);
    if (old) old.remove();
  } catch (e) { showError(e.message); }
}

function openViewer(url) {
  $("viewer-image").src = withToken(url);
  $("viewer-download").href = withToken(url);
  $("viewer").hidden = false;
}

function closeViewer() { $("viewer").hidden = true; }

function addCard(job, front) {
  if (!FINAL.has(job.state)) return;
  const old = document.querySelector(`.card[data-job="${job.id}"]`);
  const div = card(job);
  if (old) old.replaceWith(div);
  else if (front) $("gallery").prepend(div);
  else $("gallery").append(div);
}

async function loadHistory() {
  const page = await api("/api/jobs?limit=24" + (oldest ? `&before=${oldest}` : ""));
  page.jobs.forEach((job) => addCard(job, false));
  oldest = page.next;
  $("more").hidden = page.next === null;
}

async function resync() {
  // Events may have been lost while the socket was down: ask for the followed job's state.
  if (!current) return;
  const job = await api(`/api/jobs/${current}`);
  if (FINAL.has(job.state) && !$("stop").disabled) finished(job);
  else if (job.waiting) $("status").textContent = `waiting: ${job.waiting}`;  // e.g. a full disk
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(withToken(`${scheme}//${location.host}/api/events`));
  socket.onopen = () => { $("connection").textContent = "live"; resync().catch(() => {}); };
  socket.onclose = () => {
    $("connection").textContent = "reconnecting…";
    setTimeout(connect, 1000);
  };
  socket.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (e.type === "deleted") {
      const old = document.querySelector(`.card[data-job="${e.job}"]`);
      if (old) old.remove();
      return;
    }
    if (e.type === "hello" || e.job !== current) return;
    if (e.type === "started") { $("status").textContent = "started"; setRunning(true); }
    else if (e.type === "step") onStep(e);
    else if (FINAL.has(e.type)) api(`/api/jobs/${current}`).then(finished).catch((err) => showError(err.message));
  };
}

async function init() {
  const info = await api("/api/info");
  $("model").textContent = `${info.model} · ${info.workers} worker(s) · queue ${info.queue_size}`;
  const n = info.limits.native_size;
  for (const s of [n / 2, n, n * 2].filter((s) => s >= info.limits.min_size && s <= info.limits.max_size)) {
    $("size").add(new Option(`${s}x${s}`, `${s}x${s}`));
  }
  $("size").value = info.defaults.size;
  $("steps").value = info.defaults.steps;
  $("guidance").value = info.defaults.guidance;
  $("prompt").maxLength = info.max_prompt_chars;
  for (const name of info.schedulers) $("scheduler").add(new Option(name, name));
  if (!info.preview_methods.includes("tiny")) $("preview-method").querySelector('option[value="tiny"]').disabled = true;
  Inputs.resize();
  const models = (await api("/api/models")).models;
  for (const m of models) $("model-select").add(new Option(m.name, m.name, m.default, m.default));
  $("model-label").hidden = models.length < 2;
  await loadHistory();
  connect();
}

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  else if (e.key === "Escape") { e.preventDefault(); if (!$("viewer").hidden) closeViewer(); else stop(); }
});
// Words the model does not know, under the prompt, as it is typed (the server asks the model's tokenizer).
let wordsTimer = null;
function checkWords() {
  clearTimeout(wordsTimer);
  wordsTimer = setTimeout(async () => {
    const prompt = $("prompt").value;
    try {
      const w = await api(`/api/words?prompt=${encodeURIComponent(prompt)}`);
      if ($("prompt").value === prompt) $("words").textContent = w.message ? `Note: ${w.message}.` : "";
    } catch (e) { $("words").textContent = ""; }
  }, 250);
}
$("prompt").addEventListener("input", checkWords);
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
for (const id of Object.keys(steerFields)) $(id).addEventListener("input", steer);
$("viewer-close").addEventListener("click", closeViewer);
$("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });
$("more").addEventListener("click", () => loadHistory().catch((e) => showError(e.message)));
// A lost event must never leave the page unable to follow or stop a job: while one runs, ask now and then.
setInterval(() => { if (!$("stop").disabled) resync().catch(() => {}); }, 2000);
init().catch((e) => showError(e.message));
