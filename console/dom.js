// Building the page from data without ever parsing data as HTML: every key,
// value and message goes in as a text node, so `<img onerror=...>` in a key
// is shown as those characters. Nothing in the console sets innerHTML.

/** An element with properties and children; strings become text nodes. */
export function el(tag, props = {}, ...children) {
  return build(document.createElement(tag), props, children);
}

const SVG = 'http://www.w3.org/2000/svg';

/** An SVG element, as `el` builds HTML ones. */
export function svg(tag, props = {}, ...children) {
  return build(document.createElementNS(SVG, tag), props, children);
}

function build(node, props, children) {
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') node.setAttribute('class', value);
    else if (name === 'text') node.textContent = String(value);
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name === 'value' || name === 'checked' || name === 'disabled') node[name] = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  node.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** Replaces `node`'s children. */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** A button that runs `action` on click. */
export function button(label, action, props = {}) {
  return el('button', { type: 'button', onclick: action, ...props }, label);
}

/** "3.2 s", "120 ms", "850 µs" */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '–';
  if (seconds >= 1) return `${seconds.toFixed(seconds >= 10 ? 0 : 1)} s`;
  if (seconds >= 1e-3) return `${(seconds * 1e3).toFixed(seconds >= 1e-2 ? 0 : 1)} ms`;
  return `${(seconds * 1e6).toFixed(0)} µs`;
}

/** A countdown to `deadline` (a Date): "in 1 h 2 min", "in 12.3 s", "passed". */
export function countdown(deadline, now = Date.now()) {
  let ms = deadline.getTime() - now;
  if (ms <= 0) return 'passed: the key is gone for reads, its deletion is on the way';
  if (ms < 60_000) return `in ${(ms / 1000).toFixed(1)} s`;
  const parts = [];
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['min', 60_000], ['s', 1000]]) {
    const n = Math.floor(ms / size);
    if (n > 0 || parts.length > 0) parts.push(`${n} ${unit}`);
    ms -= n * size;
    if (parts.length === 2) break;
  }
  return `in ${parts.join(' ')}`;
}
