// Provisioning (admin): create a device and see its credentials once, or a batch of claim codes.

import { api } from "./api.js";
import { credentialsBox } from "./creds.js";
import { clear, copyButton, errorMessage, exact, h, table } from "./ui.js";

export async function renderProvision(root) {
  const out = h("div", { id: "provision-result", "aria-live": "polite" });

  const id = h("input", { id: "new-id", placeholder: "generated when empty", autocomplete: "off", pattern: "[A-Za-z0-9_.:\\-]+" });
  const name = h("input", { id: "new-name", autocomplete: "off" });
  const model = h("input", { id: "new-model", autocomplete: "off" });
  const kind = h("select", { id: "new-kind" }, h("option", { value: "device" }, "device"), h("option", { value: "gateway" }, "gateway"));
  const create = h("form", { dataset: { write: "" }, onsubmit: async (e) => {
    e.preventDefault();
    const body = { kind: kind.value };
    for (const [k, el] of [["id", id], ["name", name], ["model", model]]) if (el.value.trim()) body[k] = el.value.trim();
    try {
      const answer = await api("/api/v1/devices", { method: "POST", body });
      clear(out, credentialsBox(answer), h("p", {}, h("a", { href: `#/devices/${encodeURIComponent(answer.device.id)}` }, `Open ${answer.device.id}`)));
      create.reset();
    } catch (error) {
      clear(out, errorMessage(error));
    }
  } },
    h("div", { class: "row" }, h("label", { for: "new-id" }, "Device id", id), h("label", { for: "new-name" }, "Name", name),
      h("label", { for: "new-model" }, "Model", model), h("label", { for: "new-kind" }, "Kind", kind)),
    h("p", {}, h("button", { type: "submit", class: "primary" }, "Create device")));

  const count = h("input", { id: "claim-count", type: "number", min: 1, max: 1000, value: 5 });
  const prefix = h("input", { id: "claim-prefix", value: "dev", pattern: "[A-Za-z0-9_\\-]{1,32}" });
  const claimModel = h("input", { id: "claim-model", autocomplete: "off" });
  const ttl = h("input", { id: "claim-ttl", type: "number", min: 1, value: 24 });
  const claims = h("form", { dataset: { write: "" }, onsubmit: async (e) => {
    e.preventDefault();
    const body = { count: Number(count.value), prefix: prefix.value.trim() || "dev", ttl_s: Math.round(Number(ttl.value) * 3600) };
    if (claimModel.value.trim()) body.model = claimModel.value.trim();
    try {
      const answer = await api("/api/v1/claim-codes", { method: "POST", body });
      const all = answer.claim_codes.map((c) => `${c.device_id},${c.claim_code}`).join("\n");
      const example = answer.claim_codes[0];
      clear(out, h("section", { class: "panel secret", "aria-label": "Claim codes" },
        h("h2", {}, `${answer.claim_codes.length} claim codes`),
        h("p", { class: "message", role: "status" }, "Shown once. Each device trades its code, once, for its credentials."),
        table(["Device", "Claim code", "Expires"], answer.claim_codes.map((c) => h("tr", {}, h("td", {}, c.device_id), h("td", { class: "mono" }, c.claim_code), h("td", {}, exact(c.expires_at))))),
        h("div", { class: "row" }, h("strong", {}, "All as CSV"), copyButton(all)),
        h("p", {}, "A device claims its credentials with:"),
        h("pre", {}, `curl -X POST ${location.origin}/api/v1/provision/claim -H 'Content-Type: application/json' -d '{"claim_code":"${example.claim_code}"}'`)));
    } catch (error) {
      clear(out, errorMessage(error));
    }
  } },
    h("div", { class: "row" }, h("label", { for: "claim-count" }, "How many", count), h("label", { for: "claim-prefix" }, "Id prefix", prefix),
      h("label", { for: "claim-model" }, "Model", claimModel), h("label", { for: "claim-ttl" }, "Valid for (hours)", ttl)),
    h("p", {}, h("button", { type: "submit" }, "Create claim codes")));

  root.append(
    h("h1", {}, "Provision"),
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "new-h" }, h("h2", { id: "new-h" }, "New device"), create),
      h("section", { class: "panel", "aria-labelledby": "claim-h" }, h("h2", { id: "claim-h" }, "Claim codes"), claims)),
    out,
  );
}
