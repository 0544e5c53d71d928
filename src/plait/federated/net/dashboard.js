"use strict";
// The federated server's page; charts, tables and polling come from the shared /charts.js (plait/web).
let xMode = "round", last = null;

function xAxis() {
  return xMode === "round" ? {key: "round", label: "round", integer: true, from: 1}
                           : {key: "elapsed_s", label: "elapsed time (s)"};
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
  const series = s.series || [], x = xAxis();
  chart("accuracy", lines(series, x.key, [["test", "test_accuracy", 100], ["federated", "fed_accuracy", 100]]), [], x);
  chart("loss", lines(series, x.key, [["training", "train_loss"], ["test", "test_loss"]]), [], x);
  $("delta").textContent = num(s.delta) === null ? "" : "(δ = " + s.delta + ")";
  chart("epsilon", lines(series, x.key, [["ε", "epsilon"]]),
        num(s.epsilon_budget) === null ? [] : [{y: s.epsilon_budget, label: "budget ε = " + s.epsilon_budget}],
        x, num(s.delta) === null ? "no differential privacy in this run" : "no ε yet");
  chart("traffic", lines(series, x.key, [["uploaded", "cumulative_bytes_up", 1e-6],
                                         ["downloaded", "cumulative_bytes_down", 1e-6]]), [], x);
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
  settingsRows("settings", s.settings);
}
xSwitch(["round", "time"], (mode) => { xMode = mode; if (last) render(last); });
poll(render, 1000);
