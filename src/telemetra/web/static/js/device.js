// One device: latest values, chart (live), state, events, alerts, commands, configuration, credentials.

import { api, describe, session } from "./api.js";
import { TimeChart, RANGES } from "./chart.js";
import { credentialsBox } from "./creds.js";
import { Live } from "./live.js";
import { replaceQuery } from "./nav.js";
import { clear, errorMessage, every, exact, formatValue, h, json, onlineBadge, parseJson, statusBadge, table, when, writeButton } from "./ui.js";
import { alertRows } from "./alerts.js";

const TERMINAL = new Set(["acked", "failed", "expired"]);
const POLL_MS = 5000; // while the live stream is down

export async function renderDevice(root, { params, query }) {
  const [id] = params;
  const base = `/api/v1/devices/${encodeURIComponent(id)}`;
  const latest = {}; // key -> {ts, value}
  const [device, firstLatest] = await Promise.all([api(base), api(`${base}/latest`)]);
  const stops = [];

  const facts = h("dl", { class: "facts" });
  const liveBadge = h("span", { class: "badge", id: "live-status", "aria-live": "polite" }, "connecting");
  const cards = h("div", { class: "cards", id: "latest", "aria-live": "polite" });
  const chartBox = h("div", { class: "chart", id: "chart", role: "img", "aria-label": `Chart of ${id}` });
  const chartNote = h("p", { class: "muted small", id: "chart-note" });
  const keysBox = h("fieldset", { class: "keys" }, h("legend", {}, "Series"));
  const rangeSel = h("select", { id: "range" }, RANGES.map(([v, label]) => h("option", { value: v }, label)));
  rangeSel.value = query.get("range") ?? "24h";
  const resetZoom = h("button", { type: "button", hidden: true, onclick: () => { zoom = null; resetZoom.hidden = true; drawChart(); } }, "Reset zoom");
  const stateBox = h("div", { id: "state" });
  const eventsBox = h("div", { id: "events" });
  const alertsBox = h("div", { id: "device-alerts" });
  const commandsBox = h("div", { id: "commands" });
  const configBox = h("div", { id: "config" });
  const credsBox = h("div", { id: "credentials" });
  let zoom = null;
  let selected = null;

  const chart = new TimeChart(chartBox, {
    deviceId: id,
    onZoom: (min, max) => {
      zoom = { start: min, end: max };
      resetZoom.hidden = false;
      drawChart();
    },
  });

  function renderFacts(d) {
    clear(facts,
      h("dt", {}, "State"), h("dd", {}, onlineBadge(d.online), d.disabled ? h("span", { class: "badge bad" }, "disabled") : null),
      h("dt", {}, "Last seen"), h("dd", {}, when(d.last_seen_at)),
      h("dt", {}, "Model"), h("dd", {}, d.model ?? "—"),
      h("dt", {}, "Firmware"), h("dd", { class: "mono" }, d.fw_version ?? "—"),
      h("dt", {}, "Kind"), h("dd", {}, d.kind, d.parent_id ? ` (child of ${d.parent_id})` : ""),
      h("dt", {}, "RSSI"), h("dd", {}, d.rssi ?? "—"),
      h("dt", {}, "Created"), h("dd", {}, exact(d.created_at)),
      d.notes ? [h("dt", {}, "Notes"), h("dd", {}, d.notes)] : null);
  }

  function renderCards() {
    const keys = Object.keys(latest).sort();
    clear(cards, keys.length ? keys.map((k) => h("div", { class: "card", dataset: { key: k } },
      h("div", { class: "k" }, k), h("div", { class: "v", dataset: { value: "" } }, formatValue(latest[k].value)), h("div", { class: "small muted" }, when(latest[k].ts)))) :
      h("p", { class: "muted" }, "No telemetry yet."));
  }

  function numericKeys() {
    return Object.keys(latest).filter((k) => typeof latest[k].value === "number" || typeof latest[k].value === "boolean").sort();
  }

  function renderKeyPicker() {
    const keys = numericKeys();
    if (selected === null) selected = new Set(keys.slice(0, 4));
    const boxes = keys.map((k) => h("label", { class: "check" },
      h("input", { type: "checkbox", value: k, checked: selected.has(k), onchange: (e) => {
        if (e.target.checked) selected.add(k); else selected.delete(k);
        drawChart();
      } }), k));
    clear(keysBox, h("legend", {}, "Series"), boxes.length ? boxes : h("span", { class: "muted small" }, "none yet"));
  }

  async function drawChart() {
    const span = RANGES.find(([v]) => v === rangeSel.value)[2];
    const keys = numericKeys().filter((k) => selected?.has(k));
    try {
      await chart.load(keys, zoom ? { ...zoom, span: zoom.end - zoom.start } : { span, end: null });
      chartNote.textContent = keys.length
        ? `${chart.data[0].length - chart.gaps} buckets of ${chart.interval} s (min, average, max) from ${chart.resolution === "raw" ? "the raw points" : `the ${chart.resolution} rollup`} · ${(chart.bytes / 1024).toFixed(1)} KB${chart.gaps ? ` · ${chart.gaps} gap${chart.gaps > 1 ? "s" : ""} in the data` : ""}${zoom ? " · zoomed: drag again or reset" : " · drag to zoom"}`
        : "";
    } catch (error) {
      clear(chartBox, errorMessage(error));
    }
  }

  async function loadLatest(given) {
    const answer = given ?? (await api(`${base}/latest`));
    const fresh = [];
    for (const [k, p] of Object.entries(answer.values)) {
      if (!latest[k] || p.ts > latest[k].ts) fresh.push([k, p]);
      latest[k] = p;
    }
    return fresh;
  }

  // A reading (from the stream, or found by polling while the stream is down).
  function reading(ts, values) {
    const known = new Set(numericKeys());
    for (const [k, v] of Object.entries(values)) latest[k] = { ts, value: v };
    renderCards();
    const now = numericKeys();
    if (now.some((k) => !known.has(k))) {
      for (const k of now) if (!known.has(k) && selected.size < 4) selected.add(k);
      renderKeyPicker();
      drawChart();
    } else {
      chart.append(ts, values);
    }
  }

  async function loadState() {
    const [state, history] = await Promise.all([api(`${base}/state`), api(`${base}/state/history`, { query: { limit: 50 } })]);
    const rows = Object.entries(state.state).map(([k, s]) => h("tr", {}, h("td", { class: "mono" }, k), h("td", {}, formatValue(s.value)), h("td", {}, when(s.ts))));
    clear(stateBox,
      rows.length ? table(["Key", "Value", "Since"], rows) : h("p", { class: "muted" }, "No state reported."),
      history.history.length ? h("details", {}, h("summary", {}, `History (${history.history.length})`),
        table(["Key", "Value", "At"], history.history.map((r) => h("tr", {}, h("td", { class: "mono" }, r.key), h("td", {}, formatValue(r.value)), h("td", {}, exact(r.ts)))))) : null);
  }

  async function loadEvents() {
    const answer = await api(`${base}/events`, { query: { limit: 50 } });
    clear(eventsBox, answer.events.length ? h("ul", { class: "list" }, answer.events.map((e) =>
      h("li", {}, h("strong", {}, e.name), " ", h("span", { class: "muted small" }, exact(e.ts)), e.payload != null ? h("pre", {}, json(e.payload)) : null))) :
      h("p", { class: "muted" }, "No events."));
  }

  async function loadAlerts() {
    const answer = await api("/api/v1/alerts", { query: { device_id: id, limit: 50 } });
    clear(alertsBox, answer.alerts.length ? alertRows(answer.alerts, loadAlerts, { device: false }) : h("p", { class: "muted" }, "No alerts."));
  }

  let commandRows = [];
  async function loadCommands() {
    const answer = await api(`${base}/commands`, { query: { limit: 20 } });
    commandRows = answer.commands;
    clear(commandsBox, commandRows.length ? table(["Command", "Status", "Created", "Answer"], commandRows.map((c) =>
      h("tr", { dataset: { command: c.id } },
        h("td", {}, h("strong", {}, c.name), Object.keys(c.params ?? {}).length ? h("pre", {}, json(c.params)) : null),
        h("td", {}, statusBadge(c.status)),
        h("td", {}, when(c.created_at)),
        h("td", {}, c.result != null ? h("pre", {}, json(c.result)) : h("span", { class: "muted" }, "—"))))) :
      h("p", { class: "muted" }, "No commands sent."));
  }

  function commandForm() {
    if (!session.operates) return null;
    const name = h("input", { id: "cmd-name", required: true, placeholder: "reboot", autocomplete: "off" });
    const params = h("textarea", { id: "cmd-params", rows: 2, placeholder: '{"delay_s": 5}' });
    const ttl = h("input", { id: "cmd-ttl", type: "number", min: 1, value: 3600 });
    const status = h("div", { "aria-live": "polite" });
    return h("form", { dataset: { write: "" }, onsubmit: async (e) => {
      e.preventDefault();
      try {
        const body = { name: name.value.trim(), params: parseJson(params.value, "Parameters"), ttl_s: Number(ttl.value) };
        const c = await api(`${base}/commands`, { method: "POST", body });
        clear(status, h("p", { class: "message ok", role: "status" }, `Command ${c.name} ${c.status}.`));
        await loadCommands();
      } catch (error) {
        clear(status, errorMessage(error));
      }
    } },
      h("div", { class: "row" }, h("label", { for: "cmd-name" }, "Command", name), h("label", { for: "cmd-ttl" }, "Expires after (s)", ttl)),
      h("label", { for: "cmd-params" }, "Parameters (JSON)", params),
      h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Send command")), status);
  }

  async function loadConfig() {
    const c = await api(`${base}/config`);
    const keys = [...new Set([...Object.keys(c.desired), ...Object.keys(c.reported)])].sort();
    const rows = keys.map((k) => h("tr", {}, h("td", { class: "mono" }, k), h("td", {}, k in c.desired ? formatValue(c.desired[k]) : "—"),
      h("td", {}, k in c.reported ? formatValue(c.reported[k]) : "—"), h("td", { class: k in c.delta ? "changed" : "" }, k in c.delta ? "pending" : "in sync")));
    const edit = session.operates ? configEditor(c.desired) : null;
    clear(configBox,
      h("p", {}, c.in_sync ? h("span", { class: "badge ok" }, "in sync") : h("span", { class: "badge warn" }, "out of sync"),
        ` desired version ${c.desired_version ?? 0}, reported ${c.reported_version ?? "none"}`),
      rows.length ? table(["Key", "Desired", "Reported", "Delta"], rows, { class: "delta" }) : h("p", { class: "muted" }, "No configuration yet."),
      edit);
  }

  function configEditor(desired) {
    const text = h("textarea", { id: "config-desired", rows: 4 }, json(desired));
    const status = h("div", { "aria-live": "polite" });
    return h("form", { dataset: { write: "" }, onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api(`${base}/config`, { method: "PUT", body: parseJson(text.value, "Desired configuration") });
        await loadConfig();
      } catch (error) {
        clear(status, errorMessage(error));
      }
    } }, h("label", { for: "config-desired" }, "Desired configuration (JSON)", text), h("button", { type: "submit" }, "Save desired configuration"), status);
  }

  function credentials() {
    if (!session.admin) return;
    clear(credsBox, h("p", { class: "small muted" }, "A new secret replaces the old one at once, for HTTP and MQTT."),
      writeButton("Rotate credentials", async () => {
        if (!confirm(`Rotate the credentials of ${id}? The device stops working until it gets the new secret.`)) return;
        try {
          clear(credsBox, credentialsBox(await api(`${base}/rotate`, { method: "POST" })));
        } catch (error) {
          credsBox.append(errorMessage(error));
        }
      }, { class: "danger" }));
  }

  // -- layout ------------------------------------------------------------------------------------
  renderFacts(device);
  root.append(
    h("div", { class: "row" }, h("h1", {}, device.name ? `${device.name} (${id})` : id), h("span", { class: "spacer" }), liveBadge),
    // Facts and latest values share the first row between them; the chart takes the width under it.
    h("div", { class: "grid stack" },
      h("section", { class: "panel" }, h("h2", {}, "Device"), facts),
      h("section", { class: "panel", "aria-labelledby": "latest-h" }, h("h2", { id: "latest-h" }, "Latest values"), cards)),
    h("section", { class: "panel", "aria-labelledby": "chart-h" }, h("h2", { id: "chart-h" }, "History"),
      h("div", { class: "row" }, h("label", { for: "range" }, "Range", rangeSel), keysBox, h("span", { class: "spacer" }), resetZoom),
      chartBox, chartNote),
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "cmd-h" }, h("h2", { id: "cmd-h" }, "Commands"), commandForm(), commandsBox),
      h("section", { class: "panel", "aria-labelledby": "cfg-h" }, h("h2", { id: "cfg-h" }, "Configuration"), configBox),
      h("section", { class: "panel", "aria-labelledby": "state-h" }, h("h2", { id: "state-h" }, "State"), stateBox),
      h("section", { class: "panel", "aria-labelledby": "events-h" }, h("h2", { id: "events-h" }, "Events"), eventsBox),
      h("section", { class: "panel", "aria-labelledby": "alerts-h" }, h("h2", { id: "alerts-h" }, "Alerts"), alertsBox),
      session.admin ? h("section", { class: "panel", "aria-labelledby": "creds-h" }, h("h2", { id: "creds-h" }, "Credentials"), credsBox) : null,
    ),
  );
  rangeSel.addEventListener("change", () => {
    zoom = null;
    resetZoom.hidden = true;
    replaceQuery({ range: rangeSel.value });
    drawChart();
  });
  credentials();

  await loadLatest(firstLatest);
  renderCards();
  renderKeyPicker();
  // The chart first: its aggregate requests have the server to themselves, then the panels below it.
  const shown = (p) => p.catch((error) => root.append(errorMessage(error)));
  await shown(drawChart());
  await Promise.all([loadState(), loadEvents(), loadAlerts(), loadCommands(), loadConfig()].map(shown));

  // -- live --------------------------------------------------------------------------------------
  let live = false;
  const refresh = debounce({ state: loadState, event: loadEvents, alert: loadAlerts, command: loadCommands, device: async () => {
    renderFacts(await api(base));
    await loadConfig();
  } });
  const stream = new Live({
    devices: [id],
    types: ["telemetry", "state", "event", "alert", "command", "device"],
    onMessage: (msg) => {
      if (msg.device_id !== id) return;
      if (msg.type === "telemetry") reading(msg.ts, msg.values ?? {});
      else refresh(msg.type);
      if (msg.type === "state") refresh("device");
    },
    onGap: () => {
      loadLatest().then(renderCards);
      drawChart();
    },
    onStatus: (status) => {
      live = status === "live";
      // While the stream is down the page polls, so it still follows the device, only less promptly.
      liveBadge.textContent = { live: "live", reconnecting: "polling (stream reconnecting)", refused: "polling (stream refused)" }[status] ?? status;
      liveBadge.className = `badge ${live ? "ok" : "warn"}`;
    },
  }).start();
  stops.push(() => stream.stop());
  // Until the stream is up (or while it is down), look for new readings now and then.
  stops.push(every(POLL_MS, async () => {
    if (live) return;
    const byTime = new Map();
    for (const [k, p] of await loadLatest()) byTime.set(p.ts, { ...byTime.get(p.ts), [k]: p.value });
    for (const ts of [...byTime.keys()].sort()) reading(ts, byTime.get(ts));
  }));
  // Commands still on their way: watch queued → sent → acked even without the stream.
  stops.push(every(1500, () => {
    if (commandRows.some((c) => !TERMINAL.has(c.status))) loadCommands().catch(() => {});
  }));
  stops.push(every(30_000, () => api(base).then(renderFacts, () => {})));
  return () => {
    for (const stop of stops) stop();
    chart.destroy();
  };
}

function debounce(loaders) {
  const timers = {};
  return (type) => {
    const load = loaders[type];
    if (!load) return;
    clearTimeout(timers[type]);
    timers[type] = setTimeout(() => load().catch((error) => console.warn(describe(error))), 150);
  };
}
