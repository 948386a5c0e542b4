// A small SVG line chart: a few series over the same moments, redrawn whole
// on each update. Hand-drawn rather than a vendored library: the console
// needs polylines, two axis labels and a legend, which is less code than a
// library's options, and adds no bytes or licence to the binary.

import { el, svg, fill } from './dom.js';

const WIDTH = 320;
const HEIGHT = 120;
const LEFT = 4;
const TOP = 14;
const COLOURS = 8;

export class LineChart {
  /** `format(value)` writes an axis value ("12 ms"); `length` is the points kept. */
  constructor(title, format, length) {
    this.format = format;
    this.length = length;
    this.series = new Map();
    this.plot = svg('svg', {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: 'img',
      'aria-label': title,
      preserveAspectRatio: 'none',
    });
    this.legend = el('ul', { class: 'legend' });
    this.node = el('figure', { class: 'chart' }, el('figcaption', {}, title), this.plot, this.legend);
  }

  /** Adds one moment: values by series name (a missing or null value is a gap). */
  push(values) {
    for (const name of Object.keys(values)) {
      if (!this.series.has(name)) this.series.set(name, []);
    }
    for (const [name, points] of this.series) {
      points.push(values[name] ?? null);
      while (points.length > this.length) points.shift();
    }
    // A series with nothing left in the window is dropped.
    for (const [name, points] of this.series) {
      if (points.every((p) => p === null)) this.series.delete(name);
    }
    this.draw();
  }

  draw() {
    const all = [...this.series.values()].flat().filter((v) => v !== null);
    const top = niceCeiling(Math.max(0, ...all));
    const x = (i) => LEFT + ((WIDTH - LEFT) * i) / Math.max(1, this.length - 1);
    const y = (v) => HEIGHT - 2 - ((HEIGHT - TOP - 2) * v) / (top || 1);
    const lines = [];
    const names = [...this.series.keys()].sort();
    names.forEach((name, index) => {
      const points = this.series.get(name);
      const offset = this.length - points.length;
      // Gaps split a series into runs, each one polyline.
      let run = [];
      const flush = () => {
        if (run.length > 0) {
          lines.push(svg('polyline', { class: `line c${index % COLOURS}`, points: run.join(' '), 'data-series': name }));
        }
        run = [];
      };
      points.forEach((v, i) => (v === null ? flush() : run.push(`${x(offset + i).toFixed(1)},${y(v).toFixed(1)}`)));
      flush();
    });
    fill(
      this.plot,
      svg('line', { class: 'axis', x1: LEFT, x2: WIDTH, y1: HEIGHT - 2, y2: HEIGHT - 2 }),
      svg('line', { class: 'grid', x1: LEFT, x2: WIDTH, y1: TOP, y2: TOP }),
      svg('text', { class: 'tick', x: LEFT, y: TOP - 3 }, this.format(top)),
      lines,
    );
    fill(
      this.legend,
      names.map((name, index) => {
        const points = this.series.get(name);
        const last = points.findLast((v) => v !== null);
        return el('li', { class: `c${index % COLOURS}` }, el('span', { class: 'swatch' }), `${name} `, el('b', {}, this.format(last)));
      }),
    );
  }
}

/** The smallest of 1, 2, 2.5 and 5 times a power of ten at or above `v`. */
export function niceCeiling(v) {
  if (!(v > 0)) return 0;
  const power = 10 ** Math.floor(Math.log10(v));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= v) return step * power;
  }
  return 10 * power;
}
