// network3's page: draw a digit or upload a photo; the server classifies it (/v1/classify) and
// the page shows the digit, the ten probabilities and the 28x28 image the model saw.
// Plain JS, no build step, nothing from elsewhere: it works offline against the server alone.
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad"), ctx = pad.getContext("2d");
const digitEl = $("digit"), confidenceEl = $("confidence"), barsEl = $("bars"), seenEl = $("seen");
const errorEl = $("error"), modelEl = $("model"), authForm = $("auth"), tokenInput = $("token");
const TOKEN_KEY = "network3-token";
const DEBOUNCE_MS = 120;

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let drawn = false;        // anything on the pad since the last clear
let stroke = null;        // the pointer drawing now: {id, x, y}
let timer = null;         // a debounced classification of the pad
let seq = 0;              // the latest request; older answers are dropped
let inflight = 0;         // the latest request is still on its way
let retry = null;         // what to send again once a token is given

// ---------------------------------------------------------------------------- the bars --
const bars = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span>${d}</span><span class="track"><span class="fill"></span></span><span class="pct"></span>`;
  barsEl.appendChild(li);
  bars.push({ li, fill: li.querySelector(".fill"), pct: li.querySelector(".pct") });
}

function showPrediction(p) {
  digitEl.textContent = String(p.digit);
  // unsure: a blank image, or less confidence than the model's calibrated threshold: a guess.
  digitEl.classList.toggle("unsure", p.unsure === true);
  confidenceEl.textContent = p.unsure
    ? `not sure: ${(p.confidence * 100).toFixed(1)}%, this may not be a digit`
    : `${(p.confidence * 100).toFixed(1)}% sure`;
  p.probabilities.forEach((q, d) => {
    bars[d].fill.style.width = `${(q * 100).toFixed(1)}%`;
    bars[d].pct.textContent = `${(q * 100).toFixed(1)}%`;
    bars[d].li.classList.toggle("top", d === p.digit);
  });
  if (p.input) seenEl.src = `data:image/png;base64,${p.input}`;
}

const HINT = "Draw a digit in the black square, or choose a photo.";

function showNothing() {
  digitEl.textContent = "";
  digitEl.classList.remove("unsure");
  confidenceEl.textContent = HINT;
  for (const b of bars) { b.fill.style.width = "0"; b.pct.textContent = ""; b.li.classList.remove("top"); }
  seenEl.removeAttribute("src");
}

function showError(message) { errorEl.textContent = message || ""; }

function setPending() { digitEl.dataset.pending = String(timer !== null || inflight > 0); }

// --------------------------------------------------------------------------- the server --
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    authForm.hidden = false;
    tokenInput.focus();
    throw new Error(token ? "The token was refused: enter the right one." : "This server needs a token: enter it below.");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: said below */ }
  if (!response.ok) throw new Error((body && body.error) || `The server answered ${response.status} ${response.statusText}.`);
  if (body === null) throw new Error("The server's answer was not JSON.");
  return body;
}

async function loadModel() {
  try {
    const m = await api("/v1/model");
    const acc = m.test_accuracy == null ? "?" : `${(m.test_accuracy * 100).toFixed(2)}%`;
    modelEl.textContent = `model: ${m.preset || m.name} · test accuracy ${acc} · sha256 ${m.sha256.slice(0, 12)}…`;
    modelEl.title = `sha256 ${m.sha256}\nloaded ${m.loaded_at}`;
  } catch (e) {
    modelEl.textContent = "model: unknown";
    retry = retry || loadModel;
    showError(e.message);
  }
}

// Send one image (a Blob); show its answer unless a newer request was made meanwhile.
async function classify(blob, again) {
  const mine = ++seq;
  inflight = 1;
  setPending();
  try {
    const body = await api("/v1/classify?input=1", { method: "POST", body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" } });
    if (mine !== seq) return;
    showError("");
    showPrediction(body.predictions[0]);
  } catch (e) {
    if (mine !== seq) return;
    retry = again;
    showNothing();
    showError(e.message || String(e));
  } finally {
    if (mine === seq) { inflight = 0; setPending(); }
  }
}

function padBlob() {
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

async function classifyPad() {
  timer = null;
  if (!drawn) { setPending(); return; }
  const blob = await padBlob();
  if (drawn && blob) await classify(blob, classifyPad);
  else setPending();
}

function schedule() {
  if (timer !== null) clearTimeout(timer);
  timer = setTimeout(classifyPad, DEBOUNCE_MS);
  setPending();
}

// ----------------------------------------------------------------------------- drawing --
function blank() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function at(event) {
  const r = pad.getBoundingClientRect();
  return { x: (event.clientX - r.left) * (pad.width / r.width), y: (event.clientY - r.top) * (pad.height / r.height) };
}

function line(from, to) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 20;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (e) => {
  if (e.button !== 0 && e.pointerType === "mouse") return;
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  const p = at(e);
  stroke = { id: e.pointerId, x: p.x, y: p.y };
  line(p, p);
  drawn = true;
  schedule();
});

pad.addEventListener("pointermove", (e) => {
  if (!stroke || e.pointerId !== stroke.id) return;
  e.preventDefault();
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
  for (const ev of events.length ? events : [e]) {
    const p = at(ev);
    line(stroke, p);
    stroke.x = p.x;
    stroke.y = p.y;
  }
  schedule();
});

function endStroke(e) {
  if (!stroke || e.pointerId !== stroke.id) return;
  stroke = null;
  schedule();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function clear() {
  if (timer !== null) { clearTimeout(timer); timer = null; }
  seq++;            // an answer on its way is for the old drawing
  inflight = 0;
  drawn = false;
  stroke = null;
  blank();
  showNothing();
  showError("");
  setPending();
}
$("clear").addEventListener("click", clear);

// ------------------------------------------------------------------------------- files --
function upload(file) {
  if (!file) return;
  if (timer !== null) { clearTimeout(timer); timer = null; }
  showError("");
  const send = () => classify(file, send);
  send();
}

$("file").addEventListener("change", (e) => {
  upload(e.target.files[0]);
  e.target.value = "";  // the same file again is a new upload
});

const drop = $("drop");
for (const target of [drop, pad]) {
  target.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  target.addEventListener("dragleave", () => drop.classList.remove("over"));
  target.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(e.dataTransfer.files[0]);
  });
}

// ------------------------------------------------------------------------------- token --
authForm.addEventListener("submit", (e) => {
  e.preventDefault();
  token = tokenInput.value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  authForm.hidden = true;
  showError("");
  const again = retry;
  retry = null;
  loadModel();
  if (again && again !== loadModel) again();
});

blank();
showNothing();
setPending();
loadModel();
