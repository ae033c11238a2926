// A device's credentials, shown once (at creation, claim or rotation), with lines to paste into a device.

import { copyButton, h } from "./ui.js";

const SAMPLE = '{"temperature":21.5,"humidity":40}';

export function curlLine(secret) {
  return `curl -X POST ${location.origin}/api/v1/ingest -H 'X-API-Key: ${secret}' -H 'Content-Type: application/json' -d '${SAMPLE}'`;
}

export function mqttLine(deviceId, secret) {
  // The default topic prefix and MQTT port; a server configured otherwise uses its own.
  return `mosquitto_pub -h ${location.hostname} -p 1883 -u '${deviceId}' -P '${secret}' -q 1 -t 'telemetra/${deviceId}/telemetry' -m '${SAMPLE}'`;
}

function line(label, text, attrs = {}) {
  return h("div", {}, h("div", { class: "row" }, h("strong", {}, label), h("span", { class: "spacer" }), copyButton(text)), h("pre", attrs, text));
}

export function credentialsBox(answer) {
  const { device, credentials } = answer;
  return h(
    "section",
    { class: "panel secret", "aria-label": `Credentials of ${device.id}`, dataset: { credentials: device.id } },
    h("h2", {}, `Credentials of ${device.id}`),
    h("p", { class: "message", role: "status" }, "Shown once: copy the secret now. Only a hash is kept on the server."),
    line("Secret (HTTP X-API-Key and MQTT password)", credentials.api_key, { class: "mono", dataset: { secret: "" } }),
    h("p", { class: "small" }, "MQTT username: ", h("code", {}, credentials.mqtt.username)),
    line("Send a reading over HTTP", curlLine(credentials.api_key)),
    line("Send a reading over MQTT", mqttLine(device.id, credentials.api_key)),
  );
}
