// Rules (issue 10's API): list, create, edit, enable / disable, delete. Operators and admins write; a viewer
// reads the list only. A changed rule starts afresh on the server; a deleted one clears its open alerts.

import { api, session } from "./api.js";
import { clear, errorMessage, every, h, message, table, when, writeButton } from "./ui.js";

const KINDS = [
  ["threshold", "threshold: a key's value"],
  ["rate", "rate: a key's change per second"],
  ["nodata", "nodata: no reading of a key"],
  ["offline", "offline: a device silent for"],
];
const OPS = [">", ">=", "<", "<=", "==", "!="];
const SEVERITIES = ["info", "warning", "critical"];
const VALUED = new Set(["threshold", "rate"]);

function condition(r) {
  const hold = r.for_s ? ` for ${r.for_s} s` : "";
  if (r.kind === "offline") return `silent for ${r.for_s} s`;
  if (r.kind === "nodata") return `no ${r.key} reading for ${r.for_s} s`;
  const what = r.kind === "rate" ? `${r.key} change/s` : r.key;
  const clears = r.clear_value != null ? `; clears at ${r.clear_value}` : "";
  return `${what} ${r.op} ${r.value}${hold}${clears}`;
}

function scope(r) {
  if (r.devices) return `devices: ${r.devices.join(", ")}`;
  const kinds = r.kinds ? `kinds: ${r.kinds.join(", ")}` : "";
  if (r.models) return `models: ${r.models.join(", ")}${kinds ? `; ${kinds}` : ""}`;
  return kinds || "every device";
}

const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
const num = (input) => (input.value.trim() === "" ? null : Number(input.value));

export async function renderRules(root) {
  const listBox = h("div", { id: "rules" });
  const out = h("div", { "aria-live": "polite" });
  let editing = null; // the rule being edited, or null for a new one

  // -- the form (new rule or edit) -----------------------------------------------------------------
  const name = h("input", { id: "rule-name", required: true, maxlength: 128, autocomplete: "off" });
  const kind = h("select", { id: "rule-kind" }, KINDS.map(([v, label]) => h("option", { value: v }, label)));
  const key = h("input", { id: "rule-key", maxlength: 128, autocomplete: "off", placeholder: "temperature" });
  const op = h("select", { id: "rule-op" }, OPS.map((o) => h("option", { value: o }, o)));
  const value = h("input", { id: "rule-value", type: "number", step: "any" });
  const forS = h("input", { id: "rule-for", type: "number", min: 0, max: 30 * 86400, value: 0 });
  const clearValue = h("input", { id: "rule-clear", type: "number", step: "any", placeholder: "the threshold" });
  const severity = h("select", { id: "rule-severity" }, SEVERITIES.map((s) => h("option", { value: s }, s)));
  severity.value = "warning";
  const scopeSel = h("select", { id: "rule-scope" }, h("option", { value: "all" }, "every device"), h("option", { value: "models" }, "models"), h("option", { value: "devices" }, "devices"));
  const targets = h("input", { id: "rule-targets", autocomplete: "off", placeholder: "comma separated" });
  const deviceKind = h("select", { id: "rule-device-kind" }, ["any", "device", "gateway"].map((k) => h("option", { value: k }, k)));
  const enabled = h("input", { id: "rule-enabled", type: "checkbox", checked: true });
  const title = h("h2", { id: "rule-form-h" }, "New rule");
  const submit = h("button", { type: "submit", class: "primary" }, "Create rule");
  const cancel = h("button", { type: "button", hidden: true, onclick: () => edit(null) }, "Cancel edit");
  const field = (input, label) => h("label", { for: input.id }, label, input);
  const keyField = field(key, "Key");
  const opField = field(op, "Operator");
  const valueField = field(value, "Value");
  const clearField = field(clearValue, "Clears at (optional)");
  const forField = field(forS, "Held for (s)");
  const targetsField = field(targets, "Models or devices");
  const deviceKindField = field(deviceKind, "Device kind");

  function syncFields() {
    const k = kind.value;
    keyField.hidden = k === "offline";
    opField.hidden = valueField.hidden = clearField.hidden = !VALUED.has(k);
    forField.firstChild.textContent = k === "offline" ? "Silent for (s)" : k === "nodata" ? "No reading for (s)" : "Held for (s)";
    key.required = k !== "offline";
    value.required = VALUED.has(k);
    targetsField.hidden = scopeSel.value === "all";
    targets.required = scopeSel.value !== "all";
    deviceKindField.hidden = scopeSel.value === "devices"; // devices names them: no kind besides
  }
  kind.addEventListener("change", syncFields);
  scopeSel.addEventListener("change", syncFields);

  function body() {
    const k = kind.value;
    const chosen = scopeSel.value === "all" ? [] : list(targets.value);
    return {
      name: name.value.trim(), kind: k, severity: severity.value, enabled: enabled.checked,
      key: k === "offline" ? null : key.value.trim() || null,
      op: VALUED.has(k) ? op.value : null,
      value: VALUED.has(k) ? num(value) : null,
      clear_value: VALUED.has(k) ? num(clearValue) : null,
      for_s: Number(forS.value || 0),
      devices: scopeSel.value === "devices" ? chosen : null,
      models: scopeSel.value === "models" ? chosen : null,
      kinds: scopeSel.value === "devices" || deviceKind.value === "any" ? null : [deviceKind.value],
    };
  }

  function edit(rule) {
    editing = rule;
    title.textContent = rule ? `Edit rule #${rule.id}` : "New rule";
    submit.textContent = rule ? "Save rule" : "Create rule";
    cancel.hidden = !rule;
    const r = rule ?? {};
    name.value = r.name ?? "";
    kind.value = r.kind ?? "threshold";
    key.value = r.key ?? "";
    op.value = r.op ?? ">";
    value.value = r.value ?? "";
    clearValue.value = r.clear_value ?? "";
    forS.value = r.for_s ?? 0;
    severity.value = r.severity ?? "warning";
    scopeSel.value = r.devices ? "devices" : r.models ? "models" : "all";
    targets.value = (r.devices ?? r.models ?? []).join(", ");
    deviceKind.value = r.kinds?.length === 1 ? r.kinds[0] : "any";
    enabled.checked = r.enabled ?? true;
    syncFields();
    if (rule) name.focus();
  }

  const form = h("form", { id: "rule-form", dataset: { write: "" }, onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      const rule = editing
        ? await api(`/api/v1/rules/${editing.id}`, { method: "PATCH", body: body() })
        : await api("/api/v1/rules", { method: "POST", body: body() });
      clear(out, message("ok", `Rule #${rule.id} ${rule.name} ${editing ? "saved" : "created"}.`));
      edit(null);
      await load();
    } catch (error) {
      clear(out, errorMessage(error));
    } finally {
      submit.disabled = false;
    }
  } },
    h("div", { class: "row" }, field(name, "Name"), field(kind, "Kind"), field(severity, "Severity")),
    h("div", { class: "row" }, keyField, opField, valueField, clearField, forField),
    h("div", { class: "row" }, field(scopeSel, "Applies to"), targetsField, deviceKindField, h("label", { class: "check", for: "rule-enabled" }, enabled, "enabled")),
    h("p", { class: "row" }, submit, cancel), out);

  // -- the list ------------------------------------------------------------------------------------
  async function act(e, fn) {
    e.target.disabled = true;
    try {
      await fn();
    } catch (error) {
      clear(out, errorMessage(error));
    }
    await load();
  }

  async function load() {
    let rules;
    try {
      rules = (await api("/api/v1/rules")).rules;
    } catch (error) {
      clear(listBox, errorMessage(error));
      return;
    }
    const operates = session.operates;
    const headers = ["Rule", "Condition", "Applies to", "Severity", "State", "Changed", operates ? "Actions" : null].filter(Boolean);
    clear(listBox, rules.length ? table(headers, rules.map((r) =>
      h("tr", { dataset: { rule: r.id } },
        h("td", {}, h("strong", {}, r.name), h("div", { class: "muted small" }, `#${r.id} ${r.kind}`, r.source === "file" ? " · from the rules file" : "")),
        h("td", { class: "mono" }, condition(r)),
        h("td", {}, scope(r)),
        h("td", {}, h("span", { class: `badge ${r.severity === "critical" ? "bad" : r.severity === "warning" ? "warn" : ""}` }, r.severity)),
        h("td", {}, h("span", { class: `badge ${r.enabled ? "ok" : ""}`, dataset: { enabled: String(r.enabled) } }, r.enabled ? "enabled" : "disabled")),
        h("td", {}, when(r.updated_at)),
        operates ? h("td", {}, h("div", { class: "row" },
          writeButton("Edit", () => { edit(r); form.scrollIntoView({ block: "nearest" }); }),
          writeButton(r.enabled ? "Disable" : "Enable", (e) => act(e, () => api(`/api/v1/rules/${r.id}`, { method: "PATCH", body: { enabled: !r.enabled } }))),
          writeButton("Delete", (e) => act(e, async () => {
            if (!confirm(`Delete rule ${r.name}? Its open alerts are cleared.`)) return;
            await api(`/api/v1/rules/${r.id}`, { method: "DELETE" });
            if (editing?.id === r.id) edit(null);
          }), { class: "danger" }))) : null)), { "aria-label": "Rules" }) :
      h("p", { class: "muted" }, operates ? "No rules yet: create one below." : "No rules yet."));
  }

  syncFields();
  root.append(
    h("h1", {}, "Rules"),
    h("section", { class: "panel", "aria-labelledby": "rules-h" }, h("h2", { id: "rules-h" }, "Rules"),
      h("p", { class: "muted small" }, "Alerts are raised by these rules on every reading; a changed rule starts afresh, a deleted one clears its open alerts."),
      listBox),
    session.operates ? h("section", { class: "panel", "aria-labelledby": "rule-form-h" }, title, form) : null,
  );
  await load();
  return every(30_000, load);
}
