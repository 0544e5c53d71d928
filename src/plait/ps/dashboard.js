"use strict";
// The parameter-server launcher's page; charts, tables and polling come from the shared /charts.js (plait/web).
let xMode = "step", last = null;
const TIME = {label: "elapsed time (s)"};
const BAD_STATES = ["failed", "dropped", "restarting", "exited"];

function mb(bytes) { return num(bytes) === null ? "-" : (bytes / 1e6).toFixed(1); }
function meter(value, total) {  // a bar as long as value / total of 120 px
  const bar = document.createElement("span"); bar.className = "meter";
  bar.style.width = Math.round(120 * Math.min(1, value / Math.max(total, 1))) + "px";
  return bar;
}
function render(s) {
  last = s;
  $("run").textContent = s.run; document.title = "plait ps: " + s.run;
  $("phase").textContent = "phase: " + s.phase + " (" + s.workers + " workers, " + s.servers + " server" +
                           (s.servers > 1 ? "s" : "") + (s.replication > 1 ? " × 2 replicas" : "") + ")";
  $("consistency").textContent = s.consistency;
  $("slowest").textContent = (num(s.slowest_clock) === null ? "-" : s.slowest_clock) + " / " + s.steps;
  $("spread").textContent = num(s.clock_spread) === null ? "-" :
      s.clock_spread + (num(s.ssp_bound) === null ? "" : " (bound " + s.ssp_bound + ")");
  $("throughput").textContent = num(s.samples_per_s) === null ? "-" : s.samples_per_s.toFixed(0) + " samples/s";
  const evals = s.series || [], lastEval = evals.length ? evals[evals.length - 1] : {};
  $("accuracy").textContent = num(lastEval.test_accuracy) === null ? "-" :
      (100 * lastEval.test_accuracy).toFixed(2) + " %";
  $("elapsed").textContent = duration(s.elapsed_s);
  $("updated").textContent = new Date(s.time * 1000).toLocaleTimeString();

  const workers = $("workers").tBodies[0]; workers.replaceChildren();
  for (const w of s.worker_rows || []) {
    row(workers, [[w.worker], [w.clock], [meter(w.clock, s.steps)],
                  [w.state, BAD_STATES.includes(w.state) ? "bad" : "ok"],
                  [num(w.train_loss) === null ? "-" : w.train_loss.toFixed(4)], [w.staleness ?? "-"],
                  [num(w.step_s) === null ? "-" : (1000 * w.step_s).toFixed(0) + " ms"],
                  [w.samples_per_s.toFixed(0)], [w.restarts, w.restarts ? "bad" : ""]]);
  }

  const x = xMode === "step" ? {key: "step", label: "step (slowest worker's clock)", integer: true, from: 0}
                             : {key: "elapsed_s", label: TIME.label};
  chart("accuracy", lines(evals, x.key, [["test", "test_accuracy", 100]]), [], x);
  chart("loss", [...lines(s.train || [], x.key, [["training (workers' mean)", "train_loss"]]),
                 ...lines(evals, x.key, [["test", "test_loss"]])], [], x);
  chart("clocks", (s.clocks || []).filter((c) => c.points.length)
                                  .map((c) => ({label: "worker " + c.worker, points: c.points})), [], TIME);
  chart("spread", lines(s.spread || [], "elapsed_s", [["spread", "spread"]]),
        num(s.ssp_bound) === null ? [] : [{y: s.ssp_bound, label: "SSP bound " + s.ssp_bound}], TIME,
        s.consistency === "asp" ? "no worker yet (ASP: no bound)" : "no worker yet");
  chart("throughput", lines(s.throughput || [], "elapsed_s", [["samples/s", "samples_per_s"]]), [], TIME);

  const servers = $("servers").tBodies[0]; servers.replaceChildren();
  for (const v of s.server_rows || []) {
    row(servers, [[v.name], [v.running ? "yes" : "no", v.running ? "ok" : "bad"], [v.role || "-"],
                  [v.keys ?? "-"], [v.pieces ?? "-"], [v.elements ?? "-"], [v.updates ?? "-"], [mb(v.bytes_in)],
                  [mb(v.bytes_out)], [v.restarts, v.restarts ? "bad" : ""], [v.last_event]]);
  }
  const events = $("events").tBodies[0]; events.replaceChildren();
  for (const e of (s.events || []).slice().reverse()) {  // the newest first
    const bad = /killed|restarted|failed|dropped|refused|signal|lost|gap/.test(e.event);
    row(events, [[duration(e.elapsed_s)], [e.source], [e.event, bad ? "bad" : ""], [e.detail]]);
  }
  settingsRows("settings", s.settings);
}
xSwitch(["step", "time"], (mode) => { xMode = mode; if (last) render(last); });
poll(render, 1000);
