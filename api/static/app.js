// fourfold dashboard: the jobs table at /, a job's live charts at /?job=ID, the planner at /?view=plan (plan.js).
// A bearer token, when the server wants one, comes from ?token=... once: it is kept in localStorage and
// taken out of the address bar at once, so no history entry, bookmark or copied link holds it. It goes
// only into the Authorization header; the event stream opens with a one-time ticket instead.
// Everything the server sends (job names, log lines, reasons) is set as text, never as markup.
"use strict";

const params = new URLSearchParams(location.search);
if (params.has("token")) {
  if (params.get("token")) localStorage.setItem("fourfold-token", params.get("token"));
  params.delete("token");
  const rest = params.toString();
  history.replaceState(history.state, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
}
const token = localStorage.getItem("fourfold-token");

// `body`, when given, goes as JSON. A refusal throws an Error whose `detail` is the server's reason (a 422's
// "field: message"), when it gave one.
async function api(path, method = "GET", body = undefined) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!r.ok) {
    const detail = await r.json().then((d) => d?.detail, () => undefined);
    const text = detail === undefined ? undefined : typeof detail === "string" ? detail : JSON.stringify(detail);
    throw Object.assign(new Error(`${path}: ${r.status}` + (text ? ` ${text}` : "")), { status: r.status, detail: text });
  }
  return r.json();
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
const int = (v) => (v === null || v === undefined ? "-" : Math.round(v).toLocaleString());

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function showJobs() {
  const data = await api("/v1/jobs?limit=100");
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const j of data.items) {
    const tr = document.createElement("tr");
    const link = document.createElement("a");
    link.href = `/?job=${encodeURIComponent(j.id)}`;
    link.textContent = j.id.slice(0, 12);
    const idCell = document.createElement("td");
    idCell.append(link);
    tr.append(idCell, cell(j.name), cell(j.state, `state ${j.state}`), cell(`${j.step ?? 0}/${j.steps}`, "num"),
      cell(fmt(j.loss), "num"), cell(int(j.tokens_per_s), "num"),
      cell(j.mfu === null ? "-" : `${(100 * j.mfu).toFixed(1)}%`, "num"), cell(j.owner));
    tr.dataset.state = j.state;
    body.append(tr);
  }
}

const CHARTS = [
  ["chart-loss", "loss", "loss"],
  ["chart-tokens", "tokens_per_s", "tokens/s"],
  ["chart-mfu", "mfu", "MFU"],
  ["chart-step", "step_time_s", "step time (s)"],
];

// Mixture-of-experts jobs: the router's statistics of each step, in one chart shown only when there are any.
const ROUTER = [
  ["moe_max_load", "busiest expert / mean"],
  ["moe_dropped_frac", "dropped share"],
  ["moe_aux_loss", "aux loss"],
];

function drawCharts(rows) {
  const layout = (title) => ({ title: { text: title }, margin: { t: 36, r: 12, b: 36, l: 56 },
    xaxis: { title: { text: "step" } } });
  for (const [id, key, title] of CHARTS) {
    const trace = { x: rows.map((m) => m.step), y: rows.map((m) => m[key]), mode: "lines+markers", name: title };
    Plotly.react(id, [trace], layout(title), { displayModeBar: false, responsive: true });
  }
  const moe = rows.filter((m) => m.moe_max_load !== null && m.moe_max_load !== undefined);
  const router = document.getElementById("chart-moe");
  router.hidden = moe.length === 0;
  if (!router.hidden) {
    const traces = ROUTER.map(([key, name]) => ({ x: moe.map((m) => m.step), y: moe.map((m) => m[key]),
      mode: "lines+markers", name }));
    Plotly.react("chart-moe", traces, layout("router (mixture of experts)"), { displayModeBar: false, responsive: true });
  }
  document.body.dataset.points = String(rows.length);
}

async function showJob(id) {
  document.getElementById("jobs-view").hidden = true;
  document.getElementById("job-view").hidden = false;
  const rows = await api(`/v1/jobs/${id}/metrics`);
  const render = async () => {
    const j = await api(`/v1/jobs/${id}`);
    document.getElementById("job-title").textContent = `${j.name} (${j.id})`;
    document.getElementById("job-summary").replaceChildren(
      `state `, Object.assign(document.createElement("span"), { className: `state ${j.state}`, textContent: j.state }),
      ` · step ${j.step ?? 0}/${j.steps} · attempts ${j.attempts}` + (j.failure_reason ? ` · ${j.failure_reason}` : ""));
    document.body.dataset.state = j.state;
    return j;
  };
  const addEvent = (e) => {
    const li = document.createElement("li");
    li.textContent = `${e.time.slice(0, 19)}  ${e.from_state ?? ""} → ${e.to_state ?? e.kind}  ${e.message}`;
    document.getElementById("events").append(li);
  };
  const addLog = (l) => { document.getElementById("logs").textContent += `${l.line}\n`; };
  // Each attempt: how it ended and why (a failure's cause), and how long the restart took to train again.
  const showAttempts = async () => {
    const body = document.querySelector("#attempts tbody");
    body.replaceChildren();
    for (const a of await api(`/v1/jobs/${id}/attempts`)) {
      const tr = document.createElement("tr");
      tr.append(cell(String(a.number), "num"), cell(a.started_at.slice(0, 19)), cell((a.finished_at ?? "").slice(0, 19)),
        cell(a.outcome ?? "running", `outcome ${a.outcome ?? "running"}`), cell(a.reason ?? ""),
        cell(a.recovery_s === null ? "-" : `recovered in ${a.recovery_s.toFixed(1)} s`, "num"));
      body.append(tr);
    }
  };
  // The planner's prediction for the job's layout next to what it measured: again as steps arrive, at most
  // every 5 s.
  let predictedAt = 0, predictionDue = null;
  const refreshPrediction = () => {
    if (predictionDue !== null) return;
    predictionDue = setTimeout(() => {
      predictionDue = null;
      predictedAt = Date.now();
      showPrediction(id).catch(() => {});
    }, Math.max(0, predictedAt + 5000 - Date.now()));
  };
  drawCharts(rows);
  refreshPrediction();
  const job = await render();
  await showAttempts();
  if (job.finished) {  // ended (the server says which states are terminal): read it all once
    (await api(`/v1/jobs/${id}/events`)).forEach(addEvent);
    (await api(`/v1/jobs/${id}/logs`)).forEach(addLog);
    return;
  }
  // Live: the server-sent events stream replays events and logs, then follows new steps. EventSource
  // cannot send the Authorization header, so each connection opens with a ticket (good once, for 60 s).
  let retries = 0;
  const follow = async () => {
    const { ticket } = await api(`/v1/jobs/${id}/stream-ticket`, "POST");
    document.getElementById("events").replaceChildren();  // a new connection replays them all
    document.getElementById("logs").textContent = "";
    const source = new EventSource(`/v1/jobs/${id}/stream?ticket=${encodeURIComponent(ticket)}`);
    source.addEventListener("open", () => { retries = 0; });
    // A step already drawn is replaced by the newest attempt's row (a restart trains steps again).
    source.addEventListener("metrics", (ev) => {
      const m = JSON.parse(ev.data);
      const at = rows.findIndex((r) => r.step === m.step);
      if (at < 0) rows.push(m); else if (rows[at].attempt <= m.attempt) rows[at] = m; else return;
      rows.sort((a, b) => a.step - b.step);
      drawCharts(rows);
      refreshPrediction();
    });
    source.addEventListener("event", (ev) => { addEvent(JSON.parse(ev.data)); render(); showAttempts(); });
    source.addEventListener("log", (ev) => addLog(JSON.parse(ev.data)));
    source.addEventListener("end", () => { source.close(); render(); showAttempts(); refreshPrediction(); });
    // The browser would retry a dropped stream with the same URL, which a used ticket no longer opens:
    // reconnect here with a new ticket instead, a few times, waiting longer each time.
    source.addEventListener("error", () => {
      source.close();
      if (retries < 5) setTimeout(() => follow().catch(() => {}), 1000 * ++retries);
    });
  };
  await follow();
}

const jobId = params.get("job");
if (jobId !== null && !/^[0-9a-f]{32}$/.test(jobId)) {
  document.getElementById("jobs-view").hidden = true;
  document.getElementById("job-view").hidden = false;
  document.getElementById("job-title").textContent = `no job ${jobId}: a job id is 32 hex digits`;
} else if (jobId) {
  showJob(jobId).catch((err) => { document.getElementById("job-title").textContent = String(err); });
} else if (params.get("view") === "plan") {
  showPlan();
} else {
  showJobs().catch((err) => { document.querySelector("#jobs tbody").textContent = String(err); });
  setInterval(() => showJobs().catch(() => {}), 2000);
}
