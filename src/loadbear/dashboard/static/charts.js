// Hand-made SVG charts: stacked bars and lines over days. No library, no CDN: the dashboard
// must work on an air-gapped install, and these two chart kinds are all it needs.
(function () {
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6", "#f97316", "#94a3b8"];

function svgEl(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

// A "nice" axis maximum and step (1, 2, 2.5 or 5 times a power of ten) for about four ticks.
function niceScale(max) {
  if (!(max > 0)) return { max: 1, step: 0.25 };
  const raw = max / 4;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  return { max: step * Math.ceil(max / step), step };
}

function shortDay(day) {
  const [, m, d] = day.split("-");
  return `${m}-${d}`;
}

function frame(container, labels, yMax, fmt, opts) {
  // Drawn at the container's real width, so text keeps its size in wide and narrow cards.
  const W = Math.max(280, Math.round(container.clientWidth || 640)), H = opts.height || 220;
  const L = 58, R = 12, T = 12, B = 28;
  container.replaceChildren();
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart", role: "img",
    "aria-label": opts.label || "chart" }, container);
  const scale = niceScale(yMax);
  const plotW = W - L - R, plotH = H - T - B;
  const y = (v) => T + plotH - (v / scale.max) * plotH;
  for (let v = 0; v <= scale.max + 1e-9; v += scale.step) {
    svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: v === 0 ? "axis" : "gridline" }, svg);
    const t = svgEl("text", { x: L - 8, y: y(v) + 4, "text-anchor": "end", class: "tick" }, svg);
    t.textContent = fmt(v);
  }
  const n = labels.length;
  const every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(plotW / 64))));
  const band = plotW / Math.max(1, n);
  labels.forEach((lab, i) => {
    if ((n - 1 - i) % every !== 0) return; // anchored on the latest day, which is always labelled
    const t = svgEl("text", { x: L + band * i + band / 2, y: H - 8, "text-anchor": "middle", class: "tick" }, svg);
    t.textContent = shortDay(lab);
  });
  return { svg, y, L, T, band, plotH };
}

function legend(container, series) {
  const box = document.createElement("div");
  box.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("span");
    item.className = "legend-item";
    const sw = document.createElement("span");
    sw.className = s.dashed ? "swatch swatch-dashed" : "swatch";
    sw.style.background = s.color || PALETTE[i % PALETTE.length];
    const name = document.createElement("span");
    name.textContent = s.name;
    item.append(sw, name);
    box.appendChild(item);
  });
  container.appendChild(box);
}

// Charts are built before their page is attached; they draw once it is (flush), and again when
// the window is resized.
const drawn = [];
function schedule(container, draw) {
  container._draw = draw;
  drawn.push(container);
  if (container.isConnected) draw();
}
function flush() {
  // Called once a page is attached: anything not in the document by then belongs to a page
  // that is gone.
  for (let i = drawn.length - 1; i >= 0; i--) {
    if (drawn[i].isConnected) drawn[i]._draw();
    else drawn.splice(i, 1);
  }
}
let resizeTimer = null;
window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(flush, 120); });

// series: [{name, values, color?}], stacked per label; fmt formats axis values and tooltips.
function stackedBars(container, labels, series, fmt, opts = {}) {
  schedule(container, () => drawStackedBars(container, labels, series, fmt, opts));
}
function lineChart(container, labels, series, fmt, opts = {}) {
  schedule(container, () => drawLineChart(container, labels, series, fmt, opts));
}

function drawStackedBars(container, labels, series, fmt, opts) {
  const totals = labels.map((_, i) => series.reduce((a, s) => a + (s.values[i] || 0), 0));
  const f = frame(container, labels, Math.max(0, ...totals), fmt, opts);
  const w = Math.max(2, f.band * 0.68);
  labels.forEach((lab, i) => {
    let acc = 0;
    series.forEach((s, k) => {
      const v = s.values[i] || 0;
      if (v <= 0) return;
      const x = f.L + f.band * i + (f.band - w) / 2;
      const r = svgEl("rect", { x, y: f.y(acc + v), width: w, height: Math.max(0.5, f.y(acc) - f.y(acc + v)),
        fill: s.color || PALETTE[k % PALETTE.length], class: "bar" }, f.svg);
      const title = svgEl("title", {}, r);
      title.textContent = `${lab} · ${s.name}: ${fmt(v)}`;
      acc += v;
    });
  });
  if (opts.legend !== false) legend(container, series);
}

// series: [{name, values (null = no data), color?, dashed?}]
function drawLineChart(container, labels, series, fmt, opts) {
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const f = frame(container, labels, opts.yMax || Math.max(0, ...all), fmt, opts);
  series.forEach((s, k) => {
    const color = s.color || PALETTE[k % PALETTE.length];
    let d = "";
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      const x = f.L + f.band * i + f.band / 2;
      d += `${pen ? "L" : "M"}${x.toFixed(1)},${f.y(v).toFixed(1)}`;
      pen = true;
      const dot = svgEl("circle", { cx: x, cy: f.y(v), r: 2.6, fill: color, class: "dot" }, f.svg);
      const title = svgEl("title", {}, dot);
      title.textContent = `${labels[i]} · ${s.name}: ${fmt(v)}`;
    });
    if (d) {
      const path = svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "line" }, f.svg);
      if (s.dashed) path.setAttribute("stroke-dasharray", "5 4");
      f.svg.insertBefore(path, f.svg.querySelector("circle"));
    }
  });
  if (opts.legend !== false) legend(container, series);
}

window.LBCharts = { stackedBars, lineChart, flush, PALETTE, niceScale };
})();
