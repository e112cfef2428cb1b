// fourfold dashboard, the planner: the plan page at /?view=plan (the ranked layouts for a job spec on a
// cluster, POST /v1/plan) and a job page's Planner block (the predicted memory and speed of its layout next
// to what its steps measured, GET /v1/jobs/{id}/prediction). Loaded before app.js: these functions call its
// helpers (api, cell) only when app.js's routing runs them. Server text is set as text, never as markup.
"use strict";

function bytes(v) {
  if (v === null || v === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  for (; Math.abs(v) >= 1024 && i < units.length - 1; i++) v /= 1024;
  return `${i === 0 || v >= 100 ? v.toFixed(0) : v.toPrecision(3)} ${units[i]}`;
}
const seconds = (s) => (s === null || s === undefined ? "-" : s >= 1 ? `${s.toFixed(2)} s`
  : s >= 1e-3 ? `${(s * 1e3).toFixed(1)} ms` : `${(s * 1e6).toFixed(1)} µs`);
const share = (x) => (x === null || x === undefined ? "-" : `${(100 * x).toFixed(1)}%`);
const count = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${(n / 1e3).toFixed(0)}K`);
const tokens = (v) => (v === null || v === undefined ? "-" : Math.round(v).toLocaleString());
const el = (tag, text, cls) => Object.assign(document.createElement(tag), { textContent: text, className: cls ?? "" });

// -- the plan page ---------------------------------------------------------------------------------------------

function planRequest(form) {
  const f = new FormData(form);
  const num = (k) => (f.get(k) === "" ? undefined : Number(f.get(k)));  // empty: the spec's default (JSON drops it)
  return {
    spec: { model: { preset: f.get("preset") },
      train: { global_batch: num("global_batch"), micro_batch: num("micro_batch"), seq_len: num("seq_len"),
        dtype: f.get("dtype") } },
    cluster: f.get("cluster").trim() || null,  // null: the live Ray cluster
    top: num("top") ?? 10,
  };
}

function showPlan() {
  document.getElementById("jobs-view").hidden = true;
  document.getElementById("plan-view").hidden = false;
  const form = document.getElementById("plan-form");
  const error = document.getElementById("plan-error");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    form.querySelector("button").disabled = true;
    document.body.dataset.plan = "running";
    try {
      drawPlan(await api("/v1/plan", "POST", planRequest(form)));
      error.hidden = true;
      document.body.dataset.plan = "done";
    } catch (err) {  // a 422 says which field and why
      error.textContent = err.detail ?? String(err);
      error.hidden = false;
      document.getElementById("plan-result").hidden = true;
      document.body.dataset.plan = "error";
    } finally {
      form.querySelector("button").disabled = false;
    }
  });
}

function drawPlan(doc) {
  const c = doc.cluster, job = doc.job, m = doc.min_accelerators;
  document.getElementById("plan-result").hidden = false;
  document.getElementById("plan-cluster").textContent = `${count(job.params)} parameters, global batch `
    + `${job.global_batch} × ${job.seq_len} tokens in ${job.dtype} on ${c.text}: ${c.world} × ${c.accelerator_name}, `
    + `${bytes(c.memory_bytes)} each, ${bytes(c.usable_bytes)} usable (a ${share(doc.margin)} margin), `
    + `${share(doc.efficiency)} of the peak reached`;
  document.getElementById("plan-notes").replaceChildren(...doc.notes.map((n) => el("li", n)));
  document.getElementById("plan-nofit").hidden = doc.fits;
  document.querySelector("#plan-table tbody").replaceChildren(...doc.candidates.map(({ rank, reaches_target, prediction: p }) => {
    const tr = document.createElement("tr");
    tr.className = p.fits ? "fits" : "nofit";
    tr.append(cell(String(rank), "num"), cell(p.layout, "layout"),
      cell(`${bytes(p.memory.total)} (${share(p.memory.total / p.capacity_bytes)})`, "num"), cell(seconds(p.step_time_s), "num"),
      cell(tokens(p.tokens_per_s), "num"), cell(share(p.mfu), "num"), cell(p.bottleneck),
      cell(p.fits ? "yes" : "no", p.fits ? "yes" : "no"), cell(reaches_target ? "yes" : "no", reaches_target ? "yes" : "no"));
    return tr;
  }));
  document.getElementById("plan-min").textContent = m.count === null
    ? `No number of ${m.accelerator} (nodes of ${m.per_node}) holds this job.`
    : `The fewest ${m.accelerator} that hold this job: ${m.count} (in nodes of ${m.per_node}).`;
  document.getElementById("plan-reasons").replaceChildren(...doc.candidates.slice(0, 3).map((x) => {
    const li = el("li", `#${x.rank} ${x.prediction.layout}`);
    li.append(el("ul"));
    li.lastChild.append(...x.reasons.map((r) => el("li", r)));
    return li;
  }));
  drawMemory(doc);
}

// One horizontal bar per candidate, one stacked segment per memory item (GiB per rank); a dashed line at the
// usable memory (capacity less the margin).
function drawMemory(doc) {
  const rows = doc.candidates, GiB = 2 ** 30;
  const labels = rows.map((x) => `#${x.rank} ${x.prediction.layout}`);
  const items = Object.keys(rows[0].prediction.memory).filter((k) => k !== "total" && rows.some((x) => x.prediction.memory[k] > 0));
  const traces = items.map((k) => ({ type: "bar", orientation: "h", name: k, y: labels,
    x: rows.map((x) => x.prediction.memory[k] / GiB), hovertemplate: `${k}: %{x:.3g} GiB<extra></extra>` }));
  const usable = doc.cluster.usable_bytes / GiB;
  Plotly.react("chart-plan-memory", traces, {
    barmode: "stack", height: 150 + 30 * rows.length, margin: { t: 28, r: 16, b: 20, l: 12 },
    xaxis: { ticksuffix: " GiB", rangemode: "tozero" }, yaxis: { autorange: "reversed", automargin: true },
    legend: { orientation: "h", traceorder: "normal", x: 0, y: -0.08, yanchor: "top" },
    shapes: [{ type: "line", x0: usable, x1: usable, yref: "paper", y0: 0, y1: 1, line: { color: "#b3261e", dash: "dash" } }],
    annotations: [{ x: usable, y: 1, yref: "paper", yanchor: "bottom", showarrow: false, font: { color: "#b3261e" },
      text: `usable ${usable.toFixed(1)} GiB` }],
}, { displayModeBar: false, responsive: true });
}

// -- a job's Planner block -------------------------------------------------------------------------------------

async function showPrediction(id) {
  const { predicted: p, measured: m, note } = await api(`/v1/jobs/${id}/prediction`);
  const ratio = (got, want) => (got === null || !p || !want ? "-" : `×${(got / want).toFixed(2)}`);
  const rows = [
    ["peak memory per rank", p?.memory.total, m.peak_mem_bytes, bytes],
    ["tokens/s", p?.tokens_per_s, m.tokens_per_s, tokens],
    ["step time", p?.step_time_s, m.step_time_s, seconds],
  ];
  document.querySelector("#planner tbody").replaceChildren(...rows.map(([name, want, got, show]) => {
    const tr = document.createElement("tr");
    tr.append(cell(name), cell(p ? show(want) : "-", "num"), cell(show(got), "num"), cell(ratio(got, want), "num"));
    return tr;
  }));
  document.getElementById("planner-layout").textContent = p
    ? `${p.layout} on ${p.cluster} (${p.dtype}), bottleneck ${p.bottleneck}; measured over ${m.steps} steps` : "";
  const shown = document.getElementById("planner-note");
  shown.textContent = note ? `No prediction: ${note}` : "";
  shown.hidden = !note;
  document.body.dataset.prediction = p ? "predicted" : "note";
}
