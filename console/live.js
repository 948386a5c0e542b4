// Live updates: a watch of the listed prefix from the revision of its
// listing (list-then-watch: no change is missed or shown twice), resumed
// after a dropped connection from the last revision seen, and the panel of
// the changes it brings.

import { call, query } from './api.js';
import { el, fill, button } from './dom.js';
import { messages } from './sse.js';

const MAX_BACKOFF_MS = 10_000;
/** Changes kept in the panel. */
const KEPT = 500;

export class Watch {
  /** `change(message)` gets each change message ({revision, events});
   * `state(text, error)` hears how the stream is; `lost()` is called when
   * the server no longer has the history to resume from. */
  constructor({ change, state, lost }) {
    this.change = change;
    this.state = state;
    this.lost = lost;
    this.abort = null;
  }

  /** Watches `prefix` from `revision` on (replacing any watch). */
  start(prefix, revision) {
    this.stop();
    const abort = new AbortController();
    this.abort = abort;
    this.run(prefix, revision, abort.signal);
  }

  stop() {
    this.abort?.abort();
    this.abort = null;
  }

  async run(prefix, from, signal) {
    let next = from;
    let backoff = 500;
    while (!signal.aborted) {
      try {
        const response = await call('GET', `v1/watch${query({ prefix, from_revision: next })}`, { signal, headers: { Accept: 'text/event-stream' } });
        this.state('live');
        backoff = 500;
        for await (const message of messages(response.body)) {
          const data = JSON.parse(message.data);
          if (message.event === 'change') {
            next = data.revision + 1;
            this.change(data);
          } else if (message.event === 'progress') {
            next = data.revision + 1;
          } else if (message.event === 'compacted') {
            this.lost();
            return;
          }
        }
        if (signal.aborted) return;
        this.state('reconnecting', 'the stream ended');
      } catch (err) {
        if (signal.aborted) return;
        if (err.status === 410) {
          this.lost();
          return;
        }
        if (err.status === 401 || err.status === 403) {
          this.state('stopped', String(err));
          return;
        }
        this.state('reconnecting', String(err));
      }
      await new Promise((done) => {
        const timer = setTimeout(done, backoff);
        signal.addEventListener('abort', () => (clearTimeout(timer), done()), { once: true });
      });
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    }
  }
}

export class ChangesPanel {
  /** `open(key)` shows a key that a change names. */
  constructor(node, { open }) {
    this.open = open;
    this.paused = false;
    this.title = el('h2', {}, 'Changes');
    this.list = el('ol', { class: 'changes', id: 'changes', reversed: true });
    this.pause = button('Pause', () => this.toggle(), { id: 'pause' });
    fill(
      node,
      el('div', { class: 'toolbar' }, this.title, el('span', { class: 'grow' }), this.pause, button('Clear', () => fill(this.list), {})),
      this.list,
    );
  }

  watching(prefix) {
    this.title.textContent = prefix ? `Changes under '${prefix}'` : 'Changes';
  }

  toggle() {
    this.paused = !this.paused;
    this.pause.textContent = this.paused ? 'Resume' : 'Pause';
  }

  add(change) {
    if (this.paused) return;
    const time = new Date().toLocaleTimeString();
    for (const event of change.events) {
      const what = event.type === 'put' ? `put v${event.version}` : `delete v${event.version} (${event.reason})`;
      this.list.prepend(
        el(
          'li',
          { class: `change ${event.type}`, 'data-key': event.key },
          el('span', { class: 'rev' }, `#${change.revision}`),
          el('span', { class: 'what' }, what),
          button(event.key, () => this.open(event.key), { class: 'link name', title: event.key }),
          el('time', {}, time),
        ),
      );
    }
    while (this.list.children.length > KEPT) this.list.lastElementChild.remove();
  }
}
