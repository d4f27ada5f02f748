// The CMC search page: plain JavaScript, no build step, nothing fetched but this server's own endpoints
// (POST /info, /search, /search_by_key, /thumbs; GET /gallery/random).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, query: null };  // query: {kind: "image", b64, name} | {kind: "key", key} | {kind: "array"}

// ------------------------------------------------------------------------------------------------ HTTP
class ServerError extends Error {
  constructor(status, body) {
    const detail = body && body.detail ? body.detail : `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.kind = body && body.error;
    this.field = body && body.field;
  }
}

function headers() {
  const h = { "content-type": "application/json" };
  const t = $("token").value.trim();
  if (t) h["authorization"] = "Bearer " + t;
  return h;
}

async function call(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new ServerError(r.status, data);
  return data;
}

function showError(e) {
  const box = $("error");
  if (e instanceof ServerError) {
    let text = `${e.status} ${e.kind || "error"}: ${e.message}`;
    if (e.field) text += `  (field: ${e.field})`;
    if (e.status === 401) {
      text += "\nEnter the server's token under \u201cBearer token\u201d.";
      $("auth").open = true;
    }
    box.textContent = text;
  } else {
    box.textContent = String(e && e.message ? e.message : e);
  }
  box.hidden = false;
  $("status").textContent = "";
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

// ------------------------------------------------------------------------------------------------ model card
function viewSource(name) { return state.info.views[name].source; }

function fillSelect(sel, names, pick) {
  sel.innerHTML = "";
  for (const n of names) {
    const o = document.createElement("option");
    o.value = o.textContent = n;
    sel.appendChild(o);
  }
  if (pick && names.includes(pick)) sel.value = pick;
}

async function loadInfo() {
  try {
    const info = await call("POST", "/info", {});
    state.info = info;
    clearError();
    $("auth-state").textContent = info.settings && info.settings.auth ? "(this server needs one)" : "(not needed)";
    const views = Object.keys(info.views);
    const idx = info.index || {};
    const counts = idx.counts || {};
    const sizes = idx.available ? Object.entries(counts).map(([v, n]) => `${v} ${n}`).join(", ") : "no index";
    $("card").innerHTML = "";
    const parts = [["views", views.map((v) => `${v} (${info.views[v].source})`).join(", ")], ["dim", info.dim],
                   ["\u03c4", info.tau], ["image size", info.image_size], ["index", sizes]];
    for (const [k, v] of parts) {
      const s = document.createElement("span");
      s.innerHTML = `${k} <b></b> &nbsp; `;
      s.querySelector("b").textContent = v;
      $("card").appendChild(s);
    }
    const indexed = idx.available ? Object.keys(idx.views) : [];
    const qv = views.find((v) => viewSource(v) !== "vector") || views[0];
    fillSelect($("query-view"), views, qv);
    const tv = indexed.find((v) => v !== qv) || indexed[0];
    fillSelect($("target-view"), indexed, tv);
    $("k").max = (info.settings && info.settings.max_k) || 1000;
    updateInputKind();
  } catch (e) {
    $("card").textContent = "model card unavailable";
    showError(e);
  }
}

function updateInputKind() {
  if (!state.info) return;
  const vec = viewSource($("query-view").value) === "vector";
  $("image-input").hidden = vec;
  $("array-input").hidden = !vec;
}

// ------------------------------------------------------------------------------------------------ queries
function setQuery(q, previewSrc, label) {
  state.query = q;
  const img = $("preview");
  if (previewSrc) { img.src = previewSrc; img.hidden = false; } else { img.hidden = true; img.removeAttribute("src"); }
  $("query-label").textContent = label || "";
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(new Error(`cannot read ${file.name}`));
    fr.readAsDataURL(file);
  });
}

async function useFile(file) {
  if (!file) return;
  const url = await readFile(file);
  const b64 = url.slice(url.indexOf(",") + 1);
  const isImage = (file.type || "").startsWith("image/");
  setQuery({ kind: "image", b64, name: file.name }, isImage ? url : null, `query: file ${file.name}`);
  search();
}

function parseArray(text) {
  const t = text.trim();
  if (!t) throw new Error("paste a vector first");
  let arr;
  if (t.startsWith("[")) {
    try { arr = JSON.parse(t); } catch (e) { throw new Error("the vector is not valid JSON: " + e.message); }
  } else {
    arr = t.split(/[\s,;]+/).filter((s) => s.length).map(Number);
  }
  if (!Array.isArray(arr) || arr.some((x) => typeof x !== "number" || !isFinite(x)))
    throw new Error("the vector must be a list of finite numbers");
  return arr;
}

async function randomItem() {
  clearError();
  try {
    const it = await call("GET", "/gallery/random");
    setQuery({ kind: "key", key: it.key }, it.thumb, `query: gallery item ${it.key}`);
    search();
  } catch (e) { showError(e); }
}

async function search() {
  clearError();
  if (!state.info) { await loadInfo(); if (!state.info) return; }
  const view = $("query-view").value;
  const target = $("target-view").value || null;
  const k = parseInt($("k").value, 10);
  const isVec = viewSource(view) === "vector";
  let path, body;
  try {
    if (isVec && (!state.query || state.query.kind !== "key")) {
      path = "/search";
      body = { query: { view, array: parseArray($("array").value) }, target_view: target, k };
    } else if (!state.query) {
      throw new Error("choose an image or a random gallery item first");
    } else if (state.query.kind === "key") {
      path = "/search_by_key";
      body = { key: state.query.key, view, target_view: target, k };
    } else {
      path = "/search";
      body = { query: { view, image: state.query.b64 }, target_view: target, k };
    }
  } catch (e) { showError(e); return; }
  $("status").textContent = "searching\u2026";
  $("results").innerHTML = "";
  const t0 = performance.now();
  try {
    const res = await call("POST", path, body);
    const keys = res.results.map((r) => r.key);
    let thumbs = {};
    if (keys.length) {
      try { thumbs = (await call("POST", "/thumbs", { keys, view: res.target_view })).thumbs; }
      catch (e) { thumbs = {}; }
    }
    render(res, thumbs);
    const ms = Math.round(performance.now() - t0);
    $("status").textContent = `${res.results.length} results: ${res.query_view} \u2192 ${res.target_view} (${ms} ms)`;
  } catch (e) { showError(e); }
}

function fmt(x, d) { return Number(x).toFixed(d); }

function render(res, thumbs) {
  const grid = $("results");
  grid.innerHTML = "";
  const tau = state.info.tau;
  res.results.forEach((r, i) => {
    const card = document.createElement("div");
    card.className = "result" + (i === 0 ? " top" : "");
    card.dataset.key = r.key;
    card.title = "query with this item";
    const src = thumbs[r.key];
    if (src) {
      const img = document.createElement("img");
      img.src = src; img.alt = r.key;
      card.appendChild(img);
    } else {
      const d = document.createElement("div");
      d.className = "noimg"; d.textContent = "no picture";
      card.appendChild(d);
    }
    const key = document.createElement("div");
    key.className = "key"; key.textContent = `${i + 1}. ${r.key}`;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `cos ${fmt(r.score, 4)} \u00b7 critic ${Math.exp(r.score / tau).toPrecision(4)}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = Object.entries(r.metadata || {}).filter(([k, v]) => !(k === "key" && v === r.key))
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
    card.append(key, score, meta);
    card.addEventListener("click", () => {
      setQuery({ kind: "key", key: r.key }, src, `query: gallery item ${r.key}`);
      window.scrollTo({ top: 0, behavior: "smooth" });
      search();
    });
    grid.appendChild(card);
  });
}

// ------------------------------------------------------------------------------------------------ wiring
function init() {
  const saved = localStorage.getItem("cmc-token");
  if (saved) $("token").value = saved;
  $("token").addEventListener("change", () => { localStorage.setItem("cmc-token", $("token").value.trim()); loadInfo(); });
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("random").addEventListener("click", randomItem);
  $("go").addEventListener("click", search);
  $("query-view").addEventListener("change", () => { updateInputKind(); if (state.query) search(); });
  $("target-view").addEventListener("change", () => { if (state.query) search(); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const f = [...(e.clipboardData || {}).files || []].find((x) => x.type.startsWith("image/"));
    if (f) useFile(f);
  });
  loadInfo();
}

init();
