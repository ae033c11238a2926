// The live stream: WS /api/v1/realtime?devices=&types=&token=, resuming with since=<last id> after a drop.
// Messages: {"type":"telemetry","id","device_id","ts","values":{…}}, {"type":"heartbeat"}, {"type":"gap","missed":n}.

import { session } from "./api.js";

// Refused for good: no or wrong key, not yours, bad parameters. Anything else is retried.
const REFUSED = new Set([4400, 4401, 4403]);
const MAX_BACKOFF_MS = 30_000;

export class Live {
  constructor({ devices = [], types = ["telemetry"], onMessage, onGap = () => {}, onStatus = () => {} }) {
    this.devices = devices;
    this.types = types;
    this.onMessage = onMessage;
    this.onGap = onGap;
    this.onStatus = onStatus;
    this.lastId = null;
    this.stopped = false;
    this.failures = 0;
    this.ws = null;
    this.timer = null;
  }

  start() {
    this.connect();
    return this;
  }

  connect() {
    if (this.stopped) return;
    const u = new URL("/api/v1/realtime", location.href);
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (this.devices.length) u.searchParams.set("devices", this.devices.join(","));
    u.searchParams.set("types", this.types.join(","));
    if (this.lastId !== null) u.searchParams.set("since", String(this.lastId));
    u.searchParams.set("token", session.key ?? "");
    const ws = new WebSocket(u);
    this.ws = ws;
    ws.onopen = () => {
      this.failures = 0;
      this.onStatus("live");
    };
    ws.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      if (msg.id !== undefined && msg.id !== null) this.lastId = msg.id;
      if (msg.type === "heartbeat") return;
      if (msg.type === "gap") this.onGap(msg.missed);
      else this.onMessage(msg);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws || this.stopped) return;
      if (REFUSED.has(event.code)) {
        this.onStatus("refused");
        return;
      }
      this.failures += 1;
      this.onStatus("reconnecting");
      // Randomised exponential backoff, so a restarted server is not hit by every browser at once.
      const base = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** Math.min(this.failures - 1, 5));
      this.timer = setTimeout(() => this.connect(), base / 2 + Math.random() * (base / 2));
    };
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
  }
}
