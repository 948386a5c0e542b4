// Unit tests of the console's modules that need no page: the Prometheus
// parser and quantiles, and the event-stream reader.
//   node --test tests/console/

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parse, quantile, interval } from '../../console/metrics.js';
import { messages } from '../../console/sse.js';

const scrape = (requests, buckets) => parse(`# HELP kvstore_http_requests_total HTTP requests answered.
# TYPE kvstore_http_requests_total counter
kvstore_http_requests_total{route="/v1/kv/{key}",method="GET",status="200"} ${requests}
kvstore_http_requests_total{route="/v1/kv/{key}",method="PUT",status="201"} 10
kvstore_http_requests_total{route="/v1/watch",method="GET",status="200"} 1
kvstore_http_request_duration_seconds_bucket{route="/v1/kv/{key}",method="GET",le="0.001"} ${buckets[0]}
kvstore_http_request_duration_seconds_bucket{route="/v1/kv/{key}",method="GET",le="0.01"} ${buckets[1]}
kvstore_http_request_duration_seconds_bucket{route="/v1/kv/{key}",method="GET",le="+Inf"} ${buckets[2]}
kvstore_cache_hits_total ${requests}
kvstore_cache_misses_total 0
kvstore_commit_group_writes_sum 30
kvstore_commit_group_writes_count 10
`);

test('labels with escapes and several samples per name', () => {
  const samples = parse('m{a="x\\"y",b="1"} 2\nm{a="z"} 3.5\n# c\n\nn 1e3\n');
  assert.deepEqual(samples.get('m'), [
    { labels: { a: 'x"y', b: '1' }, value: 2 },
    { labels: { a: 'z' }, value: 3.5 },
  ]);
  assert.equal(samples.get('n')[0].value, 1000);
});

test('quantiles interpolate inside their bucket, as histogram_quantile', () => {
  const after = new Map([[0.001, 50], [0.01, 100], [Infinity, 100]]);
  assert.equal(quantile(0.5, null, after), 0.001);
  assert.ok(Math.abs(quantile(0.75, null, after) - 0.0055) < 1e-12);
  // Only what fell between the two scrapes counts.
  const before = new Map([[0.001, 50], [0.01, 50], [Infinity, 50]]);
  assert.ok(quantile(0.5, before, after) > 0.001);
  // In the +Inf bucket: the largest finite bound.
  assert.equal(quantile(0.99, null, new Map([[0.001, 0], [Infinity, 4]])), 0.001);
  assert.equal(quantile(0.5, after, after), null);
});

test('an interval: rates by route, latency without the watch, cache, groups', () => {
  const now = interval(scrape(100, [0, 0, 0]), scrape(300, [100, 200, 200]), 2);
  assert.equal(now.routes['/v1/kv/{key}'].rate, 100);
  assert.ok(now.routes['/v1/kv/{key}'].p99 > 0.001 && now.routes['/v1/kv/{key}'].p99 <= 0.01);
  assert.equal(now.routes['/v1/watch'].p99, null);
  assert.equal(now.cacheHitRate, 1);
  // Counters that did not move: no commits in the interval.
  assert.equal(now.groupWrites, null);
  // A restarted server counts from zero: its new counts (40 GETs, 10 PUTs)
  // are the interval's.
  assert.equal(interval(scrape(500, [0, 0, 0]), scrape(40, [0, 0, 0]), 1).routes['/v1/kv/{key}'].rate, 50);
});

function stream(...chunks) {
  return new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
      controller.close();
    },
  });
}

test('event-stream messages split anywhere, comments and CRLF', async () => {
  const got = [];
  for await (const m of messages(stream(': keep-alive\n\nid: 2\nevent: ch', 'ange\r\ndata: {"a":\ndata: 1}\n', '\nevent: progress\ndata: {"revision":9}\n\n'))) got.push(m);
  assert.deepEqual(got, [
    { event: 'change', data: '{"a":\n1}', id: '2' },
    { event: 'progress', data: '{"revision":9}', id: null },
  ]);
});
