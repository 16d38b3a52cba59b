// Per-topic views: the topic list (checkbox, count, rate) and a card per topic with its newest
// records as a compact table of fields, newest first.

import {clockTime, escapeHtml, formatRate, merchantColour, shortId} from "./util.js";

// Left out to keep the tables narrow (a row's tooltip lists every field): the record time has
// its own column, and these say little at a glance.
const HIDDEN_FIELDS = new Set(["signature", "timestamp", "uid", "shipping_time_standard", "shipping_time_prime", "prime"]);
const LONG_TEXT = 28;
const HEADERS = {offer_id: "offer", product_id: "product", merchant_id: "merchant", consumer_id: "consumer",
                 left_in_stock: "in stock", http_code: "HTTP", triggering_merchant_id: "by merchant"};

function cell(key, value) {
  if (value === null || value === undefined) return `<td class="none">—</td>`;
  if (key.endsWith("merchant_id")) {
    const id = String(value);
    return `<td><span class="mid" title="${escapeHtml(id)}"><i style="background:${merchantColour(id)}"></i>` +
           `${escapeHtml(shortId(id))}</span></td>`;
  }
  if (key.endsWith("_id") && typeof value === "string" && value.length > LONG_TEXT / 2) {
    return `<td class="id" title="${escapeHtml(value)}">${escapeHtml(shortId(value))}</td>`;
  }
  if (key === "http_code") {
    return `<td class="num${Number(value) === 200 ? "" : " bad"}">${escapeHtml(value)}</td>`;
  }
  if (Array.isArray(value)) {
    const noun = key === "offers" ? (value.length === 1 ? "offer" : "offers") : "items";
    return `<td class="num">${value.length} ${noun}</td>`;
  }
  if (typeof value === "number") return `<td class="num">${escapeHtml(value)}</td>`;
  if (typeof value === "boolean") return `<td class="bool">${value ? "yes" : "no"}</td>`;
  const text = typeof value === "object" ? JSON.stringify(value) : String(value);
  if (text.length > LONG_TEXT) {
    return `<td title="${escapeHtml(text)}">${escapeHtml(text.slice(0, LONG_TEXT - 1))}…</td>`;
  }
  return `<td>${escapeHtml(text)}</td>`;
}

/** Every field of a record, one per line, for the row's tooltip. */
function describe(envelope) {
  const value = envelope.value;
  const lines = [`partition ${envelope.partition}, offset ${envelope.offset}`];
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, field] of Object.entries(value)) {
      if (key === "signature") continue;
      const text = Array.isArray(field) ? `${field.length} items` : typeof field === "object" ? JSON.stringify(field) : String(field);
      lines.push(`${key}: ${text.length > 80 ? `${text.slice(0, 79)}…` : text}`);
    }
  } else {
    lines.push(JSON.stringify(value));
  }
  return lines.join("\n");
}

/** The table columns of some records: their fields in first-seen order, and whether any is not an object. */
function fieldsOf(records) {
  const columns = [];
  const seen = new Set();
  let scalar = false;
  for (const envelope of records) {
    const value = envelope.value;
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      scalar = true;
      continue;
    }
    for (const key of Object.keys(value)) {
      if (!seen.has(key) && !HIDDEN_FIELDS.has(key)) {
        seen.add(key);
        columns.push(key);
      }
    }
  }
  return {columns, scalar};
}

/** How many columns the records' table has (the time included). */
export function columnCount(rows) {
  if (rows.length === 0) return 0;
  const {columns, scalar} = fieldsOf(rows);
  return 1 + columns.length + (scalar ? 1 : 0);
}

/** The newest records of a topic as an HTML table (newest first), and its number of columns. */
export function recordsTable(rows) {
  if (rows.length === 0) return {html: `<p class="no-records">no records yet</p>`, columns: 0};
  const newestFirst = rows.slice().reverse();
  const {columns, scalar} = fieldsOf(newestFirst);
  const head = ["time", ...columns, ...(scalar ? ["value"] : [])]
    .map((name) => `<th title="${escapeHtml(name)}">${escapeHtml(HEADERS[name] || name.replace(/_/g, " "))}</th>`).join("");
  const body = newestFirst.map((envelope) => {
    const value = envelope.value;
    const isObject = value !== null && typeof value === "object" && !Array.isArray(value);
    const cells = columns.map((key) => cell(key, isObject ? value[key] : undefined)).join("");
    const extra = scalar ? cell("value", isObject ? undefined : value) : "";
    return `<tr title="${escapeHtml(describe(envelope))}"><td class="time">${clockTime(envelope.timestamp)}</td>` +
           `${cells}${extra}</tr>`;
  }).join("");
  return {html: `<table class="records"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`,
          columns: 1 + columns.length + (scalar ? 1 : 0)};
}

/** The topic list and the record cards, kept in configuration order. */
export class TopicViews {
  constructor({list, cards, onToggle, onVisible}) {
    this.list = list;
    this.cards = cards;
    this.onToggle = onToggle;
    this.views = new Map();
    // Tables off screen are not rebuilt (at 1,000 msg/s that is most of the page's work).
    this.observer = new IntersectionObserver((entries) => {
      let shown = false;
      for (const entry of entries) {
        const view = this.views.get(entry.target.dataset.topic);
        if (view === undefined) continue;
        view.visible = entry.isIntersecting;
        if (view.visible) view.counted = -1;  // its counters were left alone while off screen
        shown = shown || entry.isIntersecting;
      }
      if (shown) onVisible();
    }, {rootMargin: "200px"});
  }

  ensure(topic) {
    let view = this.views.get(topic.name);
    if (view !== undefined) return view;
    const row = document.createElement("label");
    row.className = "topic-row";
    row.dataset.topic = topic.name;
    row.innerHTML = `<input type="checkbox" checked><span class="name"></span>` +
                    `<span class="count num">0</span><span class="rate num">0.0/s</span>`;
    row.querySelector(".name").textContent = topic.name;
    row.title = topic.name;
    const checkbox = row.querySelector("input");
    checkbox.dataset.topic = topic.name;
    checkbox.addEventListener("change", () => this.onToggle(topic.name, checkbox.checked));
    this.list.appendChild(row);

    const card = document.createElement("section");
    card.className = "card records-card empty";
    card.dataset.topic = topic.name;
    card.innerHTML = `<header><h3></h3><span class="paused">paused</span>` +
                     `<span class="stats"><b class="count">0</b> msgs · <b class="rate">0.0</b>/s</span></header>` +
                     `<div class="table-wrap"><p class="no-records">no records yet</p></div>`;
    card.querySelector("h3").textContent = topic.name;
    card.querySelector("h3").title = topic.name;
    this.cards.appendChild(card);
    view = {
      row, checkbox, card, table: card.querySelector(".table-wrap"), visible: false,
      counted: -1, tabled: undefined, rowsSeen: -1, available: true,
      rowCount: row.querySelector(".count"), rowRate: row.querySelector(".rate"),
      cardCount: card.querySelector(".count"), cardRate: card.querySelector(".rate"),
    };
    this.views.set(topic.name, view);
    this.observer.observe(card);
    return view;
  }

  renderCounters(topic, available = true) {
    const view = this.ensure(topic);
    if (view.available !== available) {
      view.available = available;
      view.row.classList.toggle("unavailable", !available);
      view.card.classList.toggle("unavailable", !available);
      view.row.title = available ? topic.name : `${topic.name}: not visible to this viewer`;
    }
    if (view.counted === topic.version) return;
    view.counted = topic.version;
    const count = topic.count.toLocaleString();
    const rate = formatRate(topic.rate);
    view.rowCount.textContent = count;
    view.rowRate.textContent = `${rate}/s`;
    if (view.visible) {
      view.cardCount.textContent = count;
      view.cardRate.textContent = rate;
    }
    view.card.dataset.count = view.row.dataset.count = String(topic.count);
    // The card's size follows its records even before its table is drawn (it is drawn only
    // when on screen), so the page does not jump while scrolling.
    if (view.rowsSeen !== topic.rows.length) {
      view.rowsSeen = topic.rows.length;
      view.card.classList.toggle("empty", topic.rows.length === 0);
      view.card.classList.toggle("wide", columnCount(topic.rows) >= 5);  // two grid columns for wide records
      if (view.tabled === undefined && topic.rows.length > 0) {
        view.table.innerHTML = `<p class="no-records">…</p>`;  // drawn once on screen
      }
    }
    view.card.classList.toggle("disabled", !topic.enabled);
    view.row.classList.toggle("disabled", !topic.enabled);
    view.checkbox.checked = topic.enabled;
  }

  /** Rebuild at most `limit` visible tables with new records; false if more are waiting. */
  renderTables(topics, limit) {
    let done = 0;
    for (const topic of topics) {
      const view = this.ensure(topic);
      if (!view.visible || view.tabled === topic.rows.at(-1)) continue;
      if (done === limit) return false;
      this.renderTable(topic, view);
      done++;
    }
    return true;
  }

  renderTable(topic, view) {
    view.tabled = topic.rows.at(-1);  // the newest record shown
    view.table.innerHTML = recordsTable(topic.rows).html;
  }
}
