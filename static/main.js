// The market dashboard: wires the live connection to the models, and renders the charts,
// counters and tables once per animation frame, whatever the message rate.

import {alignSeries, TimeChart} from "./charts.js";
import {ExportPanel} from "./export.js";
import {LiveClient} from "./live.js";
import {MAX_POINTS, MetricModel, PricingModel, TopicState} from "./model.js";
import {TopicViews} from "./tables.js";
import {escapeHtml, formatNumber, merchantColour, shortId} from "./util.js";

const TABLE_INTERVAL_MS = 500;   // tables are for reading: two updates a second is plenty
const $ = (selector) => document.querySelector(selector);

const topics = new Map();         // name → TopicState, in the server's order
const pricing = new PricingModel();
const pricingRaw = new Map(PricingModel.TOPICS.map((t) => [t, []]));  // for rebuilding after a history
let pricingRebuild = false;
let selectedProduct = null;

const percent = (v) => `${formatNumber(v * 100, 1)}%`;
const money = (v) => formatNumber(v, 2);
const metricCharts = new Map([
  ["profitPerMinute", {model: new MetricModel("profit"), el: "#chart-profitPerMinute", format: money}],
  ["revenuePerMinute", {model: new MetricModel("revenue"), el: "#chart-revenuePerMinute", format: money}],
  ["cumulativeRevenueBasedMarketshare", {model: new MetricModel("marketshare"),
                                         el: "#chart-cumulativeRevenueBasedMarketshare", format: percent}],
]);

// ---- charts -------------------------------------------------------------------------------

const pricingChart = new TimeChart($("#chart-pricing"), {format: money, height: 355});
let pricingShown = -1;
for (const entry of metricCharts.values()) {
  entry.chart = new TimeChart($(entry.el), {format: entry.format, height: 200});
  entry.shown = -1;
}

function renderPricing() {
  updateProductPicker();
  const product = selectedProduct === null ? undefined : pricing.products.get(selectedProduct);
  const key = `${pricing.version}/${selectedProduct}/${product ? product.version : 0}`;
  if (key === pricingShown) return;
  pricingShown = key;
  const specs = [], series = [];
  if (product !== undefined) {
    const merchants = [...new Set([...product.prices.keys(), ...product.sales.keys()])].sort();
    for (const merchant of merchants) {
      const colour = merchantColour(merchant);
      const prices = product.prices.get(merchant), sales = product.sales.get(merchant);
      if (prices) {
        specs.push({key: `price:${merchant}`, label: `${shortId(merchant)} price`, stroke: colour, kind: "step"});
        series.push(prices);
      }
      if (sales) {
        specs.push({key: `sale:${merchant}`, label: `${shortId(merchant)} sale`, stroke: colour, kind: "points"});
        series.push(sales);
      }
    }
  }
  pricingChart.update(specs, alignSeries(series));
}

function updateProductPicker() {
  const picker = $("#product");
  const ids = pricing.productIds();
  const signature = ids.join(",");
  if (picker.dataset.options !== signature) {
    picker.dataset.options = signature;
    picker.replaceChildren(...ids.map((id) => new Option(`product ${id}`, id)));
    picker.disabled = ids.length === 0;
  }
  if (selectedProduct === null || !ids.includes(selectedProduct)) selectedProduct = ids.length ? ids[0] : null;
  if (selectedProduct !== null && picker.value !== selectedProduct) picker.value = selectedProduct;
}

pricingChart.setWindow(Number($("#window").value));
$("#window").addEventListener("change", (event) => pricingChart.setWindow(Number(event.target.value)));

$("#product").addEventListener("change", (event) => {
  selectedProduct = event.target.value;
  renderSoon();
});

function renderMetric(entry) {
  if (entry.shown === entry.model.version) return;
  entry.shown = entry.model.version;
  const merchants = entry.model.merchants().sort();
  const specs = merchants.map((m) => ({key: m, label: shortId(m), stroke: merchantColour(m), kind: "line"}));
  entry.chart.update(specs, alignSeries(merchants.map((m) => entry.model.points.get(m))));
}

// ---- merchants legend ---------------------------------------------------------------------

let legendShown = "";
function renderLegend() {
  const merchants = new Set();
  for (const entry of metricCharts.values()) for (const m of entry.model.merchants()) merchants.add(m);
  for (const product of pricing.products.values()) for (const m of product.prices.keys()) merchants.add(m);
  const sorted = [...merchants].sort();
  const signature = sorted.join("\n");
  if (signature === legendShown) return;
  legendShown = signature;
  $("#merchants").innerHTML = sorted.length === 0 ? `<span class="muted">no merchants yet</span>` :
    sorted.map((m) => `<span class="mid" title="${escapeHtml(m)}"><i style="background:${merchantColour(m)}"></i>` +
                      `${escapeHtml(shortId(m))}</span>`).join("");
}

// ---- topics -------------------------------------------------------------------------------

const views = new TopicViews({list: $("#topic-list"), cards: $("#records"), onToggle: toggleTopic,
                               onVisible: renderSoon});

function topic(name) {
  let state = topics.get(name);
  if (state === undefined) {
    state = new TopicState(name);
    topics.set(name, state);
    views.ensure(state);
  }
  return state;
}

function toggleTopic(name, enabled) {
  topic(name).setEnabled(enabled);
  const ticked = [...topics.values()].filter((t) => t.enabled).map((t) => t.name);
  live.subscribe(ticked, ticked.length === topics.size);
  renderSoon();
}

// ---- messages -----------------------------------------------------------------------------

function received(message) {
  if (message.type === "history") {
    const state = topic(message.topic);
    if (!state.enabled) return;
    const envelopes = Array.isArray(message.messages) ? message.messages : [];
    state.history(envelopes);
    if (pricingRaw.has(message.topic)) {
      pricingRaw.set(message.topic, envelopes.slice(-MAX_POINTS));
      pricingRebuild = true;
    }
    const metric = metricCharts.get(message.topic);
    if (metric !== undefined) {
      metric.model.reset();
      for (const envelope of envelopes) metric.model.apply(envelope);
    }
  } else if (message.type === "message") {
    const state = topic(message.topic);
    if (!state.enabled) return;  // unticked: the server may not have seen the subscription yet
    const envelope = message.message;
    state.message(envelope);
    const raw = pricingRaw.get(message.topic);
    if (raw !== undefined) {
      raw.push(envelope);
      if (raw.length >= 2 * MAX_POINTS) raw.splice(0, raw.length - MAX_POINTS);  // in bulk: O(1) a message
      if (!pricingRebuild) pricing.apply(message.topic, envelope);
    }
    const metric = metricCharts.get(message.topic);
    if (metric !== undefined) metric.model.apply(envelope);
  } else if (message.type === "error") {
    showServerError(message.error);
    return;
  } else {
    return;
  }
  schedule();
}

function rebuildPricing() {
  pricing.reset();
  const all = [];
  for (const [name, envelopes] of pricingRaw) for (const envelope of envelopes.slice(-MAX_POINTS)) all.push([name, envelope]);
  all.sort((a, b) => a[1].timestamp - b[1].timestamp);  // stable: ties keep topic order
  for (const [name, envelope] of all) pricing.apply(name, envelope);
  pricingRebuild = false;
}

let errorTimer = null;
function showServerError(error) {
  const el = $("#server-error");
  el.textContent = `Server: ${error}`;
  el.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { el.hidden = true; }, 8000);
}

// ---- rendering: batched into animation frames, a little at a time ------------------------

// However fast messages come, the page redraws at a human pace, always inside an animation
// frame, and spreads the work: each frame runs at most one job (a chart, or two tables), so no
// frame is long even when the machine is busy. A job runs when it has something new and its
// interval has passed.
const jobs = [
  {name: "pricing", interval: 250, run: () => { if (pricingRebuild) rebuildPricing(); renderPricing(); }},
  ...[...metricCharts].map(([name, entry]) => ({name, interval: 250, run: () => renderMetric(entry)})),
  {name: "legend", interval: 500, run: renderLegend},
  {name: "counters", interval: 250, run: () => { for (const state of topics.values()) views.renderCounters(state); }},
  {name: "tables", interval: TABLE_INTERVAL_MS, run: () => views.renderTables(topics.values(), 2)},
].map((job) => ({...job, dirty: false, last: -Infinity}));
let frameRequested = false;
let timer = null;
let next = 0;              // round robin over the jobs
let renders = 0;

/** New data: every job may have something to show. */
function schedule() {
  for (const job of jobs) job.dirty = true;
  requestRender();
}

function requestRender() {
  if (frameRequested || timer !== null) return;
  frameRequested = true;
  requestAnimationFrame(render);
}

function render(now) {
  frameRequested = false;
  renders++;
  for (let i = 0; i < jobs.length; i++) {
    const job = jobs[(next + i) % jobs.length];
    if (job.dirty && now - job.last >= job.interval) {
      job.dirty = false;
      job.last = now;
      if (job.run() === false) {  // more left (tables): go on in the next frame
        job.dirty = true;
        job.last = -Infinity;
      }
      next = (next + i + 1) % jobs.length;
      break;
    }
  }
  let wait = Infinity;
  for (const job of jobs) if (job.dirty) wait = Math.min(wait, Math.max(0, job.interval - (now - job.last)));
  if (wait === 0) requestRender();
  else if (wait !== Infinity) timer = setTimeout(() => { timer = null; requestRender(); }, wait);
}

/** Something the user changed: show it in the next frames. */
function renderSoon() {
  for (const job of jobs) job.last = -Infinity;
  schedule();
}

// Once a second: rates, and the reconnect countdown.
setInterval(() => {
  const seconds = performance.now() / 1000;
  for (const state of topics.values()) state.sample(seconds);
  if (live.state === "reconnecting") showState(live);
  schedule();
}, 1000);

// ---- connection state ---------------------------------------------------------------------

function showState(client) {
  const el = $("#state");
  let text;
  switch (client.state) {
    case "open": text = `live · ${client.transport}`; break;
    case "authenticating": text = `authenticating · ${client.transport}`; break;
    case "reconnecting": {
      const seconds = Math.max(0, Math.ceil((client.retryAt - Date.now()) / 1000));
      text = seconds > 0 ? `reconnecting in ${seconds} s` : "reconnecting…";
      if (client.detail) text += ` · ${client.detail}`;
      break;
    }
    case "token-required": text = "token required"; break;
    case "unauthorized": text = `unauthorized: ${client.detail}`; break;
    default: text = "connecting…";
  }
  el.textContent = text;
  el.className = `state ${client.state}`;
  if (client.state === "open") $("#server-error").hidden = true;  // e.g. a refused token, now fixed
  el.dataset.transport = client.transport || "";
  const role = client.role;
  $("#role").textContent = role === null ? "" :
    role.role === "merchant" ? `merchant ${shortId(role.merchant_id)}` : String(role.role || "");
  $("#role").hidden = role === null;
  $("#access").textContent = client.access === "token" ?
    "Live data needs a token: the token above authenticates the live view too." :
    "Live data is open: no token needed to watch.";
  document.body.dataset.liveAccess = client.access;
}

const live = new LiveClient({onMessage: received, onState: showState});

// ---- token and export ---------------------------------------------------------------------

// The token lives in this input and in memory only: no URL, no storage, no cookie.
const tokenInput = $("#token");
const applyToken = () => live.setToken(tokenInput.value.trim());
tokenInput.addEventListener("change", applyToken);
tokenInput.addEventListener("keydown", (event) => { if (event.key === "Enter") applyToken(); });
$("#token-show").addEventListener("click", (event) => {
  const showing = tokenInput.type === "text";
  tokenInput.type = showing ? "password" : "text";
  event.currentTarget.textContent = showing ? "show" : "hide";
});

const exportPanel = new ExportPanel({
  tokenInput, topicSelect: $("#export-topic"), button: $("#export-run"), result: $("#export-result"),
  getToken: () => tokenInput.value.trim(),
});

fetch("topics", {cache: "no-store"})
  .then((response) => (response.ok ? response.json() : Promise.reject(new Error(String(response.status)))))
  .then((names) => {
    if (!Array.isArray(names)) return;
    exportPanel.setTopics(names);
    for (const name of names) topic(name);
    schedule();
  })
  .catch(() => exportPanel.setTopics([]));

// ---- debugging and tests ------------------------------------------------------------------

function chartState(chart) {
  return {points: chart.points, series: chart.specs.map((s) => s.key), counts: chart.counts, renders: chart.renders};
}

window.dashboard = {
  get state() { return live.state; },
  get transport() { return live.transport; },
  get role() { return live.role; },
  get access() { return live.access; },
  get renders() { return renders; },
  get product() { return selectedProduct; },
  topics() {
    const out = {};
    for (const [name, t] of topics) out[name] = {count: t.count, live: t.live, rate: t.rate, enabled: t.enabled};
    return out;
  },
  charts() {
    const out = {pricing: {...chartState(pricingChart), product: selectedProduct, products: pricing.productIds()}};
    for (const [name, entry] of metricCharts) out[name] = chartState(entry.chart);
    return out;
  },
};

live.start();
