// One key: its value (text, pretty JSON, hex), its metadata, and the editor.
// Every write is conditional on the version the user saw (If-Match, or
// If-None-Match: * for a new key); a 412 shows the server's value beside
// the user's, to write again over the newer version or to drop.

import { call, json, keyPath, ApiError } from './api.js';
import { el, fill, button, countdown } from './dom.js';

/** Hex dumps stop after this many bytes. */
const HEX_LIMIT = 64 * 1024;

/** The bytes of an entry's value, and its text when the bytes are UTF-8. */
export function valueOf(entry) {
  if (entry.value !== undefined) return { text: entry.value, bytes: new TextEncoder().encode(entry.value) };
  const binary = atob(entry.value_base64 ?? '');
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return { text: null, bytes };
}

/** Pretty JSON of `text`, or null when it is not JSON. */
export function prettyJson(text) {
  if (text === null) return null;
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return null;
  }
}

/** "00000000  7b 22 61 22 ...  {"a"..." lines. */
export function hexDump(bytes) {
  const lines = [];
  const shown = bytes.subarray(0, HEX_LIMIT);
  for (let at = 0; at < shown.length; at += 16) {
    const row = shown.subarray(at, at + 16);
    const hex = [...row].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = [...row].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${at.toString(16).padStart(8, '0')}  ${hex.padEnd(47)}  ${ascii}`);
  }
  if (bytes.length > HEX_LIMIT) lines.push(`… ${bytes.length - HEX_LIMIT} more bytes`);
  return lines.join('\n');
}

/** "1 key", "2 keys", "1,024 bytes" */
function plural(count, noun) {
  return `${count.toLocaleString()} ${noun}${count === 1 ? '' : 's'}`;
}

function base64(bytes) {
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

export class EntryView {
  constructor(node) {
    this.node = node;
    this.key = null;
    this.entry = null;
    this.view = null;
    this.editing = false;
    this.ticker = null;
    this.empty();
  }

  empty(message = 'Pick a key on the left, or make a new one.') {
    this.key = null;
    this.entry = null;
    this.editing = false;
    this.stopTicker();
    fill(this.node, el('p', { class: 'hint' }, message));
  }

  /** Reads `key` and shows it. */
  async open(key) {
    this.key = key;
    this.editing = false;
    this.view = null;
    try {
      this.entry = await json('GET', keyPath(key));
    } catch (err) {
      if (this.key !== key) return;
      this.entry = null;
      this.stopTicker();
      fill(this.node, el('h2', { class: 'key-title' }, key), el('p', { class: 'error', role: 'alert' }, err.status === 404 ? 'This key does not exist (any more).' : String(err)));
      return;
    }
    if (this.key === key) this.show();
  }

  show(notice = null) {
    const entry = this.entry;
    const { text, bytes } = valueOf(entry);
    const pretty = prettyJson(text);
    const views = [];
    if (pretty !== null) views.push(['json', 'JSON']);
    if (text !== null) views.push(['text', 'Text']);
    views.push(['hex', 'Hex']);
    if (!views.some(([v]) => v === this.view)) {
      const structured = pretty !== null && /^[[{]/.test(pretty);
      this.view = structured ? 'json' : text !== null ? 'text' : 'hex';
    }
    const shown = this.view === 'json' ? pretty : this.view === 'text' ? text : hexDump(bytes);
    const deadline = entry.expires_at ? new Date(entry.expires_at) : null;
    this.countdown = el('span', { id: 'countdown' });
    const rows = [
      ['Version', String(entry.version)],
      ['Revision', String(entry.revision)],
      ['Created', entry.created_at],
      ['Updated', entry.updated_at],
      ['Size', `${plural(bytes.length, 'byte')}${text === null ? ' (binary)' : ''}`],
      ['Expires', deadline ? [entry.expires_at, ' — ', this.countdown] : 'never'],
    ];
    if (entry.lease) rows.push(['Lease', [entry.lease, ' ', this.leaseInfo = el('span', { class: 'hint' })]]);
    fill(
      this.node,
      el('h2', { class: 'key-title', id: 'entry-key' }, entry.key),
      notice,
      el('dl', { class: 'meta' }, rows.map(([name, value]) => [el('dt', {}, name), el('dd', { 'data-field': name.toLowerCase() }, value)])),
      el(
        'div',
        { class: 'toolbar' },
        el('div', { class: 'modes', role: 'group', 'aria-label': 'Show as' }, views.map(([id, label]) => button(label, () => { this.view = id; this.show(); }, { 'aria-pressed': String(id === this.view), id: `view-${id}` }))),
        el('span', { class: 'grow' }),
        button('Edit', () => this.edit(), { id: 'edit', class: 'primary' }),
        button('Delete', () => this.confirmDelete(), { id: 'delete', class: 'danger' }),
        button('Reload', () => this.open(entry.key), { id: 'reload' }),
      ),
      el('pre', { class: 'value', id: 'value', 'data-view': this.view }, shown),
    );
    this.startTicker(deadline);
    if (entry.lease) this.describeLease(entry.lease);
  }

  async describeLease(id) {
    const target = this.leaseInfo;
    try {
      const lease = await json('GET', `v1/leases/${encodeURIComponent(id)}`);
      target.textContent = `(ttl ${lease.ttl_ms} ms, ${plural(lease.keys, 'key')}, expires ${lease.expires_at})`;
    } catch (err) {
      target.textContent = `(${err})`;
    }
  }

  startTicker(deadline) {
    this.stopTicker();
    if (!deadline) return;
    const tick = () => (this.countdown.textContent = countdown(deadline));
    tick();
    this.ticker = setInterval(tick, 100);
  }

  stopTicker() {
    clearInterval(this.ticker);
    this.ticker = null;
  }

  /** The editor: of the open key (against its version), or of a new key. */
  edit(draft = null) {
    const entry = this.entry;
    const creating = entry === null;
    const { text, bytes } = creating ? { text: '', bytes: new Uint8Array() } : valueOf(entry);
    this.editing = true;
    this.stopTicker();
    const keyInput = el('input', { id: 'edit-key', type: 'text', value: draft?.key ?? '', placeholder: 'key', 'aria-label': 'Key', spellcheck: 'false', autocomplete: 'off' });
    const encoding = el(
      'select',
      { id: 'edit-encoding', 'aria-label': 'Value encoding' },
      el('option', { value: 'text' }, 'text'),
      el('option', { value: 'base64' }, 'base64'),
    );
    encoding.value = draft?.encoding ?? (text === null ? 'base64' : 'text');
    const value = el('textarea', { id: 'edit-value', rows: 12, spellcheck: 'false', 'aria-label': 'Value' });
    value.value = draft?.value ?? (text ?? base64(bytes));
    const expiry = el(
      'select',
      { id: 'edit-expiry', 'aria-label': 'Expiry' },
      creating ? null : el('option', { value: 'keep' }, entry.lease ? 'keep its lease' : entry.expires_at ? 'keep its deadline' : 'keep: no deadline'),
      el('option', { value: 'none' }, 'no deadline'),
      el('option', { value: 'ttl' }, 'expire after (seconds)'),
    );
    expiry.value = draft?.expiry ?? (creating ? 'none' : 'keep');
    const ttl = el('input', { id: 'edit-ttl', type: 'number', min: '0.001', step: 'any', value: draft?.ttl ?? '60', 'aria-label': 'TTL in seconds' });
    const showTtl = () => (ttl.hidden = expiry.value !== 'ttl');
    expiry.addEventListener('change', showTtl);
    showTtl();
    this.problem = el('p', { class: 'error', role: 'alert', id: 'edit-error' });
    const save = () => {
      const key = creating ? keyInput.value : entry.key;
      const mine = { key, encoding: encoding.value, value: value.value, expiry: expiry.value, ttl: ttl.value };
      const condition = creating ? { 'If-None-Match': '*' } : { 'If-Match': `"${entry.version}"` };
      this.write(mine, condition);
    };
    fill(
      this.node,
      el('h2', { class: 'key-title' }, creating ? 'New key' : ['Edit ', el('span', { id: 'entry-key' }, entry.key)]),
      creating ? el('label', {}, 'Key ', keyInput) : el('p', { class: 'hint' }, `Writes only if the key is still at version ${entry.version}.`),
      el('div', { class: 'toolbar' }, el('label', {}, 'Value as ', encoding), el('label', {}, 'Expiry ', expiry), ttl),
      value,
      this.problem,
      el('div', { class: 'toolbar' }, button(creating ? 'Create' : 'Save', save, { id: 'save', class: 'primary' }), button('Cancel', () => (creating ? this.empty() : this.open(entry.key)), { id: 'cancel' })),
    );
    (creating ? keyInput : value).focus();
  }

  /** Sends the user's value with `condition`; on 412, the conflict view. */
  async write(mine, condition) {
    const body = {};
    if (mine.encoding === 'text') body.value = mine.value;
    else body.value_base64 = mine.value.replace(/\s+/g, '');
    if (mine.expiry === 'keep') body.keep_ttl = true;
    if (mine.expiry === 'ttl') body.ttl_ms = Math.max(1, Math.round(Number(mine.ttl) * 1000));
    if (!mine.key) {
      this.problem.textContent = 'Give the key a name.';
      return;
    }
    try {
      await call('PUT', keyPath(mine.key), { body, headers: condition });
    } catch (err) {
      if (err instanceof ApiError && err.status === 412) {
        await this.conflict(mine, err);
      } else if (this.problem) {
        this.problem.textContent = String(err);
      }
      return;
    }
    this.editing = false;
    await this.open(mine.key);
  }

  /** The server's value beside the user's, after a failed condition. */
  async conflict(mine, err, deleting = false) {
    let theirs = null;
    try {
      theirs = await json('GET', keyPath(mine.key));
    } catch (read) {
      if (read.status !== 404) {
        this.problem.textContent = `${err}; and the key cannot be read: ${read}`;
        return;
      }
    }
    this.key = mine.key;
    this.entry = theirs;
    const theirsText = theirs ? (valueOf(theirs).text ?? `(binary) ${theirs.value_base64}`) : null;
    const retryCondition = theirs ? { 'If-Match': `"${theirs.version}"` } : { 'If-None-Match': '*' };
    const retry = deleting
      ? button(theirs ? `Delete version ${theirs.version} anyway` : 'Nothing to delete', () => this.remove(theirs), { id: 'retry', class: 'danger', disabled: !theirs })
      : button(theirs ? `Write mine over version ${theirs.version}` : 'Create it again with mine', () => this.write(mine, retryCondition), { id: 'retry', class: 'primary' });
    this.problem = el('p', { class: 'error', role: 'alert', id: 'edit-error' });
    fill(
      this.node,
      el('h2', { class: 'key-title' }, 'Conflict: ', el('span', { id: 'entry-key' }, mine.key)),
      el('p', { class: 'error', id: 'conflict-reason' }, `${err}. Someone else changed the key after you read it.`),
      el(
        'div',
        { class: 'conflict', id: 'conflict' },
        el('section', {}, el('h3', {}, theirs ? `Now on the server: version ${theirs.version}, ${theirs.updated_at}` : 'Now on the server: the key is gone'), el('pre', { class: 'value', id: 'theirs' }, theirsText ?? '')),
        el('section', {}, el('h3', {}, deleting ? 'You wanted: to delete it' : 'Yours'), el('pre', { class: 'value', id: 'mine' }, deleting ? '' : mine.value)),
      ),
      this.problem,
      el('div', { class: 'toolbar' }, retry, button(deleting ? 'Keep it' : 'Discard mine', () => (theirs ? this.open(mine.key) : this.empty('The key is gone.')), { id: 'discard' })),
    );
  }

  confirmDelete() {
    const entry = this.entry;
    this.problem = el('p', { class: 'error', role: 'alert' });
    this.node.append(
      el(
        'div',
        { class: 'confirm', id: 'confirm-delete' },
        el('p', {}, `Delete this key at version ${entry.version}?`),
        button('Delete', () => this.remove(entry), { id: 'confirm', class: 'danger' }),
        button('Cancel', () => this.show(), {}),
        this.problem,
      ),
    );
  }

  async remove(entry) {
    try {
      await call('DELETE', keyPath(entry.key), { headers: { 'If-Match': `"${entry.version}"` } });
    } catch (err) {
      if (err.status === 412) await this.conflict({ key: entry.key, value: '' }, err, true);
      else this.problem.textContent = String(err);
      return;
    }
    this.empty(`Deleted ${entry.key}.`);
  }

  /** A watch event for the open key: shown at once, unless the user is
   * editing (then only said: saving will meet the conflict). */
  apply(event, revision) {
    if (event.key !== this.key) return;
    const what = event.type === 'put' ? `changed to version ${event.version}` : `deleted (${event.reason})`;
    const notice = el('p', { class: 'notice', id: 'live-notice' }, `At revision ${revision} the key was ${what}.`);
    if (this.editing) {
      this.node.querySelector('#live-notice')?.remove();
      this.node.prepend(notice);
      return;
    }
    if (event.type === 'put') {
      const { type: _type, ...entry } = event;
      this.entry = { ...entry, revision };
      this.show(notice);
    } else {
      this.entry = null;
      this.stopTicker();
      fill(this.node, el('h2', { class: 'key-title', id: 'entry-key' }, event.key), notice);
    }
  }
}
