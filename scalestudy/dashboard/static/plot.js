"use strict";
// Line plots on <canvas> that share one step axis, with spike markers (grad-norm spikes as circles,
// loss spikes as triangles) and a crosshair in an SVG layer above. Every point is drawn: no sampling or decimation, because a one-step gradient-norm
// spike is exactly what a sampled plot hides. 20 traces × 10,000 steps is 200k segments, which a
// canvas path draws in milliseconds.

const PAD = { l: 58, r: 24, t: 20, b: 22 };
const SVG_NS = "http://www.w3.org/2000/svg";

// A trace: one trial's per-step columns in growable Float64Arrays, appended to as steps arrive.
class Trace {
  constructor(id) {
    this.id = id;
    this.n = 0;
    this.cols = {};
    this.spikes = []; // row indices where is_spike is 1 (grad-norm spikes)
    this.lossSpikes = []; // row indices where is_loss_spike is 1
    this.logs = {};
    this.status = null;
    this.problem = null;
  }
  get lastStep() { return this.n ? this.cols.step[this.n - 1] : 0; }
  has(col) { return col in this.cols; }
  // A column as plotted: log10 of it for a log axis (non-positive → NaN), kept and extended
  // as rows arrive, so redraws (zoom, pan, new steps) do not take a logarithm per point.
  values(col, log) {
    const ys = this.cols[col];
    if (!log || !ys) return ys;
    let cached = this.logs[col];
    if (!cached || cached.values.length < ys.length) {
      const values = new Float64Array(ys.length).fill(NaN);
      if (cached) values.set(cached.values.subarray(0, cached.n));
      cached = this.logs[col] = { values, n: cached ? cached.n : 0 };
    }
    for (let i = cached.n; i < this.n; i++) cached.values[i] = ys[i] > 0 ? Math.log10(ys[i]) : NaN;
    cached.n = this.n;
    return cached.values;
  }
  // Append a decoded batch; rows at or before the last step held are skipped, so an answer that
  // overlaps one already appended (two polls in flight) never duplicates a step.
  append(batch) {
    const skip = lowerBound(batch.data.step, batch.rows, this.lastStep + 1);
    const rows = batch.rows - skip;
    if (rows <= 0) return;
    if (this.n === 0) return this.adopt(batch, skip);
    const need = this.n + rows;
    for (const name of batch.columns) {
      let arr = this.cols[name];
      if (!arr) arr = this.cols[name] = new Float64Array(Math.max(16, need)).fill(NaN);
      if (arr.length < need) {
        const grown = new Float64Array(Math.max(need, arr.length * 2)).fill(NaN);
        grown.set(arr.subarray(0, this.n));
        arr = this.cols[name] = grown;
      }
      arr.set(batch.data[name].subarray(skip), this.n);
    }
    this.collectSpikes(batch, skip, this.n);
    this.n = need;
  }
  // The first batch (usually the whole history) is kept as the views the answer decoded to:
  // copying 20 histories would double the memory the first draw allocates and collects.
  adopt(batch, skip) {
    for (const name of batch.columns) this.cols[name] = batch.data[name].subarray(skip);
    this.collectSpikes(batch, skip, 0);
    this.n = batch.rows - skip;
  }
  // Row indices (from `offset` on) of the batch's flagged steps of both kinds.
  collectSpikes(batch, skip, offset) {
    for (const [column, list] of [["is_spike", this.spikes], ["is_loss_spike", this.lossSpikes]]) {
      const flags = batch.data[column];
      if (flags) for (let i = skip; i < batch.rows; i++) if (flags[i] === 1) list.push(offset + i - skip);
    }
  }
}

// Decode the server's binary metrics answer (scalestudy/dashboard/data.py encode_columns).
function decodeMetrics(buffer) {
  const bytes = new Uint8Array(buffer, 0, 4);
  if (String.fromCharCode(...bytes) !== "SSM1") throw new Error("not a scalestudy metrics answer");
  const headerLength = new DataView(buffer).getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const data = {};
  let offset = 8 + headerLength;
  for (const name of header.columns) {
    data[name] = new Float64Array(buffer, offset, header.rows);
    offset += header.rows * 8;
  }
  return { ...header, data };
}

// First index whose step is >= x (steps are sorted).
function lowerBound(steps, n, x) {
  let lo = 0, hi = n;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (steps[mid] < x) lo = mid + 1; else hi = mid; }
  return lo;
}

function nearestIndex(steps, n, x) {
  const i = lowerBound(steps, n, x);
  if (i >= n) return n - 1;
  if (i > 0 && x - steps[i - 1] < steps[i] - x) return i - 1;
  return i;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}

function formatValue(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(2) : +v.toPrecision(4) + "";
}

// The step range every plot of a view shows, and the step under the pointer.
class StepAxis {
  constructor() { this.plots = []; this.range = null; this.hover = null; this.pending = false; }
  extent() {
    let lo = Infinity, hi = -Infinity;
    for (const p of this.plots) for (const s of p.series) {
      if (s.trace.n) { lo = Math.min(lo, s.trace.cols.step[0]); hi = Math.max(hi, s.trace.lastStep); }
    }
    return lo <= hi ? [lo, hi === lo ? lo + 1 : hi] : [0, 1];
  }
  // The shown range: the user's zoom, else everything (so new steps widen it as they arrive).
  shown() { return this.range || this.extent(); }
  zoom(center, factor) {
    const [a, b] = this.shown(), [lo, hi] = this.extent();
    let x0 = center - (center - a) * factor, x1 = center + (b - center) * factor;
    if (x1 - x0 >= hi - lo) { this.range = null; } else {
      x1 = Math.max(x1, x0 + 2);
      this.range = [x0, x1];
    }
    this.redraw();
  }
  pan(dx) { const [a, b] = this.shown(); this.range = [a + dx, b + dx]; this.redraw(); }
  reset() { this.range = null; this.redraw(); }
  setHover(step, source) {
    this.hover = step;
    for (const p of this.plots) p.drawHover(p === source);
  }
  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.drawNow(); });
  }
  // Every plot has the page's width: read it once, since reading layout after a plot has changed
  // its markers forces the browser to lay the page out again (per plot, 100+ ms with 1,000 spikes).
  drawNow() {
    const width = this.plots.length ? this.plots[0].el.clientWidth : 0;
    for (const p of this.plots) p.draw(width);
  }
}

// The two kinds of spike a panel can mark: which rows of a trace, the marker's shape and class.
const SPIKE_KINDS = {
  grad: { rows: (trace) => trace.spikes, className: "spike", shape: "circle" },
  loss: { rows: (trace) => trace.lossSpikes, className: "loss-spike", shape: "triangle" },
};

// One panel: a title, a y axis (linear or log), the traces' `column`, and markers for the kinds of
// spike in `marks` ("grad", "loss"), drawn at the panel's own values of the flagged steps.
class Plot {
  constructor(parent, axis, { title, log = false, height = 150, marks = [], tooltip }) {
    Object.assign(this, { axis, title, log, height, marks, tooltip });
    this.series = [];
    this.drawnPoints = 0;
    this.el = document.createElement("div");
    this.el.className = "plot";
    this.el.dataset.title = title;
    this.canvas = document.createElement("canvas");
    this.svg = document.createElementNS(SVG_NS, "svg");
    this.svg.setAttribute("class", "marks");
    this.el.append(this.canvas, this.svg);
    parent.append(this.el);
    axis.plots.push(this);
    this.listen();
  }
  // series: [{trace, column, label, color}]
  setSeries(series) { this.series = series; }

  // Pixel mapping of the shown steps and values: x = ax·step + bx, y = ay·value + by (value in
  // log10 on a log axis), as constants so the per-point loop is plain arithmetic.
  geometry(width) {
    const w = width || 600, h = this.height;
    const [x0, x1] = this.axis.shown();
    const [y0, y1] = this.yRange(x0, x1);
    const ax = (w - PAD.l - PAD.r) / (x1 - x0), bx = PAD.l - x0 * ax;
    const ay = -(h - PAD.t - PAD.b) / (y1 - y0), by = PAD.t - y1 * ay;
    const fy = this.log ? Math.log10 : (v) => v;
    return { w, h, x0, x1, y0, y1, ax, bx, ay, by,
      tx: (x) => ax * x + bx, ty: (v) => ay * fy(v) + by, sx: (px) => (px - bx) / ax };
  }

  // Row range [start, end) of a trace covering the shown steps, one point beyond each edge.
  span(trace, x0, x1) {
    const steps = trace.cols.step, n = trace.n;
    return [Math.max(0, lowerBound(steps, n, x0) - 1), Math.min(n, lowerBound(steps, n, x1) + 1)];
  }

  // y range over the points in the shown steps (log axis: of log10 values, positives only).
  yRange(x0, x1) {
    let lo = Infinity, hi = -Infinity;
    for (const s of this.series) {
      const vs = s.trace.values(s.column, this.log);
      if (!vs) continue;
      const [start, end] = this.span(s.trace, x0, x1);
      for (let i = start; i < end; i++) {
        const v = vs[i];
        if (v < lo) lo = v; // NaN compares false both ways: skipped
        if (v > hi) hi = v;
      }
    }
    if (!(lo <= hi)) return this.log ? [-1, 1] : [0, 1];
    const pad = (hi - lo) * 0.06 || (this.log ? 0.5 : Math.abs(lo) * 0.1 || 1);
    return [lo - pad, hi + pad];
  }

  draw(width = this.el.clientWidth) {
    const g = this.g = this.geometry(width), dpr = window.devicePixelRatio || 1;
    this.canvas.width = g.w * dpr; this.canvas.height = g.h * dpr;
    this.canvas.style.width = g.w + "px"; this.canvas.style.height = g.h + "px";
    this.svg.setAttribute("width", g.w); this.svg.setAttribute("height", g.h);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, g.w, g.h);
    this.drawAxes(ctx, g);
    ctx.save();
    ctx.beginPath(); ctx.rect(PAD.l, PAD.t, g.w - PAD.l - PAD.r, g.h - PAD.t - PAD.b); ctx.clip();
    ctx.lineWidth = 1;
    const { ax, bx, ay, by } = g;
    let points = 0;
    const marks = [];
    for (const s of this.series) {
      const vs = s.trace.values(s.column, this.log), steps = s.trace.cols.step;
      if (!vs || !s.trace.n) continue;
      const [start, end] = this.span(s.trace, g.x0, g.x1);
      ctx.strokeStyle = s.color;
      ctx.beginPath();
      let pen = false;
      for (let i = start; i < end; i++) {
        const v = vs[i];
        if (v - v !== 0) { pen = false; continue; } // NaN or ±inf: a gap, not a line to nowhere
        const x = ax * steps[i] + bx, y = ay * v + by;
        if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
        points++;
      }
      ctx.stroke();
      for (const kind of this.marks) {
        for (const i of SPIKE_KINDS[kind].rows(s.trace)) {
          if (steps[i] < g.x0 || steps[i] > g.x1 || vs[i] - vs[i] !== 0) continue;
          marks.push({ s, i, kind, x: ax * steps[i] + bx, y: ay * vs[i] + by });
        }
      }
    }
    ctx.restore();
    this.drawnPoints = points;
    this.drawMarks(marks);
    this.drawHover(false);
  }

  drawAxes(ctx, g) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#555"; ctx.strokeStyle = "#e3e3e3";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    const yt = this.log
      ? niceTicks(Math.ceil(g.y0), Math.floor(g.y1), 4).filter(Number.isInteger).map((e) => 10 ** e)
      : niceTicks(g.y0, g.y1, 4);
    for (const v of yt) {
      const y = g.ty(v);
      if (y < PAD.t - 1 || y > g.h - PAD.b + 1) continue;
      ctx.beginPath(); ctx.moveTo(PAD.l, y); ctx.lineTo(g.w - PAD.r, y); ctx.stroke();
      ctx.fillText(formatValue(v), PAD.l - 4, y);
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (const v of niceTicks(g.x0, g.x1, 8)) {
      const x = g.tx(v);
      if (x < PAD.l || x > g.w - PAD.r) continue;
      ctx.beginPath(); ctx.moveTo(x, PAD.t); ctx.lineTo(x, g.h - PAD.b); ctx.stroke();
      ctx.fillText(formatValue(v), x, g.h - PAD.b + 3);
    }
    ctx.strokeStyle = "#999";
    ctx.strokeRect(PAD.l, PAD.t, g.w - PAD.l - PAD.r, g.h - PAD.t - PAD.b);
    ctx.textAlign = "left"; ctx.fillStyle = "#222"; ctx.font = "600 12px system-ui, sans-serif";
    ctx.fillText(this.title + (this.log ? " (log)" : ""), PAD.l, 3);
  }

  // Spikes are SVG elements a test or a script can find by kind, trial and step: grad-norm spikes
  // hollow circles in the trace's colour, loss spikes filled dark triangles (distinct in shape
  // and colour, so they read apart in print too); the hover tooltip (at the nearest step) says
  // which kind of spike a point is and by how much.
  drawMarks(marks) {
    const parts = marks.map(({ s, i, kind, x, y }) => {
      const data = `data-trial="${escapeHtml(s.trace.id)}" data-step="${s.trace.cols.step[i]}"`;
      const [cx, cy] = [x.toFixed(1), y.toFixed(1)];
      return kind === "loss"
        ? `<path class="loss-spike" d="${markerPath("triangle", x, y)}" ${data}></path>`
        : `<circle class="spike" cx="${cx}" cy="${cy}" r="4" stroke="${s.color}" ${data}></circle>`;
    });
    this.svg.innerHTML = parts.join("") + `<line class="cross" y1="${PAD.t}" y2="${this.height - PAD.b}" visibility="hidden"></line>`;
  }

  drawHover(showTip) {
    const line = this.svg.querySelector("line.cross");
    const step = this.axis.hover, g = this.g;
    if (!line || !g) return;
    if (step === null) { line.setAttribute("visibility", "hidden"); if (showTip) this.tooltip.hide(); return; }
    const x = g.tx(step);
    line.setAttribute("x1", x); line.setAttribute("x2", x);
    line.setAttribute("visibility", x >= PAD.l && x <= g.w - PAD.r ? "visible" : "hidden");
    if (!showTip) return;
    const rows = [];
    for (const s of this.series) {
      const ys = s.trace.cols[s.column];
      if (!ys || !s.trace.n) continue;
      const i = nearestIndex(s.trace.cols.step, s.trace.n, step);
      const flag = (column, ratioColumn, text) => {
        if (!s.trace.cols[column] || s.trace.cols[column][i] !== 1) return "";
        const ratio = s.trace.cols[ratioColumn] ? s.trace.cols[ratioColumn][i] : NaN;
        return ` ${text}${Number.isFinite(ratio) ? `, ${formatValue(ratio)}× the running median` : ""}`;
      };
      rows.push(`<span style="color:${s.color}">■</span> ${escapeHtml(s.label)}: ` +
        `step ${s.trace.cols.step[i]}, <b>${formatValue(ys[i])}</b>` +
        flag("is_spike", "spike_ratio", "○ grad-norm spike") + flag("is_loss_spike", "loss_spike_ratio", "▲ loss spike"));
    }
    this.tooltip.show(`<b>${escapeHtml(this.title)}</b> · step ${Math.round(step)}<br>` + rows.join("<br>"));
  }

  listen() {
    let drag = null;
    this.el.addEventListener("wheel", (e) => {
      e.preventDefault();
      const g = this.g, rect = this.el.getBoundingClientRect();
      if (!g) return;
      this.axis.zoom(g.sx(e.clientX - rect.left), e.deltaY < 0 ? 1 / 1.25 : 1.25);
    }, { passive: false });
    this.el.addEventListener("mousedown", (e) => { drag = { x: e.clientX }; e.preventDefault(); });
    window.addEventListener("mouseup", () => { drag = null; });
    this.el.addEventListener("mousemove", (e) => {
      const g = this.g, rect = this.el.getBoundingClientRect();
      if (!g) return;
      if (drag) {
        this.axis.pan(g.sx(drag.x - rect.left) - g.sx(e.clientX - rect.left));
        drag.x = e.clientX;
      }
      this.tooltip.move(e.clientX, e.clientY);
      this.axis.setHover(g.sx(e.clientX - rect.left), this);
    });
    this.el.addEventListener("mouseleave", () => this.axis.setHover(null, this));
    this.el.addEventListener("dblclick", () => this.axis.reset());
  }
}

// An SVG path of a marker centred on (x, y): an upward triangle of about 9 px.
function markerPath(shape, x, y) {
  if (shape !== "triangle") throw new Error(`no marker shape ${shape}`);
  return `M${x.toFixed(1)},${(y - 5).toFixed(1)} L${(x + 4.5).toFixed(1)},${(y + 3.5).toFixed(1)} ` +
    `L${(x - 4.5).toFixed(1)},${(y + 3.5).toFixed(1)} Z`;
}

// The legend of the spike markers, for the views that draw them.
function markerLegend() {
  return `<div class="marker-legend" id="marker-legend">` +
    `<span class="marker-item" data-kind="grad"><svg width="12" height="12"><circle class="spike" cx="6" cy="6" r="4" stroke="#555"></circle></svg> ` +
    `grad-norm spike: grad norm above monitor.spike_threshold × its running median</span>` +
    `<span class="marker-item" data-kind="loss"><svg width="12" height="12"><path class="loss-spike" d="${markerPath("triangle", 6, 7)}"></path></svg> ` +
    `loss spike: loss above monitor.loss_spike_threshold × its running median</span></div>`;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
