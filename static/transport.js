// The transport: commands over fetch with idempotency keys, the snapshot, the status and
// read endpoints, and the event stream over EventSource. It knows HTTP, not the core:
// `sync.js` wires the two together. `fetch`, `EventSource` and `sleep` are injectable so
// the retry policy can be exercised without a browser.

/** Attempts of one send before the op is left for the user's Retry. */
const SEND_ATTEMPTS = 4;
/** First backoff between attempts; doubles each time. */
const SEND_BACKOFF_MS = 250;
/**
 * Longest wait a server's Retry-After may stretch one pause between attempts to: the
 * attempts together stay within the app's stuck timeout (5 s), so an op is not marked
 * stuck (and retried by the user) while its first send still sleeps.
 */
const RETRY_AFTER_MAX_MS = 1_500;
/**
 * Longest one attempt may wait for its answer (a 202 takes milliseconds): then it is
 * abandoned and the next goes, under the same key. A request that hangs (a server frozen
 * with its socket open) would otherwise hold its key for ever, and Retry with it. A read
 * waits as long for its answer to begin; a small one must be whole by then too, and the
 * snapshot must not go that long without a byte (`fetchRead`).
 */
const SEND_ATTEMPT_TIMEOUT_MS = 5_000;

const defaultSleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Read a problem+json (RFC 9457) body's detail, or fall back to the status text. */
async function problemDetail(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || response.statusText;
  } catch {
    return response.statusText || `HTTP ${response.status}`;
  }
}

/**
 * How long a response asks the client to wait before it tries again (`Retry-After`, in
 * seconds or as an HTTP date), capped; 0 without one or with one it cannot read.
 * @param {Response} response
 */
function retryAfterMs(response, now = Date.now()) {
  const value = response.headers.get('Retry-After');
  if (!value) return 0;
  const seconds = Number(value);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - now;
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), RETRY_AFTER_MAX_MS) : 0;
}

/**
 * @param {{baseUrl?: string, fetch?: typeof fetch, EventSource?: typeof EventSource,
 *          sleep?: (ms: number) => Promise<void>, attemptTimeoutMs?: number}} options
 */
export function createTransport({
  baseUrl = '',
  fetch: fetchImpl = globalThis.fetch.bind(globalThis),
  EventSource: EventSourceImpl = globalThis.EventSource,
  sleep = defaultSleep,
  attemptTimeoutMs = SEND_ATTEMPT_TIMEOUT_MS,
} = {}) {
  /** Who hears whether requests find an answer (`watchAnswers`). */
  const answerListeners = new Set();
  /** A request was answered (`true`), or found no answer in time (`false`). */
  function heard(answered) {
    for (const listener of [...answerListeners]) listener(answered);
  }

  /**
   * A request, and `read` of its response, under one deadline at a time: the answer must
   * begin within `attemptTimeoutMs`, and then a small read must be whole by that same
   * deadline, while a large one (`streamed`: the snapshot, up to 164 MB) may take as long
   * as it needs so long as it never goes `attemptTimeoutMs` without a byte. A server frozen
   * with its socket open, or a body that stalls half-way, would otherwise hold the read,
   * and what waits on it (an overdue op's status check, a resync), for as long as the
   * browser lets a request hang; a slow link that is still delivering is not cut off.
   */
  async function fetchRead(url, init, read, { streamed = false } = {}) {
    const controller = new AbortController();
    let deadline;
    const giveUpAfter = (what) => {
      clearTimeout(deadline);
      deadline = setTimeout(() => {
        controller.abort(new DOMException(`${what} within ${attemptTimeoutMs} ms`, 'TimeoutError'));
      }, attemptTimeoutMs);
    };
    giveUpAfter(streamed ? 'no answer' : 'no whole answer');
    // Raced as well: a body read ends on the abort only if the fetch ties them together.
    const aborted = new Promise((_, reject) => {
      controller.signal.addEventListener('abort', () => reject(controller.signal.reason), { once: true });
    });
    let answered = false;
    const reading = (async () => {
      const response = await fetchImpl(url, { ...init, signal: controller.signal });
      answered = true;
      heard(true);
      if (!streamed) return read(response);
      giveUpAfter('no data');
      // No stream to watch (a body-less status): read under the one deadline.
      if (!response.body) return read(response);
      const watched = response.body.pipeThrough(new TransformStream({
        transform(chunk, out) {
          giveUpAfter('no data');
          out.enqueue(chunk);
        },
        // Whole: parsing it is not the link's doing.
        flush: () => clearTimeout(deadline),
      }));
      const { status, statusText, headers } = response;
      return read(new Response(watched, { status, statusText, headers }));
    })();
    try {
      return await Promise.race([reading, aborted]);
    } catch (error) {
      if (!answered && error?.name === 'TimeoutError') heard(false);
      throw error;
    } finally {
      clearTimeout(deadline);
    }
  }

  function getJson(path, options) {
    return fetchRead(baseUrl + path, { headers: { Accept: 'application/json' }, cache: 'no-store' }, async (response) => {
      if (response.status === 404) return null;
      if (!response.ok) throw new Error(`GET ${path}: ${response.status} ${await problemDetail(response)}`);
      return response.json();
    }, options);
  }

  /**
   * Send one command under its idempotency key. Network errors, 5xx and 409 (the same key
   * is being accepted right now) are retried with backoff under the SAME key: the server
   * answers a replay with the stored 202, so the user's intent has one effect whatever
   * happens to the packets. A retried answer's `Retry-After` (the server sends one with
   * every 503: overloaded, shutting down) lengthens the pause before the next attempt to
   * what it asks, up to 1.5 s.
   * @param {{method: string, path: string, body: object | null}} request
   * @param {string} key
   * @returns {Promise<{outcome: 'accepted', command_id: string, accepted_at: string, replayed: boolean}
   *   | {outcome: 'rejected', status: number, detail: string}
   *   | {outcome: 'unavailable', offline: boolean, status: number | null, detail: string}>}
   */
  async function sendCommand({ method, path, body }, key, { attempts = SEND_ATTEMPTS } = {}) {
    const headers = { 'Idempotency-Key': key, Accept: 'application/json' };
    if (body) headers['Content-Type'] = 'application/json';
    const payload = body ? JSON.stringify(body) : undefined;
    let lastProblem = 'no answer';
    // The status of the last answer that refused it, if one came.
    let lastStatus = null;
    // Whether the last attempt got no answer at all (rather than a 5xx or a 409).
    let offline = true;
    let askedWaitMs = 0;
    for (let attempt = 0; attempt < attempts; attempt += 1) {
      if (attempt > 0) await sleep(Math.max(SEND_BACKOFF_MS * 2 ** (attempt - 1), askedWaitMs));
      askedWaitMs = 0;
      let response;
      try {
        response = await fetchImpl(baseUrl + path, { method, headers, body: payload, signal: AbortSignal.timeout(attemptTimeoutMs) });
      } catch (error) {
        lastProblem = `network error: ${error.message}`;
        lastStatus = null;
        offline = true;
        if (error?.name === 'TimeoutError') heard(false);
        continue;
      }
      heard(true);
      if (response.status === 202 || response.ok) {
        const accepted = await response.json();
        return {
          outcome: 'accepted',
          command_id: accepted.command_id,
          accepted_at: accepted.accepted_at,
          replayed: response.headers.get('Idempotent-Replayed') === 'true',
        };
      }
      if (response.status === 409 || response.status >= 500) {
        askedWaitMs = retryAfterMs(response);
        lastProblem = `${response.status}: ${await problemDetail(response)}`;
        lastStatus = response.status;
        offline = false;
        continue;
      }
      return { outcome: 'rejected', status: response.status, detail: await problemDetail(response) };
    }
    return { outcome: 'unavailable', offline, status: lastStatus, detail: lastProblem };
  }

  /**
   * Open the event stream at `lastEventId` (the snapshot's watermark). EventSource itself
   * reconnects after a dropped connection and sends `Last-Event-ID`, so the server resumes
   * with no gap; `onEvent` gets `{id, type, data}` with a numeric id.
   * @returns {{close: () => void}}
   */
  function openEvents(lastEventId, { onEvent, onOpen, onError }) {
    const source = new EventSourceImpl(`${baseUrl}/api/events?last_event_id=${encodeURIComponent(lastEventId)}`);
    const forward = (type) => (message) => {
      let data = null;
      try {
        data = message.data ? JSON.parse(message.data) : null;
      } catch {
        return; // Not ours to interpret; the next snapshot will carry the truth.
      }
      onEvent({ id: Number(message.lastEventId), type, data });
    };
    for (const type of ['projection:settled', 'command:failed', 'reset']) source.addEventListener(type, forward(type));
    source.addEventListener('open', () => onOpen?.());
    source.addEventListener('error', () => onError?.({ closed: source.readyState === EventSourceImpl.CLOSED }));
    return { close: () => source.close() };
  }

  function putFaults(settings) {
    const request = {
      method: 'PUT',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify(settings),
    };
    return fetchRead(`${baseUrl}/api/faults`, request, async (response) => {
      if (!response.ok) throw new Error(await problemDetail(response));
      return response.json();
    });
  }

  return {
    sendCommand,
    openEvents,
    /**
     * Hear, per request, whether it was answered or found no answer in time (a server
     * frozen with its sockets open keeps the event stream open, and only this tells).
     * @param {(answered: boolean) => void} listener
     * @returns {() => void} stop hearing
     */
    watchAnswers(listener) {
      answerListeners.add(listener);
      return () => answerListeners.delete(listener);
    },
    /** `{tasks, watermark}` */
    fetchSnapshot: async () => {
      const snapshot = await getJson('/api/tasks', { streamed: true });
      if (!snapshot) throw new Error('GET /api/tasks: 404');
      return snapshot;
    },
    /** The task, or null on 404. */
    fetchTask: (id) => getJson(`/api/tasks/${encodeURIComponent(id)}`),
    /** `{id, likes, version}`, or null on 404. */
    fetchCounts: (id) => getJson(`/api/tasks/${encodeURIComponent(id)}/counts`),
    /** The command's status record, or null when the server does not know it. */
    fetchCommand: (commandId) => getJson(`/api/commands/${encodeURIComponent(commandId)}`),
    /** The command stored under an idempotency key (for an op that never got its 202), or null. */
    fetchCommandByKey: (key) => getJson(`/api/commands?key=${encodeURIComponent(key)}`),
    fetchMetrics: () => getJson('/api/metrics'),
    fetchFaults: () => getJson('/api/faults'),
    putFaults,
  };
}
