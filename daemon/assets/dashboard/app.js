// herd's dashboard: ES modules, no build step. This one holds the pages and
// the routing; charts.js draws, format.js formats. Every page reads the
// daemon's typed API under /api (session cookie; changes also send the
// session's CSRF token); live curves follow /api/events.
import { byId, esc, short, badge, time, num, duration, inputLink, kvTable } from "/static/format.js";
import { colourOf, prefs, X_AXES, byX, chartPixels, chartControls, bindChartControls, chart } from "/static/charts.js";

const root = document.getElementById("main");
// Each navigation renders into a container of its own: a page still loading
// when the user moves on writes into a container no longer shown, and finds
// only its own elements (byId), never the next page's.
let csrf = null;
// What the current page must stop when the hash changes (event streams).
let cleanup = [];

// ---- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, opts = {}) {
  const headers = { "Accept": "application/json" };
  if (opts.method && opts.method !== "GET") headers["X-Herd-CSRF"] = csrf;
  const r = await fetch("/api" + path, { credentials: "same-origin", ...opts, headers });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, body.error || r.statusText);
  return { body, total: Number(r.headers.get("Herd-Total") || 0) };
}
const get = async (path) => (await api(path)).body;
const post = async (path) => (await api(path, { method: "POST" })).body;
// A job's series sampled for a chart's width (see charts.js).
const sampled = (id, extra = "") => get(`/jobs/${id}/metrics?points=${chartPixels()}${extra}`);


// ---- pages -----------------------------------------------------------------

async function experimentsPage(main) {
  const exps = await get("/experiments");
  const rows = exps.map((e) => `<tr><td><a href="#/experiment/${e.id}">${esc(e.name)}</a></td><td class="num">${e.rounds.length}</td><td class="num">${e.jobs.length}</td><td>${esc(e.description)}</td></tr>`).join("");
  main.innerHTML = `<h1>Experiments</h1>
    <table id="experiments"><thead><tr><th>name</th><th>rounds</th><th>jobs</th><th>description</th></tr></thead>
    <tbody>${rows || '<tr><td colspan="4" class="muted">No experiments yet: herd experiment create NAME</td></tr>'}</tbody></table>`;
}

// An experiment opens with its rounds at a glance: each finished round's
// evaluation (task accuracy, win rates, the RM's held-out accuracy) as a
// chart over rounds, then the rounds with status, duration and final policy.
const ROUND_METRICS = ["task_accuracy", "win_rate", "checker_win_rate", "heldout_accuracy"];

async function experimentPage(main, id) {
  const d = await get(`/experiments/${id}`);
  const e = d.experiment;
  const rounds = await Promise.all(d.rounds.map((r) => get(`/rounds/${r.id}`)));
  const ended = (j) => !["queued", "running"].includes(j.status);
  const info = rounds.map((rd) => {
    const jobs = rd.jobs;
    const finished = jobs.length > 0 && jobs.every(ended);
    const failed = jobs.some((j) => ["failed", "cancelled", "interrupted"].includes(j.status));
    const starts = jobs.map((j) => j.started_ms).filter(Boolean);
    const ends = jobs.map((j) => j.finished_ms).filter(Boolean);
    const metrics = {};
    for (const j of jobs) {
      for (const k of ROUND_METRICS) {
        const m = j.last_metrics?.[k];
        if (m && metrics[k] == null) metrics[k] = m[1];
        const sm = j.summary?.[k] ?? j.summary?.result?.[k];
        if (typeof sm === "number" && metrics[k] == null) metrics[k] = sm;
      }
    }
    const fp = rd.round.spec?.final_policy;
    const maker = fp && jobs.find((j) => j.name === fp.slice(0, fp.lastIndexOf(".")));
    const policy = maker && maker.outputs?.[fp.slice(fp.lastIndexOf(".") + 1)];
    return { rd, finished, failed, took: finished && starts.length ? Math.max(...ends) - Math.min(...starts) : null, metrics, policy };
  });
  const keys = ROUND_METRICS.filter((k) => info.some((r) => r.finished && r.metrics[k] != null));
  const status = (r) => (r.failed ? "failed" : r.finished ? "succeeded" : "running");
  const rows = info.map((r) => `<tr data-round="${r.rd.round.id}"><td><input type="checkbox" class="pick-round" value="${r.rd.round.id}"> <a href="#/round/${r.rd.round.id}">round ${r.rd.round.index}</a></td><td>${badge(status(r))}</td><td class="num">${r.rd.jobs.length}</td>
      <td class="num">${r.took != null ? duration(r.took) : ""}</td>${keys.map((k) => `<td class="num">${r.metrics[k] != null ? num(r.metrics[k]) : ""}</td>`).join("")}
      <td>${r.policy ? inputLink(r.policy) : ""}</td></tr>`).join("");
  main.innerHTML = `<h1>${esc(e.name)}</h1><p class="muted">${esc(e.description)}</p>
    <p><a href="#/history?experiment=${e.id}">all ${e.jobs.length} jobs in the history</a></p>
    ${keys.length ? '<div class="card chart" id="rounds-chart"></div>' : ""}
    <h2>Rounds</h2><table id="rounds"><thead><tr><th>round</th><th>status</th><th>jobs</th><th>took</th>${keys.map((k) => `<th>${esc(k)}</th>`).join("")}<th>final policy</th></tr></thead>
    <tbody>${rows || `<tr><td colspan="${5 + keys.length}" class="muted">none</td></tr>`}</tbody></table>
    ${info.length >= 2 ? '<p><button id="compare-rounds" disabled>compare two rounds</button></p>' : ""}`;
  const compare = byId(main, "compare-rounds");
  if (compare) {
    const picked = () => [...main.querySelectorAll("input.pick-round:checked")].map((c) => c.value);
    main.querySelectorAll("input.pick-round").forEach((c) => { c.onchange = () => { compare.disabled = picked().length !== 2; }; });
    compare.onclick = () => { const [a, b] = picked(); location.hash = `#/rounds?a=${a}&b=${b}`; };
  }
  if (keys.length) {
    chart(byId(main, "rounds-chart"), "round over round", keys.map((k) => ({
      label: k,
      points: info.filter((r) => r.finished && r.metrics[k] != null).map((r) => [r.rd.round.index, r.metrics[k]]),
    })), "round");
  }
}

// A job's final numbers: its metrics' last values, and the round metrics
// an eval reports in its summary.
function finals(j) {
  const out = Object.fromEntries(Object.entries(j.last_metrics || {}).map(([k, v]) => [k, v[1]]));
  for (const k of ROUND_METRICS) {
    const v = j.summary?.[k] ?? j.summary?.result?.[k];
    if (typeof v === "number" && out[k] == null) out[k] = v;
  }
  return out;
}

// Two rounds side by side: their jobs matched by name, what changed in
// each pair's hyperparameters, and how its final metrics moved.
async function roundsPage(main, params) {
  const [a, b] = await Promise.all([get(`/rounds/${params.get("a")}`), get(`/rounds/${params.get("b")}`)]);
  const hp = (j) => (j.effective_hyperparameters && Object.keys(j.effective_hyperparameters).length ? j.effective_hyperparameters : j.hyperparameters) || {};
  const names = [...new Set([...a.jobs, ...b.jobs].map((j) => j.name))];
  const find = (rd, n) => rd.jobs.find((j) => j.name === n);
  const show = (v) => (v === undefined ? "–" : num(v));
  const delta = (x, y) => {
    if (typeof x !== "number" || typeof y !== "number") return "";
    const d = y - x;
    return `<span class="${d > 0 ? "up" : d < 0 ? "down" : "muted"}">${d > 0 ? "+" : ""}${num(d)}</span>`;
  };
  const rows = names.map((n) => {
    const ja = find(a, n), jb = find(b, n);
    if (!ja || !jb) {
      const only = ja || jb;
      return `<tr data-job="${esc(n)}" class="unmatched"><td>${esc(n)}</td><td>${esc(only.kind)}</td><td colspan="2" class="muted">only in round ${(ja ? a : b).round.index}</td></tr>`;
    }
    const ha = hp(ja), hb = hp(jb);
    const changed = [...new Set([...Object.keys(ha), ...Object.keys(hb)])].sort()
      .filter((k) => JSON.stringify(ha[k]) !== JSON.stringify(hb[k]) && k !== "seed");
    const fa = finals(ja), fb = finals(jb);
    const metrics = [...new Set([...Object.keys(fa), ...Object.keys(fb)])].sort();
    return `<tr data-job="${esc(n)}" class="matched"><td><a href="#/compare?ids=${ja.id},${jb.id}">${esc(n)}</a></td><td>${esc(ja.kind)}</td>
      <td class="hp-diff">${changed.map((k) => `<div data-key="${esc(k)}"><span class="mono">${esc(k)}</span> ${show(ha[k])} → ${show(hb[k])}</div>`).join("") || '<span class="muted">same</span>'}</td>
      <td class="metric-deltas">${metrics.map((k) => {
        const x = fa[k], y = fb[k];
        return `<div data-metric="${esc(k)}"><span class="mono">${esc(k)}</span> ${show(x)} → ${show(y)} ${delta(x, y)}</div>`;
      }).join("")}</td></tr>`;
  }).join("");
  main.innerHTML = `<h1>Round ${a.round.index} vs round ${b.round.index}</h1>
    <p><a href="#/round/${a.round.id}">round ${a.round.index}</a> · <a href="#/round/${b.round.id}">round ${b.round.index}</a> · jobs matched by name</p>
    <table id="round-diff"><thead><tr><th>job</th><th>kind</th><th>hyperparameters that changed</th><th>final metrics</th></tr></thead><tbody>${rows}</tbody></table>`;
}

// A round's jobs as a graph: a job's column is the longest chain of
// dependencies below it; colours say the status.
async function roundPage(main, id) {
  const d = await get(`/rounds/${id}`);
  const jobs = d.jobs;
  const byId = new Map(jobs.map((j) => [j.id, j]));
  const depth = new Map();
  const depthOf = (j) => {
    if (depth.has(j.id)) return depth.get(j.id);
    depth.set(j.id, 0);
    const deps = (j.depends_on || []).filter((x) => byId.has(x));
    const v = deps.length ? 1 + Math.max(...deps.map((x) => depthOf(byId.get(x)))) : 0;
    depth.set(j.id, v);
    return v;
  };
  jobs.forEach(depthOf);
  const columns = [];
  for (const j of jobs) (columns[depth.get(j.id)] ||= []).push(j);
  const W = 170, H = 44, GX = 60, GY = 18;
  const pos = new Map();
  columns.forEach((col, c) => col.forEach((j, r) => pos.set(j.id, { x: 20 + c * (W + GX), y: 20 + r * (H + GY) })));
  const width = 40 + columns.length * (W + GX);
  const height = 40 + Math.max(...columns.map((c) => c.length)) * (H + GY);
  const colour = { queued: "#98a2b3", running: "#2f80ed", succeeded: "#27ae60", failed: "#e5484d", cancelled: "#b08800", interrupted: "#b08800" };
  // Jobs a later job was given but left out when it started (an average
  // keeping its top K): their node and edge are dashed and faint.
  const leftOut = new Map();
  for (const j of jobs) {
    if (!Object.keys(j.resolved_inputs || {}).length) continue;
    for (const [name, ref] of Object.entries(j.inputs)) {
      const m = /^job:([0-9a-f-]+)\//.exec(ref);
      if (m && !(name in j.resolved_inputs)) leftOut.set(m[1], [...(leftOut.get(m[1]) || []), j]);
    }
  }
  const edges = jobs.flatMap((j) => (j.depends_on || []).filter((x) => pos.has(x)).map((x) => {
    const a = pos.get(x), b = pos.get(j.id);
    const dropped = (leftOut.get(x) || []).includes(j) ? " left-out" : "";
    return `<path class="edge${dropped}" d="M${a.x + W},${a.y + H / 2} C${a.x + W + GX / 2},${a.y + H / 2} ${b.x - GX / 2},${b.y + H / 2} ${b.x},${b.y + H / 2}"/>`;
  })).join("");
  const nodes = jobs.map((j) => {
    const p = pos.get(j.id);
    const by = leftOut.get(j.id);
    const second = by ? `not kept by ${by.map((x) => x.name).join(", ")}` : `${j.kind} · ${j.status}`;
    return `<a href="#/job/${j.id}"><g class="node${by ? " left-out" : ""}" data-job="${j.id}" data-status="${j.status}"><title>${esc(j.name)}: ${esc(j.kind)} · ${esc(j.status)}${by ? ` · ${esc(second)}` : ""}</title><rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" fill="${colour[j.status] || "#667085"}"/>
      <text x="${p.x + 10}" y="${p.y + 18}">${esc(j.name)}</text><text x="${p.x + 10}" y="${p.y + 34}" opacity=".85">${esc(second)}</text></g></a>`;
  }).join("");
  main.innerHTML = `<h1>Round ${d.round.index}</h1>
    <p class="muted">final policy: ${esc(d.round.spec.final_policy || "none")}</p>
    <svg id="round-graph" width="${width}" height="${height}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#98a2b3"/></marker></defs>${edges}${nodes}</svg>`;
}

async function jobPage(main, id) {
  const status = await get("/status");
  let j = await get(`/jobs/${id}`);
  const m = await sampled(id);
  const series = new Map(Object.entries(m.series));
  const counts = m.counts || {};
  // By wall time or tokens: the job's x series, or by step when it has none.
  const axis = X_AXES[prefs.x];
  const xs = axis && (await sampled(id, `&names=${encodeURIComponent(axis.series)}`)).series[axis.series];
  const xLabel = axis && xs ? axis.label : "step";
  const names = [...series.keys()].sort();
  const active = j.status === "queued" || j.status === "running";
  const notes = (j.summary && j.summary.notes) || [];
  main.innerHTML = `<h1>${esc(j.name)} <span class="muted">${esc(j.kind)}</span> ${badge(j.status)}</h1>
    <p id="progress"></p>
    ${j.error ? `<p class="error" id="failure">${esc(j.error)}</p>` : ""}
    <p id="actions">
      ${active ? '<button id="cancel" class="danger">Cancel</button><span id="cancel-ask" hidden>Cancel this job? <button id="cancel-confirm" class="danger">Yes, cancel it</button> <button id="cancel-keep">No</button></span>' : ""}
      <button id="reproduce" ${active ? "disabled" : ""}>Reproduce</button>
      <a href="#/compare?ids=${j.id}">compare…</a>
    </p>
    <h2>Metrics</h2>${chartControls()}${axis && !xs ? `<p class="muted" id="x-fallback">This job has no ${esc(axis.series)} series: by step.</p>` : ""}<div class="grid" id="charts">${names.map((n) => `<div class="card chart" id="chart-${esc(n)}"></div>`).join("") || '<p class="muted" id="no-metrics">No metrics yet.</p>'}</div>
    <div class="grid">
      <div class="card"><h2>Job</h2>${kvTable({ id: j.id, seed: j.seed, attempts: j.attempts, device: j.device || "", threads: j.threads || "", executor: j.executor ? `${j.executor.executor} ${j.executor.id}` : "", submitted: time(j.submitted_ms), started: time(j.started_ms), took: j.finished_ms && j.started_ms ? duration(j.finished_ms - j.started_ms) : "" })}</div>
      <div class="card"><h2>Hyperparameters</h2>${kvTable(j.effective_hyperparameters && Object.keys(j.effective_hyperparameters).length ? j.effective_hyperparameters : j.hyperparameters, "hyperparameters")}</div>
      <div class="card"><h2>Inputs</h2><table class="kv">${Object.entries(j.inputs).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${j.resolved_inputs[k] ? inputLink(j.resolved_inputs[k]) : inputLink(v) + (Object.keys(j.resolved_inputs).length ? ' <span class="muted">(not kept)</span>' : "")}</td></tr>`).join("")}</table></div>
      <div class="card"><h2>Outputs</h2><table class="kv" id="outputs">${Object.entries(j.outputs).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${inputLink(v)} · <a href="#/lineage/${esc(v)}">lineage</a></td></tr>`).join("") || '<tr><td class="muted">none yet</td></tr>'}</table></div>
      ${notes.length ? `<div class="card"><h2>Notes</h2><ul>${notes.map((n) => `<li>${esc(n)}</li>`).join("")}</ul></div>` : ""}
    </div>
    ${j.outputs.rollouts ? '<div class="card" id="rollouts-card"><h2>Rollouts</h2><p>step <input id="rollout-step" type="number" min="1" value="1" size="5"> <span class="muted" id="rollout-of"></span></p><table id="rollouts"></table></div>' : ""}`;
  if (j.outputs.rollouts) showRollouts(main, j);
  bindChartControls(main, route);
  const plots = new Map();
  const draw = (name) => {
    const el = byId(main, `chart-${name}`);
    const pts = series.get(name);
    const one = [{ label: name, points: xs ? byX(pts, xs) : pts, count: counts[name] }];
    // Zooming re-queries a step window: by step only.
    const requery = xs ? null : async (from, to) => {
      const w = await sampled(id, `&names=${encodeURIComponent(name)}&attempt=${m.attempt}&from=${from}&to=${to}`);
      return [{ label: name, points: w.series[name] || [], count: w.counts?.[name] }];
    };
    if (!plots.has(name)) plots.set(name, chart(el, name, one, xLabel, requery));
    else plots.get(name).update(one);
  };
  names.forEach(draw);
  const showProgress = (p) => {
    const el = byId(main, "progress");
    if (el && p && p.total) el.innerHTML = `<span class="progress"><div style="width:${(100 * p.done) / p.total}%"></div></span> ${p.done}/${p.total}`;
  };
  showProgress(j.progress);
  // Cancelling asks first: one stray click should not end a long run.
  if (active) {
    const ask = byId(main, "cancel-ask");
    byId(main, "cancel").onclick = () => { ask.hidden = false; byId(main, "cancel").hidden = true; };
    byId(main, "cancel-keep").onclick = () => { ask.hidden = true; byId(main, "cancel").hidden = false; };
    byId(main, "cancel-confirm").onclick = async () => { await post(`/jobs/${id}/cancel`); if (main.isConnected) route(); };
  }
  byId(main, "reproduce").onclick = async () => { const r = await post(`/jobs/${id}/reproduce`); location.hash = `#/job/${r.id}`; };
  if (!active || !main.isConnected) return;
  // Live: new points from the event stream; the status from the job itself.
  const events = new EventSource(`/api/events?from=${status.head_seq + 1}`);
  cleanup.push(() => events.close());
  events.addEventListener("JobMetrics", (e) => {
    const rec = JSON.parse(e.data);
    if (rec.payload.job !== id || (rec.payload.attempt && rec.payload.attempt !== m.attempt && m.attempt)) return;
    // By wall time or tokens, the event extends the x series too (as herd
    // records @elapsed_s: when the event was recorded, at its last step).
    if (xs) {
      const last = Math.max(...rec.payload.points.map((p) => p.step));
      const x = prefs.x === "time"
        ? (rec.timestamp_ms - (j.started_ms ?? j.submitted_ms)) / 1000
        : rec.payload.points.filter((p) => p.name === axis.series).at(-1)?.value;
      if (typeof x === "number" && (!xs.length || last > xs[xs.length - 1][0])) xs.push([last, x]);
    }
    const touched = new Set();
    for (const p of rec.payload.points) {
      if (!series.has(p.name)) {
        series.set(p.name, []);
        byId(main, "no-metrics")?.remove();
        // In name order, as the page draws them when it reloads (a job's
        // end must not reshuffle the panels).
        const charts = byId(main, "charts");
        const after = [...charts.children].find((c) => c.id.slice("chart-".length) > p.name);
        const card = document.createElement("div");
        card.className = "card chart";
        card.id = `chart-${p.name}`;
        charts.insertBefore(card, after || null);
      }
      const s = series.get(p.name);
      if (!s.length || p.step > s[s.length - 1][0]) {
        s.push([p.step, p.value]);
        counts[p.name] = (counts[p.name] ?? s.length - 1) + 1;
        touched.add(p.name);
      }
    }
    touched.forEach(draw);
  });
  const refresh = async () => { j = await get(`/jobs/${id}`); showProgress(j.progress); if (j.status !== "queued" && j.status !== "running" && main.isConnected) route(); };
  for (const t of ["JobStarted", "JobOutput", "JobSucceeded", "JobFailed", "JobCancelled", "JobInterrupted"]) {
    events.addEventListener(t, (e) => { if (JSON.parse(e.data).payload.job === id) refresh(); });
  }
  const timer = setInterval(refresh, 2000);
  cleanup.push(() => clearInterval(timer));
}

// A grpo job's samples, one step at a time (what TRL users turn on with
// `log_completions`): each completion with its group, reward, advantage
// and length, the group's prompt once.
function showRollouts(main, j) {
  const hp = j.effective_hyperparameters || {};
  const perStep = (hp.prompts_per_step || 1) * (hp.group_size || 1);
  const steps = hp.steps || 1;
  const input = byId(main, "rollout-step");
  input.max = String(steps);
  const show = async () => {
    const step = Math.min(Math.max(1, Number(input.value) || 1), steps);
    const rows = Math.min(perStep, 100);
    const d = await get(`/artifacts/${j.outputs.rollouts}?rows=${rows}&offset=${(step - 1) * perStep}`);
    byId(main, "rollout-of").textContent = `of ${steps}; ${rows < perStep ? `the first ${rows} of ` : ""}${perStep} samples a step`;
    let group = -1;
    byId(main, "rollouts").innerHTML = `<thead><tr><th>group</th><th>#</th><th>reward</th><th>advantage</th><th>tokens</th><th>completion</th></tr></thead><tbody>${d.rows.map((r) => {
      const head = r.group !== group ? `<tr class="rollout-prompt"><td colspan="6" class="muted">prompt: ${esc(((r.prompt || []).filter((m) => m.role === "user").pop() || {}).content || "")}${r.answer != null ? ` · answer ${esc(String(r.answer))}` : ""}</td></tr>` : "";
      group = r.group;
      return `${head}<tr class="rollout" data-step="${r.step}"><td class="num">${r.group}</td><td class="num">${r.index}</td><td class="num">${num(r.reward)}</td><td class="num">${num(r.advantage)}</td><td class="num">${r.tokens}${r.truncated ? " (cut)" : ""}</td><td class="completion" title="${esc(r.completion)}">${esc(r.completion.length > 240 ? r.completion.slice(0, 240) + "…" : r.completion)}</td></tr>`;
    }).join("")}</tbody>`;
  };
  input.onchange = show;
  show();
}

const HISTORY_PAGE = 50;

async function historyPage(main, params) {
  const q = new URLSearchParams();
  for (const k of ["experiment", "kind", "status", "round", "where", "sort"]) if (params.get(k)) q.set(k, params.get(k));
  const offset = Number(params.get("offset") || 0);
  q.set("limit", HISTORY_PAGE);
  q.set("offset", offset);
  const { body: jobs, total } = await api(`/jobs?${q}`);
  const metricNames = [...new Set(jobs.flatMap((j) => Object.keys(j.last_metrics || {})))].sort().slice(0, 4);
  const sort = params.get("sort") || "";
  // Hyperparameter columns: the one sorted or filtered by, then those whose
  // values differ across this page (lr first), three at most.
  const hpValues = (k) => new Set(jobs.map((j) => JSON.stringify(j.effective_hyperparameters?.[k])));
  const hpKeys = [...new Set(jobs.flatMap((j) => Object.keys(j.effective_hyperparameters || {})))].sort((a, b) => (b === "lr") - (a === "lr") || a.localeCompare(b));
  const named = [...`${sort},${params.get("where") || ""}`.matchAll(/hp\.(\w+)/g)].map((m) => m[1]);
  const hpNames = [...new Set([...named, ...hpKeys.filter((k) => k !== "seed" && hpValues(k).size > 1)])].slice(0, 3);
  const th = (key, label) => {
    const on = sort.replace(/^-/, "") === key;
    return `<th class="sortable ${on ? "sorted" : ""} ${on && sort.startsWith("-") ? "desc" : ""}" data-sort="${esc(key)}">${esc(label)}</th>`;
  };
  const rows = jobs.map((j) => `<tr data-job="${j.id}"><td><input type="checkbox" class="pick" value="${j.id}"></td>
      <td><a href="#/job/${j.id}">${esc(j.name)}</a></td><td>${esc(j.kind)}</td><td>${badge(j.status)}</td>
      <td>${time(j.submitted_ms)}</td><td class="num">${j.finished_ms && j.started_ms ? duration(j.finished_ms - j.started_ms) : ""}</td>
      ${hpNames.map((h) => `<td class="num">${j.effective_hyperparameters?.[h] != null ? num(j.effective_hyperparameters[h]) : ""}</td>`).join("")}
      ${metricNames.map((n) => `<td class="num">${j.last_metrics?.[n] ? num(j.last_metrics[n][1]) : ""}</td>`).join("")}</tr>`).join("");
  main.innerHTML = `<h1>History</h1>
    <form class="filters" id="filters">
      <input name="where" placeholder="where: hp.lr<1e-4,metric.loss<2" size="34" value="${esc(params.get("where") || "")}">
      <input name="sort" placeholder="sort: -metric.loss" size="18" value="${esc(sort)}">
      <input name="kind" placeholder="kind" size="8" value="${esc(params.get("kind") || "")}">
      <input name="status" placeholder="status" size="9" value="${esc(params.get("status") || "")}">
      <button class="primary" type="submit">Apply</button>
      <button type="button" id="compare">Compare selected</button>
    </form>
    <p class="muted" id="total">${total} jobs</p>
    <table id="history"><thead><tr><th></th>${th("name", "name")}${th("kind", "kind")}${th("status", "status")}${th("submitted", "submitted")}<th>took</th>
      ${hpNames.map((h) => th("hp." + h, h + " (hp)")).join("")}${metricNames.map((n) => th("metric." + n, n)).join("")}</tr></thead><tbody>${rows}</tbody></table>
    <div class="pager"><button id="prev" ${offset ? "" : "disabled"}>‹ previous</button>
      <span>${total ? offset + 1 : 0}–${offset + jobs.length} of ${total}</span>
      <button id="next" ${offset + jobs.length < total ? "" : "disabled"}>next ›</button></div>`;
  const go = (changes) => {
    const p = new URLSearchParams(params);
    for (const [k, v] of Object.entries(changes)) (v === "" || v == null ? p.delete(k) : p.set(k, v));
    location.hash = `#/history?${p}`;
  };
  byId(main, "filters").onsubmit = (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    go({ where: f.get("where"), sort: f.get("sort"), kind: f.get("kind"), status: f.get("status"), offset: "" });
  };
  for (const h of main.querySelectorAll("th.sortable")) {
    h.onclick = () => {
      const key = h.dataset.sort;
      if (!["submitted"].includes(key) && !key.includes(".")) return; // the API sorts by submitted, hp.X, metric.X
      go({ sort: sort === key ? `-${key}` : key, offset: "" });
    };
  }
  byId(main, "prev").onclick = () => go({ offset: Math.max(0, offset - HISTORY_PAGE) });
  byId(main, "next").onclick = () => go({ offset: offset + HISTORY_PAGE });
  byId(main, "compare").onclick = () => {
    const ids = [...main.querySelectorAll("input.pick:checked")].map((c) => c.value);
    if (ids.length >= 2) location.hash = `#/compare?ids=${ids.join(",")}`;
  };
}

async function comparePage(main, params) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean);
  const found = new Map((await get(`/jobs?ids=${ids.join(",")}`)).map((j) => [j.id, j]));
  const missing = ids.filter((id) => !found.has(id));
  if (missing.length) throw new Error(`no job ${missing.join(", ")}`);
  const jobs = ids.map((id) => found.get(id));
  // All jobs' series in one request, each sampled for the chart's width.
  const many = (extra = "") => get(`/metrics?jobs=${ids.join(",")}&points=${chartPixels()}${extra}`).then((m) => ids.map((id) => m.jobs[id]));
  const metrics = await many();
  const axis = X_AXES[prefs.x];
  const xs = axis ? (await many(`&names=${encodeURIComponent(axis.series)}`)).map((m) => m.series[axis.series]) : [];
  const mapped = axis && xs.every((x) => x && x.length);
  const fetched = performance.now();
  const names = [...new Set(metrics.flatMap((m) => Object.keys(m.series)))].sort();
  const hps = jobs.map((j) => (j.effective_hyperparameters && Object.keys(j.effective_hyperparameters).length ? j.effective_hyperparameters : j.hyperparameters) || {});
  const keys = [...new Set(hps.flatMap((h) => Object.keys(h)))].sort();
  const differs = (k) => new Set(hps.map((h) => JSON.stringify(h[k]))).size > 1;
  const head = `<tr><th></th>${jobs.map((j, i) => `<th style="color:${colourOf(i)}"><a href="#/job/${j.id}">${esc(j.name)}</a></th>`).join("")}</tr>`;
  main.innerHTML = `<h1>Compare ${jobs.length} jobs</h1>${chartControls()}${axis && !mapped ? `<p class="muted" id="x-fallback">Not every job has a ${esc(axis.series)} series: by step.</p>` : ""}
    <div class="grid" id="compare-charts">${names.map((n) => `<div class="card chart" id="chart-${esc(n)}"></div>`).join("")}</div>
    <h2>Hyperparameters <span class="muted">(differences highlighted first)</span></h2>
    <table id="compare-hp">${head}${[...keys.filter(differs), ...keys.filter((k) => !differs(k))].map((k) => `<tr class="${differs(k) ? "diff" : ""}" data-key="${esc(k)}"><td>${esc(k)}</td>${hps.map((h) => `<td class="mono">${h[k] === undefined ? "" : num(h[k])}</td>`).join("")}</tr>`).join("")}</table>
    <h2>Final metrics</h2>
    <table id="compare-metrics">${head}${names.map((n) => `<tr><td>${esc(n)}</td>${jobs.map((j) => `<td class="num">${j.last_metrics?.[n] ? num(j.last_metrics[n][1]) : ""}</td>`).join("")}</tr>`).join("")}</table>`;
  bindChartControls(main, route);
  for (const n of names) {
    const requery = mapped ? null : (from, to) => many(`&names=${encodeURIComponent(n)}&from=${from}&to=${to}`)
      .then((ws) => jobs.map((j, i) => ({ label: j.name, points: ws[i].series[n] || [], count: ws[i].counts?.[n] })));
    const points = (i) => (mapped ? byX(metrics[i].series[n] || [], xs[i]) : metrics[i].series[n] || []);
    chart(byId(main, `chart-${n}`), n, jobs.map((j, i) => ({ label: j.name, points: points(i), count: metrics[i].counts?.[n] })), mapped ? axis.label : "step", requery);
  }
  // Where the time went, for the benches: fetching, then drawing.
  main.dataset.drawMs = String(Math.round(performance.now() - fetched));
}

function lineageTree(node) {
  const a = node.artifact ? `${esc(node.name || "")} <span class="muted">${esc(node.artifact)}</span>` : esc(node.name || "");
  let job = "";
  if (node.job) {
    const j = node.job;
    job = `<a class="job-node st-${esc(j.status || "succeeded")}" href="#/job/${j.id}">← ${esc(j.kind)} ${esc(j.name)}</a>
      <ul>${Object.entries(j.inputs || {}).map(([k, v]) => `<li><span class="muted">${esc(k)}:</span> ${lineageTree(v)}</li>`).join("")}</ul>`;
  }
  return `<span class="lineage-node" data-hash="${esc(node.hash)}"><a class="mono" href="#/artifact/${esc(node.hash)}">${esc(short(node.hash))}</a> ${a}</span>${job}`;
}

async function lineagePage(main, hash) {
  const tree = await get(`/lineage/${hash}`);
  main.innerHTML = `<h1>Lineage of <span class="mono">${esc(short(hash))}</span></h1><div class="tree" id="lineage"><ul><li>${lineageTree(tree)}</li></ul></div>`;
}

async function artifactsPage(main) {
  const list = await get("/artifacts");
  main.innerHTML = `<h1>Artifacts</h1><table id="artifacts"><thead><tr><th>hash</th><th>name</th><th>kind</th><th>made by</th></tr></thead><tbody>
    ${list.map((a) => `<tr><td><a class="mono" href="#/artifact/${esc(a.hash)}">${esc(short(a.hash))}</a></td><td>${esc(a.made_by ? a.made_by.label : a.name)}</td><td>${esc(a.artifact)}</td>
      <td>${a.made_by ? `<a href="#/job/${a.made_by.job}">${esc(a.made_by.kind)} job ${esc(a.made_by.name)}</a>` : '<span class="muted">import</span>'}</td></tr>`).join("")}</tbody></table>`;
}

async function artifactPage(main, hash) {
  const d = await get(`/artifacts/${hash}?rows=5`);
  const a = d.artifact;
  // A checkpoint's or adapter's own config file, from its verified blob.
  let config = null;
  if (a.artifact === "checkpoint" || a.artifact === "adapter") {
    const tree = await get(`/trees/${hash}`);
    const file = tree.files.find((f) => f.name === "config.json" || f.name === "adapter_config.json");
    if (file) config = { name: file.name, body: await get(`/blobs/${file.blob}`) };
  }
  main.innerHTML = `<h1>${esc(a.name)} <span class="muted">${esc(a.artifact)}</span></h1>
    <p class="mono">${esc(a.hash)} · <a href="#/lineage/${a.hash}">lineage</a>${a.produced_by ? ` · made by <a href="#/job/${a.produced_by}">job ${esc(short(a.produced_by))}</a>` : ""}</p>
    <h2>Summary</h2><pre class="card mono" id="summary">${esc(JSON.stringify(a.summary, null, 2))}</pre>
    ${config ? `<h2>${esc(config.name)}</h2><pre class="card mono" id="config">${esc(JSON.stringify(config.body, null, 2))}</pre>` : ""}
    ${d.rows && d.rows.length ? `<h2>First rows</h2><pre class="card mono" id="rows">${esc(d.rows.map((r) => JSON.stringify(r, null, 1)).join("\n\n"))}</pre>` : ""}`;
}

async function queuePage(main) {
  const s = await get("/status");
  const running = await get("/jobs?status=running&limit=200");
  const queued = await get("/jobs?status=queued&limit=200");
  const rows = (js) => js.map((j) => `<tr><td><a href="#/job/${j.id}">${esc(j.name)}</a></td><td>${esc(j.kind)}</td><td>${badge(j.status)}</td><td>${esc(j.device || "")}${j.executor && j.executor.executor !== "local" ? ` (${esc(j.executor.executor)} ${esc(j.executor.id)})` : ""}</td><td class="num">${j.priority}</td></tr>`).join("");
  main.innerHTML = `<h1>Queue &amp; devices</h1>
    <p>executor <b id="executor">${esc(s.executor)}</b>; slots: <span class="mono">${esc(s.devices.join(", "))}</span></p>
    ${kvTable(s.jobs, "counts")}
    <h2>Running</h2><table id="running"><tr><th>job</th><th>kind</th><th>status</th><th>device</th><th>priority</th></tr>${rows(running)}</table>
    <h2>Queued</h2><table id="queued"><tr><th>job</th><th>kind</th><th>status</th><th>device</th><th>priority</th></tr>${rows(queued)}</table>`;
}

async function storePage(main) {
  main.innerHTML = `<h1>Store</h1><p>Re-hashes every event and blob and checks every recorded artifact (may take a while on a big store).</p>
    <p><button id="verify" class="primary">Verify now</button></p><div id="verification"></div>`;
  byId(main, "verify").onclick = async (e) => {
    e.target.disabled = true;
    const v = await post("/verify");
    byId(main, "verification").innerHTML = `<p>${v.ok ? badge("succeeded").replace(">succeeded<", ">intact<") : badge("failed").replace(">failed<", ">damaged<")}</p>
      ${kvTable(v.report)}${v.problems.length ? `<ul class="error">${v.problems.map((p) => `<li>${esc(p)}</li>`).join("")}</ul>` : ""}`;
    e.target.disabled = false;
  };
}

// Every page is only what survived a repair that lost events: say so on all of them.
async function showRepairs() {
  const repairs = (await get("/status")).repairs || [];
  const el = document.getElementById("repairs");
  el.hidden = repairs.length === 0;
  el.innerHTML = repairs.map((r) => `<p><b>History repaired.</b> ${esc(r.message)}</p>`).join("");
}

// ---- routing ---------------------------------------------------------------

async function route() {
  const started = performance.now();
  cleanup.forEach((f) => f());
  cleanup = [];
  const main = document.createElement("div");
  root.replaceChildren(main);
  document.body.dataset.page = "loading";
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  try {
    if (!csrf) {
      csrf = (await get("/session")).csrf;
      await showRepairs();
    }
    document.getElementById("conn").textContent = "signed in";
    switch (parts[0]) {
      case undefined: await experimentsPage(main); break;
      case "experiment": await experimentPage(main, parts[1]); break;
      case "round": await roundPage(main, parts[1]); break;
      case "rounds": await roundsPage(main, params); break;
      case "job": await jobPage(main, parts[1]); break;
      case "history": await historyPage(main, params); break;
      case "compare": await comparePage(main, params); break;
      case "lineage": await lineagePage(main, parts[1]); break;
      case "artifacts": await artifactsPage(main); break;
      case "artifact": await artifactPage(main, parts[1]); break;
      case "queue": await queuePage(main); break;
      case "store": await storePage(main); break;
      default: main.innerHTML = `<p>No page ${esc(path)}.</p>`;
    }
    if (main.isConnected) {
      // What a navigation took, hash change to page drawn (the benches read it).
      document.body.dataset.renderedMs = String(Math.round(performance.now() - started));
      document.body.dataset.page = parts[0] || "experiments";
    }
  } catch (e) {
    if (e.status === 401) {
      main.innerHTML = `<h1>Log in</h1><p id="login-needed">This browser has no herd session. Run <code>herd dashboard</code> for a one-time login link.</p>`;
    } else {
      main.innerHTML = `<p class="error" id="page-error">${esc(e.message)}</p>`;
    }
  }
}

window.addEventListener("hashchange", route);
route();
