"use strict";
// The dashboard page: four views behind the URL hash, each polling the server every POLL_MS for
// what changed. Metric polls ask only for steps after the last one held (`?after=`), so a live
// trace grows by its new rows and whole histories are never sent twice.

const POLL_MS = 2000;
const FINAL = new Set(["done", "diverged"]); // trials whose steps can no longer change
const PLOT_COLUMNS = ["step", "grad_norm", "is_spike", "spike_ratio", "loss", "is_loss_spike", "loss_spike_ratio",
  "temperature", "bias", "rms_max"];
const RUN_COLUMNS = [...PLOT_COLUMNS, "grad_norm_image", "grad_norm_text", "lr", "update_norm", "param_norm",
  "logit_pos_mean", "logit_neg_mean", "rms_patch_embed"];
const DEFAULT_TRACES = 20; // instability view without a selection: the trials with most spikes (both kinds)
// Tableau 10 then its lighter half: distinct hues for up to 20 traces.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac", "#1f4e79", "#a0522d", "#8b1a1a", "#2f6f6b", "#2e6b25", "#9a7d0a", "#6a3d6a",
  "#c2185b", "#5d4037", "#616161"];
const SCALING_METRICS = ["zeroshot_top1", "best_zeroshot_top1", "linear_probe_top1", "final_loss", "retrieval_i2t_r1",
  "retrieval_t2i_r1", "spike_count", "max_spike_ratio", "spike_rate_per_1k", "loss_spike_count",
  "loss_spike_rate_per_1k", "samples_per_s"];

const app = { view: null, polling: false, timings: {}, overview: null };
// For tests and the benchmark: render timings (ms) per view, and what the grad-norm plots drew.
window.scalestudy = {
  timings: app.timings,
  drawnPoints() {
    const plots = app.view && app.view.gradPlots ? app.view.gradPlots : [];
    return { traces: plots.reduce((n, p) => n + p.series.filter((s) => s.trace.n).length, 0),
             points: plots.reduce((n, p) => n + p.drawnPoints, 0) };
  },
};

const tooltip = {
  el: null,
  show(html) { this.el.innerHTML = html; this.el.hidden = false; },
  hide() { this.el.hidden = true; },
  move(x, y) {
    const flip = x > window.innerWidth - 340;
    this.el.style.left = (flip ? x - 330 : x + 14) + "px";
    this.el.style.top = y + 14 + "px";
  },
};

// The overview as last fetched: a view opened from the overview page reuses it while it is fresh.
async function getOverview() {
  if (!app.overview || performance.now() - app.overview.at > POLL_MS) {
    app.overview = { data: await getJSON("/api/overview"), at: performance.now() };
  }
  return app.overview.data;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// Fetch the steps after the trace's last one; a broken trial keeps its reason in `trace.problem`.
async function fetchMetrics(trace, columns) {
  const url = `/api/trials/${encodeURIComponent(trace.id)}/metrics?after=${trace.lastStep}&columns=${columns.join(",")}`;
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({ error: response.statusText }));
    trace.problem = body.error;
    return false;
  }
  const batch = decodeMetrics(await response.arrayBuffer());
  trace.problem = null;
  trace.status = batch.status;
  if (batch.rows) trace.append(batch);
  return batch.rows > 0;
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : formatValue(value);
  return String(value);
}

const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %");
const statusChip = (s) => `<span class="status st-${escapeHtml(s)}">${escapeHtml(s)}</span>`;
const problemFlag = (p) => (p ? ` <span class="flag" title="${escapeHtml(p)}">⚠ broken</span>` : "");

function compare(a, b) {
  const missing = (v) => v === null || v === undefined;
  if (missing(a) || missing(b)) return missing(a) - missing(b); // blanks last either way
  return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
}

// Both kinds of spike of an overview row, for ranking the spikiest trials.
const spikeTotal = (row) => (row.spike_count || 0) + (row.loss_spike_count || 0);

function axisLabel(row, axes) {
  return axes.map((a) => `${a.split(".").pop()}=${fmt(row[a])}`).join(" ");
}

// ---------------------------------------------------------------- overview
class OverviewView {
  constructor(main, start) {
    this.start = start;
    this.sort = { key: "trial_id", dir: 1 };
    this.filters = {};
    this.search = "";
    this.selected = new Set();
    this.optionsKey = null;
    main.innerHTML = `
      <section class="strip" id="strip"></section>
      <div class="controls" id="filters"></div>
      <div class="controls">
        <button id="open-instability">Instability view of selected</button>
        <button id="select-shown">Select shown</button> <button id="clear-selection">Clear selection</button>
        <span id="shown-count"></span>
      </div>
      <table id="trials"><thead></thead><tbody></tbody></table>`;
    this.table = main.querySelector("#trials");
    this.table.addEventListener("click", (e) => {
      const th = e.target.closest("th[data-key]");
      if (!th) return;
      this.sort = { key: th.dataset.key, dir: this.sort.key === th.dataset.key ? -this.sort.dir : 1 };
      this.render();
    });
    this.table.addEventListener("change", (e) => {
      const box = e.target.closest("input[data-trial]");
      if (!box) return;
      if (box.checked) this.selected.add(box.dataset.trial); else this.selected.delete(box.dataset.trial);
      this.renderCount();
    });
    main.querySelector("#filters").addEventListener("input", (e) => {
      if (e.target.dataset.axis) this.filters[e.target.dataset.axis] = e.target.value;
      if (e.target.id === "search") this.search = e.target.value.trim().toLowerCase();
      this.render();
    });
    main.querySelector("#select-shown").onclick = () => { this.shown().forEach((r) => this.selected.add(r.trial_id)); this.render(); };
    main.querySelector("#clear-selection").onclick = () => { this.selected.clear(); this.render(); };
    main.querySelector("#open-instability").onclick = () => {
      const ids = this.selected.size ? [...this.selected] : [];
      location.hash = "#/instability" + (ids.length ? "?trials=" + ids.join(",") : "");
    };
    this.poll();
  }

  async poll() {
    this.data = await getJSON("/api/overview");
    app.overview = { data: this.data, at: performance.now() };
    this.render();
    if (!this.drawn) { this.drawn = true; app.timings.overview = performance.now() - this.start; }
  }

  columns() {
    const axes = this.data.axes.map((a) => ({ key: a, label: a }));
    return [
      { key: "trial_id", label: "trial" }, { key: "status", label: "state" }, ...axes,
      { key: "step", label: "progress" }, { key: "zeroshot_top1", label: "zero-shot top-1" },
      { key: "best_zeroshot_top1", label: "best top-1" }, { key: "spike_count", label: "grad-norm spikes" },
      { key: "max_spike_ratio", label: "max spike ratio" }, { key: "first_spike_step", label: "first spike" },
      { key: "loss_spike_count", label: "loss spikes" }, { key: "first_loss_spike_step", label: "first loss spike" },
      { key: "stalled", label: "stalled" }, { key: "samples_per_s", label: "samples/s" },
      { key: "mfu", label: "MFU" }, { key: "peak_memory_gib", label: "peak memory (GiB)" },
    ];
  }

  shown() {
    const rows = this.data.trials.filter((r) =>
      Object.entries(this.filters).every(([k, v]) => v === "" || String(r[k]) === v) &&
      (!this.search || JSON.stringify(r).toLowerCase().includes(this.search)));
    const { key, dir } = this.sort;
    return rows.sort((a, b) => (a[key] === null || b[key] === null ? compare(a[key], b[key]) : dir * compare(a[key], b[key])));
  }

  renderStrip() {
    const d = this.data, order = ["running", "pending", "done", "diverged", "failed", "preempted"];
    const statuses = [...order.filter((s) => d.counts[s]), ...Object.keys(d.counts).filter((s) => !order.includes(s))];
    document.getElementById("strip").innerHTML =
      `<b>${d.trials.length}</b> trials · ` + statuses.map((s) => `${statusChip(s)} <b class="count" data-status="${escapeHtml(s)}">${d.counts[s]}</b>`).join(" ") +
      (d.broken ? ` · <span class="flag">⚠ ${d.broken} broken</span>` : "") +
      (d.problem ? `<div class="notice">${escapeHtml(d.problem)}</div>` : "") +
      (!d.trials.length ? `<div class="notice" id="empty">No trials yet in this run directory; this page fills in as \`scalestudy run\` adds them.</div>` : "");
  }

  renderFilters() {
    const d = this.data;
    const values = Object.fromEntries(["status", ...d.axes].map((a) => [a, [...new Set(d.trials.map((r) => String(r[a])))].sort((x, y) => compare(+x, +y) || x.localeCompare(y))]));
    const key = JSON.stringify(values);
    if (key === this.optionsKey) return; // rebuilding would drop focus and open menus
    this.optionsKey = key;
    document.getElementById("filters").innerHTML = "Filter: " + Object.entries(values).map(([a, vs]) =>
      `<label>${escapeHtml(a)} <select data-axis="${escapeHtml(a)}"><option value="">all</option>` +
      vs.map((v) => `<option${this.filters[a] === v ? " selected" : ""}>${escapeHtml(v)}</option>`).join("") + `</select></label>`).join(" ") +
      ` <input id="search" type="search" placeholder="search any value" value="${escapeHtml(this.search)}">`;
  }

  cell(row, key) {
    const v = row[key];
    switch (key) {
      case "trial_id":
        return `<a href="#/trial/${encodeURIComponent(v)}">${escapeHtml(v)}</a>${problemFlag(row.problem)}`;
      case "status": return statusChip(v);
      case "step": {
        const frac = row.steps ? Math.min(1, (row.step || 0) / row.steps) : 0;
        return `<div class="bar"><span style="width:${(100 * frac).toFixed(1)}%"></span></div> ${fmt(row.step || 0)}/${fmt(row.steps)}`;
      }
      case "zeroshot_top1": case "best_zeroshot_top1": case "mfu": return pct(v);
      case "max_spike_ratio": return v === null ? "–" : formatValue(v) + "×";
      case "stalled": return v === null || v === undefined ? "–" : v ? `<span class="flag">stalled</span>` : "no";
      default: return escapeHtml(fmt(v));
    }
  }

  renderCount() {
    document.getElementById("shown-count").textContent = `${this.shown().length} shown, ${this.selected.size} selected`;
    document.getElementById("open-instability").textContent =
      this.selected.size ? `Instability view of ${this.selected.size} selected` : `Instability view (top ${DEFAULT_TRACES} by spikes)`;
  }

  render() {
    this.renderStrip();
    this.renderFilters();
    const cols = this.columns();
    this.table.tHead.innerHTML = "<tr><th></th>" + cols.map((c) =>
      `<th data-key="${escapeHtml(c.key)}" class="${this.sort.key === c.key ? (this.sort.dir > 0 ? "asc" : "desc") : ""}">${escapeHtml(c.label)}</th>`).join("") + "</tr>";
    this.table.tBodies[0].innerHTML = this.shown().map((r) =>
      `<tr data-trial="${escapeHtml(r.trial_id)}"${r.problem ? ' class="broken"' : ""}><td><input type="checkbox" data-trial="${escapeHtml(r.trial_id)}"${this.selected.has(r.trial_id) ? " checked" : ""}></td>` +
      cols.map((c) => `<td class="c-${escapeHtml(c.key.replace(/\W/g, "_"))}">${this.cell(r, c.key)}</td>`).join("") + "</tr>").join("");
    this.renderCount();
  }
}

// ---------------------------------------------------------------- instability
class InstabilityView {
  constructor(main, params, start) {
    this.start = start;
    this.params = params;
    this.group = params.get("group") || "";
    this.layout = params.get("layout") || "overlay";
    this.gradPlots = [];
    main.innerHTML = `
      <div class="controls">
        <label>Group by <select id="group-by"></select></label>
        <label>Layout <select id="layout"><option value="overlay">overlaid</option><option value="multiples">small multiples per group</option></select></label>
        <span class="hint">wheel: zoom · drag: pan · double-click: whole run · hover: step and values</span>
      </div>
      ${markerLegend()}<div id="legend"></div><div id="plots"></div>`;
    this.main = main;
    this.init();
  }

  async init() {
    // With trials named in the URL, their histories load while the overview (labels, groups) does.
    const asked = (this.params.get("trials") || "").split(",").filter(Boolean);
    const askedTraces = asked.map((id) => new Trace(id));
    const loading = askedTraces.map((t) => fetchMetrics(t, PLOT_COLUMNS));
    const overview = await getOverview();
    this.axes = overview.axes;
    this.rows = new Map(overview.trials.map((r) => [r.trial_id, r]));
    this.unknown = asked.filter((id) => !this.rows.has(id));
    this.traces = asked.length ? askedTraces.filter((t) => this.rows.has(t.id)) : overview.trials
      .filter((r) => r.step).sort((a, b) => compare(spikeTotal(b), spikeTotal(a)) || compare(b.max_spike_ratio, a.max_spike_ratio))
      .slice(0, DEFAULT_TRACES).map((r) => new Trace(r.trial_id));
    await Promise.all(asked.length ? loading : this.traces.map((t) => fetchMetrics(t, PLOT_COLUMNS)));
    const groupBy = this.main.querySelector("#group-by"), layout = this.main.querySelector("#layout");
    groupBy.innerHTML = `<option value="">nothing</option>` + this.axes.map((a) => `<option${a === this.group ? " selected" : ""}>${escapeHtml(a)}</option>`).join("");
    layout.value = this.layout;
    groupBy.onchange = () => { this.group = groupBy.value; this.rebuild(); };
    layout.onchange = () => { this.layout = layout.value; this.rebuild(); };
    app.timings["instability.data"] = performance.now() - this.start;
    this.build();
    this.axis.drawNow();
    this.drawn = true;
    app.timings.instability = performance.now() - this.start;
  }

  // Group/layout changes redraw from the traces held; the URL records them without a reload.
  rebuild() {
    const params = new URLSearchParams({ trials: this.traces.map((t) => t.id).join(","), group: this.group, layout: this.layout });
    history.replaceState(null, "", "#/instability?" + params);
    this.build();
    this.axis.drawNow();
  }

  groupOf(trace) { return this.group ? fmt(this.rows.get(trace.id)[this.group]) : ""; }

  groups() {
    return [...new Set(this.traces.map((t) => this.groupOf(t)))].sort((a, b) => compare(+a, +b) || a.localeCompare(b));
  }

  build() {
    const axis = this.axis = new StepAxis();
    const plots = this.main.querySelector("#plots");
    plots.innerHTML = "";
    const groups = this.groups();
    const byGroup = this.group && this.layout === "overlay";
    this.colour = new Map(this.traces.map((t, i) => [t.id, PALETTE[(byGroup ? groups.indexOf(this.groupOf(t)) : i) % PALETTE.length]]));
    const series = (traces, column) => traces.map((t) => ({ trace: t, column, color: this.colour.get(t.id),
      label: `${t.id} ${axisLabel(this.rows.get(t.id), this.axes)}` }));
    const multiples = this.group && this.layout === "multiples";
    this.gradPlots = (multiples ? groups : [""]).map((g) => {
      const plot = new Plot(plots, axis, { title: "gradient norm (pre-clip)" + (multiples ? ` · ${this.group} = ${g}` : ""),
        log: true, marks: ["grad"], height: multiples ? 150 : 280, tooltip });
      plot.setSeries(series(this.traces.filter((t) => !multiples || this.groupOf(t) === g), "grad_norm"));
      return plot;
    });
    // Loss and the update RMS right under the grad norm, loss spikes marked on both: the RMS of
    // Wortsman et al. 2023 (§3.4) rises a few steps before a loss spike.
    for (const [column, title, log, marks] of [["loss", "loss", false, ["loss"]],
      ["rms_max", "update RMS: max over matrices of RMS(g² / v̂)", true, ["loss"]],
      ["temperature", "temperature t (logit scale)", false, []], ["bias", "bias b", false, []]]) {
      if (!this.traces.some((t) => t.has(column) && t.cols[column].subarray(0, t.n).some(Number.isFinite))) continue;
      new Plot(plots, axis, { title, log, marks, height: column === "loss" ? 160 : 120, tooltip }).setSeries(series(this.traces, column));
    }
    this.renderLegend(groups);
  }

  renderLegend(groups) {
    const item = (t) => {
      const row = this.rows.get(t.id);
      return `<div class="legend-item" data-trial="${escapeHtml(t.id)}"><span class="swatch" style="background:${this.colour.get(t.id)}"></span>` +
        `<a href="#/trial/${encodeURIComponent(t.id)}">${escapeHtml(t.id)}</a> <span class="axes">${escapeHtml(axisLabel(row, this.axes))}</span> ` +
        `${statusChip(t.status || row.status)} step <b class="last-step">${t.lastStep}</b> · grad-norm spikes <b class="spikes">${t.spikes.length}</b>` +
        ` · loss spikes <b class="loss-spikes">${t.lossSpikes.length}</b>` +
        `${problemFlag(t.problem || row.problem)}</div>`;
    };
    const sections = groups.map((g) => (this.group ? `<div class="legend-group"><b>${escapeHtml(this.group)} = ${escapeHtml(g)}</b>` : "<div class=\"legend-group\">") +
      this.traces.filter((t) => this.groupOf(t) === g).map(item).join("") + "</div>");
    this.main.querySelector("#legend").innerHTML =
      (this.traces.length ? sections.join("") : `<div class="notice">No trials with steps yet.</div>`) +
      (this.unknown.length ? `<div class="notice">Not in this run: ${escapeHtml(this.unknown.join(", "))}</div>` : "");
  }

  async poll() {
    if (!this.drawn) return; // the first load is still fetching: a poll now would fetch it twice
    const live = this.traces.filter((t) => !FINAL.has(t.status) || t.problem);
    const grew = await Promise.all(live.map((t) => fetchMetrics(t, PLOT_COLUMNS)));
    if (grew.some(Boolean)) this.axis.redraw();
    if (live.length) this.renderLegend(this.groups());
  }
}

// ---------------------------------------------------------------- one trial
class RunView {
  constructor(main, id, start) {
    this.start = start;
    this.id = id;
    this.main = main;
    this.gradPlots = [];
    main.innerHTML = `<h2>Trial <code>${escapeHtml(id)}</code> <span id="trial-status"></span></h2>
      <div id="trial-info"></div>${markerLegend()}<div id="plots"></div><h3>Evaluations</h3><div id="evals"></div>`;
    this.trace = new Trace(id);
    this.init();
  }

  async init() {
    await this.renderInfo();
    await fetchMetrics(this.trace, RUN_COLUMNS);
    const axis = this.axis = new StepAxis(), plots = this.main.querySelector("#plots");
    const panel = (title, log, columns, opts = {}) => {
      const present = columns.filter(([c]) => this.trace.has(c) && this.trace.cols[c].subarray(0, this.trace.n).some(Number.isFinite));
      if (!present.length) return null;
      const plot = new Plot(plots, axis, { title, log, height: opts.height || 120, marks: opts.marks || [], tooltip });
      plot.setSeries(present.map(([column, label], i) => ({ trace: this.trace, column, label, color: PALETTE[i] })));
      return plot;
    };
    const grad = panel("gradient norm (pre-clip)", true, [["grad_norm", "global"], ["grad_norm_image", "image tower"], ["grad_norm_text", "text tower"]], { marks: ["grad"], height: 240 });
    this.gradPlots = grad ? [grad] : [];
    panel("loss", false, [["loss", "loss"]], { marks: ["loss"] });
    panel("update RMS: max over matrices of RMS(g² / v̂)", true, [["rms_max", "largest matrix"], ["rms_patch_embed", "patch embedding"]], { marks: ["loss"] });
    panel("learning rate", false, [["lr", "lr"]]);
    panel("temperature t (logit scale)", false, [["temperature", "t"]]);
    panel("bias b", false, [["bias", "b"]]);
    panel("parameter and update norms", true, [["param_norm", "parameters"], ["update_norm", "update"]]);
    panel("mean logits", false, [["logit_pos_mean", "positive pairs"], ["logit_neg_mean", "negative pairs"]]);
    if (this.trace.problem) plots.innerHTML = `<div class="notice flag">${escapeHtml(this.trace.problem)}</div>`;
    axis.drawNow();
    app.timings.trial = performance.now() - this.start;
  }

  async renderInfo() {
    const d = this.detail = await getJSON(`/api/trials/${encodeURIComponent(this.id)}`);
    const state = d.state || {}, trial = d.trial || {}, summary = d.summary || {};
    const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
    const table = (obj) => `<table class="kv">${Object.entries(obj).map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(fmt(v))}</td></tr>`).join("")}</table>`;
    this.main.querySelector("#trial-status").innerHTML = statusChip(state.status || "failed") + (d.problems.length ? problemFlag(d.problems.join("\n")) : "");
    this.main.querySelector("#trial-info").innerHTML =
      d.problems.map((p) => `<div class="notice flag">${escapeHtml(p)}</div>`).join("") +
      (state.error ? `<h3>Error</h3><pre class="error">${escapeHtml(state.error)}</pre>` : "") +
      `<div class="cols"><div><h3>Swept values</h3>${table(trial.swept || {})}<h3>State</h3>${table({ status: state.status, step: state.step,
        steps: state.steps, attempts: state.attempts, host: state.host, backend: state.backend, started: when(state.started_at),
        updated: when(state.updated_at), finished: when(state.finished_at) })}</div>` +
      `<div><h3>Summary</h3>${Object.keys(summary).length ? table(summary) : "<p>none yet (written when the trial ends)</p>"}</div>` +
      `<div><h3>Derived</h3>${table(trial.derived || {})}</div></div>` +
      `<details><summary>Full config</summary><pre>${escapeHtml(JSON.stringify(trial.config || null, null, 2))}</pre></details>`;
    const evals = d.evals || [];
    const keys = evals.length ? Object.keys(evals[0]) : [];
    this.main.querySelector("#evals").innerHTML = evals.length
      ? `<table class="evals"><tr>${keys.map((k) => `<th>${escapeHtml(k)}</th>`).join("")}</tr>${evals.map((e) => `<tr>${keys.map((k) => `<td>${escapeHtml(fmt(e[k]))}</td>`).join("")}</tr>`).join("")}</table>`
      : "<p>none yet</p>";
  }

  async poll() {
    if (!this.axis || (FINAL.has(this.trace.status) && !this.trace.problem)) return;
    await this.renderInfo();
    if (await fetchMetrics(this.trace, RUN_COLUMNS)) this.axis.redraw();
  }
}

// ---------------------------------------------------------------- scaling
class ScalingView {
  constructor(main, params, start) {
    this.start = start;
    this.main = main;
    this.params = params;
    main.innerHTML = `<div class="controls"><label>x <select id="sx"></select></label> <label>y <select id="sy"></select></label>
      <label>one curve per <select id="sby"></select></label> <span class="hint">mean over seeds, band = 95 % Student-t CI of the mean (none with one seed), finished trials (as the report)</span></div>
      <div id="scaling-plot"></div>`;
    this.init();
  }

  async init() {
    const overview = await getOverview();
    // x: a swept numeric key, or batch size (every trial has one) when none is swept.
    const numeric = overview.axes.filter((a) => overview.trials.some((r) => typeof r[a] === "number"));
    if (!numeric.includes("train.batch_size")) numeric.push("train.batch_size");
    const pick = (name, fallback, options) => {
      const v = this.params.get(name);
      return options.includes(v) ? v : options.includes(fallback) ? fallback : options[0];
    };
    const lines = overview.axes.includes("loss.kind") ? overview.axes : [...overview.axes, "loss.kind"];
    this.choice = { x: pick("x", "train.batch_size", numeric), y: pick("y", "zeroshot_top1", SCALING_METRICS),
      by: pick("by", "loss.kind", lines) };
    const fill = (id, options, key) => {
      const sel = this.main.querySelector(id);
      sel.innerHTML = options.map((o) => `<option${o === this.choice[key] ? " selected" : ""}>${escapeHtml(o)}</option>`).join("");
      sel.onchange = () => { this.choice[key] = sel.value; history.replaceState(null, "", "#/scaling?" + new URLSearchParams(this.choice)); this.poll(); };
    };
    fill("#sx", numeric, "x"); fill("#sy", SCALING_METRICS, "y"); fill("#sby", lines, "by");
    await this.poll();
    app.timings.scaling = performance.now() - this.start;
  }

  async poll() {
    const box = this.main.querySelector("#scaling-plot");
    if (!this.choice) return;
    try {
      box.innerHTML = scalingSvg(await getJSON("/api/scaling?" + new URLSearchParams(this.choice)), Math.min(900, box.clientWidth || 800), 420);
    } catch (err) {
      box.innerHTML = `<div class="notice">${escapeHtml(err.message)}</div>`;
    }
  }
}

function scalingSvg(data, w, h) {
  const pts = data.curves.flatMap((c) => c.points);
  if (!pts.length) return `<div class="notice">No finished trials with ${escapeHtml(data.y)} yet.</div>`;
  const pad = { l: 60, r: 170, t: 16, b: 40 };
  const xs = pts.map((p) => p[0]), xmin = Math.min(...xs), xmax = Math.max(...xs);
  const log2 = xmin > 0 && xmax / xmin >= 4; // batch sizes: doubling steps, as the report's log2 axis
  const fx = log2 ? Math.log2 : (v) => v;
  // A point with one seed has no interval (null): its band collapses onto the mean.
  const low = (q) => q[4] ?? q[1], high = (q) => q[5] ?? q[1];
  const lo = Math.min(...pts.map(low), data.chance ?? Infinity), hi = Math.max(...pts.map(high));
  const ypad = (hi - lo) * 0.08 || 1;
  const [y0, y1] = [lo - ypad, hi + ypad], [x0, x1] = [fx(xmin), fx(xmax) === fx(xmin) ? fx(xmin) + 1 : fx(xmax)];
  const tx = (v) => pad.l + ((fx(v) - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const ty = (v) => pad.t + (1 - (v - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  let out = `<svg class="scaling" width="${w}" height="${h}">`;
  for (const v of niceTicks(y0, y1, 6)) out += `<line class="grid" x1="${pad.l}" x2="${w - pad.r}" y1="${ty(v)}" y2="${ty(v)}"/><text x="${pad.l - 6}" y="${ty(v) + 4}" text-anchor="end">${formatValue(v)}</text>`;
  for (const v of [...new Set(xs)]) out += `<text x="${tx(v)}" y="${h - pad.b + 16}" text-anchor="middle">${formatValue(v)}</text>`;
  out += `<text x="${(pad.l + w - pad.r) / 2}" y="${h - 6}" text-anchor="middle">${escapeHtml(data.x)}${log2 ? " (log2)" : ""}</text>`;
  out += `<text x="12" y="${(pad.t + h - pad.b) / 2}" transform="rotate(-90 12 ${(pad.t + h - pad.b) / 2})" text-anchor="middle">${escapeHtml(data.y)}</text>`;
  if (data.chance !== null && data.chance !== undefined) out += `<line class="chance" x1="${pad.l}" x2="${w - pad.r}" y1="${ty(data.chance)}" y2="${ty(data.chance)}"><title>chance ${formatValue(data.chance)}</title></line>`;
  data.curves.forEach((c, i) => {
    const col = PALETTE[i % PALETTE.length], p = c.points;
    const band = [...p.map((q) => `${tx(q[0])},${ty(high(q))}`), ...p.slice().reverse().map((q) => `${tx(q[0])},${ty(low(q))}`)].join(" ");
    out += `<polygon points="${band}" fill="${col}" opacity="0.18"/><polyline class="curve" points="${p.map((q) => `${tx(q[0])},${ty(q[1])}`).join(" ")}" stroke="${col}" fill="none" stroke-width="2"/>`;
    out += p.map((q) => `<circle cx="${tx(q[0])}" cy="${ty(q[1])}" r="4" fill="${col}"><title>${escapeHtml(`${data.by}=${c.name}, ${data.x}=${q[0]}: mean ${formatValue(q[1])}, std ${formatValue(q[2] ?? NaN)}, ${q[4] === null ? "one seed, no interval" : `${Math.round(100 * data.level)} % t-CI ${formatValue(q[4])}–${formatValue(q[5])}`} (${q[3]} seeds)`)}</title></circle>`).join("");
    out += `<rect x="${w - pad.r + 12}" y="${pad.t + i * 18}" width="10" height="10" fill="${col}"/><text x="${w - pad.r + 26}" y="${pad.t + 9 + i * 18}">${escapeHtml(`${data.by}=${c.name}`)}</text>`;
  });
  return out + `<rect class="frame" x="${pad.l}" y="${pad.t}" width="${w - pad.l - pad.r}" height="${h - pad.t - pad.b}"/></svg>`;
}

// ---------------------------------------------------------------- routing and polling
function route(start) {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean), params = new URLSearchParams(query || "");
  const main = document.getElementById("view");
  tooltip.hide();
  main.innerHTML = "";
  const name = ["instability", "trial", "scaling"].includes(parts[0]) ? parts[0] : "overview";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  app.view = name === "instability" ? new InstabilityView(main, params, start)
    : name === "trial" ? new RunView(main, decodeURIComponent(parts[1] || ""), start)
    : name === "scaling" ? new ScalingView(main, params, start)
    : new OverviewView(main, start);
}

async function poll() {
  if (app.polling || !app.view) return;
  app.polling = true;
  const banner = document.getElementById("offline");
  try {
    await app.view.poll();
    banner.hidden = true;
  } catch (err) {
    banner.textContent = `Cannot reach the dashboard server (${err.message}); retrying every ${POLL_MS / 1000} s.`;
    banner.hidden = false;
  } finally {
    app.polling = false;
  }
}

window.addEventListener("DOMContentLoaded", () => {
  tooltip.el = document.getElementById("tooltip");
  window.addEventListener("hashchange", () => route(performance.now()));
  window.addEventListener("resize", () => app.view && app.view.axis && app.view.axis.redraw());
  route(0); // performance.now() counts from navigation start: the first view's timing includes loading
  setInterval(poll, POLL_MS);
});
