"use strict";
// Shared by plait's dashboards (the federated server's, the parameter-server launcher's): SVG line charts, fact
// boxes, table rows, the x-axis switch and the polling loop. A plain script: each page's own /dashboard.js, loaded
// after it, uses these names.
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];
const SVG = "http://www.w3.org/2000/svg";

function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
function duration(s) {
  if (num(s) === null) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (h ? h + " h " : "") + (h || m ? m + " min " : "") + sec + " s";
}
function el(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (text !== undefined) node.textContent = text;
  return node;
}
function ticks(lo, hi, count, integer) {
  if (hi <= lo) hi = lo + 1;
  let step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
  for (const f of [1, 2, 5, 10]) if ((hi - lo) / (step * f) <= count) { step *= f; break; }
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}
// Draw into <svg id="chart-NAME"> with its legend in #legend-NAME. lines: [{label, points: [[x, y], ...]}];
// hlines: [{y, label}] (dashed, e.g. a budget or a bound); x: {label, integer (ticks), from (x starts at most
// here)}; empty: the text shown without points.
function chart(name, lines, hlines, x, empty) {
  const svg = $("chart-" + name), W = 440, H = 230;  // the viewBox: drawn in these units, scaled to the card
  const L = 52, R = 10, T = 8, B = 34;
  svg.replaceChildren();
  const legend = $("legend-" + name);
  legend.replaceChildren();
  const xs = [], ys = [];
  lines.forEach((line) => line.points.forEach(([px, py]) => { xs.push(px); ys.push(py); }));
  hlines.forEach((h) => ys.push(h.y));
  if (!xs.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, empty || "no data yet"));
    return;
  }
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x.from !== undefined) { x0 = Math.min(x0, x.from); x1 = Math.max(x1, x0 + 1); }
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const sx = (v) => L + (v - x0) / ((x1 - x0) || 1) * (W - L - R);
  const sy = (v) => H - B - (v - y0) / (y1 - y0) * (H - T - B);
  for (const t of ticks(y0, y1, 5, false)) {
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    svg.appendChild(el("text", {x: L - 4, y: sy(t) + 4, "text-anchor": "end"}, String(+t.toPrecision(4))));
  }
  for (const t of ticks(x0, x1, 6, !!x.integer)) {
    svg.appendChild(el("line", {x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "axis"}));
    svg.appendChild(el("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}, String(t)));
  }
  svg.appendChild(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, x.label));
  hlines.forEach((h) => {
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(h.y), y2: sy(h.y), stroke: "#d62728",
                                "stroke-dasharray": "5,4"}));
    svg.appendChild(el("text", {x: W - R - 4, y: sy(h.y) - 4, "text-anchor": "end"}, h.label));
  });
  lines.forEach((line, i) => {
    const color = COLORS[i % COLORS.length];
    const span = document.createElement("span");
    span.style.color = color; span.textContent = "● " + line.label;
    legend.appendChild(span);
    svg.appendChild(el("polyline", {points: line.points.map(([px, py]) => sx(px) + "," + sy(py)).join(" "),
                                    fill: "none", stroke: color, "stroke-width": 1.5}));
    if (line.points.length <= 300) line.points.forEach(([px, py]) => {
      const dot = el("circle", {cx: sx(px), cy: sy(py), r: 2.5, fill: color, class: "pt", "data-series": line.label,
                                "data-x": px});
      dot.appendChild(el("title", {}, line.label + ": " + (+py.toPrecision(5)) + " at " + x.label + " " +
                                      (+px.toPrecision(6))));
      svg.appendChild(dot);
    });
  });
}
// [[x, y × scale], ...] of the rows that have both keys as finite numbers.
function points(rows, xKey, yKey, scale) {
  const out = [];
  for (const r of rows) {
    const px = num(r[xKey]), py = num(r[yKey]);
    if (px !== null && py !== null) out.push([px, py * (scale || 1)]);
  }
  return out;
}
// specs: [[label, key, scale], ...] -> the chart's lines, those without points left out.
function lines(rows, xKey, specs) {
  return specs.map(([label, key, scale]) => ({label, points: points(rows, xKey, key, scale)}))
              .filter((l) => l.points.length);
}
function fact(parent, label, value, cls) {
  const d = document.createElement("div"); d.className = "fact " + (cls || "");
  d.textContent = label; const b = document.createElement("b"); b.textContent = value; d.appendChild(b);
  parent.appendChild(d);
}
// cells: [[text, class], ...]; a cell whose text is a Node is put in as it is.
function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const [content, cls] of cells) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  tbody.appendChild(tr);
}
// The run's settings, filled once (they do not change during a run).
function settingsRows(id, settings) {
  const body = $(id).tBodies[0];
  if (!body.rows.length) for (const [k, v] of Object.entries(settings || {})) row(body, [[k], [String(v)]]);
}
// Buttons #x-MODE switch the charts' x axis: onSwitch(mode) redraws.
function xSwitch(modes, onSwitch) {
  for (const mode of modes) $("x-" + mode).addEventListener("click", () => {
    for (const m of modes) $("x-" + m).className = m === mode ? "on" : "";
    onSwitch(mode);
  });
}
// Fetch /status.json every `everyMs` and hand it to render; an unreachable owner is said in #error.
async function poll(render, everyMs) {
  try {
    const reply = await fetch("/status.json", {cache: "no-store"});
    render(await reply.json());
    $("error").textContent = "";
  } catch (err) {
    $("error").textContent = "status unavailable (stopped?): " + err;
  }
  setTimeout(() => poll(render, everyMs), everyMs);
}
