// Small helpers shared by the dashboard modules: merchant labels and colours, formatting.

export const SHORT_ID_LENGTH = 8;

/** A merchant id as the dashboard shows it: its first 8 characters. */
export function shortId(id) {
  return id === undefined || id === null ? "—" : String(id).slice(0, SHORT_ID_LENGTH);
}

const colours = new Map();

/** The colour of a merchant in every chart and table: a hue from a hash (FNV-1a) of its id. */
export function merchantColour(id) {
  const key = String(id);
  let colour = colours.get(key);
  if (colour === undefined) {
    let hash = 0x811c9dc5;
    for (let i = 0; i < key.length; i++) {
      hash ^= key.charCodeAt(i);
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    const hue = hash % 360;
    // Yellows and greens look washed out at the lightness that suits blues and reds.
    const lightness = hue > 40 && hue < 170 ? 36 : 46;
    colour = `hsl(${hue}, ${62 + (hash >>> 9) % 18}%, ${lightness}%)`;
    colours.set(key, colour);
  }
  return colour;
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** Epoch milliseconds as local wall-clock time, HH:MM:SS.mmm. */
export function clockTime(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

const ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** A number for axes and tooltips: thousands separators, at most two decimals. */
const numberFormats = new Map();

export function formatNumber(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  let format = numberFormats.get(digits);
  if (format === undefined) {
    format = new Intl.NumberFormat(undefined, {maximumFractionDigits: digits});
    numberFormats.set(digits, format);
  }
  return format.format(value);
}

export function formatRate(rate) {
  if (rate >= 100) return Math.round(rate).toLocaleString();
  if (rate >= 10) return rate.toFixed(0);
  return rate.toFixed(1);
}
