// Fleet: one server-side page of devices at a time (search, filters, sort, paging), so 10,000 devices cost
// the same first screen as ten.

import { api, Unreachable } from "./api.js";
import { replaceQuery } from "./nav.js";
import { clear, errorMessage, every, h, onlineBadge, table, when } from "./ui.js";

const PAGE_SIZE = 50;
const COLUMNS = [
  ["id", "Device"],
  [null, "State"],
  ["last_seen_at", "Last seen"],
  ["model", "Model"],
  ["fw_version", "Firmware"],
  ["kind", "Kind"],
];

export async function renderFleet(root, { query }) {
  const state = {
    search: query.get("search") ?? "",
    model: query.get("model") ?? "",
    online: query.get("online") ?? "",
    kind: query.get("kind") ?? "",
    sort: query.get("sort") ?? "id",
    page: Math.max(0, Number(query.get("page") ?? 0) || 0),
  };
  const total = h("span", { class: "muted", "aria-live": "polite" });
  const search = h("input", { type: "search", id: "fleet-search", value: state.search, placeholder: "id, name or notes" });
  const model = h("input", { id: "fleet-model", value: state.model, list: "fleet-models", placeholder: "any" });
  const models = h("datalist", { id: "fleet-models" });
  const online = h("select", { id: "fleet-online" }, opt("", "any"), opt("true", "online"), opt("false", "offline"));
  const kind = h("select", { id: "fleet-kind" }, opt("", "any"), opt("device", "device"), opt("gateway", "gateway"));
  online.value = state.online;
  kind.value = state.kind;
  const body = h("div", { id: "fleet-table" });
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  let pending = null;
  let seq = 0;

  async function load() {
    const mine = ++seq;
    replaceQuery({ ...state, page: state.page || "", sort: state.sort === "id" ? "" : state.sort });
    let page;
    try {
      page = await api("/api/v1/devices", {
        query: { search: state.search.trim(), model: state.model.trim(), online: state.online, kind: state.kind,
          sort: state.sort, limit: PAGE_SIZE, offset: state.page * PAGE_SIZE },
      });
    } catch (error) {
      // An outage is said by the banner; what was shown stays. Anything else is said here.
      if (mine === seq && !(error instanceof Unreachable)) clear(body, errorMessage(error));
      return;
    }
    if (mine !== seq) return; // a newer search answered first
    total.textContent = `${page.total.toLocaleString()} device${page.total === 1 ? "" : "s"}`;
    for (const m of new Set(page.devices.map((d) => d.model).filter(Boolean))) {
      if (![...models.options].some((o) => o.value === m)) models.append(h("option", { value: m }));
    }
    clear(body, page.devices.length ? grid(page.devices) : h("p", { class: "muted" }, "No device matches."));
    const first = page.total ? state.page * PAGE_SIZE + 1 : 0;
    const last = Math.min(page.total, (state.page + 1) * PAGE_SIZE);
    clear(
      pager,
      h("span", { class: "muted" }, `${first.toLocaleString()}–${last.toLocaleString()} of ${page.total.toLocaleString()}`),
      h("button", { type: "button", disabled: state.page === 0, onclick: () => go(state.page - 1) }, "Previous"),
      h("button", { type: "button", disabled: last >= page.total, onclick: () => go(state.page + 1) }, "Next"),
    );
    root.dataset.loaded = String(Date.now());
  }

  function go(page) {
    state.page = page;
    load();
  }

  function grid(devices) {
    const headers = COLUMNS.map(([field, label]) => {
      if (!field) return h("th", { scope: "col" }, label);
      const sorted = state.sort === field ? "ascending" : state.sort === `-${field}` ? "descending" : null;
      return h(
        "th",
        { scope: "col", "aria-sort": sorted ?? "none", class: field === "kind" ? "hide-phone" : null },
        h("button", { type: "button", onclick: () => {
          state.sort = state.sort === field ? `-${field}` : field;
          state.page = 0;
          load();
        } }, label),
      );
    });
    const rows = devices.map((d) =>
      h(
        "tr",
        { dataset: { device: d.id } },
        h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id), d.name ? h("span", { class: "exact" }, d.name) : null),
        h("td", {}, onlineBadge(d.online), d.disabled ? h("span", { class: "badge bad" }, "disabled") : null),
        h("td", {}, when(d.last_seen_at)),
        h("td", {}, d.model ?? "—"),
        h("td", { class: "mono" }, d.fw_version ?? "—"),
        h("td", { class: "hide-phone" }, d.kind),
      ),
    );
    return table(headers, rows, { "aria-label": "Devices", stack: false });
  }

  function changed(field, el, delay = 0) {
    const handler = () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        state[field] = el.value;
        state.page = 0;
        load();
      }, delay);
    };
    el.addEventListener("input", handler);
  }
  changed("search", search, 250);
  changed("model", model, 400);
  changed("online", online);
  changed("kind", kind);

  root.append(
    h("div", { class: "row" }, h("h1", {}, "Fleet"), h("span", { class: "spacer" }), total),
    h(
      "section",
      { class: "panel" },
      h("form", { role: "search", class: "row", onsubmit: (e) => e.preventDefault() },
        h("label", { for: "fleet-search" }, "Search", search),
        h("label", { for: "fleet-model" }, "Model", model, models),
        h("label", { for: "fleet-online" }, "State", online),
        h("label", { for: "fleet-kind" }, "Kind", kind)),
    ),
    h("section", { class: "panel" }, body, pager),
  );
  await load();
  return every(15_000, load);
}

function opt(value, label) {
  return h("option", { value }, label);
}
