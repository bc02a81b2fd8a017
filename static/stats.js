// Pure helpers for the consistency-window chart: percentiles, rolling series, SVG geometry.
// No DOM here; the view turns the returned strings into SVG elements.

/** Nearest-rank percentile of a list of numbers (`p` in 0..100); null when empty. */
export function percentile(values, p) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

/**
 * p50 and p99 over time: one point per sample, computed over the samples of the trailing
 * `spanMs` ending at it, so the line moves as the window's distribution moves.
 * @param {{at: number, ms: number}[]} samples in time order
 * @returns {{at: number, p50: number, p99: number}[]}
 */
export function rollingPercentiles(samples, spanMs = 30_000) {
  const points = [];
  let start = 0;
  for (let end = 0; end < samples.length; end += 1) {
    while (samples[end].at - samples[start].at > spanMs) start += 1;
    const windowed = samples.slice(start, end + 1).map((sample) => sample.ms);
    points.push({ at: samples[end].at, p50: percentile(windowed, 50), p99: percentile(windowed, 99) });
  }
  return points;
}

/**
 * An SVG path `d` for the points of one series inside a `width` x `height` box, time on x
 * over [from, to] and milliseconds on y over [0, maxMs]. Empty string when no point.
 */
export function linePath(points, pick, { from, to, maxMs, width, height }) {
  const span = Math.max(1, to - from);
  const top = Math.max(1, maxMs);
  const steps = points
    .filter((point) => point.at >= from && pick(point) != null)
    .map((point, index) => {
      const x = ((point.at - from) / span) * width;
      const y = height - (Math.min(pick(point), top) / top) * height;
      return `${index === 0 ? 'M' : 'L'}${x.toFixed(1)},${y.toFixed(1)}`;
    });
  // One point alone draws nothing as a line: a step of no length, drawn as a dot by the
  // series' round line caps.
  if (steps.length === 1) steps.push('h0');
  return steps.join(' ');
}

/** A round upper bound for the y axis: 1, 2 or 5 times a power of ten, at least `floor`. */
export function niceCeiling(value, floor = 1000) {
  const target = Math.max(value, floor);
  const power = 10 ** Math.floor(Math.log10(target));
  for (const step of [1, 2, 5, 10]) if (step * power >= target) return step * power;
  return 10 * power;
}
