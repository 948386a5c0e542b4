// The API as the console calls it: the bearer token from sessionStorage on
// every call, errors in the API's shape turned into ApiError.

const TOKEN = 'kvstore.token';

/** The API's root: the parent of /ui/, so a proxy that serves the server
 * under a path prefix serves the console's calls under it too. */
const ROOT = new URL('..', document.baseURI);

export const token = {
  get: () => sessionStorage.getItem(TOKEN) ?? '',
  set: (value) => (value ? sessionStorage.setItem(TOKEN, value) : sessionStorage.removeItem(TOKEN)),
};

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /** "412 version_mismatch: the condition failed: ..." */
  toString() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

const refusals = new Set();

/** Calls `listener(error)` on every 401 and 403, wherever it came from. */
export function onRefusal(listener) {
  refusals.add(listener);
}

/** A request to `path` (relative to the API's root: 'v1/kv'); resolves to
 * the Response when it is 2xx or 304, else rejects with an ApiError. */
export async function call(method, path, { body, headers = {}, signal } = {}) {
  const sent = new Headers(headers);
  const bearer = token.get();
  if (bearer) sent.set('Authorization', `Bearer ${bearer}`);
  if (body !== undefined) sent.set('Content-Type', 'application/json');
  let response;
  try {
    response = await fetch(new URL(path, ROOT), {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'network', `the server did not answer (${err.message})`);
  }
  if (response.ok) return response;
  let error = {};
  try {
    error = (await response.json()).error ?? {};
  } catch {
    // Not the API's JSON (a proxy's page, say): the status says enough.
  }
  const failure = new ApiError(
    response.status,
    error.code ?? `http_${response.status}`,
    error.message ?? response.statusText,
    error,
  );
  if (response.status === 401 || response.status === 403) {
    for (const listener of refusals) listener(failure, path);
  }
  throw failure;
}

/** The JSON answer of a call. */
export async function json(method, path, options) {
  return (await call(method, path, options)).json();
}

/** The path of one key: every byte that is not unreserved is escaped, '/'
 * too (the server reads %2F as '/'), so that no URL parser can collapse a
 * key's `.` or `..` segments. */
export function keyPath(key) {
  return `v1/kv/${encodeURIComponent(key)}`;
}

/** A query string of the parameters that are set. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') q.set(name, String(value));
  }
  const text = q.toString();
  return text ? `?${text}` : '';
}
