// The arithmetic of a like toggle over a server-side counter of +1 / -1 deltas: whether
// this browser likes a task, the delta a click sends, the delta that brings the browser's
// share back to what the user asked for (`compensation`), and which click's intent
// stands, of one tab's clicks and of every tab's.
//
// Pure, so it is unit-tested apart; `createLikes` (likes.js) wires it to a core, a sync
// engine and storage.

/** Whether this browser likes the task, its pending deltas included. */
export function isLiked(contribution, pending) {
  return contribution + pending > 0;
}

/** The delta a click on the toggle sends. */
export function toggleDelta(contribution, pending) {
  return isLiked(contribution, pending) ? -1 : 1;
}

/**
 * The delta that brings this browser's eventual share (settled + pending) to what the
 * user last asked for (`wanted`: liked or not), or, with no click in play, back to 0 or
 * 1: +1 from -1, -1 from 2, and so on; 0 when it is there.
 */
export function compensation(contribution, pending, wanted) {
  const eventual = contribution + pending;
  if (wanted !== undefined) return (wanted ? 1 : 0) - eventual;
  if (eventual < 0) return -eventual;
  if (eventual > 1) return 1 - eventual;
  return 0;
}

/**
 * The intent a tab's clicks on one task leave: the last click still in play. A click
 * whose like or unlike failed, was refused or discarded is out of play: what it asked
 * for did not happen, and the toggle rolls back to the click before it. Clicks before
 * the last one that settled can never be the intent again, so they are dropped.
 *
 * @param {{key: string | null, liked: boolean, at: number}[]} clicks oldest first
 */
export function intentOf(clicks) {
  return clicks.length ? clicks[clicks.length - 1] : undefined;
}

/** `clicks` once the op of `key` settled: the clicks before it are dropped. */
export function clickSettled(clicks, key) {
  const index = clicks.findIndex((click) => click.key === key);
  return index < 0 ? clicks : clicks.slice(index);
}

/**
 * `clicks` without the click of op `key` (its op left without applying). When it is the
 * first click in play, the toggle goes back to what it showed before it, and that stays
 * the intent (a click of no op, `key` null) until a later click: a discarded like that
 * the server applies after all is then taken back.
 */
export function clickWithdrawn(clicks, key) {
  const index = clicks.findIndex((click) => click.key === key);
  if (index < 0) return clicks;
  const rest = clicks.filter((_, at) => at !== index);
  return index === 0 ? [{ key: null, liked: !clicks[0].liked, at: clicks[0].at }, ...rest] : rest;
}

/**
 * The browser's intent on each task: of every tab's intents, the latest click's.
 * `records` are [tab id, Map task id -> [liked, at]]; ties go to the greater tab id.
 */
export function latestIntents(records) {
  const latest = new Map();
  for (const [tab, intents] of records) {
    for (const [taskId, [liked, at]] of intents) {
      if (isLaterThan({ at, tab }, latest.get(taskId))) latest.set(taskId, { liked, at, tab });
    }
  }
  return latest;
}

/** Whether a click ({at, tab}) comes after `other` (none: yes); a tie goes to the greater tab id. */
export function isLaterThan(click, other) {
  return !other || click.at > other.at || (click.at === other.at && click.tab > other.tab);
}
