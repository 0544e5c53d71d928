
"use strict";
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
const SVG = "http://www.w3.org/2000/svg";
let xMode = "round", last = null;

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
// lines: [{label, points: [[x, y], ...]}]; hlines: [{y, label}]
function chart(name, lines, hlines, xLabel, empty) {
  const svg = $("chart-" + name), W = 440, H = 230;  // the viewBox: drawn in these units, scaled to the card
  const L = 52, R = 10, T = 8, B = 34;
  svg.replaceChildren();
  const legend = $("legend-" + name);
  legend.replaceChildren();
  const xs = [], ys = [];
  lines.forEach((line) => line.points.forEach(([x, y]) => { xs.push(x); ys.push(y); }));
  hlines.forEach((h) => ys.push(h.y));
  if (!xs.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, empty || "no data yet"));
    return;
  }
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (xMode === "round") { x0 = Math.min(x0, 1); x1 = Math.max(x1, x0 + 1); }
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / ((x1 - x0) || 1) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of ticks(y0, y1, 5, false)) {
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    svg.appendChild(el("text", {x: L - 4, y: sy(t) + 4, "text-anchor": "end"}, String(+t.toPrecision(4))));
  }
  for (const t of ticks(x0, x1, 6, xMode === "round")) {
    svg.appendChild(el("line", {x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "axis"}));
    svg.appendChild(el("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}, String(t)));
  }
  svg.appendChild(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, xLabel));
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
    svg.appendChild(el("polyline", {points: line.points.map(([x, y]) => sx(x) + "," + sy(y)).join(" "),
                                    fill: "none", stroke: color, "stroke-width": 1.5}));
    if (line.points.length <= 300) line.points.forEach(([x, y]) => {
      const dot = el("circle", {cx: sx(x), cy: sy(y), r: 2.5, fill: color, class: "pt", "data-series": line.label,
                                "data-x": x});
      dot.appendChild(el("title", {}, line.label + ": " + (+y.toPrecision(5)) + " at " + xLabel + " " + x));
      svg.appendChild(dot);
    });
  });
}
function points(series, key, scale) {
  const out = [];
  for (const r of series) {
    const x = num(xMode === "round" ? r.round : r.elapsed_s), y = num(r[key]);
    if (x !== null && y !== null) out.push([x, y * scale]);
  }
  return out;
}
function lines(series, specs) {
  return specs.map(([label, key, scale]) => ({label, points: points(series, key, scale || 1)}))
              .filter((l) => l.points.length);
}
function fact(parent, label, value, cls) {
  const d = document.createElement("div"); d.className = "fact " + (cls || "");
  d.textContent = label; const b = document.createElement("b"); b.textContent = value; d.appendChild(b);
  parent.appendChild(d);
}
function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) {
    const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td);
  }
  tbody.appendChild(tr);
}
function render(s) {
  last = s;
  $("run").textContent = s.run; document.title = "plait fl: " + s.run;
  $("phase").textContent = "phase: " + s.phase;
  $("rounds").textContent = s.round + " / " + s.rounds;
  $("connected").textContent = s.connected + " of " + s.registered + " registered";
  $("elapsed").textContent = duration(s.elapsed_s);
  $("eta").textContent = s.phase === "done" ? "done" : duration(s.eta_s);
  $("rss").textContent = num(s.rss_mib) === null ? "-" : s.rss_mib.toFixed(0) + " MiB";
  $("updated").textContent = new Date(s.time * 1000).toLocaleTimeString();
  const cur = $("current"); cur.replaceChildren();
  const c = s.current || {};
  if (c.round === undefined) fact(cur, "round", "none open");
  else {
    const refused = Object.keys(c.refused || {}).length;
    fact(cur, c.kind + " round", c.round + (c.closed ? " (closed)" : ""));
    fact(cur, "selected", c.selected.length + " (target " + c.target + ")");
    fact(cur, "reported", c.finished.length);
    fact(cur, "dropped", c.dropped.length - refused, c.dropped.length - refused ? "bad" : "");
    fact(cur, "refused", refused, refused ? "bad" : "");
    fact(cur, "deadline in", num(s.deadline_s) === null ? "-" : s.deadline_s.toFixed(0) + " s");
    if (c.secagg_stage) fact(cur, "secure aggregation", c.secagg_stage);
  }
  const series = s.series || [], xLabel = xMode === "round" ? "round" : "elapsed time (s)";
  chart("accuracy", lines(series, [["test", "test_accuracy", 100], ["federated", "fed_accuracy", 100]]), [], xLabel);
  chart("loss", lines(series, [["training", "train_loss"], ["test", "test_loss"]]), [], xLabel);
  $("delta").textContent = num(s.delta) === null ? "" : "(δ = " + s.delta + ")";
  chart("epsilon", lines(series, [["ε", "epsilon"]]),
        num(s.epsilon_budget) === null ? [] : [{y: s.epsilon_budget, label: "budget ε = " + s.epsilon_budget}],
        xLabel, num(s.delta) === null ? "no differential privacy in this run" : "no ε yet");
  chart("traffic", lines(series, [["uploaded", "cumulative_bytes_up", 1e-6],
                                  ["downloaded", "cumulative_bytes_down", 1e-6]]), [], xLabel);
  const clients = $("clients").tBodies[0]; clients.replaceChildren();
  for (const k of s.clients || []) {
    const refusals = Object.entries(k.refusals).map(([r, n]) => r + " × " + n).join(", ");
    const p = k.properties || {};
    row(clients, [[k.id], [k.connected ? "yes" : "no", k.connected ? "ok" : "bad"],
                  [k.last_seen_s.toFixed(1) + " s ago"], [k.examples], [k.rounds], [k.evaluations],
                  [k.this_round, k.this_round.startsWith("refused") ? "bad" : ""], [refusals, refusals ? "bad" : ""],
                  [k.last_refusal], [p.charging ? "yes" : "no"], [p.idle ? "yes" : "no"],
                  [p.unmetered ? "yes" : "no"]]);
  }
  $("client-count").textContent = "(" + (s.clients || []).length + " of " + s.registered + " shown)";
  const refusals = $("refusals").tBodies[0]; refusals.replaceChildren();
  for (const [reason, n] of Object.entries(s.rejected || {})) row(refusals, [[reason], [n, n ? "bad" : ""]]);
  const settings = $("settings").tBodies[0];
  if (!settings.rows.length) for (const [k, v] of Object.entries(s.settings || {})) row(settings, [[k], [String(v)]]);
}
async function refresh() {
  try {
    const reply = await fetch("/status.json", {cache: "no-store"});
    render(await reply.json());
    $("error").textContent = "";
  } catch (err) {
    $("error").textContent = "status unavailable (server stopped?): " + err;
  }
  setTimeout(refresh, 1000);
}
function axis(mode) {
  xMode = mode;
  $("x-round").className = mode === "round" ? "on" : ""; $("x-time").className = mode === "time" ? "on" : "";
  if (last) render(last);
}
$("x-round").addEventListener("click", () => axis("round"));
$("x-time").addEventListener("click", () => axis("time"));
refresh();
