// Small DOM helpers. Text goes in as text nodes, never as HTML: device names and payloads are untrusted.

import { describe } from "./api.js";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "value") el.value = value;
    else if (name === "checked") el.checked = Boolean(value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Write controls carry data-write, so a test (and a reader) can see that a viewer gets none.
export function writeButton(label, onclick, attrs = {}) {
  return h("button", { type: "button", dataset: { write: "" }, onclick, ...attrs }, label);
}

export function relative(iso) {
  if (!iso) return "never";
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  const future = seconds < 0;
  const s = Math.abs(seconds);
  let text;
  if (s < 5) return "just now";
  if (s < 60) text = `${s} s`;
  else if (s < 3600) text = `${Math.floor(s / 60)} min`;
  else if (s < 86400) text = `${Math.floor(s / 3600)} h`;
  else text = `${Math.floor(s / 86400)} d`;
  return future ? `in ${text}` : `${text} ago`;
}

export function exact(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// Relative time with the exact local time under it; refreshed by tick().
export function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "never");
  return h(
    "span",
    {},
    h("time", { datetime: iso, title: iso, dataset: { relative: "" } }, relative(iso)),
    h("span", { class: "exact" }, exact(iso)),
  );
}

export function tick(root = document) {
  for (const t of root.querySelectorAll("time[data-relative]")) t.textContent = relative(t.dateTime);
}

export function message(kind, text) {
  return h("div", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

export function errorMessage(error) {
  return message("error", describe(error));
}

export function statusBadge(status) {
  const tone = { acked: "ok", delivered: "ok", completed: "ok", cleared: "ok", active: "bad", failed: "bad", expired: "bad",
    timed_out: "bad", cancelled: "warn", paused: "warn", acknowledged: "warn", queued: "", sent: "warn",
    distributing: "warn", notified: "warn", downloading: "warn", installing: "warn", running: "warn", stopped: "warn", pending: "" }[status] ?? "";
  return h("span", { class: `badge ${tone}`, dataset: { status } }, status);
}

// A place under an input for the server's word about it (a 422 naming that field); see markField.
export function fieldNote(input) {
  const note = h("div", { class: "field-error", id: `${input.id}-error`, hidden: true });
  input.setAttribute("aria-describedby", note.id);
  return note;
}

// Say an ApiError next to the field it names (its first part: "events.0" is the events field), clearing
// the others; true when it was said there, false when no note belongs to that field (say it elsewhere).
export function markField(notes, error) {
  const name = error?.field?.split(".")[0];
  let said = false;
  for (const [key, note] of Object.entries(notes)) {
    const input = document.getElementById(note.id.replace(/-error$/, ""));
    const mine = key === name;
    note.hidden = !mine;
    note.textContent = mine ? describeField(error) : "";
    if (mine) input?.setAttribute("aria-invalid", "true");
    else input?.removeAttribute("aria-invalid");
    if (mine) input?.focus();
    said ||= mine;
  }
  return said;
}

function describeField(error) {
  // "events.0: Value error, 'x' matches no event…" reads better without the field name and pydantic's prefix.
  return error.message.replace(/^[\w.]+: /, "").replace(/^Value error, /, "");
}

export function onlineBadge(online) {
  return h("span", { class: `badge ${online ? "ok" : ""}` }, h("span", { class: `dot ${online ? "on" : ""}`, "aria-hidden": "true" }), online ? "online" : "offline");
}

export function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(6)));
  if (typeof value === "boolean") return value ? "true" : "false";
  if (value === null || value === undefined) return "—";
  return typeof value === "string" ? value : JSON.stringify(value);
}

export function json(value) {
  return JSON.stringify(value, null, 2);
}

// On a phone a table of this kind becomes one block per row, each cell under its header's name
// (``data-label``), instead of a strip scrolled sideways with its last columns out of sight.
// ``stack: false`` keeps it a table (the fleet list, which drops columns on a phone instead).
export function table(headers, rows, { stack = true, ...attrs } = {}) {
  const labels = headers.map((x) => (x instanceof Node ? x.textContent : String(x ?? "")).trim());
  if (stack) {
    for (const row of [rows].flat(Infinity)) {
      if (!(row instanceof Element)) continue;
      [...row.children].forEach((cell, i) => {
        if (labels[i] && cell.dataset.label === undefined) cell.dataset.label = labels[i];
      });
    }
  }
  const cls = [attrs.class, stack ? "stack" : null].filter(Boolean).join(" ");
  return h(
    "div",
    { class: "table-wrap" },
    h("table", { ...attrs, class: cls || undefined }, h("thead", {}, h("tr", {}, headers.map((x) => (x instanceof Node ? x : h("th", { scope: "col" }, x))))), h("tbody", {}, rows)),
  );
}

// Run fn every ms while the page is shown; returns the stop function.
// A failed refresh is already said (the banner for an outage, the sign-in for a refused key).
export function every(ms, fn) {
  const id = setInterval(() => {
    if (!document.hidden) Promise.resolve().then(fn).catch((error) => console.warn("refresh failed:", error.message));
  }, ms);
  return () => clearInterval(id);
}

export function copyButton(text) {
  return h("button", { type: "button", onclick: (e) => {
    navigator.clipboard?.writeText(text).then(() => { e.target.textContent = "Copied"; }, () => {});
  } }, "Copy");
}

// Parse a JSON textarea; a mistake names the field instead of throwing from deep inside.
export function parseJson(text, field) {
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${field}: not valid JSON (${error.message})`);
  }
}
