// Server-Sent Events read from a fetch() body. EventSource cannot send an
// Authorization header, so the console reads /v1/watch with fetch (with or
// without a token: one code path) and parses the stream here.

/** The messages of an event stream: {event, data, id}. */
export async function* messages(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let message = fresh();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, '');
        buffer = buffer.slice(end + 1);
        if (line === '') {
          if (message.data.length > 0) {
            yield { event: message.event, data: message.data.join('\n'), id: message.id };
          }
          message = fresh();
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') message.event = text;
          else if (field === 'data') message.data.push(text);
          else if (field === 'id') message.id = text;
        }
      }
    }
  } finally {
    // Left early (the console moved on): close the stream.
    reader.cancel().catch(() => {});
  }
}

function fresh() {
  return { event: 'message', data: [], id: null };
}
