// OTA (admin): firmware upload with progress, rollouts with waves and thresholds, live progress, pause /
// resume / cancel.

import { api, upload } from "./api.js";
import { Live } from "./live.js";
import { clear, errorMessage, every, exact, h, statusBadge, table, writeButton } from "./ui.js";

const ACTIVE = new Set(["pending", "distributing", "paused"]);
const NODES_SHOWN = 500; // devices listed under an open rollout (the counts cover all of them)
const COALESCE_MS = 200; // events arriving this close together are one refresh
const POLL_MS = 3000; // while the stream is down

export async function renderOta(root) {
  const firmwareList = h("div", { id: "firmware" });
  const rollouts = h("div", { id: "rollouts" });
  const uploadOut = h("div", { "aria-live": "polite" });
  const rolloutOut = h("div", { "aria-live": "polite" });
  const fwSelect = h("select", { id: "ro-firmware", required: true });
  let firmware = [];

  // -- firmware ------------------------------------------------------------------------------------
  const file = h("input", { id: "fw-file", type: "file", required: true });
  const model = h("input", { id: "fw-model", required: true, autocomplete: "off" });
  const version = h("input", { id: "fw-version", required: true, placeholder: "1.2.3", autocomplete: "off" });
  const notes = h("input", { id: "fw-notes", autocomplete: "off" });
  const stable = h("input", { id: "fw-stable", type: "checkbox" });
  const progress = h("progress", { id: "fw-progress", max: 1, value: 0, hidden: true, "aria-label": "Upload progress" });
  const uploadForm = h("form", { dataset: { write: "" }, onsubmit: async (e) => {
    e.preventDefault();
    const form = new FormData();
    form.append("model", model.value.trim());
    form.append("version", version.value.trim());
    if (notes.value.trim()) form.append("release_notes", notes.value.trim());
    form.append("is_stable", stable.checked ? "true" : "false");
    form.append("file", file.files[0]);
    progress.hidden = false;
    progress.value = 0;
    try {
      const fw = await upload("/api/v1/firmware", form, (fraction) => { progress.value = fraction; });
      progress.value = 1;
      clear(uploadOut, h("p", { class: "message ok", role: "status" }, `Uploaded ${fw.model} ${fw.version} (${fw.size_bytes.toLocaleString()} bytes, sha256 ${fw.sha256.slice(0, 12)}…).`));
      uploadForm.reset();
      await loadFirmware();
    } catch (error) {
      clear(uploadOut, errorMessage(error));
    }
  } },
    h("div", { class: "row" }, h("label", { for: "fw-file" }, "Image", file), h("label", { for: "fw-model" }, "Model", model),
      h("label", { for: "fw-version" }, "Version", version), h("label", { for: "fw-notes" }, "Release notes", notes),
      h("label", { class: "check", for: "fw-stable" }, stable, "stable")),
    h("p", {}, h("button", { type: "submit", class: "primary" }, "Upload firmware")), progress, uploadOut);

  async function loadFirmware() {
    const page = await api("/api/v1/firmware", { query: { limit: 100 } });
    firmware = page.items;
    clear(firmwareList, firmware.length ? table(["Model", "Version", "Size", "SHA-256", "Uploaded", ""], firmware.map((f) =>
      h("tr", { dataset: { firmware: f.id } }, h("td", {}, f.model), h("td", { class: "mono" }, f.version, f.is_stable ? h("span", { class: "badge ok" }, "stable") : null),
        h("td", {}, `${(f.size_bytes / 1024).toFixed(1)} KB`), h("td", { class: "mono small" }, `${f.sha256.slice(0, 16)}…`),
        h("td", {}, exact(f.created_at)), h("td", {}, h("a", { href: f.download_url }, "Download"))))) : h("p", { class: "muted" }, "No firmware uploaded."));
    const chosen = fwSelect.value;
    clear(fwSelect, firmware.map((f) => h("option", { value: f.id }, `${f.model} ${f.version}`)));
    if (chosen) fwSelect.value = chosen;
    syncModel();
  }

  // -- rollouts ------------------------------------------------------------------------------------
  const target = h("input", { id: "ro-model", required: true, autocomplete: "off" });
  const waves = h("input", { id: "ro-waves", value: "5, 25, 100", pattern: "\\s*\\d+(\\s*,\\s*\\d+)*\\s*" });
  const rate = h("input", { id: "ro-rate", type: "number", min: 1, value: 600 });
  const failPct = h("input", { id: "ro-fail", type: "number", min: 1, max: 100, value: 20 });
  const minFinished = h("input", { id: "ro-min", type: "number", min: 1, value: 10 });
  const timeout = h("input", { id: "ro-timeout", type: "number", min: 1, value: 3600 });
  const syncModel = () => {
    const f = firmware.find((x) => String(x.id) === fwSelect.value);
    if (f && !target.dataset.edited) target.value = f.model;
  };
  fwSelect.addEventListener("change", syncModel);
  target.addEventListener("input", () => { target.dataset.edited = "1"; });
  const rolloutForm = h("form", { dataset: { write: "" }, onsubmit: async (e) => {
    e.preventDefault();
    try {
      const body = {
        firmware_id: Number(fwSelect.value), target_model: target.value.trim(),
        waves: waves.value.split(",").map((w) => Number(w.trim())).filter((w) => w > 0),
        rate_per_minute: Number(rate.value), pause_failure_percent: Number(failPct.value),
        pause_min_finished: Number(minFinished.value), device_timeout_s: Number(timeout.value),
      };
      const job = await api("/api/v1/ota/updates", { method: "POST", body });
      clear(rolloutOut, h("p", { class: "message ok", role: "status" }, `Rollout #${job.id} ${job.status}: ${job.progress.total} devices.`));
      await loadRollouts();
    } catch (error) {
      clear(rolloutOut, errorMessage(error));
    }
  } },
    h("div", { class: "row" }, h("label", { for: "ro-firmware" }, "Firmware", fwSelect), h("label", { for: "ro-model" }, "Devices of model", target),
      h("label", { for: "ro-waves" }, "Waves (cumulative %)", waves)),
    h("div", { class: "row" }, h("label", { for: "ro-rate" }, "Devices per minute", rate), h("label", { for: "ro-timeout" }, "Device timeout (s)", timeout),
      h("label", { for: "ro-fail" }, "Pause at failures (%)", failPct), h("label", { for: "ro-min" }, "…after finished", minFinished)),
    h("p", {}, h("button", { type: "submit", class: "primary" }, "Start rollout")), rolloutOut);

  // Each rollout is one <article>, replaced on its own when that rollout changes: an ``ota`` event on the
  // stream names the rollout (``update_id``), and only it is fetched again (a button in another rollout
  // keeps its focus, an open device list stays open).
  const open = new Set(); // rollouts whose device list is shown
  const articles = new Map(); // rollout id → its <article>
  let order = []; // rollout ids as listed, newest first

  function renderRollout(job, nodes) {
    const p = job.progress;
    const done = p.completed + p.failed + p.timed_out;
    const ended = !ACTIVE.has(job.status);
    const act = (to, label) => writeButton(label, async () => {
      try {
        await api(`/api/v1/ota/updates/${job.id}/${to}`, { method: "POST" });
      } catch (error) {
        rolloutOut.replaceChildren(errorMessage(error));
      }
      await refreshRollout(job.id);
    });
    const title = `#${job.id} ${job.name ?? ""} ${job.node_type ?? job.target_model ?? ""} → ${job.version ?? ""}`.replace(/\s+/g, " ");
    return h("article", { class: "panel", dataset: { rollout: job.id, status: job.status }, "aria-label": `Rollout ${job.id}` },
      h("div", { class: "row" }, h("h3", {}, title), statusBadge(job.status),
        h("span", { class: "spacer" }),
        job.status === "distributing" ? act("pause", "Pause") : null,
        job.status === "paused" ? act("resume", "Resume") : null,
        ACTIVE.has(job.status) ? act("cancel", "Cancel") : null),
      h("progress", { max: Math.max(1, p.total), value: done, "aria-label": `Rollout ${job.id} progress` }),
      h("p", { class: "small", dataset: { progress: "" } },
        h("span", { dataset: { count: "completed" } }, `${p.completed} completed`), " · ",
        h("span", { dataset: { count: "failed" } }, `${p.failed + p.timed_out} failed`), " · ",
        // A rollout that ended (cancelled, failed) leaves its unfinished devices where they were: they
        // are no longer "in progress" or "waiting", so the page does not say so.
        ended ? [h("span", { dataset: { count: "unfinished" } }, `${p.notified + p.downloading + p.installing + p.pending} not updated`), " · "] : [
          h("span", { dataset: { count: "active" } }, `${p.notified + p.downloading + p.installing} in progress`), " · ",
          h("span", { dataset: { count: "pending" } }, `${p.pending} waiting`), " · "],
        h("span", { dataset: { count: "total" } }, `${p.total} devices`),
        job.paused_reason ? h("span", { class: "badge warn" }, job.paused_reason) : null),
      job.waves.length ? table(["Wave", "Devices", "Completed", "Failed", "Status"], job.waves.map((w, i) =>
        h("tr", { dataset: { wave: i + 1 } }, h("td", { class: "nowrap" }, `${i + 1} (${w.percent} %)`), h("td", {}, w.devices), h("td", {}, w.completed), h("td", {}, w.failed), h("td", {}, statusBadge(ended && w.status !== "completed" ? "stopped" : w.status))))) : null,
      h("details", { open: open.has(job.id), ontoggle: (e) => {
        const was = open.has(job.id);
        if (e.target.open) open.add(job.id); else open.delete(job.id);
        if (e.target.open && !was) refreshRollout(job.id);
      } }, h("summary", {}, `Devices (${p.total})`),
        nodes ? h("div", {}, table(["Device", "Status", "Wave", "Progress", "Updated"], nodes.map((n) => h("tr", { dataset: { node: n.node_id } }, h("td", { class: "mono" }, n.node_id), h("td", {}, statusBadge(n.status)),
          h("td", {}, n.wave + 1), h("td", { dataset: { nodeProgress: "" } }, n.progress != null ? `${n.progress} %` : "—"), h("td", {}, exact(n.updated_at))))),
        nodes.length < p.total ? h("p", { class: "muted small" }, `The first ${nodes.length} of ${p.total} devices.`) : null) : h("p", { class: "muted" }, "Loading…")));
  }

  function place() {
    clear(rollouts, order.length ? order.map((id) => articles.get(id)) : h("p", { class: "muted" }, "No rollouts yet."));
  }

  function put(job, nodes) {
    const fresh = renderRollout(job, nodes);
    const old = articles.get(job.id);
    articles.set(job.id, fresh);
    if (old?.isConnected) old.replaceWith(fresh);
    else {
      if (!order.includes(job.id)) order = [job.id, ...order].sort((a, b) => b - a);
      place();
    }
  }

  async function loadRollouts() {
    const jobs = await api("/api/v1/ota/updates", { query: { limit: 50 } });
    order = jobs.map((j) => j.id);
    for (const id of articles.keys()) if (!order.includes(id)) articles.delete(id);
    for (const job of jobs) articles.set(job.id, renderRollout(job, null));
    place();
    await Promise.all(jobs.filter((j) => open.has(j.id)).map((j) => refreshRollout(j.id)));
  }

  function forget(id) {
    articles.delete(id);
    order = order.filter((x) => x !== id);
    place();
  }

  async function refreshRollout(id) {
    let job;
    try {
      job = await api(`/api/v1/ota/updates/${id}`, { query: { nodes_limit: open.has(id) ? NODES_SHOWN : 0 } });
    } catch (error) {
      if (error?.status === 404) {
        forget(id);
        return;
      }
      throw error;
    }
    put(job, open.has(id) ? job.nodes : null);
  }

  // One fetch at a time per rollout, and at most one more queued behind it however many events arrive:
  // a rollout of 10,000 devices sends an event per device change, and the page asks once per burst.
  const busy = new Map(); // rollout id → "running" | "again"
  function changed(id) {
    if (busy.has(id)) {
      busy.set(id, "again");
      return;
    }
    busy.set(id, "running");
    setTimeout(async () => {
      try {
        await refreshRollout(id);
      } catch (error) {
        console.warn("rollout refresh failed:", error?.message ?? error);
      }
      const again = busy.get(id) === "again";
      busy.delete(id);
      if (again) changed(id);
    }, COALESCE_MS);
  }

  const liveBadge = h("span", { class: "badge", id: "live-status", "aria-live": "polite" }, "connecting");
  root.append(
    h("div", { class: "row" }, h("h1", {}, "OTA"), h("span", { class: "spacer" }), liveBadge),
    // The two forms share the width between them (a grid with wide panels in it would keep a third,
    // empty column beside them on a wide screen).
    h("div", { class: "grid stack" },
      h("section", { class: "panel", "aria-labelledby": "up-h" }, h("h2", { id: "up-h" }, "Upload firmware"), uploadForm),
      h("section", { class: "panel", "aria-labelledby": "ro-h" }, h("h2", { id: "ro-h" }, "New rollout"), rolloutForm)),
    h("section", { class: "panel", "aria-labelledby": "rl-h" }, h("h2", { id: "rl-h" }, "Rollouts"), rollouts),
    h("section", { class: "panel", "aria-labelledby": "fw-h" }, h("h2", { id: "fw-h" }, "Firmware images"), firmwareList),
  );
  await Promise.all([loadFirmware(), loadRollouts()]);

  // -- live: WS /api/v1/realtime?types=ota -----------------------------------------------------------
  let live = false;
  const stream = new Live({
    types: ["ota"],
    onMessage: (msg) => {
      if (msg.type !== "ota" || msg.update_id == null) return;
      const id = Number(msg.update_id);
      if (msg.status === "deleted" && msg.device_id == null) forget(id); // nothing left to fetch (a 404)
      else changed(id);
    },
    onGap: () => loadRollouts().catch(() => {}), // missed events: everything may have moved
    onStatus: (status) => {
      const was = live;
      live = status === "live";
      liveBadge.textContent = { live: "live", reconnecting: "polling (stream reconnecting)", refused: "polling (stream refused)" }[status] ?? status;
      liveBadge.className = `badge ${live ? "ok" : "warn"}`;
      // Back after a drop: what changed meanwhile was not streamed to us.
      if (live && !was) loadRollouts().catch(() => {});
    },
  }).start();
  const poll = every(POLL_MS, () => (live ? null : loadRollouts().catch(() => {})));
  return () => {
    stream.stop();
    poll();
  };
}
