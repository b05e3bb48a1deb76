// Small formatting helpers the dashboard's pages and charts share: HTML
// escaping, numbers, times, links to artifacts.

// An element of a page's own container by id (see app.js: pages render
// into containers of their own).
export const byId = (el, id) => el.querySelector("#" + CSS.escape(id));
export const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
export const short = (h) => (h && h.length > 16 ? h.slice(0, 12) : h);
export const badge = (s) => `<span class="badge st-${esc(s)}" data-status="${esc(s)}">${esc(s)}</span>`;
export const time = (ms) => (ms ? new Date(ms).toLocaleString() : "");
export function num(v) {
  if (typeof v === "string") return esc(v);
  if (typeof v !== "number") return esc(JSON.stringify(v));
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(3);
  return String(Math.round(v * 1e4) / 1e4);
}
export function duration(ms) {
  if (ms == null) return "";
  const s = Math.round(ms / 1000);
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m${s % 60}s` : `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
}
export function inputLink(v) {
  const m = /^job:([0-9a-f-]+)\/(\w+)$/.exec(v);
  if (m) return `<a href="#/job/${m[1]}">job ${short(m[1])}</a>/${esc(m[2])}`;
  return `<a class="mono" href="#/artifact/${esc(v)}">${esc(short(v))}</a>`;
}
export function kvTable(obj, id = "") {
  const rows = Object.entries(obj || {}).filter(([, v]) => v !== "" && v != null).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="mono">${num(v)}</td></tr>`).join("");
  return `<table class="kv" ${id ? `id="${id}"` : ""}>${rows || '<tr><td class="muted">none</td></tr>'}</table>`;
}
