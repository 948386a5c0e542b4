// The web console in a real browser (Debian's chromium through
// playwright-core), against running kvstore servers:
//
//   node console.mjs --open URL --auth URL [--screenshots DIR]
//
// --open is a server without tokens; --auth one with the token file of
// tests/it/auth.rs (admin-token: everything; reader-token: reads users/
// only), which may speak HTTPS with a certificate of a test CA
// (the browser is told to accept it). Changes "made by another client" are made with curl.
// Prints one line per scenario, the measured numbers, and
// "N passed, N failed"; exits 1 when a scenario failed.

import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: options } = parseArgs({
  options: {
    open: { type: 'string' },
    auth: { type: 'string' },
    screenshots: { type: 'string' },
    chromium: { type: 'string', default: process.env.KVSTORE_TEST_CHROMIUM ?? '/usr/bin/chromium' },
  },
});
if (!options.open || !options.auth) {
  console.error('usage: node console.mjs --open URL --auth URL [--screenshots DIR]');
  process.exit(2);
}
const OPEN = options.open.replace(/\/$/, '');
const AUTH = options.auth.replace(/\/$/, '');
/** Every wait of a scenario: a console that does not get there fails. */
const WAIT_MS = 20_000;

// ---- HTTP from outside the browser ----

async function api(base, method, path, { body, headers = {}, token } = {}) {
  const sent = { ...headers };
  if (token) sent.Authorization = `Bearer ${token}`;
  if (body !== undefined) sent['Content-Type'] = 'application/json';
  const response = await fetch(base + path, { method, headers: sent, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(WAIT_MS) });
  const text = await response.text();
  return { status: response.status, headers: response.headers, body: text ? JSON.parse(text) : null };
}

/** The keys under the root, counted through every page. */
async function countKeys(base) {
  let total = 0;
  let cursor = '';
  do {
    const page = (await api(base, 'GET', `/v1/kv?keys_only=1&limit=1000${cursor ? `&cursor=${cursor}` : ''}`)).body;
    total += page.items.length;
    cursor = page.next_cursor;
  } while (cursor);
  return total;
}

/** A write by "another client": curl, as a person at a terminal would. */
function curlPut(base, key, value) {
  const out = execFileSync('curl', ['-sS', '--max-time', '10', '-X', 'PUT', '--json', JSON.stringify({ value }), `${base}/v1/kv/${encodeURIComponent(key)}`], { encoding: 'utf8' });
  return JSON.parse(out);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

// ---- the run ----

const started = performance.now();
const results = [];
const numbers = {};
const browser = await chromium.launch({
  executablePath: options.chromium,
  headless: true,
  // No background traffic: the machine may have no network beyond loopback.
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking', '--disable-component-update', '--no-first-run', '--disable-sync'],
  timeout: 60_000,
});

/** A fresh page (own sessionStorage), failing the scenario on any script
 * error or CSP violation. */
async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 720 }, ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.problems = [];
  page.on('pageerror', (err) => page.problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !/the server responded with a status of (401|403|404|412)/.test(msg.text())) page.problems.push(`console: ${msg.text()}`);
  });
  await page.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__violations = (window.__violations ?? 0) + 1;
      console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  return page;
}

async function scenario(name, body) {
  const t0 = performance.now();
  const page = await newPage();
  try {
    await body(page);
    check(page.problems.length === 0, page.problems.join('; '));
    results.push({ name, ok: true, ms: performance.now() - t0 });
    console.log(`ok - ${name} (${Math.round(performance.now() - t0)} ms)`);
  } catch (err) {
    results.push({ name, ok: false });
    console.log(`FAILED - ${name}: ${err.message}`);
    const dir = options.screenshots ?? tmpdir();
    await page.screenshot({ path: `${dir}/failed-${name.replace(/\W+/g, '-')}.png` }).catch(() => {});
  } finally {
    await page.context().close();
  }
}

async function shoot(page, name) {
  if (!options.screenshots) return;
  mkdirSync(options.screenshots, { recursive: true });
  await page.screenshot({ path: `${options.screenshots}/${name}.png` });
}

const open = (page, fragment = '') => page.goto(`${OPEN}/ui/${fragment}`);
const keyButton = (page, key) => page.locator(`#keys button[data-key="${CSS.escape(key)}"]`);
const CSS = { escape: (s) => s.replace(/["\\]/g, '\\$&') };

// Seed: 1,000 keys under bulk/ (one batch), and a few to browse.
const bulk = [];
for (let i = 0; i < 1000; i++) bulk.push({ op: 'put', key: `bulk/${String(i).padStart(4, '0')}`, value: `value ${i}` });
check((await api(OPEN, 'POST', '/v1/batch', { body: { ops: bulk } })).status === 200, 'seeding bulk/');
for (const [key, value] of [
  ['users/1', 'Ada'],
  ['users/2', 'Grace'],
  ['users/3', 'Edsger'],
  ['users/admins/1', 'Barbara'],
  ['config/app', '{"name":"kvstore","replicas":3,"features":{"console":true}}'],
]) {
  check((await api(OPEN, 'PUT', `/v1/kv/${key}`, { body: { value } })).status === 201, `seeding ${key}`);
}
check((await api(OPEN, 'PUT', '/v1/kv/blobs/1', { body: { value_base64: 'AAH+/w==' } })).status === 201, 'seeding blobs/1');

await scenario('first load: page weight and a 1,000-key prefix rendered', async (page) => {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  const sizes = new Map();
  const urls = new Map();
  cdp.on('Network.responseReceived', (e) => urls.set(e.requestId, e.response.url));
  cdp.on('Network.loadingFinished', (e) => sizes.set(e.requestId, e.encodedDataLength));
  await open(page, '#prefix=bulk/');
  await page.waitForFunction(() => document.querySelectorAll('#keys li').length === 1000);
  const timing = await page.evaluate(() => ({
    rendered: performance.getEntriesByName('kvstore: keys listed')[0].startTime,
    listing: performance.getEntriesByType('resource').find((r) => r.name.includes('/v1/kv?')).duration,
  }));
  check((await page.textContent('#counts')).includes('1,000 keys loaded'), 'the count of bulk/');
  let ui = 0;
  let all = 0;
  for (const [id, size] of sizes) {
    all += size;
    if (new URL(urls.get(id) ?? 'x:', OPEN).pathname.startsWith('/ui')) ui += size;
  }
  numbers['console files transferred on first load (bytes)'] = ui;
  numbers['first load with the 1,000-key listing (bytes)'] = all;
  numbers['navigation start to 1,000 keys rendered (ms)'] = Math.round(timing.rendered);
  numbers['of which the listing request (ms)'] = Math.round(timing.listing);
});

await scenario('browse: tree by "/", flat list, breadcrumbs', async (page) => {
  await open(page);
  const folder = page.locator('#keys li.folder button[data-prefix="users/"]');
  await folder.waitFor();
  // The tree skips over a folder once it has seen some of its keys.
  check(/bulk\/\d+\+$/.test(await page.locator('#keys li.folder', { hasText: 'bulk/' }).textContent()), 'bulk/ shows that it holds more');
  await folder.click();
  await keyButton(page, 'users/1').waitFor();
  // In the tree, users/admins/ is a folder; flat, its key is listed.
  check(await page.locator('#keys button[data-prefix="users/admins/"]').count() === 1, 'users/admins/ as a folder');
  await page.click('#mode-flat');
  await keyButton(page, 'users/admins/1').waitFor();
  check((await keyButton(page, 'users/1').textContent()) === 'users/1', 'flat rows show whole keys');
  check((await page.textContent('#counts')).startsWith('4 keys loaded'), 'counts under users/');
  await page.click('nav.crumbs button:text("(all)")');
  await keyButton(page, 'blobs/1').waitFor();
  // Flat at the root: more than a page, counted by walking every page.
  await page.click('#count-all');
  const all = await countKeys(OPEN);
  await page.waitForSelector(`#counts:text("; ${all.toLocaleString('en-US')} in all")`);
  // The total follows the changes that the watch brings.
  curlPut(OPEN, 'notes/counted', 'one more');
  await page.waitForSelector(`#counts:text("; ${(all + 1).toLocaleString('en-US')} in all")`);
  await page.click('#mode-tree');
  await page.locator('#keys button[data-prefix="bulk/"]').click();
  await page.waitForSelector(`#counts:text("1,000 keys loaded under 'bulk/'")`);
});

await scenario('one key: pretty JSON, text, hex; binary as hex', async (page) => {
  await open(page, '#key=config/app');
  await page.waitForSelector('#value[data-view="json"]');
  check((await page.textContent('#value')).includes('\n  "replicas": 3'), 'pretty JSON');
  await page.click('#view-hex');
  check((await page.textContent('#value')).startsWith('00000000  7b 22 6e 61'), 'hex dump');
  await page.click('#view-text');
  check((await page.textContent('#value')).startsWith('{"name":"kvstore"'), 'text');
  check((await page.textContent('dd[data-field="version"]')) === '1', 'version');
  await page.click('#view-json');
  await shoot(page, 'json');
  await open(page, '#key=blobs/1');
  await page.waitForSelector('#value[data-view="hex"]');
  check((await page.textContent('#value')).includes('00 01 fe ff'), 'binary value as hex');
  check(await page.locator('#view-text').count() === 0, 'no text view of binary');
  // A key on a lease: the lease, its TTL and its keys.
  const { lease } = (await api(OPEN, 'POST', '/v1/leases', { body: { ttl_ms: 600_000 } })).body;
  check((await api(OPEN, 'PUT', '/v1/kv/leased/1', { body: { value: 'x', lease } })).status === 201, 'a leased key');
  await open(page, '#key=leased/1');
  await page.locator('dd[data-field="lease"]', { hasText: '(ttl 600000 ms, 1 key, expires' }).waitFor();
  check((await page.textContent('dd[data-field="lease"]')).startsWith(lease), 'the lease id');
  check((await page.textContent('#countdown')).startsWith('in 9 min'), 'the lease deadline counts down');
});

await scenario('create with a TTL', async (page) => {
  await open(page);
  await page.click('#new-key');
  await page.fill('#edit-key', 'notes/new');
  await page.fill('#edit-value', 'hello');
  await page.selectOption('#edit-expiry', 'ttl');
  await page.fill('#edit-ttl', '120');
  await page.click('#save');
  await page.waitForSelector('#entry-key:text("notes/new")');
  check((await page.textContent('dd[data-field="version"]')) === '1', 'version 1');
  check(/in 1 min|in 1\d\d(\.\d)? s|in 2 min/.test(await page.textContent('#countdown')), 'a countdown');
  const stored = await api(OPEN, 'GET', '/v1/kv/notes/new');
  check(stored.body.value === 'hello' && stored.body.expires_at, 'stored with a deadline');
  // Creating it again is refused: the console creates only absent keys.
  await page.click('#new-key');
  await page.fill('#edit-key', 'notes/new');
  await page.fill('#edit-value', 'again');
  await page.click('#save');
  await page.waitForSelector('#conflict');
  check((await page.textContent('#theirs')) === 'hello', 'the existing value beside mine');
});

await scenario('edit: a conflict made by curl, then retry', async (page) => {
  await open(page, '#prefix=users/&key=users/1');
  await page.waitForSelector('dd[data-field="version"]:text("1")');
  await page.click('#edit');
  await page.fill('#edit-value', 'mine');
  curlPut(OPEN, 'users/1', 'theirs');
  await page.click('#save');
  await page.waitForSelector('#conflict');
  check((await page.textContent('#theirs')) === 'theirs', 'the newer value');
  check((await page.textContent('#mine')) === 'mine', 'my value');
  check((await page.textContent('#conflict-reason')).startsWith('412 version_mismatch'), 'the 412');
  await shoot(page, 'conflict');
  await page.click('#retry');
  await page.waitForSelector('dd[data-field="version"]:text("3")');
  const stored = await api(OPEN, 'GET', '/v1/kv/users/1');
  check(stored.body.value === 'mine' && stored.body.version === 3, 'mine written over version 2');
  // Discarding keeps the server's value.
  await page.click('#edit');
  await page.fill('#edit-value', 'dropped');
  curlPut(OPEN, 'users/1', 'kept');
  await page.click('#save');
  await page.click('#discard');
  await page.waitForSelector('#value:text("kept")');
});

await scenario('live: changes made by curl appear', async (page) => {
  await open(page, '#prefix=users/&key=users/2');
  await page.waitForSelector('.live.live');
  await page.waitForSelector('#value:text("Grace")');
  curlPut(OPEN, 'users/9', 'live');
  await keyButton(page, 'users/9').waitFor();
  await page.waitForSelector('#changes li[data-key="users/9"]');
  curlPut(OPEN, 'users/2', 'Grace Hopper');
  await page.waitForSelector('#value:text("Grace Hopper")');
  check((await page.textContent('#live-notice')).includes('changed to version 2'), 'the open key says it changed');
  await api(OPEN, 'DELETE', '/v1/kv/users/9');
  await keyButton(page, 'users/9').waitFor({ state: 'detached' });
  await shoot(page, 'keys');
});

await scenario('delete, conditional on the version seen', async (page) => {
  await open(page, '#prefix=users/&key=users/3');
  await page.waitForSelector('#value:text("Edsger")');
  await page.click('#delete');
  await page.click('#confirm');
  await page.waitForSelector('#entry p.hint:text("Deleted users/3.")');
  await keyButton(page, 'users/3').waitFor({ state: 'detached' });
  check((await api(OPEN, 'GET', '/v1/kv/users/3')).status === 404, 'gone');
});

await scenario('server panel: the charts draw points', async (page) => {
  await open(page, '#view=server');
  let n = 0;
  const load = setInterval(() => {
    api(OPEN, 'GET', '/v1/kv/users/1').catch(() => {});
    if (n++ % 4 === 0) api(OPEN, 'PUT', '/v1/kv/load/1', { body: { value: String(n) } }).catch(() => {});
  }, 50);
  try {
    // Requests per second of the key route, then p99 latency, commit group
    // sizes, commit and sync latency: each a line of two points or more.
    const drawn = (chart, series = '') =>
      page.waitForFunction(
        ([n, name]) => [...document.querySelectorAll(`.charts > .chart:nth-child(${n}) polyline${name ? `[data-series="${name}"]` : ''}`)].some((line) => line.getAttribute('points').split(' ').length >= 2),
        [chart, series],
      );
    await drawn(1, '/v1/kv/{key}');
    for (const chart of [3, 5, 6]) await drawn(chart);
    // For the docs' picture, charts that have moved for a while.
    if (options.screenshots) await page.waitForTimeout(30_000);
  } finally {
    clearInterval(load);
  }
  check((await page.textContent('.status')).startsWith('Live:'), 'the status line');
  await shoot(page, 'server');
});

await scenario('XSS: a key and value of markup are shown as text', async (page) => {
  const markup = '<img src=x onerror="window.__xss=1">';
  const key = `xss/${markup}`;
  check((await api(OPEN, 'PUT', `/v1/kv/${encodeURIComponent(key)}`, { body: { value: markup } })).status === 201, 'seeding');
  await open(page, '#prefix=xss/');
  await keyButton(page, key).click();
  await page.waitForSelector('#value');
  check((await page.textContent('#value')) === markup, 'the value as text');
  check((await page.textContent('#entry-key')) === key, 'the key as text');
  // Live too: the watch brings another.
  curlPut(OPEN, `${key}2`, markup);
  await page.waitForSelector('#changes li[data-key^="xss/"]');
  await page.click('#edit');
  await page.click('#cancel');
  const ran = await page.evaluate(() => ({ xss: window.__xss, images: document.querySelectorAll('img').length, violations: window.__violations ?? 0 }));
  check(ran.xss === undefined, 'the handler ran');
  check(ran.images === 0, 'an img element exists');
  check(ran.violations === 0, 'the page tried something the policy blocked');
});

await scenario('auth: 401 asks for a token, 403 is said plainly', async (page) => {
  await page.goto(`${AUTH}/ui/#prefix=users/`);
  await page.waitForSelector('dialog#auth[open]');
  check((await page.textContent('#banner')).startsWith('401 unauthenticated'), '401 in the banner');
  check((await page.textContent('#auth-reason')).includes('401'), '401 in the prompt');
  await page.fill('#token', 'not-a-token');
  await page.click('#token-save');
  await page.waitForSelector('dialog#auth[open]');
  await shoot(page, 'auth');
  await page.fill('#token', 'reader-token');
  await page.click('#token-save');
  await page.waitForSelector('dialog#auth', { state: 'hidden' });
  await keyButton(page, 'users/1').waitFor();
  check((await page.evaluate(() => sessionStorage.getItem('kvstore.token'))) === 'reader-token', 'kept in sessionStorage');
  check((await page.context().cookies()).length === 0, 'no cookies');
  // Outside the token's prefixes: 403, said as such.
  await page.click('nav.crumbs button:text("(all)")');
  await page.fill('#prefix', 'config/');
  await page.press('#prefix', 'Enter');
  await page.waitForSelector('#banner:text("403 forbidden")');
  check((await page.textContent('#counts')).includes('403 forbidden'), '403 where the list was');
  await keyButton(page, 'users/1').waitFor({ state: 'detached' });
  await page.click('#token-button');
  await page.fill('#token', 'admin-token');
  await page.click('#token-save');
  await page.locator('#keys button[data-key="config/app"]').waitFor();
  check((await page.locator('#banner').isHidden()), 'the banner cleared');
});

await browser.close();
const seconds = (performance.now() - started) / 1000;
numbers['browser test run time (s)'] = Number(seconds.toFixed(1));
for (const [name, value] of Object.entries(numbers)) console.log(`number: ${name}: ${value}`);
const failed = results.filter((r) => !r.ok).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
