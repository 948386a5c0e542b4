// The console's page: the key browser, the open key, the changes, the
// server panel and the token prompt, wired together. The address's fragment
// keeps what is shown (#prefix=users/&key=users/42, #view=server), so a
// reload or a shared link shows the same.

import { token, onRefusal } from './api.js';
import { el, fill, button } from './dom.js';
import { KeyList } from './keys.js';
import { EntryView } from './entry.js';
import { Watch, ChangesPanel } from './live.js';
import { ServerPanel } from './server.js';

const $ = (id) => document.getElementById(id);

const banner = $('banner');
const liveState = $('live');

function say(text, kind = 'error') {
  banner.hidden = !text;
  banner.className = `banner ${kind}`;
  banner.textContent = text ?? '';
}

function remember() {
  const state = new URLSearchParams();
  if (keys.prefix) state.set('prefix', keys.prefix);
  if (entry.key) state.set('key', entry.key);
  if (view === 'server') state.set('view', 'server');
  history.replaceState(null, '', `#${state}`);
}

const entry = new EntryView($('entry'));
const changes = new ChangesPanel($('changes-panel'), { open: (key) => show(key) });
const keys = new KeyList($('keys-panel'), {
  open: (key) => show(key),
  moved: (prefix, revision) => {
    changes.watching(prefix);
    watch.start(prefix, revision + 1);
    remember();
  },
  create: () => {
    entry.key = null;
    entry.entry = null;
    entry.edit({ key: keys.prefix });
  },
  failed: () => {
    watch.stop();
    liveState.textContent = 'not watching';
    liveState.className = 'live stopped';
  },
});
const watch = new Watch({
  change: (message) => {
    for (const event of message.events) {
      // Until the new prefix is listed, the watch of the previous one runs.
      if (event.key.startsWith(keys.prefix)) keys.apply(event);
      entry.apply(event, message.revision);
    }
    changes.add(message);
  },
  state: (state, detail) => {
    liveState.textContent = detail ? `${state}: ${detail}` : state;
    liveState.className = `live ${state}`;
  },
  // The server no longer keeps the revisions to resume from: list again.
  lost: () => keys.go(keys.prefix),
});
const server = new ServerPanel($('server'));

async function show(key) {
  keys.select(key);
  await entry.open(key);
  remember();
}

let view = 'keys';
function switchTo(next) {
  view = next;
  $('keys-view').hidden = next !== 'keys';
  $('server').hidden = next !== 'server';
  for (const tab of document.querySelectorAll('[data-view]')) tab.setAttribute('aria-selected', String(tab.dataset.view === next));
  if (next === 'server') server.start();
  else server.stop();
  remember();
}
for (const tab of document.querySelectorAll('[data-view]')) tab.addEventListener('click', () => switchTo(tab.dataset.view));

// The token prompt: opened by any 401, and by the Token button.
const dialog = $('auth');
const tokenInput = $('token');
const authReason = $('auth-reason');
function prompt(reason) {
  authReason.textContent = reason ?? (token.get() ? 'A token is set for this tab.' : 'No token is set.');
  tokenInput.value = '';
  if (!dialog.open) dialog.showModal();
  tokenInput.focus();
}
function useToken(value) {
  token.set(value);
  dialog.close();
  say(null);
  $('token-state').textContent = token.get() ? 'token set' : 'no token';
  keys.go(keys.prefix);
  if (entry.key) entry.open(entry.key);
  if (view === 'server') {
    server.stop();
    server.start();
  }
}
fill(
  $('auth-buttons'),
  button('Use this token', () => useToken(tokenInput.value.trim()), { id: 'token-save', class: 'primary' }),
  button('Forget the token', () => useToken(''), { id: 'token-forget' }),
  button('Close', () => dialog.close(), { id: 'token-close' }),
);
tokenInput.addEventListener('keydown', (e) => e.key === 'Enter' && useToken(tokenInput.value.trim()));
$('token-button').addEventListener('click', () => prompt());
$('token-state').textContent = token.get() ? 'token set' : 'no token';

onRefusal((err, path) => {
  if (err.status === 401) {
    say(`401 unauthenticated: ${err.message}`);
    prompt(`The server answered 401 unauthenticated to ${path}: ${err.message}`);
  } else {
    say(`403 forbidden: ${err.message}`);
  }
});

/** Shows what the address's fragment names (on load, and when it is
 * changed by hand or by a link). */
function follow(first) {
  const state = new URLSearchParams(location.hash.slice(1));
  const prefix = state.get('prefix') ?? '';
  if (first || prefix !== keys.prefix) keys.go(prefix);
  const key = state.get('key');
  if (key && key !== entry.key) show(key);
  switchTo(state.get('view') === 'server' ? 'server' : 'keys');
}
window.addEventListener('hashchange', () => follow(false));
follow(true);
