// rekam operator console: vanilla JS, no build step, no external resources (the kit is offline).
// Every text from the kit or the operator goes into the DOM with textContent, never as HTML.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
const state = {
  view: "signin", me: null, enrollment: null, lastResult: null, receipt: null,
  dupRunFor: null, busy: false, status: null,
};

// ---- helpers ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, extra) {
    super(message); this.status = status; this.code = code; this.extra = extra || {};
  }
}

function detailOf(status, body) {
  const d = body && body.detail !== undefined ? body.detail : body;
  if (d && typeof d === "object" && !Array.isArray(d)) {
    return new ApiError(status, d.code || "", d.message || d.error || JSON.stringify(d), d);
  }
  if (Array.isArray(d)) { // FastAPI validation error: name the field
    const parts = d.map((x) => (x.loc || []).slice(1).join(".") + ": " + (x.msg || ""));
    return new ApiError(status, "invalid", parts.join("; "));
  }
  return new ApiError(status, "", String(d || "HTTP " + status));
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(API + path, opts);
  } catch (e) {
    throw new ApiError(0, "offline", "the kit does not answer (check the Wi-Fi connection)");
  }
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const err = detailOf(r.status, data);
    if (err.code === "signed_out_idle" || err.code === "not_signed_in") onSignedOut(err.message);
    throw err;
  }
  return data;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
function show(id, on) { $(id).hidden = !on; }
function setMsg(id, text, kind) { const m = $(id); m.textContent = text || ""; m.className = "msg " + (kind || "error"); }

function fmtBytes(n) {
  if (n === null || n === undefined) return "?";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0; let v = Number(n);
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return v.toFixed(i ? 1 : 0) + " " + u[i];
}

function fmtAge(iso) {
  if (!iso) return "—";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
  return Math.round(s / 86400) + " days ago";
}

function fingerLabel(code, enrollment) {
  const f = enrollment && enrollment.fingers.find((x) => x.finger === code);
  return f ? f.label : code;
}

// ---- views and navigation ---------------------------------------------------------------

function go(view) {
  state.view = view;
  for (const v of ["signin", "enroll", "status", "records"]) show("view-" + v, v === view);
  for (const b of document.querySelectorAll(".navbtn")) b.classList.toggle("active", b.dataset.view === view);
  if (view === "status") refreshStatus();
  if (view === "records") refreshRecords();
  if (view === "enroll") refreshEnrollment();
}

async function onSignedIn(me) {
  state.me = me;
  $("who").textContent = me.name + " (" + me.operator_id + ")";
  show("nav", true); show("signout", true);
  await pollStatus(); // the status is for signed-in operators: fetched now, before the enrollment view uses it
  go("enroll");
}

function onSignedOut(message) {
  if (!state.me && state.view === "signin") return;
  state.me = null; state.enrollment = null; state.receipt = null; state.lastResult = null;
  $("who").textContent = "";
  show("nav", false); show("signout", false); show("idle", false);
  go("signin");
  if (message) setMsg("signin-msg", message, "warn");
}

// ---- sign-in and idle warning -----------------------------------------------------------

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setMsg("signin-msg", "");
  try {
    const r = await api("POST", "/auth/signin", { operator_id: $("signin-id").value.trim(), pin: $("signin-pin").value });
    $("signin-pin").value = "";
    onSignedIn({ operator_id: r.operator_id, name: r.name, role: r.role });
  } catch (e) {
    $("signin-pin").value = "";
    let text = e.message;
    if (e.code === "locked" && e.extra.retry_after_s) text += " (try again in " + Math.ceil(e.extra.retry_after_s / 60) + " min)";
    setMsg("signin-msg", text);
  }
});

$("signout").addEventListener("click", async () => {
  try { await api("POST", "/auth/signout"); } catch (e) { /* signed out anyway */ }
  onSignedOut("Signed out.");
});

async function pollMe() {
  if (!state.me) return;
  let me;
  try { me = await api("GET", "/auth/me"); } catch (e) { return; }
  if (!me.signed_in) { onSignedOut("Signed out after inactivity; sign in again."); return; }
  show("idle", !!me.warn);
  if (me.warn) $("idle-text").textContent = "No activity: you will be signed out in " + me.signout_in_s + " s.";
}

$("idle-stay").addEventListener("click", async () => {
  try { await api("GET", "/enrollment"); } catch (e) { /* handled by api() */ }
  show("idle", false);
});

// ---- alerts and status ------------------------------------------------------------------

function alertsFrom(st) {
  const out = [];
  const g = st.guard || {};
  const noStick = st.stick && !st.stick.present;
  // The stick's absence has its own alert; do not repeat the guard's reason for it.
  const reasons = (g.reasons || []).filter((r) => !(noStick && /no USB stick/.test(r)));
  if (g.level === "HALT") out.push(["halt", "CAPTURE HALTED: " + reasons.join("; ") + " — no new enrollment can start."]);
  else if (g.level === "WARN" && reasons.length) out.push(["warn", "Storage low: " + reasons.join("; ")]);
  if (noStick) out.push([g.level === "HALT" ? "halt" : "warn", "USB stick missing: records are only on the SD card. Insert the stick."]);
  if (st.sensor && st.sensor.error) out.push(["halt", "Fingerprint sensor error: " + st.sensor.error]);
  if (st.control && st.control.locked) out.push(["halt", "Capture locked by the fleet: " + (st.control.lock_reason || "")]);
  return out;
}

function renderAlerts(st) {
  const box = $("alerts");
  clear(box);
  for (const [kind, text] of alertsFrom(st)) box.appendChild(el("div", text, "banner " + kind));
}

async function pollStatus() {
  if (!state.me) { clear($("alerts")); return; } // the kit's status is for signed-in operators only
  try {
    state.status = await api("GET", "/status");
  } catch (e) {
    clear($("alerts"));
    $("alerts").appendChild(el("div", e.message, "banner halt"));
    return;
  }
  renderAlerts(state.status);
  if (state.view === "status") renderStatus(state.status);
}

function row(tbody, label, value) {
  const tr = el("tr");
  tr.appendChild(el("th", label));
  tr.appendChild(el("td", value));
  tbody.appendChild(tr);
}

function renderStatus(st) {
  const g = st.guard || {};
  const gb = $("st-guard");
  gb.className = "banner " + (g.level === "HALT" ? "halt" : g.level === "WARN" ? "warn" : "ok");
  gb.textContent = "Capture: " + (g.level || "?") + ((g.reasons || []).length ? " — " + g.reasons.join("; ") : " — ready");
  const media = $("st-media");
  clear(media);
  for (const m of st.media || []) {
    const box = el("div", null, "medium");
    const used = m.total_bytes ? 1 - m.free_bytes / m.total_bytes : 0;
    box.appendChild(el("div", m.name + (m.present === false ? " (missing)" : "") + " — " + (m.level || "?"), "medium-name"));
    const bar = el("div", null, "bar");
    const fill = el("div", null, "fill " + String(m.level || "").toLowerCase());
    fill.style.width = Math.round(Math.min(1, Math.max(0, used)) * 100) + "%";
    bar.appendChild(fill);
    box.appendChild(bar);
    let detail = fmtBytes(m.free_bytes) + " free of " + fmtBytes(m.total_bytes);
    if (m.records_left !== undefined && m.records_left !== null) detail += " · room for ~" + m.records_left + " records";
    if (m.reason) detail += " · " + m.reason;
    box.appendChild(el("div", detail, "medium-detail"));
    media.appendChild(box);
  }
  const t = $("st-table");
  clear(t);
  const rec = st.records || {};
  const n = (s) => (rec[s] ? rec[s].records : 0);
  row(t, "Records", "stored " + n("stored") + " · sent " + n("sent") + " · acknowledged " + n("acked") + " · quarantined " + n("quarantined"));
  row(t, "Backlog (not acknowledged)", String(n("stored") + n("sent")));
  row(t, "Oldest unacknowledged", st.oldest_unacked ? st.oldest_unacked + " (" + fmtAge(st.oldest_unacked) + ")" : "none");
  if (st.mirror_lag) row(t, "Not yet on a USB stick", st.mirror_lag.records + " records (" + fmtBytes(st.mirror_lag.bytes) + ")");
  if (st.stick) row(t, "USB stick", st.stick.present ? "present" + (st.stick.stick_id ? " (" + st.stick.stick_id + ")" : "") : "missing" + (st.stick.error ? ": " + st.stick.error : ""));
  const up = st.relay || st.uplink;
  if (up) {
    let s = up.state || "?";
    if (up.broker) s += " to " + up.broker;
    if (up.since) s += " since " + up.since;
    if (up.last_error) s += " — " + up.last_error;
    row(t, "Uplink", s);
    if (up.backlog) row(t, "Uplink backlog", up.backlog.records + " records (" + fmtBytes(up.backlog.bytes) + ")");
  } else {
    row(t, "Uplink", "not configured (records leave by USB stick)");
  }
  if (st.sensor) row(t, "Fingerprint sensor", st.sensor.error ? "ERROR: " + st.sensor.error : (st.sensor.open ? "ready" : "idle") + " (" + (st.sensor.port || "") + ")");
  if (st.daemon) row(t, "Software", "rekam " + st.daemon.version + (st.daemon.simulation ? " (SIMULATION)" : "") + ", up " + Math.round(st.daemon.uptime_s / 60) + " min");
  if (st.kit_id) row(t, "Kit", st.kit_id);
  renderTls();
}

async function renderTls() {
  let tls;
  try { tls = await api("GET", "/tls"); } catch (e) { return; }
  const box = $("st-tls");
  clear(box);
  show("st-tls", !!tls.https);
  if (!tls.https) return;
  box.appendChild(el("h2", "Sidik jari sertifikat HTTPS / HTTPS certificate fingerprint (SHA-256)"));
  box.appendChild(el("p", "Sebelum masuk dari ponsel, cocokkan sidik jari ini dengan yang ditampilkan browser ponsel. " +
    "Before signing in from a phone, compare this fingerprint with the one the phone's browser shows."));
  box.appendChild(el("code", tls.fingerprint, "fingerprint"));
  const img = el("img");
  img.src = API + "/tls/qr.svg";
  img.alt = "QR: " + tls.fingerprint;
  img.id = "st-tls-qr";
  box.appendChild(img);
}

async function refreshStatus() { await pollStatus(); if (state.status) renderStatus(state.status); }

async function refreshRecords() {
  let rows;
  try { rows = await api("GET", "/records?limit=500"); } catch (e) { $("rec-summary").textContent = e.message; return; }
  const today = new Date().toISOString().slice(0, 10);
  const todays = rows.filter((r) => String(r.created || "").slice(0, 10) === today);
  const counts = {};
  for (const r of todays) counts[r.state] = (counts[r.state] || 0) + 1;
  $("rec-summary").textContent = todays.length + " record(s) today" +
    (todays.length ? " — " + Object.entries(counts).map(([k, v]) => k + " " + v).join(", ") : "");
  const body = $("rec-body");
  clear(body);
  for (const r of todays) {
    const tr = el("tr");
    tr.appendChild(el("td", String(r.created).slice(11, 19)));
    tr.appendChild(el("td", r.id, "mono"));
    tr.appendChild(el("td", r.state, "state " + r.state));
    tr.appendChild(el("td", fmtBytes(r.size)));
    body.appendChild(tr);
  }
}

// ---- enrollment -------------------------------------------------------------------------

function prompt(text, kind) {
  const p = $("prompt");
  p.textContent = text;
  p.className = "prompt " + (kind || "");
}

async function refreshEnrollment() {
  if (!state.me) return;
  try {
    state.enrollment = await api("GET", "/enrollment");
  } catch (e) {
    setMsg("enroll-msg", e.message);
    return;
  }
  renderEnrollment();
}

function renderEnrollment() {
  const e = state.enrollment;
  const active = e && e.active;
  show("receipt", !active && !!state.receipt);
  show("enroll-start", !active && !state.receipt);
  show("enroll-active", !!active);
  if (!active) {
    if (state.receipt) {
      prompt("Stored. Give the resident the receipt: print the PDF or let them photograph the QR code.", "ok");
    } else {
      const st = state.status;
      if (st && st.guard && st.guard.level === "HALT") {
        prompt("Capture is halted: " + (st.guard.reasons || []).join("; ") + ". See Status.", "halt");
      } else {
        prompt("Type the resident's 16-digit NIK (from the KK) and tap Start enrollment.");
      }
    }
    return;
  }
  $("enroll-nik").textContent = "NIK " + e.nik_masked;
  renderSteps(e);
  const step = e.step;
  show("capture", step === "face" || step.startsWith("finger:"));
  show("dup", step === "dupcheck");
  show("sup", step === "supervisor");
  show("review", step === "review");
  if (step === "face" || step.startsWith("finger:")) renderCapture(e);
  else if (step === "dupcheck") {
    prompt("All captures done. Checking for a double enrollment…");
    if (state.dupRunFor !== e.id) { state.dupRunFor = e.id; runDupcheck(); }
  } else if (step === "supervisor") {
    prompt("Possible double enrollment: call the supervisor. They enter their id, PIN, decision and reason.", "halt");
    const d = e.duplicates || [];
    $("sup-matches").textContent = "Matching fingers: " + d.map((h) => h.finger + " ↔ " + h.record_id).join(", ");
  } else if (step === "review") {
    prompt("Check the summary with the resident, then tap Store enrollment.");
    renderReview(e);
  }
}

function renderSteps(e) {
  const ol = $("steps");
  clear(ol);
  const items = [];
  if (e.face || e.face_exception || e.step === "face") {
    const faceDone = e.face_exception || (e.face && e.face.done);
    items.push(["face", "Face", faceDone ? (e.face_exception ? "exc" : e.face.forced ? "forced" : "done") : ""]);
  }
  for (const f of e.fingers) items.push(["finger:" + f.finger, f.finger, f.done ? (f.exception ? "exc" : f.forced ? "forced" : "done") : ""]);
  items.push(["dupcheck", "Dup", e.duplicates !== null ? "done" : ""]);
  items.push(["review", "Store", ""]);
  for (const [key, label, st] of items) {
    const li = el("li", label, "step " + st + (e.step === key ? " current" : ""));
    li.title = key;
    ol.appendChild(li);
  }
}

function renderCapture(e) {
  const step = e.step;
  const isFace = step === "face";
  const code = isFace ? null : step.slice(7);
  const label = isFace ? "face photo" : fingerLabel(code, e);
  $("capture-title").textContent = isFace ? "Face photo" : code + " — " + label;
  $("capture-go").textContent = isFace ? "Take photo" : "Capture finger";
  $("capture-go").disabled = state.busy || e.busy;
  $("capture-exc").disabled = state.busy || e.busy;
  const r = state.lastResult;
  const sameStep = r && r.step === step;
  if (state.busy) {
    prompt(isFace ? "Taking the photo…" : "Waiting for the " + label + " on the sensor… (place it flat, press lightly)", "busy");
  } else if (sameStep && r.status === "timeout") {
    prompt(r.message + ", then tap Capture finger again.", "warn");
  } else if (sameStep && !r.done) {
    prompt("Retake: " + (r.hints.length ? r.hints.join("; ") : "quality too low") + ". Then tap " + $("capture-go").textContent + " again (attempt " + (r.attempt + 1) + ").", "warn");
  } else if (isFace) {
    prompt("Face photo: the resident looks straight at the camera, neutral expression, no glasses or cap. Tap Take photo.");
  } else {
    prompt("Ask the resident to place the " + label.toUpperCase() + " flat on the sensor, then tap Capture finger.");
  }
  renderFeedback(state.lastResult);
}

function renderFeedback(r) {
  show("feedback", !!r && r.status !== "timeout");
  show("preview", !!r && !!r.preview);
  if (!r || r.status === "timeout") return;
  const badge = $("fb-badge");
  const kind = r.accepted ? "accepted" : r.forced ? "forced" : "retake";
  badge.textContent = { accepted: "ACCEPTED", forced: "KEPT BEST (low quality)", retake: "RETAKE" }[kind];
  badge.className = "badge " + kind;
  $("fb-score").textContent = (r.what || "") + " score " + Math.round(r.score) + " · attempt " + r.attempt;
  $("fb-msg").textContent = r.message;
  const ul = $("fb-hints");
  clear(ul);
  for (const h of r.hints || []) ul.appendChild(el("li", h));
  if (r.preview) $("preview").src = API + "/enrollment/preview/" + r.preview + "?t=" + Date.now();
}

async function startEnrollment(ev) {
  ev.preventDefault();
  setMsg("nik-msg", "");
  state.receipt = null;
  const body = { nik: $("nik").value.trim(), override_reason: $("override").hidden ? "" : $("override-reason").value.trim() };
  $("nik-start").disabled = true;
  try {
    state.enrollment = await api("POST", "/enrollment", body);
    state.lastResult = null; state.dupRunFor = null;
    $("nik").value = ""; $("override-reason").value = ""; show("override", false);
    setMsg("enroll-msg", "");
    renderEnrollment();
  } catch (e) {
    if (e.code === "nik_enrolled") {
      show("override", true);
      setMsg("nik-msg", e.message, "warn");
      $("override-reason").focus();
    } else {
      setMsg("nik-msg", e.message);
    }
  } finally {
    $("nik-start").disabled = false;
  }
}

$("nik-form").addEventListener("submit", startEnrollment);
$("nik").addEventListener("input", () => { show("override", false); setMsg("nik-msg", ""); });

$("capture-go").addEventListener("click", async () => {
  const e = state.enrollment;
  if (!e || !e.active) return;
  const step = e.step;
  state.busy = true;
  setMsg("enroll-msg", "");
  renderCapture(e);
  try {
    const path = step === "face" ? "/enrollment/face" : "/enrollment/fingers/" + step.slice(7);
    const r = await api("POST", path);
    r.step = step;
    r.what = step === "face" ? "face" : step.slice(7);
    r.preview = r.status === "timeout" ? null : (step === "face" ? "face-last.jpg" : "finger-" + step.slice(7) + ".png");
    state.lastResult = r;
  } catch (err) {
    setMsg("enroll-msg", err.message);
  } finally {
    state.busy = false;
  }
  const keep = state.lastResult;
  await refreshEnrollment();
  // Keep showing the accepted capture's feedback on the next step until the next attempt.
  if (keep && keep.done && state.enrollment && state.enrollment.active && state.enrollment.step !== keep.step) {
    renderFeedback(keep);
  }
});

$("capture-exc").addEventListener("click", () => { show("exc-form", true); $("exc-text").focus(); });
$("exc-close").addEventListener("click", () => show("exc-form", false));
$("exc-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const e = state.enrollment;
  const sel = $("exc-select").value;
  const text = $("exc-text").value.trim();
  const reason = sel === "other" ? text : (text ? sel + ": " + text : sel);
  if (!reason) { setMsg("enroll-msg", "give a reason"); return; }
  const path = e.step === "face" ? "/enrollment/face/exception" : "/enrollment/fingers/" + e.step.slice(7) + "/exception";
  try {
    state.enrollment = await api("POST", path, { reason });
    $("exc-text").value = ""; show("exc-form", false); state.lastResult = null;
    setMsg("enroll-msg", "");
    renderEnrollment();
  } catch (err) { setMsg("enroll-msg", err.message); }
});

async function runDupcheck() {
  $("dup-go").disabled = true;
  $("dup-result").textContent = "Searching this kit's earlier enrollments…";
  try {
    const r = await api("POST", "/enrollment/dupcheck");
    $("dup-result").textContent = r.flagged ? "Match found: " + r.records.join(", ") : "No match: not enrolled under another NIK on this kit.";
  } catch (e) {
    $("dup-result").textContent = e.message;
  } finally {
    $("dup-go").disabled = false;
  }
  await refreshEnrollment();
}
$("dup-go").addEventListener("click", runDupcheck);

$("sup-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setMsg("sup-msg", "");
  const decision = document.querySelector("input[name=decision]:checked").value;
  try {
    state.enrollment = await api("POST", "/enrollment/supervisor", {
      supervisor_id: $("sup-id").value.trim(), pin: $("sup-pin").value, decision, reason: $("sup-reason").value.trim(),
    });
    $("sup-pin").value = ""; $("sup-reason").value = "";
    if (!state.enrollment.active) setMsg("nik-msg", "Rejected by the supervisor: nothing was stored.", "warn");
    renderEnrollment();
  } catch (e) {
    $("sup-pin").value = "";
    setMsg("sup-msg", e.message);
  }
});

function renderReview(e) {
  const tb = $("review-table").tBodies[0];
  clear(tb);
  row(tb, "NIK", e.nik_masked);
  if (e.face_exception) row(tb, "Face", "exception: " + e.face_exception);
  else if (e.face) row(tb, "Face", "score " + e.face.score + (e.face.forced ? " (kept best, low quality)" : ""));
  for (const f of e.fingers) {
    row(tb, f.finger + " " + f.label, f.exception ? "exception: " + f.exception : "score " + f.score + (f.forced ? " (kept best, low quality)" : ""));
  }
  if (e.supervisor) row(tb, "Supervisor", e.supervisor.supervisor_id + ": " + e.supervisor.decision + " — " + e.supervisor.reason);
  if (e.override_reason) row(tb, "Enrolled again because", e.override_reason);
}

$("commit").addEventListener("click", async () => {
  $("commit").disabled = true;
  try {
    const r = await api("POST", "/enrollment/commit");
    state.receipt = r; state.lastResult = null;
    $("rc-id").textContent = r.record_id;
    $("rc-mirror").textContent = r.mirrored ? "Saved on the SD card and the USB stick." : "Saved on the SD card only — insert the USB stick.";
    $("rc-qr").src = API + "/receipts/" + r.record_id + ".png";
    $("rc-pdf").href = API + "/receipts/" + r.record_id + ".pdf";
    await refreshEnrollment();
  } catch (e) {
    setMsg("enroll-msg", e.message + " — the enrollment is kept; tap Store enrollment again.");
  } finally {
    $("commit").disabled = false;
  }
});

$("cancel").addEventListener("click", async () => {
  if (!window.confirm("Cancel this enrollment? Nothing will be kept.")) return;
  try {
    await api("POST", "/enrollment/cancel");
    state.lastResult = null;
    setMsg("nik-msg", "Enrollment cancelled: nothing was kept.", "warn");
  } catch (e) { setMsg("enroll-msg", e.message); }
  await refreshEnrollment();
});

$("rc-next").addEventListener("click", () => { state.receipt = null; renderEnrollment(); $("nik").focus(); });

for (const b of document.querySelectorAll(".navbtn")) b.addEventListener("click", () => go(b.dataset.view));

// ---- start ------------------------------------------------------------------------------

async function boot() {
  pollStatus();
  let me = null;
  try { me = await api("GET", "/auth/me"); } catch (e) { me = null; }
  if (me && me.signed_in) onSignedIn(me); else go("signin");
  setInterval(pollStatus, 5000);
  setInterval(pollMe, 15000);
  setInterval(() => { if (state.view === "records") refreshRecords(); }, 30000);
}

boot();
