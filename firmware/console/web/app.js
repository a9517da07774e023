// rekam operator console: vanilla JS, no build step, no external resources (the kit is offline).
// Every text from the kit or the operator goes into the DOM with textContent, never as HTML.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
const state = {
  view: "signin", me: null, enrollment: null, lastResult: null, receipt: null,
  dupRunFor: null, busy: false, status: null, lastDone: null, excNote: null,
};

// ---- language: the kit's message catalog (firmware/locale/*/console.po, served by /api/v1/i18n) ----------
// msgids are English; t() returns the translation in the chosen language with {name} placeholders filled.
// Numbers, sizes and dates mirror firmware/system/i18n.py exactly through Intl (the same CLDR data as Babel):
// counts with grouping, sizes in binary units labelled KiB/MiB/GiB with one decimal, dates spelled out.
const LANG_KEY = "rekam.lang";
const I18N = { lang: "id", def: "id", languages: ["id", "en"], messages: {} };

function fill(text, kw) {
  return String(text).replace(/\{(\w+)\}/g, (m, k) => (kw && kw[k] !== undefined ? String(kw[k]) : m));
}
function t(msgid, kw) {
  let s = I18N.lang === "en" ? null : I18N.messages[msgid];
  if (Array.isArray(s)) s = s[0];
  return fill(s || msgid, kw);
}
function tn(singular, plural, n, kw) {
  const args = Object.assign({ n: fmtCount(n) }, kw || {});
  const forms = I18N.lang === "en" ? null : I18N.messages[singular];
  if (Array.isArray(forms) && forms.length) return fill(forms[I18N.lang === "id" ? 0 : (n === 1 ? 0 : 1)] || forms[0], args);
  return fill(n === 1 ? singular : plural, args);
}
function fmtCount(n) { return new Intl.NumberFormat(I18N.lang, { useGrouping: true }).format(Number(n)); }

async function loadLanguage(lang) {
  let cat = null;
  try {
    const r = await fetch(API + "/i18n" + (lang ? "/" + encodeURIComponent(lang) : ""), { cache: "no-store" });
    if (r.ok) cat = await r.json();
  } catch (e) { cat = null; }
  if (cat) {
    I18N.lang = cat.lang; I18N.def = cat.default; I18N.languages = cat.languages; I18N.messages = cat.messages || {};
  }
  document.documentElement.lang = I18N.lang;
  applyStatic();
}

// Static texts of index.html: data-i18n (text), data-i18n-<attr> (an attribute: placeholder, alt, title).
function applyStatic() {
  for (const e of document.querySelectorAll("[data-i18n]")) e.textContent = t(e.dataset.i18n);
  for (const e of document.querySelectorAll("*")) {
    for (const a of e.getAttributeNames()) {
      if (a.startsWith("data-i18n-")) e.setAttribute(a.slice(10), t(e.getAttribute(a)));
    }
  }
  document.title = t("rekam — enrollment kit");
  $("lang").textContent = I18N.lang === "id" ? "English" : "Bahasa Indonesia";
  $("lang").setAttribute("lang", I18N.lang === "id" ? "en" : "id");
}

// ---- helpers ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, extra) {
    super(message); this.status = status; this.code = code; this.extra = extra || {};
  }
}

// The operator reads a translated text chosen by the error's stable code; the kit's own (English) message is
// the fallback for a code the console does not know yet.
function errorText(code, d, fallback) {
  switch (code) {
    case "bad_pin":
      return d.tries_left === undefined || d.tries_left === null ? t("Wrong operator id or PIN.")
        : t("Wrong operator id or PIN.") + " " + tn("{n} try left before the lockout.", "{n} tries left before the lockout.", d.tries_left);
    case "locked": return t("Too many wrong PINs: this operator is locked. Try again in {min} min.", { min: fmtCount(Math.ceil((d.retry_after_s || 60) / 60)) });
    case "role": return t("This operator is not a supervisor.");
    case "supervisor_auth": return t("The supervisor's id or PIN is wrong.");
    case "not_signed_in": return t("Sign in first.");
    case "signed_out_idle": return t("Signed out after inactivity; sign in again.");
    case "nik_not_digits": return t("The NIK has only digits 0-9.");
    case "nik_length": return t("The NIK has 16 digits; check the number on the KK.");
    case "nik_province": return t("Digits 1-2 of the NIK are not an Indonesian province code; check the KK.");
    case "nik_regency": return t("Digits 3-4 of the NIK (regency/city) must not be 00; check the KK.");
    case "nik_district": return t("Digits 5-6 of the NIK (district) must not be 00; check the KK.");
    case "nik_birth_date": return t("Digits 7-12 of the NIK are not a valid date of birth; check the KK.");
    case "nik_serial": return t("Digits 13-16 of the NIK must not be 0000; check the KK.");
    case "nik_enrolled": return t("This NIK was already enrolled on this kit. To enroll it again, give a reason.");
    case "busy": return t("Another enrollment is in progress on this kit.");
    case "halted": return t("Capture is halted: see the red notice at the top.");
    case "locked_fleet": return t("Capture is locked by the office.");
    case "not_owner": return t("This enrollment belongs to {name}: only they or a supervisor may continue or cancel it.", { name: d.owner_name || d.owner || "?" });
    case "no_enrollment": return t("No enrollment in progress.");
    case "camera_error": case "no_camera": return t("The camera does not work. Record an exception for the face, or call the technician.");
    case "sensor_error": case "no_sensor": return t("The fingerprint sensor does not work. Call the technician.");
    case "no_face_quality": return t("The face photo check does not work. Record an exception for the face, or call the technician.");
    case "no_finger_quality": return t("The fingerprint quality check does not work. Call the technician.");
    case "store_error": return t("The record could not be stored.");
    case "reason_required": return t("Give a reason.");
    case "not_ready": return t("Not ready to store: a step is not done yet.");
    case "no_stick": return t("No USB stick is inserted.");
    case "invalid": return t("Check the form: something is missing or too long.");
    default: return fallback;
  }
}

function detailOf(status, body) {
  const d = body && body.detail !== undefined ? body.detail : body;
  if (d && typeof d === "object" && !Array.isArray(d)) {
    const code = d.code === "locked" && status === 423 && d.retry_after_s === undefined ? "locked_fleet" : (d.code || "");
    return new ApiError(status, code, errorText(code, d, d.message || d.error || t("The kit refused the request.")), d);
  }
  if (Array.isArray(d)) return new ApiError(status, "invalid", errorText("invalid", {}, "")); // never the raw validator text
  return new ApiError(status, "", t("The kit refused the request (HTTP {status}).", { status }));
}

async function api(method, path, body) {
  // The kit words its answers (guard reasons, errors) in the language this console shows.
  const opts = { method, headers: { "X-Rekam-Lang": I18N.lang || "" }, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(API + path, opts);
  } catch (e) {
    throw new ApiError(0, "offline", t("The kit does not answer (check the Wi-Fi connection)."));
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

// firmware.system.i18n.format_size, mirrored: binary units, one decimal from KiB up.
function fmtBytes(n) {
  if (n === null || n === undefined) return "?";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0; let v = Number(n);
  if (Math.abs(v) < 1024) return fmtCount(Math.trunc(v)) + " B";
  while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return new Intl.NumberFormat(I18N.lang, { minimumFractionDigits: 1, maximumFractionDigits: 1 }).format(v) + " " + u[i];
}

// firmware.system.i18n.format_date (long): "12 Maret 1990" / "March 12, 1990"; the date is a calendar day.
function fmtDate(isoDay) {
  const [y, m, d] = isoDay.split("-").map(Number);
  return new Intl.DateTimeFormat(I18N.lang, { dateStyle: "long", timeZone: "UTC" }).format(new Date(Date.UTC(y, m - 1, d)));
}

function fmtAge(iso) {
  if (!iso) return "—";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 90) return t("{n} s ago", { n: fmtCount(Math.round(s)) });
  if (s < 5400) return t("{n} min ago", { n: fmtCount(Math.round(s / 60)) });
  if (s < 172800) return t("{n} h ago", { n: fmtCount(Math.round(s / 3600)) });
  return t("{n} days ago", { n: fmtCount(Math.round(s / 86400)) });
}

const FINGER_NAMES = {
  R1: "right thumb", R2: "right index finger", R3: "right middle finger", R4: "right ring finger", R5: "right little finger",
  L1: "left thumb", L2: "left index finger", L3: "left middle finger", L4: "left ring finger", L5: "left little finger",
};
function fingerLabel(code) {
  switch (code) { // spelled out so the catalog check sees each name
    case "R1": return t("right thumb"); case "R2": return t("right index finger"); case "R3": return t("right middle finger");
    case "R4": return t("right ring finger"); case "R5": return t("right little finger");
    case "L1": return t("left thumb"); case "L2": return t("left index finger"); case "L3": return t("left middle finger");
    case "L4": return t("left ring finger"); case "L5": return t("left little finger");
    default: return FINGER_NAMES[code] || code;
  }
}

// Record states as an operator reads them: acknowledged and purged records were DELIVERED (purged = the kit's
// copy removed after the data center confirmed it), never "deleted".
function stateLabel(s) {
  switch (s) {
    case "stored": return t("stored, not sent yet");
    case "sent": return t("sent, waiting for confirmation");
    case "acked": return t("delivered");
    case "purged": return t("delivered (removed from the kit)");
    case "quarantined": return t("quarantined");
    default: return s;
  }
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
  state.me = null; state.enrollment = null; state.receipt = null; state.lastResult = null; state.lastDone = null;
  $("who").textContent = "";
  show("nav", false); show("signout", false); show("idle", false);
  go("signin");
  if (message) setMsg("signin-msg", message, "warn");
}

// ---- sign-in and idle warning -----------------------------------------------------------

// The browser's own validation bubbles are off (novalidate): they speak the browser's language and sit beside
// stale messages; the console checks the fields itself and says what is wrong in the operator's language.
$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setMsg("signin-msg", "");
  const id = $("signin-id").value.trim();
  const pin = $("signin-pin").value;
  if (!id) { setMsg("signin-msg", t("Type your operator id.")); $("signin-id").focus(); return; }
  if (!/^[0-9]{4,12}$/.test(pin)) {
    setMsg("signin-msg", t("The PIN has 4 to 12 digits."));
    $("signin-pin").value = ""; $("signin-pin").focus(); return;
  }
  try {
    const r = await api("POST", "/auth/signin", { operator_id: id, pin });
    $("signin-pin").value = "";
    onSignedIn({ operator_id: r.operator_id, name: r.name, role: r.role });
  } catch (e) {
    $("signin-pin").value = "";
    setMsg("signin-msg", e.message); // the lockout's wait is in the message once (errorText)
  }
});

$("signout").addEventListener("click", async () => {
  try { await api("POST", "/auth/signout"); } catch (e) { /* signed out anyway */ }
  onSignedOut(t("Signed out."));
});

async function pollMe() {
  if (!state.me) return;
  let me;
  try { me = await api("GET", "/auth/me"); } catch (e) { return; }
  if (!me.signed_in) { onSignedOut(t("Signed out after inactivity; sign in again.")); return; }
  show("idle", !!me.warn);
  if (me.warn) $("idle-text").textContent = t("No activity: you will be signed out in {s} s.", { s: fmtCount(me.signout_in_s) });
}

$("idle-stay").addEventListener("click", async () => {
  try { await api("GET", "/enrollment"); } catch (e) { /* handled by api() */ }
  show("idle", false);
});

$("lang").addEventListener("click", async () => {
  const next = I18N.lang === "id" ? "en" : "id";
  try { localStorage.setItem(LANG_KEY, next); } catch (e) { /* private mode: this page only */ }
  await loadLanguage(next);
  rerender();
});

function rerender() {
  if (state.status) renderAlerts(state.status);
  if (state.view === "status" && state.status) renderStatus(state.status);
  if (state.view === "records") refreshRecords();
  if (state.view === "enroll" && state.me) renderEnrollment();
}

// ---- alerts and status ------------------------------------------------------------------

function alertsFrom(st) {
  const out = [];
  const g = st.guard || {};
  const noStick = st.stick && !st.stick.present;
  // The stick's absence has its own alert; do not repeat the guard's reason for it. The reasons come worded
  // in the kit's language; `codes` (one per reason) say which is which.
  const codes = g.codes || [];
  const reasons = (g.reasons || []).filter((r, i) => !(noStick && ["no_stick", "stick_required"].includes(codes[i])));
  if (g.level === "HALT") {
    out.push(["halt", t("CAPTURE HALTED: {reasons}. No new enrollment can start.", { reasons: reasons.join("; ") })]);
    for (const a of g.actions || []) out.push(["halt", a]);
  } else if (g.level === "WARN" && reasons.length) out.push(["warn", t("Storage low: {reasons}", { reasons: reasons.join("; ") })]);
  // A stick that is in but was left out after a fault: the kit's own words (pull it and insert it again).
  if (noStick) out.push([g.level === "HALT" ? "halt" : "warn", st.stick.code === "usb_stick_faulted" && st.stick.message
    ? st.stick.message : t("USB stick missing: records are only on the SD card. Insert the stick.")]);
  if (st.sensor && st.sensor.error) out.push(["halt", t("Fingerprint sensor error: {error}", { error: st.sensor.error })]);
  if (st.control && st.control.locked) out.push(["halt", t("Capture locked by the office: {reason}", { reason: st.control.lock_reason || "" })]);
  // The battery: the kit words the message (power_low / power_critical / power_lost) in this console's language.
  if (st.power && st.power.message) out.push([st.power.level === "critical" ? "halt" : "warn", st.power.message]);
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
  if (value instanceof Node) { const td = el("td"); td.appendChild(value); tr.appendChild(td); } else tr.appendChild(el("td", value));
  tbody.appendChild(tr);
  return tr;
}

function renderStatus(st) {
  const g = st.guard || {};
  const gb = $("st-guard");
  gb.className = "banner " + (g.level === "HALT" ? "halt" : g.level === "WARN" ? "warn" : "ok");
  gb.textContent = t("Capture: {level}", { level: g.level || "?" }) + ((g.reasons || []).length ? " — " + g.reasons.join("; ") : " — " + t("ready"));
  const media = $("st-media");
  clear(media);
  for (const m of st.media || []) {
    const box = el("div", null, "medium");
    const used = m.total_bytes ? 1 - m.free_bytes / m.total_bytes : 0;
    box.appendChild(el("div", m.name + (m.present === false ? " (" + t("missing") + ")" : "") + " — " + (m.level || "?"), "medium-name"));
    const bar = el("div", null, "bar");
    const fill = el("div", null, "fill " + String(m.level || "").toLowerCase());
    fill.style.width = Math.round(Math.min(1, Math.max(0, used)) * 100) + "%";
    bar.appendChild(fill);
    box.appendChild(bar);
    let detail = t("{free} free of {total}", { free: fmtBytes(m.free_bytes), total: fmtBytes(m.total_bytes) });
    if (m.records_left !== undefined && m.records_left !== null) detail += " · " + t("room for about {n} records", { n: fmtCount(m.records_left) });
    if (m.reason) detail += " · " + m.reason;
    box.appendChild(el("div", detail, "medium-detail"));
    media.appendChild(box);
  }
  const tb = $("st-table");
  clear(tb);
  const rec = st.records || {};
  const n = (s) => (rec[s] ? rec[s].records : 0);
  row(tb, t("Records"), t("stored {stored} · sent {sent} · quarantined {quarantined}",
    { stored: fmtCount(n("stored")), sent: fmtCount(n("sent")), quarantined: fmtCount(n("quarantined")) })).id = "st-records";
  // Delivered = confirmed by the data center (acknowledged), whether the kit still keeps a copy or removed it.
  row(tb, t("Delivered to the data center"), t("{n} ({kept} still on the kit, {removed} removed from the kit)",
    { n: fmtCount(n("acked") + n("purged")), kept: fmtCount(n("acked")), removed: fmtCount(n("purged")) })).id = "st-delivered";
  row(tb, t("Backlog (not confirmed)"), fmtCount(n("stored") + n("sent")));
  row(tb, t("Oldest unconfirmed"), st.oldest_unacked ? st.oldest_unacked + " (" + fmtAge(st.oldest_unacked) + ")" : t("none"));
  if (st.mirror_lag) row(tb, t("Not yet on a USB stick"), tn("{n} record ({size})", "{n} records ({size})", st.mirror_lag.records, { size: fmtBytes(st.mirror_lag.bytes) }));
  if (st.stick) {
    row(tb, t("USB stick"), st.stick.present ? t("present") + (st.stick.stick_id ? " (" + st.stick.stick_id + ")" : "")
      : t("missing") + (st.stick.message || st.stick.error ? ": " + (st.stick.message || st.stick.error) : ""));
  }
  const up = st.relay || st.uplink;
  if (up) {
    let s = up.state || "?";
    if (up.broker) s += " → " + up.broker;
    if (up.since) s += " " + t("since {time}", { time: up.since });
    if (up.last_error) s += " — " + up.last_error;
    row(tb, t("Uplink"), s);
    if (up.backlog) row(tb, t("Uplink backlog"), tn("{n} record ({size})", "{n} records ({size})", up.backlog.records, { size: fmtBytes(up.backlog.bytes) }));
  } else {
    row(tb, t("Uplink"), t("not configured (records leave by USB stick)"));
  }
  if (st.sensor) {
    row(tb, t("Fingerprint sensor"), st.sensor.error ? t("ERROR: {error}", { error: st.sensor.error })
      : (st.sensor.open ? t("ready") : t("idle")) + " (" + (st.sensor.port || "") + ")");
  }
  if (st.daemon) {
    row(tb, t("Software"), t("rekam {version}, running for {min} min", { version: st.daemon.version, min: fmtCount(Math.round(st.daemon.uptime_s / 60)) })
      + (st.daemon.simulation ? " (" + t("SIMULATION") + ")" : ""));
  }
  if (st.kit_id) row(tb, t("Kit"), st.kit_id);
  renderTls();
}

async function renderTls() {
  let tls;
  try { tls = await api("GET", "/tls"); } catch (e) { return; }
  const box = $("st-tls");
  clear(box);
  show("st-tls", !!tls.https);
  if (!tls.https) return;
  box.appendChild(el("h2", t("HTTPS certificate fingerprint (SHA-256)")));
  box.appendChild(el("p", t("Before signing in from a phone, compare this fingerprint with the one the phone's browser shows.")));
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
  $("rec-summary").textContent = tn("{n} record today", "{n} records today", todays.length) +
    (todays.length ? " — " + Object.entries(counts).map(([k, v]) => stateLabel(k) + ": " + fmtCount(v)).join(", ") : "");
  const body = $("rec-body");
  clear(body);
  for (const r of todays) {
    const tr = el("tr");
    tr.appendChild(el("td", String(r.created).slice(11, 19)));
    tr.appendChild(el("td", r.id, "mono"));
    tr.appendChild(el("td", stateLabel(r.state), "state " + r.state));
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
  if (!state.me) return false;
  try {
    state.enrollment = await api("GET", "/enrollment");
  } catch (e) {
    setMsg("enroll-msg", e.message);
    return false;
  }
  renderEnrollment();
  return true;
}

function isOwner(e) {
  return !!state.me && (e.operator_id === state.me.operator_id || state.me.role === "supervisor");
}

function eyeLabel(eye) { return eye === "left" ? t("left eye") : t("right eye"); }
function isCaptureStep(step) { return step === "face" || step.startsWith("finger:") || step.startsWith("iris:"); }
// The API paths, preview and exception reasons of a capture step (face, iris:<eye>, finger:<code>).
function capturePath(step) {
  if (step === "face") return "/enrollment/face";
  if (step.startsWith("iris:")) return "/enrollment/iris/" + step.slice(5);
  return "/enrollment/fingers/" + step.slice(7);
}
function capturePreview(step) {
  if (step === "face") return "face-last.jpg";
  if (step.startsWith("iris:")) return "iris-" + step.slice(5) + ".jpg";
  return "finger-" + step.slice(7) + ".png";
}

function stepName(step) {
  if (step === "face") return t("Face photo");
  if (step && step.startsWith("iris:")) return t("Iris, {eye}", { eye: eyeLabel(step.slice(5)) });
  if (step === "signature") return t("Signature");
  if (step && step.startsWith("finger:")) return fingerLabel(step.slice(7));
  return step;
}

function renderEnrollment() {
  const e = state.enrollment;
  const active = e && e.active;
  show("receipt", !active && !!state.receipt);
  show("enroll-start", !active && !state.receipt);
  show("enroll-active", !!active);
  if (!active) {
    if (state.receipt) {
      prompt(t("Stored. Give the resident the receipt: print the PDF or let them photograph the QR code."), "ok");
    } else {
      const st = state.status;
      if (st && st.guard && st.guard.level === "HALT") {
        // The reason is in the red notice above; the prompt says what it means here (not the reason again).
        prompt(t("Capture is halted: no new enrollment can start. See the red notice above and the Status page."), "halt");
      } else {
        prompt(t("Type the resident's 16-digit NIK (from the KK) and tap Start enrollment."));
      }
    }
    return;
  }
  $("enroll-nik").textContent = "NIK " + e.nik_masked;
  // Someone else's enrollment: say whose it is; only its owner or a supervisor may continue or cancel it.
  const mine = e.operator_id === (state.me && state.me.operator_id);
  const owner = $("owner-note");
  owner.hidden = mine;
  if (!mine) {
    owner.textContent = isOwner(e)
      ? t("This enrollment was started by {name} ({id}). As a supervisor you may continue or cancel it.", { name: e.operator_name || e.operator_id, id: e.operator_id })
      : t("This enrollment was started by {name} ({id}) and is not finished. Only they or a supervisor may continue or cancel it.", { name: e.operator_name || e.operator_id, id: e.operator_id });
  }
  const allowed = isOwner(e);
  for (const id of ["capture", "sign", "dup", "sup", "review"]) show(id, false);
  show("cancel", allowed);
  renderSteps(e);
  if (!allowed) { prompt(t("Wait for {name}, or call a supervisor.", { name: e.operator_name || e.operator_id }), "warn"); return; }
  const step = e.step;
  show("capture", isCaptureStep(step));
  show("sign", step === "signature");
  show("dup", step === "dupcheck");
  show("sup", step === "supervisor");
  show("review", step === "review");
  if (isCaptureStep(step)) renderCapture(e);
  else if (step === "signature") renderSignature();
  else if (step === "dupcheck") {
    prompt(t("All captures done. Checking for a double enrollment…"));
    if (state.dupRunFor !== e.id) { state.dupRunFor = e.id; runDupcheck(); }
  } else if (step === "supervisor") {
    prompt(t("Possible double enrollment: call the supervisor. They enter their id, PIN, decision and reason."), "halt");
    const d = e.duplicates || [];
    $("sup-matches").textContent = t("Matching fingers: {list}", { list: d.map((h) => h.finger + " " + fingerLabel(h.finger) + " ↔ " + h.record_id).join(", ") });
  } else if (step === "review") {
    prompt(t("Read the NIK and the date of birth to the resident and compare the photos, then tap Store enrollment."));
    renderReview(e);
  }
}

function renderSteps(e) {
  const ol = $("steps");
  clear(ol);
  const items = [];
  if (e.face || e.face_exception || e.step === "face") {
    const faceDone = e.face_exception || (e.face && e.face.done);
    items.push(["face", t("Face"), faceDone ? (e.face_exception ? "exc" : e.face.forced ? "forced" : "done") : ""]);
  }
  for (const i of e.irises || []) items.push(["iris:" + i.eye, i.eye === "left" ? t("Iris L") : t("Iris R"), i.done ? (i.exception ? "exc" : i.forced ? "forced" : "done") : ""]);
  for (const f of e.fingers) items.push(["finger:" + f.finger, f.finger, f.done ? (f.exception ? "exc" : f.forced ? "forced" : "done") : ""]);
  if (e.signature) items.push(["signature", t("Sign"), e.signature.done ? (e.signature.exception ? "exc" : "done") : ""]);
  items.push(["dupcheck", t("Dup"), e.duplicates !== null ? "done" : ""]);
  items.push(["review", t("Store"), ""]);
  for (const [key, label, st] of items) {
    const li = el("li", label, "step " + st + (e.step === key ? " current" : ""));
    li.title = stepName(key);
    ol.appendChild(li);
  }
}

function renderCapture(e) {
  const step = e.step;
  const isFace = step === "face";
  const isIris = step.startsWith("iris:");
  const code = isFace || isIris ? null : step.slice(7);
  const label = isFace ? t("face photo") : isIris ? eyeLabel(step.slice(5)) : fingerLabel(code);
  $("capture-title").textContent = isFace ? t("Face photo") : isIris ? stepName(step) : code + " — " + label;
  $("capture-go").textContent = isFace ? t("Take photo") : isIris ? t("Capture iris") : t("Capture finger");
  $("capture-go").disabled = state.busy || e.busy;
  $("capture-exc").disabled = state.busy || e.busy;
  show("iris-live", isIris);
  if (!isIris) { show("iris-pos", false); state.live = null; }
  renderExceptionReasons(isFace ? "face" : isIris ? "iris" : "finger");
  const r = state.lastResult;
  const sameStep = r && r.step === step;
  // The previous step's result is named as such, under its own label, never under this step's heading.
  const done = state.lastDone;
  const note = $("done-note");
  note.hidden = !(done && done.step !== step);
  if (done && done.step !== step) note.textContent = done.text;
  if (state.busy) {
    prompt(isFace ? t("Taking the photo…") : t("Waiting for the {finger} on the sensor… (place it flat, press lightly)", { finger: label }), "busy");
  } else if (state.failed && state.failed.step === step) {
    prompt(state.failed.text, "halt");
  } else if (sameStep && r.status === "timeout") {
    prompt(t("No finger on the sensor. Place the {finger} flat, then tap Capture finger again.", { finger: label }), "warn");
  } else if (sameStep && !r.done) {
    // The reasons are listed once, as bullets below; the prompt says only what to do.
    prompt(t("Retake: follow the tips below, then tap {button} again (attempt {n}).", { button: $("capture-go").textContent, n: fmtCount(r.attempt + 1) }), "warn");
  } else if (isFace) {
    prompt(t("Face photo: the resident looks straight at the camera, neutral expression, no glasses or cap. Tap Take photo."));
  } else if (isIris) {
    prompt(t("Iris: hold the iris camera in front of the resident's {eye}, about 10 cm away; the resident opens the eye wide and looks into the camera. Tap Capture iris.", { eye: label.toUpperCase() }));
  } else {
    prompt(t("Ask the resident to place the {finger} flat on the sensor, then tap Capture finger.", { finger: label.toUpperCase() }));
  }
  renderFeedback(sameStep ? r : null);
}

function renderFeedback(r) {
  show("feedback", !!r && r.status !== "timeout");
  show("preview", !!r && !!r.preview && r.status !== "timeout");
  if (!r || r.status === "timeout") return;
  const badge = $("fb-badge");
  const kind = r.accepted ? "accepted" : r.forced ? "forced" : "retake";
  badge.textContent = { accepted: t("ACCEPTED"), forced: t("KEPT BEST (low quality)"), retake: t("RETAKE") }[kind];
  badge.className = "badge " + kind;
  $("fb-score").textContent = t("{what} score {score} · attempt {n}", { what: r.what || "", score: fmtCount(Math.round(r.score)), n: fmtCount(r.attempt) });
  // One place for the reasons: the bullets. The message line only for a kept-best result (it says why).
  $("fb-msg").textContent = r.forced ? t("Kept the best of {n} attempts (quality below the threshold).", { n: fmtCount(r.attempt) }) : "";
  const ul = $("fb-hints");
  clear(ul);
  // The hints come worded by the kit in this console's language (X-Rekam-Lang); their codes are in r.codes.
  if (!r.done) for (const h of r.hints || []) ul.appendChild(el("li", h));
  if (r.preview) $("preview").src = API + "/enrollment/preview/" + r.preview + "?t=" + Date.now();
}

// Exception reasons differ for the face and for a finger (no "amputated" face). The value sent is the English
// reason (the record's language for the data center); the label is translated.
const FACE_REASONS = [["camera unavailable", "camera unavailable"], ["resident refuses", "resident refuses a photo"],
  ["face covered (medical)", "face covered for a medical reason"], ["other", "other…"]];
const IRIS_REASONS = [["missing", "eye missing"], ["blind", "blind eye"], ["prosthesis", "prosthetic eye"],
  ["eye disease", "eye disease or injury"], ["camera unavailable", "camera unavailable"], ["other", "other…"]];
const FINGER_REASONS = [["missing", "missing / amputated"], ["bandaged", "bandaged"], ["injured", "injured / scarred"],
  ["sensor unavailable", "sensor unavailable"], ["resident refuses", "resident refuses"], ["other", "other…"]];
function reasonLabel(key) {
  switch (key) { // spelled out for the catalog check
    case "camera unavailable": return t("camera unavailable");
    case "resident refuses a photo": return t("resident refuses a photo");
    case "face covered for a medical reason": return t("face covered for a medical reason");
    case "missing / amputated": return t("missing / amputated");
    case "bandaged": return t("bandaged");
    case "injured / scarred": return t("injured / scarred");
    case "sensor unavailable": return t("sensor unavailable");
    case "resident refuses": return t("resident refuses");
    case "eye missing": return t("eye missing");
    case "blind eye": return t("blind eye");
    case "prosthetic eye": return t("prosthetic eye");
    case "eye disease or injury": return t("eye disease or injury");
    case "other…": return t("other…");
    default: return key;
  }
}
function renderExceptionReasons(want) {
  const sel = $("exc-select");
  if (sel.dataset.kind === want && sel.dataset.lang === I18N.lang) return;
  clear(sel);
  for (const [value, label] of want === "face" ? FACE_REASONS : want === "iris" ? IRIS_REASONS : FINGER_REASONS) {
    const o = el("option", reasonLabel(label));
    o.value = value;
    sel.appendChild(o);
  }
  sel.dataset.kind = want; sel.dataset.lang = I18N.lang;
}

async function startEnrollment(ev) {
  ev.preventDefault();
  setMsg("nik-msg", "");
  state.receipt = null;
  const nik = $("nik").value.trim();
  if (!nik) { setMsg("nik-msg", t("Type the resident's 16-digit NIK.")); $("nik").focus(); return; }
  const override = $("override").hidden ? "" : $("override-reason").value.trim();
  if (!$("override").hidden && !override) { setMsg("nik-msg", t("Give the reason to enroll this NIK again."), "warn"); $("override-reason").focus(); return; }
  const body = { nik, override_reason: override };
  $("nik-start").disabled = true;
  try {
    state.enrollment = await api("POST", "/enrollment", body);
    state.lastResult = null; state.lastDone = null; state.dupRunFor = null; state.failed = null;
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

function resultText(step, r) {
  const what = stepName(step);
  if (r.forced) return t("Done: {what} — kept the best attempt (score {score}).", { what, score: fmtCount(Math.round(r.score)) });
  return t("Done: {what} — accepted (score {score}).", { what, score: fmtCount(Math.round(r.score)) });
}

$("capture-go").addEventListener("click", async () => {
  const e = state.enrollment;
  if (!e || !e.active) return;
  const step = e.step;
  state.busy = true; state.failed = null;
  setMsg("enroll-msg", "");
  show("exc-form", false);
  renderCapture(e);
  try {
    const r = await api("POST", capturePath(step));
    r.step = step;
    r.what = step === "face" ? t("face") : step.startsWith("iris:") ? stepName(step) : step.slice(7);
    r.preview = r.status === "timeout" ? null : capturePreview(step);
    if (r.position) showPosition(r.position);
    state.lastResult = r;
    if (r.done) state.lastDone = { step, text: resultText(step, r) };
  } catch (err) {
    // The capture did not finish (the kit stopped answering, a device failed): the prompt must say so, and the
    // buttons come back, whatever happens to the refresh below.
    state.failed = { step, text: err.code === "offline"
      ? t("The kit did not answer: the capture was not finished. Check that the kit is on, then tap the button again.")
      : err.message };
    setMsg("enroll-msg", err.message);
  } finally {
    state.busy = false;
  }
  const ok = await refreshEnrollment();
  if (!ok) renderCapture(e);
});

$("capture-exc").addEventListener("click", () => {
  show("exc-form", true); show("feedback", false); show("preview", false); show("done-note", false);
  $("exc-form").scrollIntoView({ block: "nearest" });
  $("exc-select").focus();
});
$("exc-close").addEventListener("click", () => { show("exc-form", false); if (state.enrollment) renderCapture(state.enrollment); });
$("exc-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const e = state.enrollment;
  const sel = $("exc-select").value;
  const text = $("exc-text").value.trim();
  const reason = sel === "other" ? text : (text ? sel + ": " + text : sel);
  if (!reason) { setMsg("enroll-msg", t("Give a reason.")); $("exc-text").focus(); return; }
  const step = e.step;
  const path = capturePath(step) + "/exception";
  try {
    state.enrollment = await api("POST", path, { reason });
    $("exc-text").value = ""; show("exc-form", false); state.lastResult = null;
    const label = $("exc-select").selectedOptions[0] ? $("exc-select").selectedOptions[0].textContent : sel;
    state.lastDone = { step, text: t("Exception recorded for {what}: {reason}.", { what: stepName(step), reason: sel === "other" ? text : label + (text ? ": " + text : "") }) };
    setMsg("enroll-msg", state.lastDone.text, "ok");
    renderEnrollment();
  } catch (err) { setMsg("enroll-msg", err.message); }
});

async function runDupcheck() {
  $("dup-go").disabled = true;
  $("dup-result").textContent = t("Searching this kit's earlier enrollments…");
  try {
    const r = await api("POST", "/enrollment/dupcheck");
    $("dup-result").textContent = r.flagged ? t("Match found: {records}", { records: r.records.join(", ") })
      : t("No match: not enrolled under another NIK on this kit.");
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
  const sid = $("sup-id").value.trim();
  const reason = $("sup-reason").value.trim();
  if (!sid || !/^[0-9]{4,12}$/.test($("sup-pin").value) || !reason) {
    setMsg("sup-msg", t("The supervisor types their id, PIN (4 to 12 digits) and a reason."));
    return;
  }
  try {
    state.enrollment = await api("POST", "/enrollment/supervisor", { supervisor_id: sid, pin: $("sup-pin").value, decision, reason });
    $("sup-pin").value = ""; $("sup-reason").value = "";
    if (!state.enrollment.active) setMsg("nik-msg", t("Rejected by the supervisor: nothing was stored."), "warn");
    renderEnrollment();
  } catch (e) {
    $("sup-pin").value = "";
    setMsg("sup-msg", e.message);
  }
});

function thumb(name, alt) {
  const img = el("img", null, "thumb");
  img.alt = alt;
  img.src = API + "/enrollment/preview/" + name + "?t=" + Date.now();
  return img;
}

function scoreText(x) {
  return x.exception !== undefined && x.exception ? t("exception: {reason}", { reason: x.exception })
    : t("score {score}", { score: fmtCount(Math.round(x.score || 0)) }) + (x.forced ? " (" + t("kept best, low quality") + ")" : "");
}

function renderReview(e) {
  const tb = $("review-table").tBodies[0];
  clear(tb);
  // The full NIK and the birth date its digits 7-12 hold, spelled out: the resident hears a typo.
  const nik = e.nik || e.nik_masked;
  const nikBox = el("div");
  nikBox.appendChild(el("span", nik.replace(/(\d{6})(\d{6})(\d{4})/, "$1 $2 $3"), "mono big-nik"));
  row(tb, t("NIK"), nikBox).id = "review-nik";
  if (e.birth_date) {
    row(tb, t("Date of birth (from the NIK)"), fmtDate(e.birth_date) + " · " + (e.female ? t("woman") : t("man"))).id = "review-birth";
  }
  const faceCell = el("div", null, "thumbrow");
  if (e.face_exception) faceCell.appendChild(el("span", t("exception: {reason}", { reason: e.face_exception })));
  else if (e.face) {
    if (e.face.preview) faceCell.appendChild(thumb(e.face.preview, t("face photo")));
    faceCell.appendChild(el("span", scoreText({ score: e.face.score, forced: e.face.forced })));
  }
  if (e.face || e.face_exception) row(tb, t("Face"), faceCell);
  for (const f of e.fingers) {
    const cell = el("div", null, "thumbrow");
    if (f.preview && !f.exception) cell.appendChild(thumb(f.preview, fingerLabel(f.finger)));
    cell.appendChild(el("span", scoreText(f)));
    row(tb, f.finger + " " + fingerLabel(f.finger), cell);
  }
  for (const i of e.irises || []) {
    const cell = el("div", null, "thumbrow");
    if (i.preview && !i.exception) cell.appendChild(thumb(i.preview, eyeLabel(i.eye)));
    cell.appendChild(el("span", scoreText(i)));
    row(tb, stepName("iris:" + i.eye), cell).id = "review-iris-" + i.eye;
  }
  if (e.signature) {
    const cell = el("div", null, "thumbrow");
    if (e.signature.preview) cell.appendChild(thumb(e.signature.preview, t("Signature")));
    else cell.appendChild(el("span", t("exception: {reason}", { reason: e.signature.exception })));
    row(tb, t("Signature"), cell).id = "review-signature";
  }
  if (e.supervisor) row(tb, t("Supervisor"), e.supervisor.supervisor_id + ": " + (e.supervisor.decision === "accept" ? t("accepted") : t("rejected")) + " — " + e.supervisor.reason);
  if (e.override_reason) row(tb, t("Enrolled again because"), e.override_reason);
}

$("commit").addEventListener("click", async () => {
  $("commit").disabled = true;
  try {
    const r = await api("POST", "/enrollment/commit");
    state.receipt = r; state.lastResult = null; state.lastDone = null;
    $("rc-id").textContent = r.record_id;
    $("rc-mirror").textContent = r.mirrored ? t("Saved on the SD card and the USB stick.") : t("Saved on the SD card only — insert the USB stick.");
    $("rc-qr").src = API + "/receipts/" + r.record_id + ".png";
    $("rc-pdf").href = API + "/receipts/" + r.record_id + ".pdf";
    await refreshEnrollment();
  } catch (e) {
    setMsg("enroll-msg", e.message + " " + t("The enrollment is kept; tap Store enrollment again."));
  } finally {
    $("commit").disabled = false;
  }
});

$("cancel").addEventListener("click", async () => {
  if (!window.confirm(t("Cancel this enrollment? Nothing will be kept."))) return;
  try {
    await api("POST", "/enrollment/cancel");
    state.lastResult = null; state.lastDone = null;
    setMsg("nik-msg", t("Enrollment cancelled: nothing was kept."), "warn");
  } catch (e) { setMsg("enroll-msg", e.message); }
  await refreshEnrollment();
});

$("rc-next").addEventListener("click", () => { state.receipt = null; renderEnrollment(); $("nik").focus(); });

for (const b of document.querySelectorAll(".navbtn")) b.addEventListener("click", () => go(b.dataset.view));

// ---- start ------------------------------------------------------------------------------

async function boot() {
  let saved = null;
  try { saved = localStorage.getItem(LANG_KEY); } catch (e) { saved = null; }
  await loadLanguage(saved); // null: the kit's configured language
  pollStatus();
  let me = null;
  try { me = await api("GET", "/auth/me"); } catch (e) { me = null; }
  if (me && me.signed_in) onSignedIn(me); else go("signin");
  setInterval(pollStatus, 5000);
  setInterval(pollMe, 15000);
  setInterval(() => { if (state.view === "records") refreshRecords(); }, 30000);
}

// For the browser tests: the formatters, to compare with firmware.system.i18n on the same values.
window.rekamFormat = { count: fmtCount, size: fmtBytes, date: fmtDate, state: stateLabel, lang: () => I18N.lang };

boot();

// --- iris: live view with the eye's position and distance ---------------------------------------------------
function showPosition(p) {
  const box = $("iris-pos");
  box.hidden = false;
  if (!p || !p.found) { box.textContent = t("No eye in the picture."); return; }
  const dist = { too_far: t("too far: come closer"), too_close: t("too close: move back"), ok: t("distance good") }[p.distance];
  const side = Math.abs(p.dx) > 0.1 ? (p.dx > 0 ? t("move the camera right") : t("move the camera left")) : "";
  const vert = Math.abs(p.dy) > 0.1 ? (p.dy > 0 ? t("move the camera down") : t("move the camera up")) : "";
  box.textContent = [dist, side, vert].filter(Boolean).join(" · ");
}
async function liveOnce() {
  const e = state.enrollment;
  if (!state.live || !e || !e.active || !e.step.startsWith("iris:") || state.busy) { state.live = null; $("iris-live").textContent = t("Live view"); return; }
  try {
    const r = await api("GET", "/enrollment/iris/" + e.step.slice(5) + "/live");
    showPosition(r.position);
    show("preview", true);
    $("preview").src = API + "/enrollment/preview/" + r.preview + "?t=" + Date.now();
  } catch (err) { setMsg("enroll-msg", err.message); state.live = null; }
  if (state.live) state.live = setTimeout(liveOnce, 1000);
}
$("iris-live").addEventListener("click", () => {
  if (state.live) { clearTimeout(state.live); state.live = null; $("iris-live").textContent = t("Live view"); return; }
  state.live = true; $("iris-live").textContent = t("Stop live view");
  liveOnce();
});

// --- signature pad: pointer events (pressure where the device has it); the kit renders and checks the strokes --
const sig = { strokes: [], drawing: false, t0: 0 };
function padPoint(ev) {
  const c = $("sign-pad");
  const r = c.getBoundingClientRect();
  return [Math.round((ev.clientX - r.left) * c.width / r.width), Math.round((ev.clientY - r.top) * c.height / r.height),
    ev.pressure || 0.5, Math.round(performance.now() - sig.t0)];
}
function drawPad() {
  const c = $("sign-pad"); const g = c.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
  g.strokeStyle = "#000"; g.lineWidth = 3; g.lineCap = "round"; g.lineJoin = "round";
  for (const s of sig.strokes) {
    g.beginPath();
    s.forEach((p, i) => (i ? g.lineTo(p[0], p[1]) : g.moveTo(p[0], p[1])));
    if (s.length === 1) g.lineTo(s[0][0] + 0.5, s[0][1]);
    g.stroke();
  }
  $("sign-count").textContent = tn("{n} stroke", "{n} strokes", sig.strokes.length, { n: fmtCount(sig.strokes.length) });
}
function renderSignature() {
  prompt(t("Signature: the resident signs in the box with a finger or the stylus, then tap Keep signature."));
  drawPad();
}
$("sign-pad").addEventListener("pointerdown", (ev) => {
  ev.preventDefault();
  if (!sig.strokes.length) sig.t0 = performance.now();
  sig.drawing = true; $("sign-pad").setPointerCapture(ev.pointerId);
  sig.strokes.push([padPoint(ev)]); drawPad();
});
$("sign-pad").addEventListener("pointermove", (ev) => {
  if (!sig.drawing) return;
  const s = sig.strokes[sig.strokes.length - 1];
  if (s.length < 2000) s.push(padPoint(ev));
  drawPad();
});
for (const name of ["pointerup", "pointercancel"]) $("sign-pad").addEventListener(name, () => { sig.drawing = false; });
$("sign-clear").addEventListener("click", () => { sig.strokes = []; clear($("sign-hints")); drawPad(); });
$("sign-save").addEventListener("click", async () => {
  const c = $("sign-pad");
  $("sign-save").disabled = true;
  try {
    const r = await api("POST", "/enrollment/signature", { strokes: sig.strokes, width: c.width, height: c.height });
    clear($("sign-hints"));
    for (const h of r.hints || []) $("sign-hints").appendChild(el("li", h));
    if (r.accepted) { sig.strokes = []; state.lastDone = { step: "signature", text: t("Signature kept.") }; setMsg("enroll-msg", t("Signature kept."), "ok"); }
    await refreshEnrollment();
  } catch (err) { setMsg("enroll-msg", err.message); } finally { $("sign-save").disabled = false; }
});
$("sign-exc").addEventListener("click", () => { show("sign-exc-form", true); $("sign-exc-text").focus(); });
$("sign-exc-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const reason = $("sign-exc-text").value.trim();
  if (!reason) { setMsg("enroll-msg", t("Give a reason.")); return; }
  try {
    state.enrollment = await api("POST", "/enrollment/signature/exception", { reason });
    $("sign-exc-text").value = ""; show("sign-exc-form", false); sig.strokes = [];
    renderEnrollment();
  } catch (err) { setMsg("enroll-msg", err.message); }
});
