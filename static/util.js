// Small helpers shared by the dashboard modules: merchant labels and colours, formatting.

export const SHORT_ID_LENGTH = 8;

/** A merchant id as the dashboard shows it: its first 8 characters. */
export function shortId(id) {
  return id === undefined || id === null ? "—" : String(id).slice(0, SHORT_ID_LENGTH);
}

// Ten colours that stay apart from each other on white.
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
                 "#92400e", "#475569"];
const colours = new Map();
const taken = new Set();

function hash(text) {
  let h = 0x811c9dc5;  // FNV-1a
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/**
 * The colour of a merchant in every chart, legend and table. A hash of the id picks it from the
 * palette; if another merchant already has that colour, the next free one (while there is one).
 * Once given, a merchant's colour does not change.
 */
export function merchantColour(id) {
  const key = String(id);
  let colour = colours.get(key);
  if (colour === undefined) {
    const start = hash(key) % PALETTE.length;
    colour = PALETTE[start];
    for (let i = 0; i < PALETTE.length; i++) {
      const candidate = PALETTE[(start + i) % PALETTE.length];
      if (!taken.has(candidate)) {
        colour = candidate;
        break;
      }
    }
    taken.add(colour);
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
