// Renders a Grafana dashboard JSON (panels: row, timeseries, stat, state-timeline, table) from a
// live Prometheus. Not a Grafana replacement: just enough to show what the dashboard shows.
// When every panel is drawn, document.title becomes "rendered" and window.renderDone is true.
"use strict";

const params = new URLSearchParams(location.search);
const PROM = (params.get("prom") || "http://127.0.0.1:19090").replace(/\/$/, "");
const DASHBOARD = params.get("dashboard") || "../../dashboards/persistence-agent.json";
const END = Number(params.get("end")) || Math.floor(Date.now() / 1000);
const START = Number(params.get("start")) || END - 900;
const STEP = Number(params.get("step")) || 10;
const RATE_INTERVAL = params.get("rate_interval") || "1m";

// Grafana layout constants: 24 columns, 30 px rows, 8 px gaps.
const COLS = 24, ROW_H = 30, GAP = 8;

// Grafana's named colors (dark theme) and the "palette-classic" series colors.
const NAMED = {
  green: "#73BF69", red: "#F2495C", orange: "#FF9830", yellow: "#FADE2A", blue: "#5794F2",
  purple: "#B877D9", "dark-green": "#37872D", "dark-red": "#C4162A", "dark-orange": "#FA6400",
  "dark-yellow": "#E0B400", "dark-blue": "#1F60C4", "dark-purple": "#8F3BB8", transparent: "transparent",
};
const CLASSIC = ["#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9", "#705DA0",
  "#508642", "#CCA300", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477", "#B7DBAB",
  "#F4D598", "#70DBED", "#F9BA8F", "#F29191", "#82B5D8", "#E5A8E2", "#AEA2E0"];
const color = (c) => NAMED[c] || c;
const AXIS = "rgba(204,204,220,0.65)", GRIDLINE = "rgba(204,204,220,0.08)";

// Time labels like Grafana's (HH:mm, HH:mm:ss below a minute), in UTC so the PNG does not depend
// on the machine's time zone.
const TIME_INCRS = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
const pad2 = (n) => String(n).padStart(2, "0");
function hhmm(t, secs) {
  const d = new Date(t * 1000);
  return `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}${secs ? ":" + pad2(d.getUTCSeconds()) : ""}`;
}
// Tick instants for a span: the smallest increment leaving >= minPx between ticks.
function timeTicks(start, end, widthPx, minPx) {
  const incr = TIME_INCRS.find((i) => (widthPx * i) / (end - start) >= minPx) || TIME_INCRS[TIME_INCRS.length - 1];
  const ticks = [];
  for (let t = Math.ceil(start / incr) * incr; t <= end; t += incr) ticks.push(t);
  return { ticks, incr };
}

function alpha(hex, a) {
  const h = color(hex).replace("#", "");
  const n = parseInt(h.length === 3 ? h.split("").map((c) => c + c).join("") : h, 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

// ---------- units (the subset the dashboard uses, formatted like Grafana) ----------
function trim(v, dec) {
  if (dec != null) return v.toFixed(dec);
  const a = Math.abs(v);
  const d = a === 0 ? 0 : a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : a >= 0.1 ? 2 : 3;
  return String(Number(v.toFixed(d)));
}
function si(v, dec, suffixes) {
  let i = 0;
  while (Math.abs(v) >= 1000 && i < suffixes.length - 1) { v /= 1000; i++; }
  return trim(v, dec) + suffixes[i];
}
function fmt(unit, v, dec) {
  if (v == null || !isFinite(v)) return "";
  switch (unit) {
    case "percentunit": return trim(v * 100, dec) + "%";
    case "percent": return trim(v, dec) + "%";
    case "ops": return si(v, dec, [" ops/s", "K ops/s", "M ops/s"]);
    case "s": {
      const a = Math.abs(v);
      if (a === 0) return "0 s";
      if (a < 1e-3) return trim(v * 1e6, dec) + " µs";
      if (a < 1) return trim(v * 1e3, dec) + " ms";
      if (a < 60) return trim(v, dec) + " s";
      if (a < 3600) return trim(v / 60, dec) + " min";
      return trim(v / 3600, dec) + " hour";
    }
    default: return si(v, dec, ["", " K", " Mil", " Bil"]);
  }
}

// ---------- Prometheus ----------
function interpolate(expr) {
  const range = `${Math.round(END - START)}s`;
  return expr
    .replace(/\$__rate_interval|\$\{__rate_interval\}/g, RATE_INTERVAL)
    .replace(/\$__interval|\$\{__interval\}/g, `${STEP}s`)
    .replace(/\$__range|\$\{__range\}/g, range);
}
async function prom(path, args) {
  const body = new URLSearchParams(args);
  const r = await fetch(`${PROM}${path}`, { method: "POST", body });
  const j = await r.json().catch(() => ({ status: "error", error: `HTTP ${r.status}` }));
  if (j.status !== "success") throw new Error(j.error || `HTTP ${r.status}`);
  return j.data;
}
function legendName(fmtStr, metric, expr) {
  if (fmtStr && fmtStr !== "__auto") return fmtStr.replace(/\{\{\s*([\w]+)\s*\}\}/g, (_, k) => metric[k] ?? "");
  const labels = Object.entries(metric).filter(([k]) => k !== "__name__");
  if (!labels.length) return metric.__name__ || expr;
  return `${metric.__name__ || ""}{${labels.map(([k, v]) => `${k}="${v}"`).join(", ")}}`;
}
// Every target over the same aligned grid of timestamps.
async function queryTargets(panel) {
  const xs = [];
  for (let t = START; t <= END + 1e-9; t += STEP) xs.push(t);
  const series = [], empty = [], errors = [];
  for (const t of panel.targets || []) {
    if (t.hide || !t.expr) continue;
    const expr = interpolate(t.expr);
    try {
      const data = await prom("/api/v1/query_range", { query: expr, start: START, end: END, step: STEP });
      if (!data.result.length) empty.push(t.expr);
      for (const s of data.result) {
        const ys = new Array(xs.length).fill(null);
        for (const [ts, v] of s.values) {
          const i = Math.round((ts - START) / STEP);
          const f = parseFloat(v);
          if (i >= 0 && i < xs.length && isFinite(f)) ys[i] = f;
        }
        series.push({ name: legendName(t.legendFormat, s.metric, t.expr), metric: s.metric, ys });
      }
    } catch (e) {
      errors.push(`${t.refId}: ${e.message}`);
    }
  }
  return { xs, series, empty, errors };
}

// ---------- field config ----------
function overridesFor(panel, name) {
  const props = {};
  for (const o of panel.fieldConfig?.overrides || []) {
    const m = o.matcher || {};
    const hit = (m.id === "byName" && m.options === name) ||
      (m.id === "byRegexp" && new RegExp(m.options).test(name));
    if (hit) for (const p of o.properties || []) props[p.id] = p.value;
  }
  return props;
}
function thresholdColor(steps, v) {
  let c = steps?.[0]?.color || "green";
  for (const s of steps || []) if (s.value == null || v >= s.value) c = s.color;
  return color(c);
}

// ---------- layout ----------
const grid = document.getElementById("grid");
const gridWidth = grid.clientWidth;
const colW = (gridWidth - GAP * (COLS - 1)) / COLS;
function place(el, gp) {
  el.style.left = `${gp.x * (colW + GAP)}px`;
  el.style.top = `${gp.y * (ROW_H + GAP)}px`;
  el.style.width = `${gp.w * colW + (gp.w - 1) * GAP}px`;
  el.style.height = `${gp.h * ROW_H + (gp.h - 1) * GAP}px`;
}
function panelShell(p) {
  const el = document.createElement("div");
  el.className = "panel";
  place(el, p.gridPos);
  const title = document.createElement("div");
  title.className = "panel-title";
  title.textContent = p.title || "";
  const body = document.createElement("div");
  body.className = "panel-body";
  el.append(title, body);
  grid.append(el);
  return { el, title, body };
}
function noData(body, res, msg) {
  const d = document.createElement("div");
  d.className = "nodata";
  if (res.errors.length) {
    d.innerHTML = `<span class="error">Query error</span>`;
    for (const e of res.errors) { const c = document.createElement("code"); c.textContent = e; d.append(c); }
  } else {
    d.textContent = msg || "No data";
    for (const q of res.empty) { const c = document.createElement("code"); c.textContent = q; d.append(c); }
  }
  body.append(d);
}

// ---------- timeseries ----------
function stackData(xs, ys) {
  // Grafana "normal" stacking: each series is drawn on top of the previous ones.
  const acc = new Array(xs.length).fill(0);
  return ys.map((y) => y.map((v, i) => {
    if (v == null) return acc[i] === 0 && ys.every((o) => o[i] == null) ? null : acc[i];
    acc[i] += v;
    return acc[i];
  }));
}
function renderTimeseries(p, body, res) {
  const d = p.fieldConfig?.defaults || {};
  const custom = d.custom || {};
  const unit = d.unit || "short";
  const logScale = custom.scaleDistribution?.type === "log";
  const stacked = custom.stacking?.mode === "normal";
  const specs = res.series.map((s, i) => {
    const o = overridesFor(p, s.name);
    const fixed = o.color?.mode === "fixed" ? color(o.color.fixedColor) : null;
    return {
      name: s.name,
      color: fixed || CLASSIC[i % CLASSIC.length],
      dash: o["custom.lineStyle"]?.fill === "dash" ? o["custom.lineStyle"].dash || [10, 10] : null,
      fillOpacity: o["custom.fillOpacity"] ?? custom.fillOpacity ?? 0,
      width: o["custom.lineWidth"] ?? custom.lineWidth ?? 1,
    };
  });

  let ys = res.series.map((s) => s.ys);
  if (logScale) ys = ys.map((y) => y.map((v) => (v != null && v > 0 ? v : null)));
  const bands = [];
  if (stacked) {
    ys = stackData(res.xs, ys);
    for (let i = 1; i < ys.length; i++) bands.push({ series: [i + 1, i], fill: alpha(specs[i].color, specs[i].fillOpacity / 100) });
  }

  const legend = document.createElement("div");
  legend.className = "legend";
  const showLegend = p.options?.legend?.showLegend !== false;
  if (showLegend) {
    for (const s of specs) {
      const it = document.createElement("span");
      it.className = "legend-item";
      const sw = document.createElement("span");
      sw.className = "legend-swatch" + (s.dash ? " dashed" : "");
      if (s.dash) sw.style.borderColor = s.color; else sw.style.background = s.color;
      it.append(sw, document.createTextNode(s.name));
      legend.append(it);
    }
  }
  const chart = document.createElement("div");
  body.append(chart, legend);
  body.style.display = "flex";
  body.style.flexDirection = "column";
  const width = body.clientWidth - 16;
  const height = Math.max(60, body.clientHeight - legend.offsetHeight - 8);

  const yRange = (u, min, max) => {
    if (logScale) {
      if (min == null || max == null) return [0.001, 1];
      return uPlot.rangeLog(min, max, 10, true);
    }
    if (min == null) { min = 0; max = 1; }
    let lo = d.min ?? null, hi = d.max ?? null;
    if (hi != null && max > hi) max = hi;
    const [a, b] = uPlot.rangeNum(lo != null ? Math.min(lo, min) : min, max, 0.1, true);
    return [lo != null ? lo : a, hi != null ? Math.max(hi, lo ?? -Infinity) : b];
  };

  const thresholds = custom.thresholdsStyle?.mode === "line" || custom.thresholdsStyle?.mode === "dashed"
    ? (d.thresholds?.steps || []).filter((s) => s.value != null) : [];

  const opts = {
    width, height,
    legend: { show: false },
    cursor: { show: false },
    padding: [8, 16, 0, 0],
    scales: {
      x: { time: true, range: [START, END] },
      y: logScale ? { distr: 3, log: 10, range: yRange } : { range: yRange },
    },
    axes: [
      {
        stroke: AXIS, grid: { stroke: GRIDLINE, width: 1 }, ticks: { show: false },
        font: "11px Inter, Liberation Sans, sans-serif", space: 70, incrs: TIME_INCRS,
        values: (u, splits, ai, space, incr) => splits.map((t) => hhmm(t, incr < 60)),
      },
      {
        stroke: AXIS, grid: { stroke: GRIDLINE, width: 1 }, ticks: { show: false },
        font: "11px Inter, Liberation Sans, sans-serif", size: 62,
        values: (u, splits) => splits.map((v) => fmt(unit, v)),
      },
    ],
    series: [{}].concat(specs.map((s) => ({
      label: s.name,
      stroke: s.color,
      width: s.width,
      dash: s.dash || undefined,
      fill: stacked ? undefined : (s.fillOpacity > 0 ? alpha(s.color, s.fillOpacity / 100) : undefined),
      spanGaps: custom.spanNulls === true,
      points: { show: false },
    }))),
    bands,
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        const [lo, hi] = [u.scales.y.min, u.scales.y.max];
        for (const t of thresholds) {
          if (t.value < lo || t.value > hi) continue;
          const y = Math.round(u.valToPos(t.value, "y", true));
          ctx.save();
          ctx.strokeStyle = color(t.color);
          ctx.lineWidth = 1 * devicePixelRatio;
          if (custom.thresholdsStyle.mode === "dashed") ctx.setLineDash([10, 10]);
          ctx.beginPath();
          ctx.moveTo(u.bbox.left, y);
          ctx.lineTo(u.bbox.left + u.bbox.width, y);
          ctx.stroke();
          ctx.restore();
        }
      }],
    },
  };
  if (stacked) {
    // the lowest series fills down to zero; the others fill down to the series below (bands)
    opts.series[1].fill = alpha(specs[0].color, specs[0].fillOpacity / 100);
  }
  new uPlot(opts, [res.xs].concat(ys), chart);
}

// ---------- stat ----------
function renderStat(p, body, res) {
  const d = p.fieldConfig?.defaults || {};
  const calc = p.options?.reduceOptions?.calcs?.[0] || "lastNotNull";
  const s = res.series[0];
  const vals = s.ys.filter((v) => v != null);
  if (!vals.length) return noData(body, { errors: [], empty: p.targets.map((t) => t.expr) });
  const v = calc === "mean" ? vals.reduce((a, b) => a + b, 0) / vals.length
    : calc === "max" ? Math.max(...vals) : calc === "min" ? Math.min(...vals) : vals[vals.length - 1];
  const c = d.color?.mode === "fixed" ? color(d.color.fixedColor) : thresholdColor(d.thresholds?.steps, v);
  const bg = p.options?.colorMode === "background";
  const panelEl = body.parentElement;
  if (bg) {
    panelEl.style.background = `linear-gradient(120deg, ${alpha(c, 0.85)}, ${c})`;
    panelEl.style.borderColor = "transparent";
    panelEl.querySelector(".panel-title").style.color = "#fff";
  }
  const box = document.createElement("div");
  box.className = "stat";
  body.append(box);
  const W = body.clientWidth, H = body.clientHeight;
  if (p.options?.graphMode === "area") {
    const lineColor = bg ? "rgba(255,255,255,0.55)" : c;
    const chart = document.createElement("div");
    box.append(chart);
    new uPlot({
      width: W, height: Math.round(H * 0.5), legend: { show: false }, cursor: { show: false },
      padding: [0, 0, 0, 0],
      scales: { x: { time: false, range: [START, END] } },
      axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: lineColor, width: 1, fill: bg ? "rgba(255,255,255,0.18)" : alpha(c, 0.2), points: { show: false } }],
    }, [res.xs, s.ys], chart);
    chart.style.position = "absolute";
    chart.style.left = "0"; chart.style.bottom = "0";
  }
  const val = document.createElement("div");
  val.className = "stat-value";
  val.style.fontSize = `${Math.min(H * 0.42, W / 5)}px`;
  if (!bg) val.style.color = c;
  val.textContent = fmt(d.unit, v, d.decimals);
  box.append(val);
}

// ---------- state timeline ----------
function renderStateTimeline(p, body, res) {
  const d = p.fieldConfig?.defaults || {};
  const maps = {};
  for (const m of d.mappings || []) if (m.type === "value") Object.assign(maps, m.options);
  const H = body.clientHeight - 22;
  const rowH = (H / res.series.length) * (p.options?.rowHeight ?? 0.9);
  const span = END - START;
  res.series.forEach((s, r) => {
    const row = document.createElement("div");
    row.className = "st-row";
    row.style.top = `${(H / res.series.length) * r + (H / res.series.length - rowH) / 2}px`;
    row.style.height = `${rowH}px`;
    const label = document.createElement("div");
    label.className = "st-label";
    label.textContent = s.name;
    const track = document.createElement("div");
    track.className = "st-track";
    row.append(label, track);
    // merge runs of equal values
    let i = 0;
    while (i < s.ys.length) {
      const v = s.ys[i];
      let j = i + 1;
      while (j < s.ys.length && s.ys[j] === v) j++;
      if (v != null) {
        const m = maps[String(v)] || {};
        const c = m.color ? color(m.color) : thresholdColor(d.thresholds?.steps, v);
        const seg = document.createElement("div");
        seg.className = "st-seg";
        const x0 = (res.xs[i] - START) / span, x1 = (Math.min(res.xs[j - 1] + STEP, END) - START) / span;
        seg.style.left = `${x0 * 100}%`;
        seg.style.width = `${Math.max(0.2, (x1 - x0) * 100)}%`;
        seg.style.background = alpha(c, (d.custom?.fillOpacity ?? 70) / 100);
        if (p.options?.showValue !== "never") seg.textContent = m.text ?? fmt(d.unit, v);
        track.append(seg);
      }
      i = j;
    }
    body.append(row);
  });
  const axis = document.createElement("div");
  axis.className = "st-axis";
  body.append(axis);
  const { ticks, incr } = timeTicks(START, END, axis.clientWidth, 70);
  for (const t of ticks) {
    const tick = document.createElement("span");
    tick.className = "st-tick";
    tick.style.left = `${((t - START) / span) * 100}%`;
    tick.textContent = hhmm(t, incr < 60);
    axis.append(tick);
  }
}

// ---------- table (instant queries, "organize" transformation) ----------
async function renderTable(p, body) {
  const res = { errors: [], empty: [] };
  const rows = [];
  let labels = [];
  for (const t of p.targets || []) {
    if (t.hide || !t.expr) continue;
    try {
      const data = t.instant || t.format === "table"
        ? await prom("/api/v1/query", { query: interpolate(t.expr), time: END })
        : null;
      if (!data.result.length) res.empty.push(t.expr);
      for (const s of data.result) {
        for (const k of Object.keys(s.metric)) if (!labels.includes(k)) labels.push(k);
        rows.push({ Time: new Date(s.value[0] * 1000).toISOString(), ...s.metric, Value: s.value[1] });
      }
    } catch (e) { res.errors.push(`${t.refId}: ${e.message}`); }
  }
  if (!rows.length) return noData(body, res);
  let cols = ["Time", ...labels.filter((l) => l !== "__name__"), "Value"];
  const names = {};
  for (const tr of p.transformations || []) {
    if (tr.id !== "organize") continue;
    const ex = tr.options?.excludeByName || {};
    cols = cols.filter((c) => !ex[c]);
    Object.assign(names, tr.options?.renameByName || {});
  }
  const table = document.createElement("table");
  table.className = "grafana";
  const head = table.createTHead().insertRow();
  for (const c of cols) { const th = document.createElement("th"); th.textContent = names[c] || c; head.append(th); }
  const tb = table.createTBody();
  for (const r of rows) {
    const tr = tb.insertRow();
    for (const c of cols) tr.insertCell().textContent = r[c] ?? "";
  }
  body.append(table);
}

// ---------- main ----------
async function main() {
  const dash = await (await fetch(DASHBOARD)).json();
  const fmtT = (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
  document.getElementById("subtitle").textContent =
    `"${dash.title}" · ${fmtT(START)} → ${fmtT(END)} UTC (times below in UTC) (${Math.round((END - START) / 60)} min) · ` +
    `Prometheus ${PROM} · step ${STEP}s · $__rate_interval = ${RATE_INTERVAL}`;

  // flatten rows (collapsed rows keep their panels inside)
  const panels = [];
  for (const p of dash.panels || []) {
    panels.push(p);
    if (p.type === "row" && p.collapsed) for (const c of p.panels || []) panels.push(c);
  }
  let bottom = 0;
  for (const p of panels) bottom = Math.max(bottom, p.gridPos.y + p.gridPos.h);
  grid.style.height = `${bottom * (ROW_H + GAP)}px`;

  const report = [];
  await Promise.all(panels.map(async (p) => {
    if (p.type === "row") {
      const el = document.createElement("div");
      el.className = "row";
      place(el, p.gridPos);
      el.textContent = p.title;
      grid.append(el);
      return;
    }
    const { body } = panelShell(p);
    try {
      if (p.type === "table") { await renderTable(p, body); return; }
      const res = await queryTargets(p);
      report.push({ id: p.id, title: p.title, series: res.series.length, empty: res.empty, errors: res.errors });
      const hasData = res.series.some((s) => s.ys.some((v) => v != null));
      if (!hasData) return noData(body, res);
      if (p.type === "stat" || p.type === "gauge") renderStat(p, body, res);
      else if (p.type === "state-timeline") renderStateTimeline(p, body, res);
      else renderTimeseries(p, body, res);
    } catch (e) {
      noData(body, { errors: [e.message], empty: [] });
    }
  }));
  window.renderReport = report;
  window.renderDone = true;
  document.title = "rendered";
}
main().catch((e) => {
  document.getElementById("subtitle").innerHTML = `<span class="error">${e.message}</span>`;
  document.title = "failed";
});
