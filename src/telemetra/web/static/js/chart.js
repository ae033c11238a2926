// A time chart drawn from the aggregate endpoint at the resolution the screen needs: about one bucket per
// pixel of width, each bucket's min and max drawn as a band (spikes stay visible) around its average.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { api } from "./api.js";
import { h } from "./ui.js";

export const RANGES = [
  ["15m", "15 min", 15 * 60],
  ["1h", "1 hour", 3600],
  ["6h", "6 hours", 6 * 3600],
  ["24h", "24 hours", 86400],
  ["7d", "7 days", 7 * 86400],
  ["30d", "30 days", 30 * 86400],
  ["90d", "90 days", 90 * 86400],
  ["1y", "1 year", 365 * 86400],
];
// Bucket widths (seconds) that read well on an axis.
const NICE = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];
const PARTS = 4;
const PALETTE = ["#2f7ed8", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#0c8599", "#5f3dc4", "#e67700"];

export function pickInterval(spanS, widthPx) {
  const buckets = Math.max(60, Math.min(2000, Math.round(widthPx)));
  const raw = spanS / buckets;
  return NICE.find((n) => n >= raw) ?? Math.ceil(raw / 86400) * 86400;
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export class TimeChart {
  constructor(container, { deviceId, onZoom }) {
    this.container = container;
    this.deviceId = deviceId;
    this.onZoom = onZoom;
    this.plot = null;
    this.keys = [];
    this.data = [[]];
    this.window = null; // {start, end} in seconds; end null = up to now (live)
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(container);
    this.rebuild = () => this.keys.length && this.draw();
    window.addEventListener("themechange", this.rebuild);
  }

  size() {
    const width = Math.max(280, this.container.clientWidth);
    return { width, height: width < 600 ? 240 : 320 };
  }

  async load(keys, window) {
    this.keys = keys;
    this.window = window;
    const now = Date.now() / 1000;
    const end = window.end ?? now;
    const start = window.start ?? end - window.span;
    if (!keys.length) {
      this.data = [[]];
      this.gaps = 0;
      this.draw();
      return;
    }
    const interval = pickInterval(end - start, this.size().width);
    // Asked for from one bucket boundary to another (the axis still shows start … end): whole buckets,
    // which the server answers from a rollup tier (1 min, 1 h) instead of scanning the raw points —
    // a range edge inside a tier bucket would have it fall back to the raw points (domain/rollups.py).
    const from = Math.floor(start / interval) * interval;
    const to = Math.ceil(end / interval) * interval;
    // A long range is asked for in parts at bucket boundaries, answered side by side: the server scans
    // each part on its own connection, so the database's cores share a year's rows.
    const parts = to - from >= 30 * 86400 ? PARTS : 1;
    const edges = [from];
    for (let i = 1; i < parts; i++) edges.push(Math.floor((from + ((to - from) * i) / parts) / interval) * interval);
    edges.push(to);
    const answers = await Promise.all(edges.slice(0, -1).map((from, i) =>
      api(`/api/v1/devices/${encodeURIComponent(this.deviceId)}/aggregate`, {
        query: { keys: keys.join(","), start: new Date(from * 1000).toISOString(), end: new Date(edges[i + 1] * 1000).toISOString(),
          interval, fn: "min,max,avg" },
        sized: true,
      })));
    const series = {};
    for (const key of keys) series[key] = answers.flatMap((a) => a.data.series[key] ?? []);
    this.interval = interval;
    this.resolution = answers[0].data.resolution;
    this.bytes = answers.reduce((n, a) => n + a.bytes, 0);
    this.data = columns(keys, series, interval);
    this.gapAfter = gapAfter(this.data[0], interval);
    this.gaps = insertGaps(this.data, this.gapAfter, interval);
    this.scale = { min: start, max: end };
    this.draw();
  }

  // A live reading: appended while the chart shows "up to now", the window sliding with it.
  append(tsIso, values) {
    if (!this.plot || this.window?.end) return false;
    const x = Date.parse(tsIso) / 1000;
    const xs = this.data[0];
    if (!this.keys.some((k) => typeof values[k] === "number")) return false;
    if (xs.length && x < xs[xs.length - 1]) return false;
    if (xs.length && x - xs[xs.length - 1] > this.gapAfter) {
      // Silent for longer than the device's cadence: no line across the silence.
      xs.push(xs[xs.length - 1] + this.interval);
      for (let j = 1; j < this.data.length; j++) this.data[j].push(null);
      this.gaps += 1;
    }
    xs.push(x);
    this.keys.forEach((key, i) => {
      const v = typeof values[key] === "number" ? values[key] : typeof values[key] === "boolean" ? Number(values[key]) : null;
      for (let j = 0; j < 3; j++) this.data[1 + i * 3 + j].push(v);
    });
    const span = this.window.span;
    const max = Math.max(x, Date.now() / 1000);
    this.scale = { min: max - span, max };
    this.plot.setData(this.data, false);
    this.plot.setScale("x", this.scale);
    this.mark();
    return true;
  }

  mark() {
    const ds = this.container.dataset;
    ds.points = String(this.data[0].length);
    ds.interval = String(this.interval ?? "");
    ds.bytes = String(this.bytes ?? "");
    ds.resolution = this.resolution ?? "";
    ds.gaps = String(this.gaps ?? 0);
    ds.drawn = String(Date.now());
  }

  draw() {
    this.plot?.destroy();
    this.plot = null;
    this.container.replaceChildren();
    if (!this.keys.length) {
      this.container.append(h("p", { class: "muted" }, "No numeric series yet."));
      this.mark();
      return;
    }
    const text = css("--text");
    const grid = css("--border");
    const axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    const series = [{}];
    const bands = [];
    this.keys.forEach((key, i) => {
      const color = PALETTE[i % PALETTE.length];
      const base = series.length;
      series.push({ label: key, stroke: color, width: 1.5, spanGaps: false });
      series.push({ label: `${key} min`, stroke: `${color}66`, width: 0.5, spanGaps: false });
      series.push({ label: `${key} max`, stroke: `${color}66`, width: 0.5, spanGaps: false });
      bands.push({ series: [base + 2, base + 1], fill: `${color}26` });
    });
    const opts = {
      ...this.size(),
      series,
      bands,
      axes: [axis, { ...axis, size: 60 }],
      scales: { x: { time: true, range: () => [this.scale.min, this.scale.max] } },
      cursor: { drag: { x: true, y: false, setScale: false } },
      legend: { live: true },
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width < 4) return;
            const min = u.posToVal(u.select.left, "x");
            const max = u.posToVal(u.select.left + u.select.width, "x");
            u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
            this.onZoom?.(min, max);
          },
        ],
      },
    };
    this.plot = new uPlot(opts, this.data, this.container);
    this.mark();
  }

  destroy() {
    this.resize.disconnect();
    window.removeEventListener("themechange", this.rebuild);
    this.plot?.destroy();
  }
}

// The aggregate answer ({key: [{start, min, max, avg}]}) as uPlot columns: x, then avg/min/max per key.
function columns(keys, series, interval) {
  const xs = new Set();
  for (const key of keys) for (const b of series[key] ?? []) xs.add(Date.parse(b.start) / 1000);
  const x = [...xs].sort((a, b) => a - b);
  const at = new Map(x.map((v, i) => [v, i]));
  const out = [x];
  for (const key of keys) {
    const avg = new Array(x.length).fill(null);
    const min = new Array(x.length).fill(null);
    const max = new Array(x.length).fill(null);
    for (const b of series[key] ?? []) {
      const i = at.get(Date.parse(b.start) / 1000);
      avg[i] = b.avg;
      min[i] = b.min;
      max[i] = b.max;
    }
    out.push(avg, min, max);
  }
  return out;
}

// How far apart two drawn buckets may be before the chart breaks its line there: twice the bucket width,
// or three times the usual spacing of the buckets that have data (a device reporting every 5 min on
// 2-min buckets is not "missing" every other bucket). Infinity until there are two buckets.
export function gapAfter(xs, interval) {
  if (xs.length < 2) return Infinity;
  const deltas = [];
  for (let i = 1; i < xs.length; i++) deltas.push(xs[i] - xs[i - 1]);
  deltas.sort((a, b) => a - b);
  return Math.max(2 * interval, 3 * deltas[Math.floor(deltas.length / 2)]);
}

// A null row in every series where buckets are further apart than ``after``: uPlot (spanGaps false)
// draws no line, and no min/max band, across missing data. Returns how many gaps it marked.
export function insertGaps(data, after, interval) {
  const xs = data[0];
  const at = [];
  for (let i = 1; i < xs.length; i++) if (xs[i] - xs[i - 1] > after) at.push(i);
  for (let n = at.length - 1; n >= 0; n--) {
    const i = at[n];
    xs.splice(i, 0, xs[i - 1] + interval);
    for (let j = 1; j < data.length; j++) data[j].splice(i, 0, null);
  }
  return at.length;
}
