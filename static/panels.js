// The side panels: the consistency-window chart (the windows this page measured, beside
// the server's from GET /api/metrics, polled) and the fault panel (the server's failure
// knobs, PUT /api/faults, and polled with the metrics: another tab, or a script, may turn
// them). DOM only: the figures come from stats.js, the requests from the transport.

import { $, setText } from './dom.js';
import { linePath, niceCeiling, percentile, rollingPercentiles } from './stats.js';

/** How often the server's metrics (for the chart) and fault settings are polled. */
const METRICS_POLL_MS = 2000;
/** How much history the chart shows. */
const CHART_SPAN_MS = 120_000;
/** How many of the server's polled figures the chart keeps. */
const MAX_SERVER_POINTS = 200;
const SVG_NS = 'http://www.w3.org/2000/svg';
const CHART = { width: 300, height: 130, left: 16, top: 8 };
const FAULT_FIELDS = ['delay_ms', 'jitter_ms', 'failure_rate', 'drop_rate', 'transient_rate'];

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function formatMs(value) {
  return value == null ? '–' : `${Math.round(value)} ms`;
}

/**
 * @param {{transport: object, windowSamples: () => {at: number, ms: number}[]}} options
 *   `windowSamples`: the windows this page measured (the core's snapshot has them)
 */
export function createPanels({ transport, windowSamples }) {
  /** The server's window percentiles as polled: {at, p50, p99}, oldest first. */
  let serverSeries = [];

  function renderChart(samples) {
    const clientSeries = rollingPercentiles(samples);
    const to = Date.now();
    const from = to - CHART_SPAN_MS;
    const inRange = (point) => point.at >= from;
    const peak = Math.max(0, ...[...clientSeries, ...serverSeries].filter(inRange).flatMap((point) => [point.p99 ?? 0]));
    const maxMs = niceCeiling(peak);
    const box = { from, to, maxMs, width: CHART.width, height: CHART.height };
    const chart = $('window-chart');
    const plot = svg('g', { transform: `translate(${CHART.left},${CHART.top})` });
    plot.append(svg('rect', { class: 'plot-area', x: '0', y: '0', width: String(CHART.width), height: String(CHART.height) }));
    for (const fraction of [0.5, 1]) {
      const y = String(CHART.height - fraction * CHART.height);
      plot.append(svg('line', { class: 'grid', x1: '0', x2: String(CHART.width), y1: y, y2: y }));
      const label = svg('text', { class: 'axis', x: '2', y: String(Number(y) + 10) });
      label.textContent = `${Math.round(fraction * maxMs)} ms`;
      plot.append(label);
    }
    const series = [
      ['client-p50', clientSeries, (point) => point.p50],
      ['client-p99', clientSeries, (point) => point.p99],
      ['server-p50', serverSeries, (point) => point.p50],
      ['server-p99', serverSeries, (point) => point.p99],
    ];
    for (const [name, points, pick] of series) {
      const d = linePath(points, pick, box);
      if (d) plot.append(svg('path', { class: `series ${name}`, 'data-series': name, d }));
    }
    chart.replaceChildren(plot);

    const recent = samples.map((sample) => sample.ms);
    setText($('client-figures'), recent.length
      ? `p50 ${formatMs(percentile(recent, 50))}, p99 ${formatMs(percentile(recent, 99))} over ${recent.length} settled`
      : 'no sample yet');
  }

  async function pollMetrics() {
    try {
      const metrics = await transport.fetchMetrics();
      const window = metrics.window_ms ?? {};
      // The chart plots the recent figures (the last 30 to 60 s): those since start barely
      // move after a change of the delay. A server without them: those since start.
      const recent = metrics.window_recent_ms ?? window;
      if (recent.count > 0) {
        serverSeries = [...serverSeries, { at: Date.now(), p50: recent.p50, p99: recent.p99 }].slice(-MAX_SERVER_POINTS);
      }
      setText($('server-figures'), window.count > 0
        ? `p50 ${formatMs(window.p50)}, p99 ${formatMs(window.p99)}, max ${formatMs(window.max)} over ${window.count}`
          + (metrics.window_recent_ms && recent.count !== window.count
            ? `; in the last minute p50 ${formatMs(recent.p50)}, p99 ${formatMs(recent.p99)} over ${recent.count}`
            : '')
        : 'no settled command yet');
      // Dead letters are among the failed: commands the server gave up on after repeated
      // transient faults, which the transient fault rate makes happen.
      const deadLettered = metrics.dead_lettered ? ` (${metrics.dead_lettered} dead-lettered)` : '';
      setText($('server-counts'), `accepted ${metrics.accepted}, settled ${metrics.settled}, `
        + `failed ${metrics.failed}${deadLettered}, deduplicated ${metrics.deduplicated}, pending ${metrics.pending}`
        + (metrics.lag_ms >= 1000 ? `, applying ${formatMs(metrics.lag_ms)} behind due times` : '')
        + (metrics.refused ? `, refused ${metrics.refused} (the server's backlog was full or too far behind)` : ''));
      renderChart(windowSamples());
    } catch (error) {
      setText($('server-figures'), `unavailable (${error.message})`);
    }
  }

  // ---- the fault panel ----------------------------------------------------------------

  /**
   * PUTs go out one after the other, so the server ends with the last thing the user set;
   * a poll goes in the same line, and only while no PUT waits, so it never shows a value
   * from before one.
   */
  let faultChain = Promise.resolve();
  let putsWaiting = 0;
  /**
   * Per field, the value the server holds as far as this page knows: the last one it
   * answered or was sent. Apply sends only the fields that differ from it, so a value the
   * `change` of its field already sent does not go out again with the click that blurred it.
   */
  const held = new Map();

  function showFaults(settings) {
    const form = $('faults');
    for (const field of FAULT_FIELDS) {
      if (typeof settings[field] === 'number') held.set(field, settings[field]);
      const input = form.elements[field];
      // Never overwrite what the user is typing.
      if (input && settings[field] !== undefined && input !== document.activeElement) input.value = String(settings[field]);
    }
  }

  function readFaults(fields) {
    const form = $('faults');
    const update = {};
    for (const field of fields) {
      const raw = form.elements[field]?.value.trim() ?? '';
      if (raw !== '') update[field] = Number(raw);
    }
    return update;
  }

  /** The fault panel's status line: "Applied." or why a value was refused. */
  function sayFaultStatus(ok, text) {
    const status = $('fault-status');
    status.setAttribute('role', ok ? 'status' : 'alert');
    status.className = `fault-status ${ok ? 'ok' : 'error'}`;
    setText(status, text);
  }

  /** What the form says that the server is not known to hold: the update to send, or null. */
  function unsent(fields) {
    const differing = Object.entries(readFaults(fields)).filter(([field, value]) => value !== held.get(field));
    return differing.length ? Object.fromEntries(differing) : null;
  }

  /** PUT a subset of the settings (the server accepts any subset) and report the outcome. */
  function applyFaults(update) {
    putsWaiting += 1;
    for (const [field, value] of Object.entries(update)) held.set(field, value);
    faultChain = faultChain.then(async () => {
      try {
        showFaults(await transport.putFaults(update));
        sayFaultStatus(true, 'Applied.');
      } catch (error) {
        // What the server holds is not known now: the next Apply sends these again.
        for (const field of Object.keys(update)) held.delete(field);
        sayFaultStatus(false, `Refused: ${error.message}`);
      } finally {
        putsWaiting -= 1;
      }
    });
    return faultChain;
  }

  /** What the server holds now, set here or anywhere else. */
  function pollFaults() {
    if (putsWaiting) return faultChain;
    faultChain = faultChain.then(async () => {
      if (putsWaiting) return;
      const settings = await transport.fetchFaults().catch(() => null);
      if (settings && !putsWaiting) showFaults(settings);
    });
    return faultChain;
  }

  /**
   * Apply with nothing to send, as far as the page knows: what the server holds is read
   * again (another tab or a script may have turned a knob since the last poll), and what
   * differs from the form is sent.
   */
  function confirmHeld() {
    faultChain = faultChain.then(async () => {
      if (putsWaiting) return; // a PUT still on its way says how it went
      const settings = await transport.fetchFaults().catch(() => null);
      if (!settings) {
        sayFaultStatus(false, 'Not applied: the server did not answer.');
        return;
      }
      for (const field of FAULT_FIELDS) if (typeof settings[field] === 'number') held.set(field, settings[field]);
      const update = unsent(FAULT_FIELDS);
      if (update) applyFaults(update);
      else sayFaultStatus(true, 'Applied.');
    });
  }

  /**
   * Whether `input` holds a value the server would take; else it is not sent, and the
   * field and the status line say why, as the server would. Its range and its being a
   * number count, not its step: the arrows step by 0.05, and a rate of 0.33 is as good
   * (the form is `novalidate` for that).
   */
  function acceptable(input) {
    const { badInput, rangeOverflow, rangeUnderflow } = input.validity;
    if (!badInput && !rangeOverflow && !rangeUnderflow) return true;
    const why = badInput
      ? `${input.name} must be a number`
      : `${input.name} must be in [${input.min}, ${input.max}], got ${input.value}`;
    // In line after the PUTs already sent, so that an "Applied." of theirs does not
    // replace it.
    faultChain = faultChain.then(() => sayFaultStatus(false, `Refused: ${why}`));
    input.setCustomValidity(`${why}.`);
    input.reportValidity();
    input.setCustomValidity('');
    return false;
  }

  function bindFaultPanel() {
    const form = $('faults');
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      if (!FAULT_FIELDS.every((field) => acceptable(form.elements[field]))) return;
      const update = unsent(FAULT_FIELDS);
      if (update) applyFaults(update);
      else confirmHeld();
    });
    // A changed field applies on its own too: only that field, so it never resets the others.
    form.addEventListener('change', (event) => {
      if (!acceptable(event.target)) return;
      const update = unsent([event.target.name]);
      if (update) applyFaults(update);
    });
    pollFaults();
  }

  /** Bind the fault panel and start polling the server's metrics. */
  function start() {
    bindFaultPanel();
    setInterval(() => {
      pollMetrics();
      pollFaults();
    }, METRICS_POLL_MS);
    pollMetrics();
  }

  return { renderChart, start };
}
