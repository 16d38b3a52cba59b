// Time charts on uPlot (vendored, global `uPlot`): one series per merchant, a shared look,
// a tooltip with every merchant's value at the cursor, and a size that follows the card.

import {clockTime, escapeHtml, formatNumber, shortId} from "./util.js";

const AXIS = {
  stroke: "#5b6472",
  font: "11px system-ui, sans-serif",
  grid: {stroke: "#edf0f4", width: 1},
  ticks: {stroke: "#dfe3e8", width: 1, size: 4},
};

/** The last defined value of ys at or before idx (a price holds until it changes). */
function valueAt(ys, idx) {
  for (let i = idx; i >= 0; i--) {
    const y = ys[i];
    if (y !== undefined) return y;
  }
  return undefined;
}

function tooltipPlugin(chart) {
  let tip;
  return {
    hooks: {
      init: (u) => {
        tip = document.createElement("div");
        tip.className = "chart-tip";
        tip.hidden = true;
        u.over.appendChild(tip);
        u.over.addEventListener("mouseleave", () => { tip.hidden = true; });
      },
      setCursor: (u) => {
        const idx = u.cursor.idx;
        if (idx === null || idx === undefined || u.data[0].length === 0) {
          tip.hidden = true;
          return;
        }
        const rows = [];
        for (let si = 1; si < u.series.length; si++) {
          const spec = chart.specs[si - 1];
          if (!u.series[si].show) continue;
          const y = spec.kind === "points" ? u.data[si][idx] : valueAt(u.data[si], idx);
          if (y === undefined || y === null) continue;
          rows.push(`<div><i style="background:${spec.stroke}"></i>${escapeHtml(spec.label)}` +
                    `<b>${escapeHtml(chart.format(y))}</b></div>`);
        }
        if (rows.length === 0) {
          tip.hidden = true;
          return;
        }
        tip.innerHTML = `<div class="tip-time">${clockTime(u.data[0][idx] * 1000)}</div>${rows.join("")}`;
        tip.hidden = false;
        const left = u.cursor.left, top = u.cursor.top;
        const flip = left > u.over.clientWidth * 0.6;
        tip.style.transform = `translate(${flip ? left - tip.offsetWidth - 12 : left + 12}px, ${Math.max(0, top - 20)}px)`;
      },
    },
  };
}

export class TimeChart {
  /**
   * el: the container; options.format(y) → text for the y axis and tooltip;
   * options.height in px.
   */
  constructor(el, {format = (y) => formatNumber(y), height = 220} = {}) {
    this.el = el;
    this.format = format;
    this.height = height;
    this.plot = null;
    this.windowSeconds = 0;   // 0: the whole x range of the data; else only its newest seconds
    this.signature = "";
    this.specs = [];
    this.points = 0;
    this.counts = {};
    this.renders = 0;
    this.empty = document.createElement("div");
    this.empty.className = "chart-empty";
    this.empty.textContent = "waiting for data…";
    el.appendChild(this.empty);
    this.measured = 0;  // the container's width, from the ResizeObserver (no layout reads while drawing)
    this.resizer = new ResizeObserver((entries) => {
      this.measured = entries[entries.length - 1].contentRect.width;
      this.resize();
    });
    this.resizer.observe(el);
  }

  /** Show only the newest `seconds` of data (0: all of it). */
  setWindow(seconds) {
    this.windowSeconds = seconds;
    if (this.plot !== null) this.plot.setData(this.plot.data);
  }

  width() {
    return Math.max(200, Math.floor(this.measured || this.el.clientWidth));
  }

  resize() {
    if (this.plot && this.plot.width !== this.width()) this.plot.setSize({width: this.width(), height: this.height});
  }

  /**
   * specs: [{key, label, stroke, kind: "line" | "step" | "points"}], one per y array in data;
   * data: uPlot's aligned [xs, ys1, ys2, ...]. A new set of series builds a new plot.
   */
  update(specs, data) {
    const signature = specs.map((s) => `${s.key}:${s.kind}`).join("|");
    if (signature !== this.signature || this.plot === null) {
      if (this.plot !== null) this.plot.destroy();
      this.specs = specs;
      this.signature = signature;
      this.plot = new uPlot(this.options(specs), data, this.el);
    } else {
      this.plot.setData(data);
    }
    let points = 0;
    const counts = {};
    for (let i = 1; i < data.length; i++) {
      let n = 0;
      for (const y of data[i]) if (y !== undefined && y !== null) n++;
      counts[specs[i - 1].key] = n;
      points += n;
    }
    this.points = points;
    this.counts = counts;
    this.renders++;
    if (this.el.dataset.points !== String(points)) this.el.dataset.points = String(points);
    if (this.empty.hidden !== points > 0) this.empty.hidden = points > 0;
  }

  xRange(min, max) {
    if (min === null || max === null) return [min, max];
    if (this.windowSeconds > 0) min = Math.max(min, max - this.windowSeconds);
    return min === max ? [min - 1, max + 1] : [min, max];
  }

  options(specs) {
    const format = this.format;
    return {
      width: this.width(),
      height: this.height,
      legend: {show: false},
      cursor: {drag: {x: false, y: false}, points: {size: 7}},
      scales: {x: {time: true, range: (u, min, max) => this.xRange(min, max)}},
      axes: [
        // HH:MM:SS labels need more room than HH:MM ones.
        {...AXIS, values: timeTicks, space: (u, axis, min, max, dim) => (max - min) / dim * 80 < 60 ? 80 : 50},
        {...AXIS, size: 58, values: (u, ticks) => ticks.map((v) => format(v))},
      ],
      series: [
        {},
        ...specs.map((spec) => seriesOptions(spec)),
      ],
      plugins: [tooltipPlugin(this)],
    };
  }
}

const pad = (n) => String(n).padStart(2, "0");

/** Local 24-hour time ticks: seconds when the ticks are less than a minute apart, a date past a day. */
function timeTicks(u, splits, axisIdx, space, increment) {
  return splits.map((seconds) => {
    const d = new Date(seconds * 1000);
    const time = increment < 60 ? `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
      : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return increment >= 86400 ? d.toLocaleDateString() : time;
  });
}

const SQUARE = 6;

/**
 * Points as small squares in one path: far cheaper to draw than circles when a busy market has
 * thousands of sales on screen.
 */
function squares(u, seriesIdx, idx0, idx1) {
  const xs = u.data[0], ys = u.data[seriesIdx], scale = u.series[seriesIdx].scale;
  const size = SQUARE * devicePixelRatio, half = size / 2;
  const fill = new Path2D();
  for (let i = idx0; i <= idx1; i++) {
    const y = ys[i];
    if (y === null || y === undefined) continue;
    fill.rect(Math.round(u.valToPos(xs[i], "x", true) - half), Math.round(u.valToPos(y, scale, true) - half), size, size);
  }
  const {left, top, width, height} = u.bbox;
  const clip = new Path2D();
  clip.rect(left - size, top - size, width + 2 * size, height + 2 * size);
  return {stroke: null, fill, clip, flags: 3};
}

function seriesOptions(spec) {
  const base = {label: spec.label, stroke: spec.stroke, width: 1.75};
  if (spec.kind === "points") {
    return {...base, paths: () => null, width: 0,
            points: {show: true, size: SQUARE, width: 0, fill: spec.stroke, paths: squares}};
  }
  if (spec.kind === "step") {
    return {...base, paths: uPlot.paths.stepped({align: 1}), points: {show: false}};
  }
  return {...base, points: {show: true, size: 4, fill: spec.stroke, width: 0}};
}

/** Aligned uPlot data from named series {xs, ys}, in the order of keys. */
export function alignSeries(seriesList) {
  if (seriesList.length === 0) return [[]];
  return uPlot.join(seriesList.map((s) => [s.xs, s.ys]));
}

export const merchantLabel = (id) => shortId(id);
