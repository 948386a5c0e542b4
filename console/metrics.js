// The Prometheus text that /metrics serves, parsed, and what the console
// charts computed from two scrapes of it: rates and histogram quantiles over
// the interval between them, as PromQL's rate() and histogram_quantile() do.

/** Samples by metric name: [{labels, value}]. */
export function parse(text) {
  const samples = new Map();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, name, value] of (match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[name] = value.replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
    }
    const value = Number(match[3]);
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value });
  }
  return samples;
}

/** The sum of a metric's samples whose labels pass `keep`, grouped by `by(labels)`. */
function sums(samples, name, by = () => '', keep = () => true) {
  const out = new Map();
  for (const { labels, value } of samples.get(name) ?? []) {
    if (!keep(labels)) continue;
    const group = by(labels);
    out.set(group, (out.get(group) ?? 0) + value);
  }
  return out;
}

/** Cumulative bucket counts of a histogram, by group: Map(group -> Map(le -> count)). */
function buckets(samples, name, by = () => '') {
  const out = new Map();
  for (const { labels, value } of samples.get(`${name}_bucket`) ?? []) {
    const group = by(labels);
    if (!out.has(group)) out.set(group, new Map());
    const counts = out.get(group);
    const le = labels.le === '+Inf' ? Infinity : Number(labels.le);
    counts.set(le, (counts.get(le) ?? 0) + value);
  }
  return out;
}

/**
 * The q-quantile of the observations that fell between two cumulative
 * bucket counts (Map le -> count), interpolated linearly inside its bucket;
 * null when nothing was observed. An answer in the +Inf bucket is the
 * largest finite bound.
 */
export function quantile(q, before, after) {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const counts = bounds.map((le) => after.get(le) - (before?.get(le) ?? 0));
  const total = counts[counts.length - 1] ?? 0;
  if (!(total > 0)) return null;
  const rank = q * total;
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] >= rank) {
      if (bounds[i] === Infinity) return bounds[i - 1] ?? null;
      const lower = i === 0 ? 0 : bounds[i - 1];
      const below = i === 0 ? 0 : counts[i - 1];
      const inside = counts[i] - below;
      return inside > 0 ? lower + ((bounds[i] - lower) * (rank - below)) / inside : bounds[i];
    }
  }
  return null;
}

const byRoute = (labels) => labels.route;
/** Routes whose requests wait on purpose: their durations are not latency. */
const WAITING = new Set(['/v1/watch', '/v1/changes']);

/**
 * What changed between two scrapes `seconds` apart:
 * - routes: {route: {rate, p50, p99}} (requests per second; seconds)
 * - cacheHitRate: hits / (hits + misses), null without reads
 * - groupWrites, groupKeys: mean writes and keys per commit group
 * - commitP99, syncP99: seconds, null without commits or syncs
 */
export function interval(before, after, seconds) {
  const delta = (name, by, keep) => {
    const was = sums(before, name, by, keep);
    const out = new Map();
    for (const [group, value] of sums(after, name, by, keep)) {
      // A restarted server counts from zero again: the new count is the delta.
      const change = value - (was.get(group) ?? 0);
      out.set(group, change >= 0 ? change : value);
    }
    return out;
  };
  const one = (name) => delta(name).get('') ?? 0;
  const q = (value, name, by) => {
    const was = buckets(before, name, by);
    const out = new Map();
    for (const [group, counts] of buckets(after, name, by)) {
      out.set(group, quantile(value, was.get(group), counts));
    }
    return out;
  };
  const routes = {};
  const rates = delta('kvstore_http_requests_total', byRoute);
  const latency = 'kvstore_http_request_duration_seconds';
  const p50 = q(0.5, latency, byRoute);
  const p99 = q(0.99, latency, byRoute);
  for (const [route, count] of rates) {
    routes[route] = {
      rate: count / seconds,
      p50: WAITING.has(route) ? null : (p50.get(route) ?? null),
      p99: WAITING.has(route) ? null : (p99.get(route) ?? null),
    };
  }
  const hits = one('kvstore_cache_hits_total');
  const misses = one('kvstore_cache_misses_total');
  const mean = (name) => {
    const count = one(`${name}_count`);
    return count > 0 ? one(`${name}_sum`) / count : null;
  };
  return {
    routes,
    cacheHitRate: hits + misses > 0 ? hits / (hits + misses) : null,
    groupWrites: mean('kvstore_commit_group_writes'),
    groupKeys: mean('kvstore_commit_group_keys'),
    commitP99: q(0.99, 'kvstore_commit_duration_seconds').get('') ?? null,
    syncP99: q(0.99, 'kvstore_background_sync_duration_seconds').get('') ?? null,
  };
}
