// The dashboard's charts: uPlot line charts of metric series, with the
// settings people set once (EMA smoothing, log y, the x axis), NaN and
// infinities drawn as marks, and zoom that re-queries the daemon for the
// window. Pages (app.js) fetch; this module draws.
import uPlot from "/static/vendor/uPlot.esm.js";
import { byId, esc, num } from "/static/format.js";

const PALETTE = ["#2f5bea", "#e5484d", "#27ae60", "#b08800", "#8e44ad", "#16a2b8", "#d35400", "#34495e"];
// One colour per line however many: the palette, then hues a golden angle
// apart (as hex, so a faint copy can append an alpha).
export function colourOf(i) {
  if (i < PALETTE.length) return PALETTE[i];
  const h = ((i - PALETTE.length) * 137.508) % 360, sat = 0.65, l = 0.45;
  const f = (n) => {
    const k = (n + h / 30) % 12;
    const c = l - sat * Math.min(l, 1 - l) * Math.max(-1, Math.min(k - 3, 9 - k, 1));
    return Math.round(255 * c).toString(16).padStart(2, "0");
  };
  return `#${f(0)}${f(8)}${f(4)}`;
}

// A uPlot line chart of one metric: series = [{label, points: [[step, value]]}].
// Chart settings people set once: EMA smoothing (the raw curve faint
// behind, as TensorBoard and W&B draw it) and a log-scale y axis.
export const prefs = {
  get smooth() { return Number(localStorage.getItem("herd.smooth") || 0); },
  get log() { return localStorage.getItem("herd.logy") === "1"; },
  get x() { return localStorage.getItem("herd.x") || "step"; },
};

// The x axes a chart can have besides the step: each is a series of the job
// mapping steps to x (herd records when each metric batch arrived; its
// trainers log tokens_seen).
export const X_AXES = {
  time: { series: "@elapsed_s", label: "wall time (s)" },
  tokens: { series: "tokens_seen", label: "tokens seen" },
};

// Points by another x: each step's x interpolated along `xs` ([step, x],
// in step order), clamped at the ends; null when the job has no such series.
export function byX(points, xs) {
  if (!xs || !xs.length) return null;
  const at = (step) => {
    let lo = 0, hi = xs.length - 1;
    if (step <= xs[0][0]) return xs[0][1];
    if (step >= xs[hi][0]) return xs[hi][1];
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (xs[mid][0] <= step) lo = mid; else hi = mid; }
    const [s0, x0] = xs[lo], [s1, x1] = xs[hi];
    return x0 + ((x1 - x0) * (step - s0)) / (s1 - s0);
  };
  return points.map(([step, y]) => [at(step), y]);
}

// TensorBoard's debiased EMA: early points are not pulled toward zero;
// non-finite values stay out of the average (they are marked, not hidden).
function ema(ys, weight) {
  let last = 0, n = 0;
  return ys.map((y) => {
    if (y == null || !Number.isFinite(y)) return null;
    last = last * weight + (1 - weight) * y;
    n += 1;
    return last / (1 - weight ** n);
  });
}

// The API sends non-finite values as text ("NaN", "Infinity", "-Infinity"):
// they are left out of the lines and drawn as marks instead.
const finite = (y) => (typeof y === "number" ? y : null);

// Charts ask the daemon for as many points as they have pixels: it sends
// each bucket's extremes, so nothing a person looks for is sampled away.
// A chart is one column of a page's grid (style.css: columns of at least
// 420 px, 14 px apart).
export function chartPixels() {
  const width = document.getElementById("main").clientWidth || innerWidth;
  const columns = Math.max(1, Math.floor((width + 14) / (420 + 14)));
  const column = (width - 14 * (columns - 1)) / columns;
  return Math.max(360, Math.round(column * (devicePixelRatio || 1)));
}

// uPlot's data: the union of steps, then each series (raw, and smoothed
// after it when smoothing is on).
export function chartData(series) {
  const steps = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(steps.map((s, i) => [s, i]));
  const data = [steps];
  for (const s of series) {
    const ys = new Array(steps.length).fill(null);
    for (const [x, y] of s.points) ys[index.get(x)] = finite(y);
    data.push(ys);
    if (prefs.smooth > 0) data.push(ema(ys, prefs.smooth));
  }
  return data;
}

// The controls above a page's charts; a change redraws the page.
export function chartControls() {
  return `<p class="chart-controls">smoothing <input id="smooth" type="range" min="0" max="0.99" step="0.01" value="${prefs.smooth}">
    <span id="smooth-value">${prefs.smooth.toFixed(2)}</span>
    <label><input type="checkbox" id="logy" ${prefs.log ? "checked" : ""}> log y</label>
    x <select id="xaxis">${[["step", "step"], ["time", "wall time"], ["tokens", "tokens seen"]].map(([v, t]) => `<option value="${v}" ${prefs.x === v ? "selected" : ""}>${t}</option>`).join("")}</select></p>`;
}

export function bindChartControls(main, redraw) {
  byId(main, "smooth").oninput = (e) => { byId(main, "smooth-value").textContent = Number(e.target.value).toFixed(2); };
  byId(main, "smooth").onchange = (e) => { localStorage.setItem("herd.smooth", e.target.value); redraw(); };
  byId(main, "logy").onchange = (e) => { localStorage.setItem("herd.logy", e.target.checked ? "1" : "0"); redraw(); };
  byId(main, "xaxis").onchange = (e) => { localStorage.setItem("herd.x", e.target.value); redraw(); };
}

// Each non-finite point of each series, with its line's colour.
const marksOf = (series) => series.flatMap((s, i) => s.points.filter((p) => typeof p[1] === "string").map(([x, kind]) => ({ x, kind, colour: colourOf(i) })));

// NaN: a dashed line across the plot; ±Infinity: a triangle at the top or
// bottom edge. On uPlot's canvas, after the lines.
function drawMarks(u, marks) {
  const { ctx, bbox } = u;
  const r = 5 * (devicePixelRatio || 1);
  ctx.save();
  for (const m of marks) {
    const x = u.valToPos(m.x, "x", true);
    if (!(x >= bbox.left && x <= bbox.left + bbox.width)) continue;
    ctx.strokeStyle = ctx.fillStyle = m.colour;
    ctx.beginPath();
    if (m.kind === "NaN") {
      ctx.setLineDash([4, 3]);
      ctx.moveTo(x, bbox.top);
      ctx.lineTo(x, bbox.top + bbox.height);
      ctx.stroke();
      ctx.setLineDash([]);
    } else {
      // Pointing out of the plot, where the value went.
      const edge = m.kind === "-Infinity" ? bbox.top + bbox.height : bbox.top;
      const base = m.kind === "-Infinity" ? edge - 2 * r : edge + 2 * r;
      ctx.moveTo(x, edge);
      ctx.lineTo(x - r, base);
      ctx.lineTo(x + r, base);
      ctx.fill();
    }
  }
  ctx.restore();
}

// `requery(from, to)`, when given, fetches the series again for a zoomed
// step window (drag to zoom; double-click goes back to the whole series).
export function chart(el, title, series, xLabel = "step", requery = null) {
  const data = chartData(series);
  let marks = marksOf(series);
  // Away from the cursor the legend shows each line's last value, not "--".
  const last = (ys) => {
    for (let k = ys.length - 1; k >= 0; k--) if (ys[k] != null) return ys[k];
    return null;
  };
  const shown = (v) => (v == null ? "" : num(v));
  // Steps are whole numbers: ticks too (no 1.5).
  const stepIncrs = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7].map((p) => m * p)).sort((a, b) => a - b);
  const smooth = prefs.smooth > 0;
  // A log axis only where every value is positive.
  const positive = data.slice(1).every((ys) => ys.every((y) => y == null || y > 0));
  const log = prefs.log && positive;
  const lines = series.flatMap((s, i) => {
    const colour = colourOf(i);
    const value = (u, v, si) => shown(v == null ? last(u.data[si]) : v);
    const raw = { label: smooth ? `${s.label} (raw)` : s.label, stroke: smooth ? `${colour}44` : colour, width: smooth ? 1 : 1.5, spanGaps: true, value };
    return smooth ? [raw, { label: s.label, stroke: colour, width: 1.75, spanGaps: true, value }] : [raw];
  });
  const opts = {
    title, width: Math.max(360, el.clientWidth || 560), height: 220,
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    // Hovering near a line brings it forward and fades the rest; clicking a
    // legend entry hides or shows its line.
    focus: { alpha: 0.25 },
    cursor: { focus: { prox: 16 } },
    series: [{ label: xLabel, value: (u, v) => (v == null ? "last" : String(v)) }, ...lines],
    hooks: { draw: [(u) => drawMarks(u, marks)], setScale: [(u, key) => key === "x" && zoomed(u)] },
    axes: [
      // Seconds may be fractions; steps, rounds and tokens are whole.
      xLabel === X_AXES.time.label ? { label: xLabel } : { label: xLabel, incrs: stepIncrs, values: (u, vals) => vals.map((v) => (v == null ? "" : String(Math.round(v)))) },
      // As wide as the widest label (5.000e-4 is not clipped).
      { values: (u, vals) => vals.map(shown),
        size: (u, vals) => 18 + 7.5 * Math.max(4, ...(vals || []).map((v) => String(v).length)) },
    ],
  };
  const describe = (series) => {
    el.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
    el.dataset.count = String(series.reduce((n, s) => n + (s.count ?? s.points.length), 0));
    el.dataset.marks = String(marks.length);
  };
  // Zoom: a window inside the whole series' steps is fetched again at full
  // resolution; only the latest answer is drawn.
  let whole = { series, x0: data[0][0], x1: data[0][data[0].length - 1] };
  let generation = 0;
  const show = (u, next, resetScales) => {
    marks = marksOf(next);
    const { min, max } = u.scales.x;
    u.setData(chartData(next), resetScales);
    // Without a reset uPlot keeps the scales but draws nothing new until
    // a scale is set: set the zoom again (zoomed() sees the same window).
    if (!resetScales) u.setScale("x", { min, max });
    describe(next);
  };
  function zoomed(u) {
    const { min, max } = u.scales.x;
    if (!requery || min == null || max == null || whole.x0 == null) return;
    if (min <= whole.x0 && max >= whole.x1) { generation += 1; return; }
    const from = Math.max(0, Math.ceil(min)), to = Math.max(from, Math.floor(max));
    if (el.dataset.window === `${from}-${to}`) return;
    const g = ++generation;
    requery(from, to).then((next) => {
      if (g !== generation || !el.isConnected) return;
      show(u, next, false);
      el.dataset.window = `${from}-${to}`;
    });
  }
  el.innerHTML = "";
  const plot = new uPlot(opts, data, el);
  if (requery) {
    plot.over.addEventListener("dblclick", () => {
      generation += 1;
      delete el.dataset.window;
      show(plot, whole.series, true);
    });
  }
  describe(series);
  el.dataset.x = xLabel;
  el.dataset.lines = String(lines.length);
  el.dataset.log = log ? "1" : "0";
  // New points of a live series (the whole series, unzoomed).
  plot.update = (next) => {
    whole = { series: next, x0: next[0]?.points[0]?.[0], x1: Math.max(...next.map((s) => s.points.at(-1)?.[0] ?? -Infinity)) };
    if (!el.dataset.window) show(plot, next, true);
  };
  el.plot = plot;
  return plot;
}
