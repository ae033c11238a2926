// Webhooks (issue 10's API): list, create, edit, enable / disable, delete, rotate the signing secret, a test
// delivery and each webhook's delivery log with retries. Operators read, send tests and retry; creating and
// changing webhooks is for admin keys, because the answer that creates one (or rotates its secret) carries
// its signing secret — shown here once.

import { api, session } from "./api.js";
import { replaceQuery } from "./nav.js";
import { clear, copyButton, errorMessage, every, fieldNote, h, json, markField, message, statusBadge, table, when, writeButton } from "./ui.js";

// The server's event names (telemetra.domain.webhooks.EVENT_NAMES; tests/web/test_static.py keeps the two
// equal). Only help: the server refuses a pattern that matches none of them and says which.
export const EVENT_NAMES = [
  "alert.raised", "alert.repeated", "alert.acknowledged", "alert.cleared",
  "device.online", "device.offline", "device.created", "device.updated", "device.rotated", "device.disabled",
  "device.enabled", "device.deleted", "device.claimed", "device.config",
  "rollout.pending", "rollout.distributing", "rollout.paused", "rollout.completed", "rollout.failed",
  "rollout.cancelled", "rollout.deleted",
  "rollout.device.pending", "rollout.device.notified", "rollout.device.downloading", "rollout.device.installing",
  "rollout.device.completed", "rollout.device.failed", "rollout.device.timed_out",
  "webhook.test",
];
const STATUSES = ["pending", "delivered", "failed"];
const LOG_PAGE = 50;
// While the log shows a pending delivery it is read again this often, so a test is seen arriving.
const PENDING_REFRESH_MS = 1_500;
const IDLE_REFRESH_MS = 15_000;

const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

// "alert: raised, repeated …" — the names grouped by what they are about, for the events field's help.
function eventHelp() {
  const groups = new Map();
  for (const name of EVENT_NAMES) {
    const at = name.lastIndexOf(".");
    const subject = name.slice(0, at);
    if (!groups.has(subject)) groups.set(subject, []);
    groups.get(subject).push(name.slice(at + 1));
  }
  return h("ul", { class: "events-help small" }, [...groups].map(([subject, changes]) =>
    h("li", {}, h("code", {}, `${subject}.`), " ", changes.join(", "))));
}

function counts(w) {
  return h("div", { class: "row counts" }, STATUSES.map((s) =>
    h("span", { class: `badge ${w.deliveries[s] && s === "failed" ? "bad" : w.deliveries[s] && s === "delivered" ? "ok" : ""}`, dataset: { count: s } },
      `${w.deliveries[s]} ${s}`)));
}

// The answer that sets a secret (creation, rotation) is the only one that carries it.
function secretBox(created, { rotated = false } = {}) {
  return h("section", { class: "panel secret", "aria-label": `Secret of webhook ${created.name}`, dataset: { webhookSecret: created.id } },
    h("h2", {}, `${rotated ? "New signing secret" : "Signing secret"} of ${created.name}`),
    h("p", { class: "message", role: "status" }, h("strong", {}, "Shown once: "), "copy the secret now. It is not shown again; the webhook's receiver needs it to check signatures.",
      rotated ? " Deliveries from now on are signed with this secret only, not the old one." : null),
    h("div", { class: "row" }, h("strong", {}, "Secret"), h("span", { class: "spacer" }), copyButton(created.secret)),
    h("pre", { class: "mono", dataset: { secret: "" } }, created.secret),
    h("p", { class: "small muted" }, "Each delivery carries ", h("code", {}, "X-Telemetra-Signature: sha256=…"),
      ", the hex HMAC-SHA256 with this secret of ", h("code", {}, "<X-Telemetra-Timestamp>.<body>"), "."));
}

// The fields a webhook is made of, for the create form and the edit form alike (ids `${prefix}-url`, …;
// each with its note for the server's word about it, see markField).
function hookFields(prefix, { url = "", name = "", events = "alert.*", enabled = true, nameLabel = "Name (optional)", foldHelp = false } = {}) {
  const urlIn = h("input", { id: `${prefix}-url`, type: "url", required: true, maxlength: 2048, autocomplete: "off", placeholder: "the receiver's http or https URL", value: url });
  const nameIn = h("input", { id: `${prefix}-name`, maxlength: 128, autocomplete: "off", placeholder: "the URL's host", value: name });
  const eventsIn = h("input", { id: `${prefix}-events`, required: true, autocomplete: "off", value: events, placeholder: "alert.*, device.offline" });
  const enabledIn = h("input", { id: `${prefix}-enabled`, type: "checkbox", checked: enabled });
  eventsIn.defaultValue = events; // what form.reset() goes back to
  enabledIn.defaultChecked = enabled;
  const notes = { url: fieldNote(urlIn), name: fieldNote(nameIn), events: fieldNote(eventsIn) };
  const helpId = `${prefix}-events-help`;
  const intro = h("p", {}, "Names or shell-style patterns, comma separated: ", h("code", {}, "alert.*"), ", ", h("code", {}, "device.offline"), ", ",
    h("code", {}, "*"), " for everything. ", h("code", {}, "webhook.test"), " (the Send test button) reaches every webhook.", foldHelp ? null : " Known events:");
  const help = foldHelp
    ? h("div", { id: helpId, class: "muted small" }, intro, h("details", {}, h("summary", {}, "Known events"), eventHelp()))
    : h("div", { id: helpId, class: "muted small" }, intro, eventHelp());
  eventsIn.setAttribute("aria-describedby", `${eventsIn.getAttribute("aria-describedby")} ${helpId}`);
  const field = (input, note, label, cls = "") => h("div", { class: `field ${cls}` }, h("label", { for: input.id }, label, input), note);
  const rows = [
    h("div", { class: "row" }, field(urlIn, notes.url, "URL", "grow"), field(nameIn, notes.name, nameLabel)),
    h("div", { class: "row" }, field(eventsIn, notes.events, "Events", "grow"), h("label", { class: "check beside", for: enabledIn.id }, enabledIn, "enabled")),
    help,
  ];
  return { urlIn, nameIn, eventsIn, enabledIn, notes, rows };
}

export async function renderWebhooks(root, { query }) {
  const listBox = h("div", { id: "webhooks" });
  const out = h("div", { "aria-live": "polite" }); // the form's answers
  const listOut = h("div", { "aria-live": "polite" }); // the list's actions' answers
  const secretOut = h("div", { id: "webhook-secret", "aria-live": "polite" });
  const admin = session.admin;
  let hooks = [];
  let shownId = Number(query.get("log")) || null; // whose delivery log is open

  // -- the create form (admin) ---------------------------------------------------------------------
  const { urlIn, nameIn, eventsIn, enabledIn, notes, rows: fields } = hookFields("webhook");
  const submit = h("button", { type: "submit", class: "primary" }, "Create webhook");

  const form = h("form", { id: "webhook-form", dataset: { write: "" }, noValidate: true, onsubmit: async (e) => {
    e.preventDefault();
    markField(notes, null);
    submit.disabled = true;
    const body = { url: urlIn.value.trim(), events: list(eventsIn.value), enabled: enabledIn.checked };
    if (nameIn.value.trim()) body.name = nameIn.value.trim();
    try {
      const created = await api("/api/v1/webhooks", { method: "POST", body });
      clear(out, message("ok", `Webhook #${created.id} ${created.name} created.`));
      clear(secretOut, secretBox(created));
      form.reset();
      shownId = created.id;
      await load();
      secretOut.scrollIntoView({ block: "nearest" });
    } catch (error) {
      // A refusal naming url, name or events is said next to that field; anything else under the form.
      clear(out, markField(notes, error) ? null : errorMessage(error));
    } finally {
      submit.disabled = false;
    }
  } },
    fields,
    h("p", { class: "row" }, submit), out);

  // -- the edit form of one webhook (admin): only what changed is sent; and its secret rotated -------
  const editBox = h("div", { id: "webhook-edit-box" });
  let editing = null; // the webhook whose edit form is open, as it was when opened

  function closeEdit() {
    editing = null;
    clear(editBox);
    for (const b of listBox.querySelectorAll("button[data-edit]")) b.setAttribute("aria-pressed", "false");
  }

  function openEdit(w) {
    editing = w;
    for (const b of listBox.querySelectorAll("button[data-edit]")) b.setAttribute("aria-pressed", String(Number(b.dataset.edit) === w.id));
    const f = hookFields("webhook-edit", { url: w.url, name: w.name, events: w.events.join(", "), enabled: w.enabled, nameLabel: "Name", foldHelp: true });
    const editOut = h("div", { "aria-live": "polite" });
    const save = h("button", { type: "submit", class: "primary" }, "Save changes");
    // The fields that differ from the webhook as it was opened: a PATCH of those only.
    const changes = () => {
      const body = {};
      const url = f.urlIn.value.trim();
      const name = f.nameIn.value.trim();
      const events = list(f.eventsIn.value);
      if (url !== w.url) body.url = url;
      if (name !== w.name) body.name = name;
      if (events.join("\n") !== w.events.join("\n")) body.events = events;
      if (f.enabledIn.checked !== w.enabled) body.enabled = f.enabledIn.checked;
      return body;
    };
    const form = h("form", { id: "webhook-edit-form", dataset: { write: "" }, noValidate: true, onsubmit: async (e) => {
      e.preventDefault();
      markField(f.notes, null);
      const body = changes();
      if (!Object.keys(body).length) {
        clear(editOut, message("info", "Nothing to save: no field was changed."));
        return;
      }
      save.disabled = true;
      try {
        const saved = await api(`/api/v1/webhooks/${w.id}`, { method: "PATCH", body });
        closeEdit();
        clear(listOut, message("ok", `Webhook #${saved.id} ${saved.name} saved (${Object.keys(body).join(", ")} changed).`));
        await load();
      } catch (error) {
        // As in the create form: a refusal naming a field is said next to it, anything else under the form.
        clear(editOut, markField(f.notes, error) ? null : errorMessage(error));
      } finally {
        save.disabled = false;
      }
    } },
      f.rows,
      h("p", { class: "row" }, save, h("button", { type: "button", onclick: closeEdit }, "Cancel")), editOut);
    const rotateOut = h("div", { "aria-live": "polite" });
    const rotate = writeButton("Rotate secret", async (e) => {
      if (!confirm(`Rotate the signing secret of ${w.name}? From now on deliveries are signed with a new secret only; its receiver needs the new one, shown once.`)) return;
      e.target.disabled = true;
      try {
        const rotated = await api(`/api/v1/webhooks/${w.id}/rotate-secret`, { method: "POST" });
        clear(rotateOut, message("ok", "New secret made: it is shown once, above."));
        clear(secretOut, secretBox(rotated, { rotated: true }));
        secretOut.scrollIntoView({ block: "nearest" });
      } catch (error) {
        clear(rotateOut, errorMessage(error));
      } finally {
        e.target.disabled = false;
      }
    }, { class: "danger" });
    clear(editBox, h("section", { class: "panel", id: "webhook-edit", "aria-labelledby": "webhook-edit-h", dataset: { editing: w.id } },
      h("h2", { id: "webhook-edit-h" }, `Edit webhook ${w.name}`),
      h("p", { class: "muted small" }, `#${w.id}. Only the fields you change are saved.`),
      form,
      h("h3", {}, "Signing secret"),
      h("div", { class: "row centered" }, h("p", { class: "muted small grow-text" }, "Shown only when it is set. Rotating makes a new one on the server and shows it once; the old one signs nothing after that."), rotate),
      rotateOut));
    editBox.scrollIntoView({ block: "nearest" });
    f.urlIn.focus();
  }

  // -- the delivery log of one webhook -------------------------------------------------------------
  const logTitle = h("h2", { id: "deliveries-h" }, "Delivery log");
  const logStatus = h("select", { id: "delivery-status" }, h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s }, s)));
  const logBox = h("div", { id: "deliveries" });
  const logOut = h("div", { "aria-live": "polite" });
  const logPanel = h("section", { class: "panel", "aria-labelledby": "deliveries-h", hidden: true },
    h("div", { class: "row" }, logTitle, h("span", { class: "spacer" }), h("label", { for: "delivery-status" }, "Show", logStatus),
      h("button", { type: "button", id: "deliveries-refresh", onclick: () => loadLog() }, "Refresh")),
    logOut, logBox);
  let logShown = []; // the deliveries on screen, every page of them
  let logRead = 0; // when the log was last read (Date.now())

  function deliveryRow(d) {
    const retry = d.status === "failed" && session.operates
      ? writeButton("Retry", async (e) => {
        e.target.disabled = true;
        try {
          await api(`/api/v1/webhooks/${shownId}/deliveries/${d.id}/retry`, { method: "POST" });
          clear(logOut, message("ok", `Delivery #${d.id} queued again.`));
        } catch (error) {
          clear(logOut, errorMessage(error));
        }
        await loadLog(); // failed → pending: the counts follow
      })
      : null;
    return h("tr", { dataset: { delivery: d.id, status: d.status } },
      h("td", {}, statusBadge(d.status), h("div", { class: "muted small" }, `#${d.id}`)),
      h("td", {}, h("span", { class: "mono" }, d.event), d.device_id ? h("div", { class: "small" }, d.device_id) : null,
        h("details", { class: "small" }, h("summary", {}, "body"), h("pre", {}, json(d.body)))),
      h("td", { dataset: { attempts: "" } }, String(d.attempts)),
      h("td", { dataset: { response: "" } }, d.response_status != null ? String(d.response_status) : "—",
        d.duration_ms != null ? h("div", { class: "muted small" }, `${d.duration_ms} ms`) : null),
      h("td", { class: "small error-text" }, d.error ?? ""),
      h("td", {}, when(d.created_at)),
      h("td", {}, d.last_attempt_at ? when(d.last_attempt_at) : h("span", { class: "muted" }, "not yet")),
      h("td", {}, d.delivered_at ? when(d.delivered_at) : d.next_attempt_at ? h("span", {}, "next ", when(d.next_attempt_at)) : h("span", { class: "muted" }, "—")),
      session.operates ? h("td", {}, retry) : null);
  }

  function drawLog(nextBefore) {
    const headers = ["Status", "Event", "Attempts", "Response", "Error", "Queued", "Last attempt", "Delivered / next", session.operates ? "Actions" : null].filter(Boolean);
    const more = nextBefore ? h("div", { class: "pager" }, h("button", { type: "button", onclick: () => loadLog(nextBefore) }, "Older")) : null;
    clear(logBox, logShown.length ? [table(headers, logShown.map(deliveryRow), { "aria-label": "Deliveries" }), more]
      : h("p", { class: "muted" }, logStatus.value ? `No ${logStatus.value} deliveries.` : "No deliveries yet."));
  }

  async function loadLog(before = null) {
    const hook = hooks.find((w) => w.id === shownId);
    logPanel.hidden = !hook;
    if (!hook) return;
    logTitle.textContent = `Delivery log of ${hook.name}`;
    try {
      const answer = await api(`/api/v1/webhooks/${hook.id}/deliveries`, { query: { status: logStatus.value, limit: LOG_PAGE, before } });
      if (hook.id !== shownId) return; // another log was opened meanwhile
      const was = new Map(logShown.map((d) => [d.id, d.status]));
      logShown = before ? [...logShown, ...answer.deliveries] : answer.deliveries;
      logRead = Date.now();
      drawLog(answer.next_before);
      // A delivery that changed state changes the list's counts: read them after the log, never older.
      if (answer.deliveries.some((d) => was.has(d.id) && was.get(d.id) !== d.status)) await loadList();
    } catch (error) {
      clear(logBox, errorMessage(error));
    }
  }
  logStatus.addEventListener("change", () => loadLog());

  function showLog(id) {
    shownId = id;
    replaceQuery({ log: id });
    clear(logOut);
    logShown = [];
    clear(logBox);
    for (const tr of listBox.querySelectorAll("tr[data-webhook]")) tr.classList.toggle("selected", Number(tr.dataset.webhook) === id);
    return loadLog();
  }

  // -- the list ------------------------------------------------------------------------------------
  async function act(e, fn) {
    e.target.disabled = true;
    try {
      await fn();
    } catch (error) {
      clear(listOut, errorMessage(error));
    }
    await load();
  }

  async function loadList() {
    try {
      hooks = (await api("/api/v1/webhooks")).webhooks;
    } catch (error) {
      clear(listBox, errorMessage(error));
      return;
    }
    if (!hooks.some((w) => w.id === shownId)) shownId = hooks[0]?.id ?? null;
    if (editing && !hooks.some((w) => w.id === editing.id)) closeEdit(); // deleted meanwhile
    const headers = ["Webhook", "Events", "State", "Deliveries", "Actions"];
    clear(listBox, hooks.length ? table(headers, hooks.map((w) =>
      h("tr", { dataset: { webhook: w.id }, class: w.id === shownId ? "selected" : null },
        h("td", { class: "hook" }, h("strong", {}, w.name), h("div", { class: "muted small" }, `#${w.id}`), h("div", { class: "mono small break" }, w.url)),
        h("td", { class: "mono small" }, w.events.join(", ")),
        h("td", {}, h("span", { class: `badge ${w.enabled ? "ok" : ""}`, dataset: { enabled: String(w.enabled) } }, w.enabled ? "enabled" : "disabled")),
        h("td", {}, counts(w)),
        h("td", {}, h("div", { class: "row actions" },
          h("button", { type: "button", "aria-pressed": String(w.id === shownId), onclick: () => showLog(w.id) }, "Log"),
          session.operates ? writeButton("Send test", (e) => act(e, async () => {
            const queued = await api(`/api/v1/webhooks/${w.id}/test`, { method: "POST" });
            clear(listOut, message("ok", `Test delivery #${queued.delivery_id} to ${w.name} queued.`));
            await showLog(w.id);
          }), { disabled: !w.enabled, title: w.enabled ? "POST a webhook.test event now" : "enable the webhook to send a test" }) : null,
          admin ? writeButton("Edit", () => openEdit(w), { "aria-pressed": String(w.id === editing?.id), dataset: { write: "", edit: w.id }, title: "change its URL, events or name; rotate its secret" }) : null,
          admin ? writeButton(w.enabled ? "Disable" : "Enable", (e) => act(e, () => api(`/api/v1/webhooks/${w.id}`, { method: "PATCH", body: { enabled: !w.enabled } }))) : null,
          admin ? writeButton("Delete", (e) => act(e, async () => {
            if (!confirm(`Delete webhook ${w.name}? Its delivery log goes with it.`)) return;
            await api(`/api/v1/webhooks/${w.id}`, { method: "DELETE" });
            clear(listOut, message("ok", `Webhook ${w.name} deleted.`));
          }), { class: "danger" }) : null)))), { "aria-label": "Webhooks" }) :
      h("p", { class: "muted" }, admin ? "No webhooks yet: create one below." : "No webhooks yet."));
  }

  async function load() {
    await loadList();
    await loadLog();
  }

  root.append(
    h("h1", {}, "Webhooks"),
    h("section", { class: "panel", "aria-labelledby": "webhooks-h" }, h("h2", { id: "webhooks-h" }, "Webhooks"),
      h("p", { class: "muted small" }, "Each event a webhook subscribes to is POSTed to its URL as signed JSON, and tried again with backoff until the receiver answers 2xx."),
      admin ? null : h("p", { class: "message", role: "status" }, "Creating, changing and deleting webhooks needs an admin key; an operator sends tests and retries deliveries."),
      listOut, listBox),
    secretOut,
    editBox,
    logPanel,
    admin ? h("section", { class: "panel", "aria-labelledby": "webhook-form-h" }, h("h2", { id: "webhook-form-h" }, "New webhook"), form) : null,
  );
  await load();
  const stopList = every(30_000, load);
  // Fast while a delivery is pending (a test on its way, a retry waiting), slow otherwise.
  const stopLog = every(PENDING_REFRESH_MS, () => {
    const pending = logShown.some((d) => d.status === "pending");
    if (pending) return loadLog();
    return Date.now() - logRead > IDLE_REFRESH_MS ? loadLog() : null;
  });
  return () => {
    stopList();
    stopLog();
  };
}
