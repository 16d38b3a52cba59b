// The market dashboard: wires the live connection to the models, and renders the charts,
// counters and tables once per animation frame, whatever the message rate.

import {alignSeries, TimeChart} from "./charts.js";
import {ExportPanel} from "./export.js";
import {LiveClient} from "./live.js";
import {MAX_POINTS, MetricModel, PricingModel, TopicState} from "./model.js";
import {TopicViews} from "./tables.js";
import {escapeHtml, formatNumber, merchantColour, shortId} from "./util.js";

const TABLE_INTERVAL_MS = 1000;  // tables are for reading: one update a second is plenty
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
const NO_POINTS = {xs: [], ys: []};
for (const entry of metricCharts.values()) {
  entry.chart = new TimeChart($(entry.el), {format: entry.format, height: 200});
  entry.shown = -1;
}

function pricingKey() {
  const product = selectedProduct === null ? undefined : pricing.products.get(selectedProduct);
  return `${pricing.version}/${selectedProduct}/${product ? product.version : 0}/${pricing.products.size}`;
}

function pricingPending() {
  return pricingRebuild || pricingKey() !== pricingShown;
}

function renderPricing() {
  updateProductPicker();
  const key = pricingKey();
  if (key === pricingShown) return;
  pricingShown = key;
  const product = selectedProduct === null ? undefined : pricing.products.get(selectedProduct);
  // A price and a sales series for every merchant of any product: the chart keeps its series
  // (and is not rebuilt) when a merchant's first sale comes in, or another product is picked.
  const specs = [], series = [];
  if (product !== undefined) {
    const merchants = new Set();
    for (const p of pricing.products.values()) for (const m of [...p.prices.keys(), ...p.sales.keys()]) merchants.add(m);
    for (const merchant of [...merchants].sort()) {
      const colour = merchantColour(merchant);
      specs.push({key: `price:${merchant}`, label: `${shortId(merchant)} price`, stroke: colour, kind: "step"});
      series.push(product.prices.get(merchant) || NO_POINTS);
      specs.push({key: `sale:${merchant}`, label: `${shortId(merchant)} sale`, stroke: colour, kind: "points"});
      series.push(product.sales.get(merchant) || NO_POINTS);
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

// The topics this session has had a history of: what the server shows this viewer (a merchant
// may see fewer than GET /topics lists). A subscription names only those.
const sessionTopics = new Set();
let resubscribing = false;

function toggleTopic(name, enabled) {
  topic(name).setEnabled(enabled);
  subscribe();
  renderSoon();
}

function subscribe() {
  resubscribing = false;
  const ticked = [...topics.values()].filter((t) => t.enabled && sessionTopics.has(t.name)).map((t) => t.name);
  if (sessionTopics.size > 0) live.subscribe(ticked);
}

// ---- messages -----------------------------------------------------------------------------

function received(message) {
  if (message.type === "history") {
    const state = topic(message.topic);
    sessionTopics.add(message.topic);
    if (!state.enabled) {
      // A new session sends every topic: tell it again which ones are ticked (once).
      resubscribing = true;  // once its histories are all in (see drainInbox)
      return;
    }
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

// Messages wait in a queue and are decoded and applied in short tasks (at most INBOX_BUDGET_MS
// each), so a burst of thousands never holds the main thread for long.
const INBOX_BUDGET_MS = 6;
const inbox = [];
let inboxHead = 0;
let draining = false;
const inboxChannel = new MessageChannel();
inboxChannel.port1.onmessage = drainInbox;

function enqueue(item) {
  inbox.push(item);
  if (!draining) {
    draining = true;
    inboxChannel.port2.postMessage(0);
  }
}

function drainInbox() {
  const deadline = performance.now() + INBOX_BUDGET_MS;
  while (inboxHead < inbox.length) {
    const item = inbox[inboxHead++];
    let message = item;
    if (typeof item === "string") {
      try {
        message = JSON.parse(item);
      } catch (error) {
        continue;
      }
    }
    received(message);
    if (performance.now() >= deadline) break;
  }
  if (inboxHead < inbox.length) {
    if (inboxHead > 4096) {
      inbox.splice(0, inboxHead);
      inboxHead = 0;
    }
    inboxChannel.port2.postMessage(0);  // the rest in the next task
  } else {
    inbox.length = inboxHead = 0;
    draining = false;
    if (resubscribing) subscribe();
  }
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
// frame, and spreads the work: each frame runs at most one job that draws (a chart, the
// counters or a table), so no frame is long. A job runs when it has something new and its
// interval has passed; a job that turns out slow (a busy machine) waits longer, up to ten times
// its own cost, so that no job takes more than a tenth of the main thread. Its cost is the time
// until the next frame starts: the drawing in script, and the style, layout and raster it causes.
const BUDGET = 10;
const FRAME_MS = 1000 / 60;
const jobs = [
  {name: "pricing", interval: 250, pending: pricingPending, run: () => { if (pricingRebuild) rebuildPricing(); renderPricing(); }},
  ...[...metricCharts].map(([name, entry]) => ({name, interval: 250, pending: () => entry.shown !== entry.model.version,
                                                run: () => renderMetric(entry)})),
  {name: "legend", interval: 500, run: renderLegend},
  {name: "counters", interval: 250, run: () => {
    // A topic the server sent no history of in this session is not visible to this viewer.
    const known = live.state === "open" && sessionTopics.size > 0;
    for (const state of topics.values()) views.renderCounters(state, !known || sessionTopics.has(state.name));
  }},
  {name: "tables", interval: TABLE_INTERVAL_MS, run: () => views.renderTables(topics.values(), 1)},
].map((job) => ({pending: () => true, ...job, dirty: false, last: -Infinity, cost: 0}));
let frameRequested = false;
let timer = null;
let next = 0;              // round robin over the jobs
let renders = 0;
let measuring = null;      // {job, started}: the job run in the previous frame

const intervalOf = (job) => Math.max(job.interval, Math.min(job.cost * BUDGET, 3 * job.interval));

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
  if (measuring !== null) {
    const {job, started} = measuring;
    measuring = null;
    job.cost = 0.7 * job.cost + 0.3 * Math.max(0, performance.now() - started - FRAME_MS);
  }
  for (let i = 0; i < jobs.length; i++) {
    const job = jobs[(next + i) % jobs.length];
    if (!job.dirty || now - job.last < intervalOf(job)) continue;
    job.dirty = false;
    if (!job.pending()) continue;  // nothing new for it after all: try the next one
    job.last = now;
    const started = performance.now();
    if (job.run() === false) {  // more left (tables): go on in the next frame
      job.dirty = true;
      job.last = -Infinity;
    }
    measuring = {job, started};
    next = (next + i + 1) % jobs.length;
    break;
  }
  if (measuring !== null) {  // the next frame tells what this one cost
    requestRender();
    return;
  }
  let wait = Infinity;
  for (const job of jobs) if (job.dirty) wait = Math.min(wait, Math.max(0, intervalOf(job) - (now - job.last)));
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
  if (client.state !== "open") sessionTopics.clear();  // the next session says again what it shows
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

const live = new LiveClient({onData: enqueue, onMessage: received, onState: showState});

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
