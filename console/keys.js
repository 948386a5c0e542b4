// The key browser: one prefix at a time, as a tree by '/' or a flat list,
// loaded a page at a time with the API's cursors, and kept current by the
// watch of the same prefix.

import { json, query } from './api.js';
import { el, fill, button } from './dom.js';

/** Keys per page: the API's largest, keys only (values are read on opening). */
const PAGE = 1000;
/** A tree walk stops for "Load more" once it has this many new rows. */
const TREE_ROWS = 200;
/** A full count walks pages up to this many keys, then says "at least". */
const COUNT_CAP = 1_000_000;

export class KeyList {
  /** `open(key)` shows a key; `moved(prefix, revision)` is called once a
   * prefix's first page is listed, with the revision it was read at. */
  constructor(node, { open, moved, create, failed }) {
    this.open = open;
    this.moved = moved;
    this.failed = failed;
    this.prefix = '';
    this.mode = 'tree';
    this.keys = [];
    this.walk = null;
    this.skipped = new Set();
    this.total = null;
    this.selected = null;
    this.flashing = new Set();
    this.generation = 0;

    this.search = el('input', {
      type: 'search',
      id: 'prefix',
      placeholder: 'prefix, e.g. users/',
      'aria-label': 'Key prefix',
      autocomplete: 'off',
      spellcheck: 'false',
      onkeydown: (e) => e.key === 'Enter' && this.go(this.search.value),
    });
    this.modes = el(
      'div',
      { class: 'modes', role: 'group', 'aria-label': 'View' },
      button('Tree', () => this.setMode('tree'), { id: 'mode-tree' }),
      button('Flat', () => this.setMode('flat'), { id: 'mode-flat' }),
    );
    this.crumbs = el('nav', { class: 'crumbs', 'aria-label': 'Prefix' });
    this.counts = el('p', { class: 'counts', id: 'counts' });
    this.list = el('ul', { class: 'keys', id: 'keys' });
    this.more = button('Load more', () => this.loadMore(), { id: 'load-more', hidden: true });
    this.countAll = button('Count all', () => this.count(), { id: 'count-all', hidden: true });
    fill(
      node,
      el(
        'div',
        { class: 'toolbar' },
        this.search,
        button('Go', () => this.go(this.search.value)),
        button('New key', create, { id: 'new-key', class: 'primary' }),
      ),
      el('div', { class: 'toolbar' }, this.modes, this.crumbs),
      this.counts,
      this.list,
      el('div', { class: 'toolbar' }, this.more, this.countAll),
    );
  }

  /** Lists `prefix` from its first page. */
  async go(prefix) {
    const generation = ++this.generation;
    this.prefix = prefix;
    this.search.value = prefix;
    this.keys = [];
    this.skipped = new Set();
    this.total = null;
    this.walk = { mode: this.mode, start: prefix, end: after(prefix), cursor: null, done: false, frontier: prefix };
    this.counts.textContent = 'Loading…';
    const revision = await this.page(generation);
    if (revision !== null) this.moved(prefix, revision);
  }

  setMode(mode) {
    this.mode = mode;
    // A tree walk skips the keys inside folders, which a flat list shows.
    if (this.walk && this.walk.mode !== mode && (!this.walk.done || this.skipped.size > 0)) this.go(this.prefix);
    else this.render();
  }

  loadMore() {
    return this.page(this.generation);
  }

  /**
   * Loads the next rows: a flat list pages through the prefix with the
   * API's cursor; a tree skips over each folder once it has seen one of its
   * keys (listing again from the folder's end), so that one request shows
   * a folder of a million keys as one row. Resolves to the revision of the
   * first page read, or null when it failed or the prefix changed.
   */
  async page(generation) {
    const walk = this.walk;
    let revision = null;
    let added = 0;
    try {
      for (let requests = 0; !walk.done && added < (walk.mode === 'tree' ? TREE_ROWS : PAGE) && requests < 20; requests++) {
        const bounds = walk.cursor ? { start: walk.start, end: walk.end, cursor: walk.cursor } : { start: walk.start, end: walk.end };
        const page = await json('GET', `v1/kv${query({ ...bounds, keys_only: 1, limit: PAGE })}`);
        if (generation !== this.generation) return null;
        revision ??= page.revision;
        const seen = new Set(this.keys.map((k) => k.key));
        for (const item of page.items) if (!seen.has(item.key)) this.keys.push(item);
        added += walk.mode === 'tree' ? new Set(page.items.map((k) => folderOf(k.key, this.prefix) ?? k.key)).size : page.items.length;
        const last = page.items[page.items.length - 1];
        const folder = last && walk.mode === 'tree' ? folderOf(last.key, this.prefix) : null;
        if (page.next_cursor === null) {
          walk.done = true;
        } else if (folder !== null) {
          this.skipped.add(folder);
          walk.start = `${this.prefix}${folder.slice(0, -1)}0`;
          walk.cursor = null;
          walk.frontier = walk.start;
        } else {
          walk.cursor = page.next_cursor;
          walk.frontier = last.key;
        }
      }
    } catch (err) {
      if (generation !== this.generation) return null;
      walk.done = true;
      this.render();
      this.counts.textContent = `Cannot list '${this.prefix}': ${err}`;
      this.counts.className = 'counts error';
      this.failed(err);
      return null;
    }
    this.keys.sort((a, b) => compareBytes(encode(a.key), encode(b.key)));
    this.render();
    // For DevTools' performance panel (and the browser test's numbers).
    performance.mark('kvstore: keys listed', { detail: { prefix: this.prefix, keys: this.keys.length } });
    return revision;
  }

  /** Walks every page of the prefix (keys only) to count its keys. */
  async count() {
    const generation = this.generation;
    let cursor = null;
    let total = 0;
    this.countAll.disabled = true;
    try {
      do {
        const page = await json('GET', `v1/kv${query({ prefix: this.prefix, keys_only: 1, limit: PAGE, cursor })}`);
        if (generation !== this.generation) return;
        total += page.items.length;
        cursor = page.next_cursor;
        this.counts.textContent = `Counting… ${total.toLocaleString()} so far`;
      } while (cursor && total < COUNT_CAP);
      this.total = total;
      this.capped = cursor !== null;
    } catch (err) {
      this.total = null;
      this.counts.textContent = `Cannot count: ${err}`;
      return;
    } finally {
      this.countAll.disabled = false;
    }
    this.render();
  }

  /** Applies one watch event (a put or a delete of a key under the prefix). */
  apply(event) {
    const at = this.position(event.key);
    const present = at < this.keys.length && this.keys[at].key === event.key;
    // A counted total follows every change, loaded or not: a put at
    // version 1 made the key, a delete removed one.
    if (this.total !== null) this.total += event.type === 'put' ? Number(event.version === 1) : -1;
    if (event.type === 'put') {
      const entry = { key: event.key, version: event.version, created_at: event.created_at, updated_at: event.updated_at, expires_at: event.expires_at, lease: event.lease };
      if (present) this.keys[at] = entry;
      else if (this.loaded(event.key)) this.keys.splice(at, 0, entry);
      this.flash(event.key);
    } else if (present) {
      this.keys.splice(at, 1);
    }
    this.render();
  }

  /** Whether `key` lies in the part of the prefix loaded so far (a key past
   * the walk belongs to a page not loaded yet). */
  loaded(key) {
    return this.walk.done || compareBytes(encode(key), encode(this.walk.frontier)) < 0;
  }

  /** Where `key` is or would go in the loaded keys (byte order, as the server's). */
  position(key) {
    const target = encode(key);
    let low = 0;
    let high = this.keys.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (compareBytes(encode(this.keys[mid].key), target) < 0) low = mid + 1;
      else high = mid;
    }
    return low;
  }

  flash(key) {
    this.flashing.add(key);
    setTimeout(() => {
      this.flashing.delete(key);
      this.render();
    }, 1500);
  }

  select(key) {
    this.selected = key;
    this.render();
  }

  render() {
    this.modes.querySelectorAll('button').forEach((b) => b.setAttribute('aria-pressed', String(b.id === `mode-${this.mode}`)));
    this.renderCrumbs();
    const shown = this.keys.length.toLocaleString();
    const more = this.walk?.done === false ? ' (more follow)' : '';
    const total = this.total === null ? '' : `; ${this.capped ? 'at least ' : ''}${this.total.toLocaleString()} in all`;
    this.counts.textContent = `${shown} keys loaded under '${this.prefix}'${more}${total}`;
    this.counts.className = 'counts';
    this.more.hidden = this.walk?.done !== false;
    this.countAll.hidden = this.walk?.done !== false && this.skipped.size === 0;
    fill(this.list, this.mode === 'tree' ? this.tree() : this.keys.map((k) => this.row(k, k.key)));
  }

  renderCrumbs() {
    const parts = this.prefix.split('/');
    const crumbs = [button('(all)', () => this.go(''), { class: 'crumb' })];
    let path = '';
    parts.slice(0, -1).forEach((part) => {
      path += `${part}/`;
      const target = path;
      crumbs.push(el('span', { class: 'sep' }, '›'), button(`${part}/`, () => this.go(target), { class: 'crumb' }));
    });
    if (parts[parts.length - 1]) crumbs.push(el('span', { class: 'sep' }, '›'), el('span', { class: 'crumb rest' }, `${parts[parts.length - 1]}…`));
    fill(this.crumbs, crumbs);
  }

  /** Folders (the next '/' segment, with the count of loaded keys below it) and keys, in key order. */
  tree() {
    const rows = [];
    let folder = null;
    for (const entry of this.keys) {
      const rest = entry.key.slice(this.prefix.length);
      const slash = rest.indexOf('/');
      if (slash < 0) {
        folder = null;
        // The key that is the prefix itself (`users/` under `users/`).
        rows.push(this.row(entry, rest || entry.key));
        continue;
      }
      const name = rest.slice(0, slash + 1);
      if (folder && folder.name === name) {
        folder.count += 1;
        folder.size.textContent = `${folder.count.toLocaleString()}${folder.more}`;
        continue;
      }
      const size = el('span', { class: 'size', title: this.skipped.has(name) ? 'keys seen so far: open the folder to list them all' : null }, '1');
      const target = this.prefix + name;
      folder = { name, count: 1, size, more: this.skipped.has(name) ? '+' : '' };
      size.textContent = `1${folder.more}`;
      rows.push(el('li', { class: 'folder' }, button(el('span', { class: 'name' }, name), () => this.go(target), { 'data-prefix': target }), size));
    }
    return rows;
  }

  row(entry, label) {
    const classes = ['key'];
    if (entry.key === this.selected) classes.push('selected');
    if (this.flashing.has(entry.key)) classes.push('flash');
    const meta = [`v${entry.version}`];
    if (entry.expires_at) meta.push('⏱');
    if (entry.lease) meta.push('lease');
    return el(
      'li',
      { class: classes.join(' ') },
      button(el('span', { class: 'name' }, label), () => this.open(entry.key), { 'data-key': entry.key, title: entry.key }),
      el('span', { class: 'size' }, meta.join(' ')),
    );
  }
}

/** The folder (next segment, with its '/') of `key` under `prefix`, or null for a key of its own. */
function folderOf(key, prefix) {
  const rest = key.slice(prefix.length);
  const slash = rest.indexOf('/');
  return slash < 0 ? null : rest.slice(0, slash + 1);
}

/** The first string after every string that starts with `prefix` (the end
 * of its range), or '' (no end) for the empty prefix or one that cannot be
 * raised. Code point order is UTF-8's byte order. */
export function after(prefix) {
  const points = [...prefix];
  while (points.length > 0) {
    const last = points.pop().codePointAt(0);
    if (last < 0x10ffff) {
      const next = last + 1 === 0xd800 ? 0xe000 : last + 1;
      return points.join('') + String.fromCodePoint(next);
    }
  }
  return '';
}

const encoder = new TextEncoder();
const encode = (key) => encoder.encode(key);

function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}
