// The server panel: /metrics scraped every second while the panel is shown,
// charted over the last two minutes.

import { call } from './api.js';
import { el, fill, duration } from './dom.js';
import { LineChart } from './chart.js';
import { parse, interval } from './metrics.js';

const EVERY_MS = 1000;
const POINTS = 120;

const perSecond = (v) => (v === null || v === undefined ? '–' : `${v >= 100 ? v.toFixed(0) : v.toFixed(1)}/s`);
const percent = (v) => (v === null || v === undefined ? '–' : `${(v * 100).toFixed(0)} %`);
const count = (v) => (v === null || v === undefined ? '–' : v.toFixed(1));

export class ServerPanel {
  constructor(node) {
    this.node = node;
    this.status = el('p', { class: 'status' }, 'Not started.');
    this.charts = {
      rate: new LineChart('Requests per second, by route', perSecond, POINTS),
      p50: new LineChart('p50 latency, by route', duration, POINTS),
      p99: new LineChart('p99 latency, by route', duration, POINTS),
      cache: new LineChart('Cache hit rate', percent, POINTS),
      group: new LineChart('Commit group size (mean per commit)', count, POINTS),
      sync: new LineChart('Commit and sync latency (p99)', duration, POINTS),
    };
    fill(
      node,
      el('h2', {}, 'Server'),
      el('p', { class: 'hint' }, 'From /metrics, once a second: rates and quantiles over each second (latency from the histogram buckets; watch and changes requests wait on purpose and are left out of latency).'),
      this.status,
      el('div', { class: 'charts' }, Object.values(this.charts).map((c) => c.node)),
    );
    this.timer = null;
    this.last = null;
  }

  start() {
    if (this.timer !== null) return;
    this.scrape();
    this.timer = setInterval(() => this.scrape(), EVERY_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.last = null;
  }

  async scrape() {
    let text;
    const at = performance.now();
    try {
      text = await (await call('GET', 'metrics')).text();
    } catch (err) {
      this.status.textContent = `Cannot read /metrics: ${err}`;
      this.status.className = 'status error';
      this.last = null;
      return;
    }
    const samples = parse(text);
    if (this.last) {
      const seconds = (at - this.last.at) / 1000;
      this.show(interval(this.last.samples, samples, seconds));
    }
    this.last = { at, samples };
  }

  show(now) {
    const routes = Object.entries(now.routes);
    const pick = (field) => Object.fromEntries(routes.map(([route, r]) => [route, r[field]]));
    this.charts.rate.push(pick('rate'));
    this.charts.p50.push(pick('p50'));
    this.charts.p99.push(pick('p99'));
    this.charts.cache.push({ 'hit rate': now.cacheHitRate });
    this.charts.group.push({ writes: now.groupWrites, keys: now.groupKeys });
    this.charts.sync.push({ commit: now.commitP99, sync: now.syncP99 });
    const total = routes.reduce((sum, [, r]) => sum + r.rate, 0);
    this.status.textContent = `Live: ${perSecond(total)} in all, as of ${new Date().toLocaleTimeString()}.`;
    this.status.className = 'status';
  }
}
