// What the dashboard knows: per-topic counters and newest records, and the chart series.
// Times are the Kafka record time of each message (the envelope's `timestamp`, epoch ms),
// everywhere: tables, rates and chart x values (uPlot wants seconds).

export const MAX_POINTS = 2000;   // kept per series
export const TABLE_ROWS = 15;     // newest records shown per topic
const RATE_WINDOW = 5;            // seconds the msg/s rate averages over

/** One topic: whether it is ticked, how many records arrived, the rate, the newest records. */
export class TopicState {
  constructor(name) {
    this.name = name;
    this.enabled = true;
    this.count = 0;        // records since the last history (the history included)
    this.live = 0;         // live records ever, for the rate
    this.rate = 0;
    this.rows = [];        // newest last, at most TABLE_ROWS
    this.samples = [];     // [seconds, live] once a second, for the rate
    this.version = 0;      // bumped on every change the page should show
  }

  history(envelopes) {
    this.count = envelopes.length;
    this.rows = envelopes.slice(-TABLE_ROWS);
    this.version++;
  }

  message(envelope) {
    this.count++;
    this.live++;
    this.rows.push(envelope);
    if (this.rows.length > TABLE_ROWS) this.rows.shift();
    this.version++;
  }

  /** Ticked or unticked: an unticked topic receives nothing, so its rate is 0 at once. */
  setEnabled(enabled) {
    this.enabled = enabled;
    this.samples = [];
    this.rate = 0;
    this.version++;
  }

  /** Called once a second: the rate over the last few seconds of live records. */
  sample(nowSeconds) {
    if (!this.enabled) return;
    this.samples.push([nowSeconds, this.live]);
    while (this.samples.length > RATE_WINDOW + 1) this.samples.shift();
    const [t0, n0] = this.samples[0];
    const rate = nowSeconds > t0 ? (this.live - n0) / (nowSeconds - t0) : 0;
    if (rate !== this.rate) {
      this.rate = rate;
      this.version++;
    }
  }
}

/**
 * Named series of (x, y) points, each capped at MAX_POINTS (the oldest go first). The arrays
 * are trimmed in bulk once they hold twice the cap, so adding a point stays O(1) when a series
 * is full; get() shows only the newest `cap` points.
 */
export class SeriesSet {
  constructor(cap = MAX_POINTS) {
    this.cap = cap;
    this.series = new Map();
  }

  add(key, x, y) {
    let s = this.series.get(key);
    if (s === undefined) {
      s = {xs: [], ys: []};
      this.series.set(key, s);
    }
    s.xs.push(x);
    s.ys.push(y);
    if (s.xs.length >= 2 * this.cap) {
      s.xs.splice(0, s.xs.length - this.cap);
      s.ys.splice(0, s.ys.length - this.cap);
    }
  }

  clear() {
    this.series.clear();
  }

  keys() {
    return [...this.series.keys()];
  }

  /** The newest `cap` points of a series, {xs, ys}; undefined if it has none. */
  get(key) {
    const s = this.series.get(key);
    if (s === undefined || s.xs.length <= this.cap) return s;
    return {xs: s.xs.slice(-this.cap), ys: s.ys.slice(-this.cap)};
  }
}

const numeric = (value) => (typeof value === "number" ? value : value === null || value === undefined || value === "" ? NaN : Number(value));

/** One number per merchant and record (profit, revenue, market share) as a series per merchant. */
export class MetricModel {
  constructor(field) {
    this.field = field;
    this.points = new SeriesSet();
    this.version = 0;
  }

  reset() {
    this.points.clear();
    this.version++;
  }

  apply(envelope) {
    const value = envelope.value;
    if (value === null || typeof value !== "object") return;
    const y = numeric(value[this.field]);
    if (value.merchant_id === undefined || !Number.isFinite(y)) return;
    this.points.add(String(value.merchant_id), envelope.timestamp / 1000, y);
    this.version++;
  }

  merchants() {
    return this.points.keys();
  }
}

/**
 * The pricing interaction per product: each merchant's best (lowest) offer price over time,
 * from marketSituation snapshots and successful addOffer/updateOffer events, and its sales
 * (buyOffer with http_code 200) as points.
 */
export class PricingModel {
  static TOPICS = ["marketSituation", "addOffer", "updateOffer", "buyOffer"];

  constructor() {
    this.products = new Map();
    this.version = 0;  // bumped when everything is rebuilt; each product has its own
  }

  reset() {
    this.products.clear();
    this.version++;
  }

  product(id) {
    const key = String(id);
    let product = this.products.get(key);
    if (product === undefined) {
      product = {id: key, offers: new Map(), best: new Map(), prices: new SeriesSet(), sales: new SeriesSet(), version: 0};
      this.products.set(key, product);
    }
    return product;
  }

  productIds() {
    return [...this.products.keys()].sort((a, b) => (Number(a) - Number(b)) || a.localeCompare(b));
  }

  apply(topic, envelope) {
    const value = envelope.value;
    if (value === null || typeof value !== "object") return;
    const t = envelope.timestamp / 1000;
    if (topic === "marketSituation") this.snapshot(value, t);
    else if (topic === "buyOffer") this.sale(value, t);
    else this.offer(value, t);
  }

  snapshot(value, t) {
    const offers = Array.isArray(value.offers) ? value.offers : [];
    const productId = value.product_id ?? offers.find((o) => o && o.product_id !== undefined)?.product_id;
    if (productId === undefined) return;
    const product = this.product(productId);
    const merchants = new Set(product.best.keys());
    product.offers = new Map();
    offers.forEach((offer, i) => {
      if (offer === null || typeof offer !== "object" || offer.merchant_id === undefined) return;
      const price = numeric(offer.price);
      if (!Number.isFinite(price)) return;
      const merchant = String(offer.merchant_id);
      product.offers.set(offer.offer_id ?? `${merchant}#${i}`, {merchant, price});
      merchants.add(merchant);
    });
    for (const merchant of merchants) this.record(product, merchant, t);
  }

  offer(value, t) {
    if (value.http_code !== undefined && Number(value.http_code) !== 200) return;  // the price did not change
    const price = numeric(value.price);
    if (value.product_id === undefined || value.merchant_id === undefined || !Number.isFinite(price)) return;
    const product = this.product(value.product_id);
    const merchant = String(value.merchant_id);
    product.offers.set(value.offer_id ?? `${merchant}#event`, {merchant, price});
    this.record(product, merchant, t);
  }

  sale(value, t) {
    if (Number(value.http_code) !== 200) return;
    const price = numeric(value.price);
    if (value.product_id === undefined || value.merchant_id === undefined || !Number.isFinite(price)) return;
    const product = this.product(value.product_id);
    const merchant = String(value.merchant_id);
    product.sales.add(merchant, t, price);
    product.version++;
    if (Number(value.left_in_stock) === 0 && value.offer_id !== undefined && product.offers.delete(value.offer_id)) {
      this.record(product, merchant, t);  // sold out: the merchant's best price may have gone up, or away
    }
  }

  /** A point at the merchant's current best price for the product; a gap once it has no offer. */
  record(product, merchant, t) {
    let best = Infinity;
    for (const offer of product.offers.values()) if (offer.merchant === merchant && offer.price < best) best = offer.price;
    if (best === Infinity) {
      if (!product.best.has(merchant)) return;
      product.best.delete(merchant);
      product.prices.add(merchant, t, null);
    } else {
      product.best.set(merchant, best);
      product.prices.add(merchant, t, best);
    }
    product.version++;
  }
}
