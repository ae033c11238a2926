// Test telemetry (the test-console idea of iotmesh): post a message as a device and see it arrive.

import { api, session } from "./api.js";
import { Live } from "./live.js";
import { clear, errorMessage, exact, formatValue, h, json, parseJson } from "./ui.js";

export async function renderTest(root, { query }) {
  const arrived = h("ul", { class: "list", id: "arrived", "aria-live": "polite" });
  const out = h("div", { id: "test-result", "aria-live": "polite" });
  const device = h("input", { id: "test-device", required: true, list: "test-devices", value: query.get("device") ?? "", autocomplete: "off" });
  const devices = h("datalist", { id: "test-devices" });
  const deviceKey = h("input", { id: "test-key", type: "password", autocomplete: "off", placeholder: "optional" });
  const body = h("textarea", { id: "test-body", rows: 5 }, '{"temperature": 21.5, "humidity": 40}');
  let stream = null;

  api("/api/v1/devices", { query: { limit: 100, sort: "-last_seen_at" } }).then((page) => {
    for (const d of page.devices) devices.append(h("option", { value: d.id }));
  }, () => {});

  const nothing = h("p", { class: "muted" }, "Nothing yet: what the device sends appears here as it arrives.");
  function show(ts, values, how) {
    nothing.hidden = true;
    arrived.prepend(h("li", {}, h("strong", {}, how), " ", h("span", { class: "muted small" }, exact(ts)), " ",
      Object.entries(values).map(([k, v]) => h("code", { class: "mono" }, `${k}=${formatValue(v)} `))));
  }

  function watch(id) {
    stream?.stop();
    stream = new Live({ devices: [id], types: ["telemetry"], onMessage: (m) => m.type === "telemetry" && show(m.ts, m.values ?? {}, "live"), onStatus: () => {} }).start();
  }

  const canPost = session.operates;
  const viewerForm = h("form", { onsubmit: (e) => {
    e.preventDefault();
    watch(device.value.trim());
    clear(out, h("p", { class: "message", role: "status" }, `Watching ${device.value.trim()}: readings appear as they arrive.`));
  } },
    h("p", { class: "message" }, "A viewer key cannot post telemetry; it can watch what a device sends."),
    h("label", { for: "test-device" }, "Device id", device, devices),
    h("p", {}, h("button", { type: "submit" }, "Watch")), out);
  const form = canPost ? null : viewerForm;
  const postForm = h("form", { dataset: { write: "" }, onsubmit: async (e) => {
    e.preventDefault();
    const id = device.value.trim();
    try {
      const message = parseJson(body.value, "Message");
      const own = deviceKey.value.trim();
      const doc = own ? message : { device_id: id, ...message };
      watch(id);
      const answer = await api("/api/v1/ingest", { method: "POST", body: doc, key: own || undefined });
      clear(out, h("p", { class: "message ok", role: "status" }, `Accepted: ${answer.points} point${answer.points === 1 ? "" : "s"} for ${answer.device_ids.join(", ")}.`),
        h("pre", {}, json(answer)));
      const latest = await api(`/api/v1/devices/${encodeURIComponent(id)}/latest`);
      show(new Date().toISOString(), Object.fromEntries(Object.entries(latest.values).map(([k, p]) => [k, p.value])), "stored");
    } catch (error) {
      clear(out, errorMessage(error));
    }
  } },
    h("div", { class: "row" }, h("label", { for: "test-device" }, "Device id", device, devices), h("label", { for: "test-key" }, "Device key", deviceKey)),
    h("p", { class: "muted small" }, "With the device's own key the message is posted as that device; without one, with yours, naming the device id."),
    h("label", { for: "test-body" }, "Message (JSON, any shape Telemetra accepts)", body),
    h("p", {}, h("button", { type: "submit", class: "primary" }, "Send test message")), out);

  root.append(
    h("h1", {}, "Test telemetry"),
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "t-h" }, h("h2", { id: "t-h" }, canPost ? "Send" : "Watch"), form ?? postForm),
      h("section", { class: "panel", "aria-labelledby": "a-h" }, h("h2", { id: "a-h" }, "Arrived"), nothing, arrived)),
  );
  return () => stream?.stop();
}
