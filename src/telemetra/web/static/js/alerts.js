// Alerts: active → acknowledged → cleared.

import { api, session } from "./api.js";
import { replaceQuery } from "./nav.js";
import { clear, errorMessage, every, h, statusBadge, table, when, writeButton } from "./ui.js";

export function alertRows(alerts, reload, { device = true } = {}) {
  const act = (a, to, label) =>
    writeButton(label, async (e) => {
      e.target.disabled = true;
      try {
        await api(`/api/v1/alerts/${a.id}/${to}`, { method: "POST" });
      } catch (error) {
        e.target.after(errorMessage(error));
      }
      await reload();
    });
  const headers = [device ? "Device" : null, "Alert", "Severity", "Status", "Raised", session.operates ? "Actions" : null].filter(Boolean);
  return table(headers, alerts.map((a) =>
    h("tr", { dataset: { alert: a.id } },
      // An empty device_id: an alert about the server itself (storage_budget), not a device.
      device ? h("td", {}, a.device_id ? h("a", { href: `#/devices/${encodeURIComponent(a.device_id)}` }, a.device_id) : h("span", { class: "muted" }, "server")) : null,
      h("td", {}, h("strong", {}, a.type), a.message ? h("div", { class: "small" }, a.message) : null, a.count > 1 ? h("span", { class: "muted small" }, `×${a.count}`) : null),
      h("td", {}, a.severity ?? "—"),
      h("td", {}, statusBadge(a.status)),
      h("td", {}, when(a.created_at)),
      session.operates ? h("td", {}, h("div", { class: "row" },
        a.status === "active" ? act(a, "acknowledge", "Acknowledge") : null,
        a.status !== "cleared" ? act(a, "clear", "Clear") : null)) : null)), { "aria-label": "Alerts" });
}

export async function renderAlerts(root, { query }) {
  const status = h("select", { id: "alert-status" }, ["active", "acknowledged", "cleared", ""].map((s) => h("option", { value: s }, s || "all")));
  status.value = query.get("status") ?? "active";
  const list = h("div", { id: "alerts" });
  async function load() {
    replaceQuery({ status: status.value === "active" ? "" : status.value || "all" });
    try {
      const answer = await api("/api/v1/alerts", { query: { status: status.value, limit: 200 } });
      clear(list, answer.alerts.length ? alertRows(answer.alerts, load) : h("p", { class: "muted" }, `No ${status.value || ""} alerts.`));
    } catch (error) {
      clear(list, errorMessage(error));
    }
  }
  if (status.value === "all") status.value = "";
  status.addEventListener("change", load);
  root.append(h("h1", {}, "Alerts"), h("section", { class: "panel" }, h("div", { class: "row" }, h("label", { for: "alert-status" }, "Show", status)), list));
  await load();
  return every(10_000, load);
}
