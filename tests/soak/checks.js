// The soak's judgements (tests/soak/two-tabs.mjs), pure: each takes what was recorded (the
// server's event log, the commands a tab sent, what a tab showed) and returns the problems
// found, as sentences. Unit-tested in tests/js/soak-checks.test.js.
//
// They judge by versions, never by the clock: a `projection:settled` event carries the
// task as it stands at its version, and the page reports the confirmed version each edit
// was made on, as its editor opened (its op's `made_on`; the PATCH's or DELETE's
// `base_version` adds the tab's own changes since, static/send-order.js `sendQueued`).

import { fold, EVENT_SETTLED, EVENT_FAILED } from '../../static/ops.js';
import { EDIT_FIELDS } from '../../static/conflicts.js';

export { EVENT_SETTLED, EVENT_FAILED, EDIT_FIELDS };

/** A command's task id from its path (`/api/tasks/ID`, `/api/tasks/ID/likes`), or its body's. */
export const taskOf = (command) => command.body?.id ?? decodeURIComponent(command.path.split('/')[3] ?? '');

/** The fields a PATCH or DELETE sets, with their values (a DELETE: every edit field). */
function editedFields(command) {
  if (command.method === 'DELETE') return [...EDIT_FIELDS];
  return Object.keys(command.body ?? {}).filter((field) => field !== 'base_version');
}

/**
 * Each task's settled versions from the event log, in version order: `{ version, task, key,
 * id }` with the task as it stood after that command (a delete: `task` null) and the
 * event's id.
 */
export function histories(events) {
  const byTask = new Map();
  for (const event of events) {
    if (event.type !== EVENT_SETTLED || event.data.version == null) continue;
    const list = byTask.get(event.data.task_id) ?? [];
    list.push({ version: event.data.version, task: event.data.task ?? null, key: event.data.idempotency_key, id: event.id });
    byTask.set(event.data.task_id, list);
  }
  for (const list of byTask.values()) list.sort((a, b) => a.version - b.version);
  return byTask;
}

/**
 * The writes of `field` in versions (from, to]: the settled commands whose version changed
 * its value, with who sent them.
 */
export function writesOf(history, field, from, to) {
  const writes = [];
  let previous;
  for (const entry of history ?? []) {
    const value = entry.task?.[field];
    if (entry.version > from && entry.version <= to && previous !== undefined && value !== previous) {
      writes.push({ version: entry.version, key: entry.key, value });
    }
    previous = value;
  }
  return writes;
}

/** The task as it stood at `version` (the last settled version at or before it). */
export function taskAt(history, version) {
  let task;
  for (const entry of history ?? []) if (entry.version <= version) task = entry.task;
  return task;
}

/**
 * One entry per idempotency key a tab sent, in the order first sent (a Retry sends the same
 * key again, with the same body).
 */
export function firstSends(commands) {
  const seen = new Set();
  return commands.filter((command) => !seen.has(command.key) && seen.add(command.key));
}

/** Each key's outcome in the log: the event that settled or failed it. */
export const outcomes = (events) => new Map(events.map((event) => [event.data.idempotency_key, event]));

const refusedAsConflict = (event) => event?.type === EVENT_FAILED && event.data.reason === 'conflict';

/**
 * The version the user's view of the task stood on when the edit sent as `command` was
 * made: the confirmed version the page reported for it (`edits`, by key; 0: the task was
 * not confirmed yet). Without a report, its `base_version`, which also counts the tab's
 * own changes since.
 */
function madeOn(command, edits) {
  return edits.has(command.key) ? (edits.get(command.key) ?? 0) : command.body?.base_version;
}

/**
 * The send that began the edit `command` carries on. When the server refuses an edit as a
 * conflict that nobody else's change explains, the client sends it again by itself, under
 * a new key, made on the version the refusal showed (static/conflicts.js, rebasePlan):
 * the same request with the fields it still sets. A conflict put to the user ends a
 * chain: Keep mine is the user's decision. `views`: the conflict views the tab opened,
 * `{ at, task_id, kind, yours }`; `edits`: the version each key was made on.
 */
export function chainStart(sends, command, results, views, edits = new Map()) {
  const sameEdit = (earlier, later) => later.method === 'DELETE'
    || editedFields(later).every((field) => earlier.body && field in earlier.body && earlier.body[field] === later.body[field]);
  // Made on the version its refusal showed: a new intent of the same edit is made on
  // whatever the tab has confirmed when the user acts again.
  const resentAfter = (earlier, later) => {
    const refusal = results.get(earlier.key);
    return refusedAsConflict(refusal) && madeOn(later, edits) === refusal.data.current?.version;
  };
  const shownBetween = (earlier, later) => views.some((view) => view.task_id === taskOf(later)
    && view.at >= earlier.at && view.at <= later.at
    && (view.kind === 'delete') === (later.method === 'DELETE'));
  let current = command;
  for (;;) {
    const index = sends.indexOf(current);
    const previous = sends.slice(0, index).reverse().find((earlier) => earlier.method === current.method
      && earlier.path === current.path && resentAfter(earlier, current) && sameEdit(earlier, current));
    if (!previous || shownBetween(previous, current)) return current;
    current = previous;
  }
}

/** What the judgements of edits look up: each key's outcome, each task's versions, the tab's keys. */
function lookups(sends, events) {
  return { results: outcomes(events), byTask: histories(events), mine: new Set(sends.map((command) => command.key)) };
}

/**
 * No silent overwrite: an edit the client sent again on a newer version (a rebase, no
 * question asked) must not replace a value of a field it sets that another tab wrote after
 * the user's edit was made. A value this tab itself predicted (it sent it) counts as seen,
 * as the client counts it.
 */
export function checkRebases(name, sends, events, views, edits = new Map()) {
  const problems = [];
  const { results, byTask, mine } = lookups(sends, events);
  for (const command of sends) {
    if (command.method !== 'PATCH' && command.method !== 'DELETE') continue;
    if (results.get(command.key)?.type !== EVENT_SETTLED || command.body?.base_version == null) continue;
    const start = chainStart(sends, command, results, views, edits);
    const from = madeOn(start, edits);
    const to = madeOn(command, edits);
    if (start === command || from == null) continue;
    const taskId = taskOf(command);
    const history = byTask.get(taskId);
    for (const field of editedFields(command)) {
      const last = writesOf(history, field, from, to).at(-1);
      if (!last || mine.has(last.key)) continue;
      if (taskAt(history, from)?.[field] === last.value) continue; // changed and changed back
      const predicted = sends.some((sent) => sent !== command && taskOf(sent) === taskId && sent.body?.[field] === last.value);
      if (predicted) continue;
      problems.push(`[${name}] silent overwrite of ${taskId}: ${command.method} ${JSON.stringify(command.body)} (key ${command.key}) was sent again on version ${to} over ${field} = ${JSON.stringify(last.value)}, written by another tab at version ${last.version} after the edit was made on version ${from}`);
    }
  }
  return problems;
}

/**
 * A conflict view tells the truth: one that says someone else changed what the user edited
 * (not `kept_moving`) has another tab's write of one of those fields after the edit was
 * made, up to the version the view shows as theirs.
 */
export function checkConflictViews(name, sends, events, views, edits = new Map()) {
  const problems = [];
  const { results, byTask, mine } = lookups(sends, events);
  for (const view of views) {
    if (view.kept_moving) continue;
    const method = view.kind === 'delete' ? 'DELETE' : 'PATCH';
    const fields = view.kind === 'delete' ? [...EDIT_FIELDS] : Object.keys(view.yours);
    // The refused send the view stands for: this tab's last send of that edit before it.
    const refused = [...sends].reverse().find((command) => command.method === method && taskOf(command) === view.task_id
      && command.at <= view.at && refusedAsConflict(results.get(command.key))
      && (method === 'DELETE' || fields.every((field) => command.body?.[field] === view.yours[field])));
    if (!refused) {
      problems.push(`[${name}] a conflict view on ${view.task_id} (yours ${JSON.stringify(view.yours)}) with no refused send of this tab behind it`);
      continue;
    }
    const start = chainStart(sends, refused, results, views.filter((other) => other !== view), edits);
    const from = madeOn(start, edits);
    if (from == null) continue;
    const to = view.theirs?.version ?? Number.MAX_SAFE_INTEGER;
    const history = byTask.get(view.task_id);
    const others = fields.flatMap((field) => writesOf(history, field, from, to)
      .filter((write) => !mine.has(write.key)).map((write) => `${field}@${write.version}`));
    if (others.length === 0) {
      problems.push(`[${name}] conflict view on ${view.task_id} says someone else changed ${fields.join(', ')}, but no other tab wrote them between version ${from} (the edit's) and ${to} (theirs): yours ${JSON.stringify(view.yours)}`);
    }
  }
  return problems;
}

/**
 * No double submit: no idempotency key applied or failed twice, and no create intent applied
 * twice (the soak gives every create a title of its own).
 */
export function checkDuplicates(events) {
  const problems = [];
  const byKey = new Map();
  const createsByTitle = new Map();
  for (const event of events) {
    const key = event.data.idempotency_key;
    byKey.set(key, (byKey.get(key) ?? 0) + 1);
    if (event.type === EVENT_SETTLED && event.data.kind === 'create') {
      const title = event.data.task?.title;
      createsByTitle.set(title, [...(createsByTitle.get(title) ?? []), event.data.task_id]);
    }
  }
  for (const [key, count] of byKey) if (count > 1) problems.push(`key ${key} has ${count} outcomes in the log`);
  for (const [title, ids] of createsByTitle) if (ids.length > 1) problems.push(`"${title}" was created ${ids.length} times: ${ids.join(', ')}`);
  return problems;
}

/**
 * What a tab shows, against the server's tasks (`GET /api/tasks`): no row twice; a settled
 * row shows the server's values (no fake success); a stuck row offers Retry and Discard; a
 * row still pending is named (the caller waited past the stuck timeout: a spinner); every
 * server task is listed unless a delete of it is pending here.
 * `shown`: `{ rows: [{ id, state, title, done, likes, retry, discard }], ops: [{ task_id, kind }] }`.
 */
export function checkRows(name, shown, tasks) {
  const problems = [];
  const server = new Map(tasks.map((task) => [task.id, task]));
  const listed = new Set();
  for (const row of shown.rows) {
    if (listed.has(row.id)) problems.push(`[${name}] "${row.title}" (${row.id}) is listed twice`);
    listed.add(row.id);
    const task = server.get(row.id);
    if (row.state === 'settled') {
      if (!task) {
        problems.push(`[${name}] "${row.title}" (${row.id}) shows as settled, and the server has no such task`);
        continue;
      }
      const differs = ['title', 'done', 'likes'].filter((field) => task[field] !== row[field]);
      if (differs.length) {
        problems.push(`[${name}] "${row.title}" (${row.id}) shows as settled with ${differs.map((field) => `${field} ${JSON.stringify(row[field])}`).join(', ')}; the server has ${differs.map((field) => JSON.stringify(task[field])).join(', ')}`);
      }
    } else if (row.state === 'stuck') {
      if (!row.retry || !row.discard) problems.push(`[${name}] "${row.title}" (${row.id}) is stuck without Retry and Discard`);
    } else if (row.state === 'pending') {
      problems.push(`[${name}] "${row.title}" (${row.id}) is still pending`);
    }
  }
  const deleting = new Set(shown.ops.filter((op) => op.kind === 'delete').map((op) => op.task_id));
  for (const task of tasks) {
    if (!listed.has(task.id) && !deleting.has(task.id)) problems.push(`[${name}] the server's "${task.title}" (${task.id}) is not listed, and no delete of it is pending`);
  }
  return problems;
}

/**
 * Likes, per browser (a browser context: its tabs share localStorage): each browser's share
 * of a task's likes is 0 or 1, the shares add up to the server's count, and the toggle shows
 * Liked exactly where the share is 1.
 * `browsers`: `[{ name, shares: { taskId: n }, pressed: [{ tab, id, liked }] }]`.
 */
export function checkShares(browsers, tasks) {
  const problems = [];
  for (const task of tasks) {
    const shares = browsers.map((browser) => browser.shares[task.id] ?? 0);
    if (shares.some((share) => share !== 0 && share !== 1)) problems.push(`"${task.title}" (${task.id}): a browser's share is out of 0..1: ${shares.join(', ')}`);
    const sum = shares.reduce((total, share) => total + share, 0);
    if (sum !== task.likes) problems.push(`"${task.title}" (${task.id}): the browsers' shares ${shares.join(' + ')} do not add up to the server's ${task.likes} likes`);
    for (const [index, browser] of browsers.entries()) {
      for (const toggle of browser.pressed.filter((pressed) => pressed.id === task.id)) {
        if (toggle.liked !== (shares[index] > 0)) problems.push(`[${toggle.tab}] "${task.title}" (${task.id}) shows ${toggle.liked ? 'Liked' : 'Like'} with the browser's share at ${shares[index]}`);
      }
    }
  }
  return problems;
}

/**
 * Read your own writes and monotonic reads, across the window: every row a tab showed, as
 * it changed (`samples`, in order: `{ load, task_id, version, watermark, title, done,
 * likes, ops }`, `version` the one it is confirmed at, `ops` its stack with each op's
 * values, as the core holds them).
 * - It shows the server's task at that version with its stack folded on top: a confirmed
 *   row is one the server had, and a pending write shows until it leaves.
 * - Its version is at least that of every settled event on the task up to the tab's
 *   watermark: a write the tab has seen applied, its own or another's, stays shown.
 * - Its version never goes back, across reloads too.
 */
export function checkShownRows(name, samples, events) {
  const problems = [];
  const byTask = histories(events);
  const last = new Map();
  const reported = new Set();
  const report = (sample, what) => {
    // One problem per task and kind: a row that is wrong stays wrong for many samples.
    const id = `${sample.task_id} ${what.split(':')[0]}`;
    if (reported.has(id)) return;
    reported.add(id);
    problems.push(`[${name}] ${sample.task_id} showed ${JSON.stringify({ title: sample.title, done: sample.done, likes: sample.likes })} at version ${sample.version} (watermark ${sample.watermark}, ops ${JSON.stringify(sample.ops)}): ${what}`);
  };
  for (const sample of samples) {
    const history = byTask.get(sample.task_id);
    const server = sample.version == null ? null : history?.find((entry) => entry.version === sample.version)?.task;
    if (sample.version != null && !server) report(sample, 'a version: the server never had it');
    else {
      const expected = fold(server, sample.ops);
      const differs = expected ? ['title', 'done', 'likes'].filter((field) => expected[field] !== sample[field]) : [];
      if (differs.length) report(sample, `its fields: the server's version with the stack on it gives ${differs.map((field) => `${field} ${JSON.stringify(expected[field])}`).join(', ')}`);
    }
    // The highest version the tab has applied (the history is in version order).
    const known = history?.filter((entry) => entry.task && entry.id <= sample.watermark).at(-1);
    if (known && !(sample.version >= known.version)) {
      report(sample, `an applied write: event #${known.id} (key ${known.key}) settled version ${known.version}; the tab had applied it (watermark), and the row is behind it`);
    }
    const before = last.get(sample.task_id);
    if (before != null && sample.version != null && sample.version < before) report(sample, `a version going back: it showed version ${before} before`);
    if (sample.version != null) last.set(sample.task_id, Math.max(before ?? 0, sample.version));
  }
  return problems;
}

/** A notice names a task by a title it had (the server's events, or the tabs' creates). */
export function checkNoticeTitles(name, notices, events, sends) {
  const problems = [];
  const titles = new Map();
  const add = (taskId, title) => titles.set(taskId, new Set([...(titles.get(taskId) ?? []), title]));
  for (const event of events) {
    const task = event.data.task ?? event.data.current;
    if (task) add(event.data.task_id, task.title);
  }
  for (const command of sends) if (command.method === 'POST' && command.body?.title) add(command.body.id, command.body.title);
  for (const notice of notices) {
    const quoted = /“([^”]*)”/.exec(notice.text)?.[1];
    const known = titles.get(notice.task_id);
    if (quoted !== undefined && known && !known.has(quoted)) {
      problems.push(`[${name}] a notice names "${quoted}", a title ${notice.task_id} never had (${[...known].join(', ')}): ${notice.text}`);
    }
  }
  return problems;
}

/** One task's story for a report: every send of the tabs on it and every event, by version and order. */
export function timeline(taskId, tabs, events) {
  const lines = [];
  for (const tab of tabs) {
    for (const command of tab.sends.filter((sent) => taskOf(sent) === taskId)) {
      lines.push(`  ${tab.name} sent ${command.method} ${JSON.stringify(command.body)} key ${command.key}`);
    }
  }
  for (const event of events.filter((logged) => logged.data.task_id === taskId)) {
    const by = tabs.find((tab) => tab.sends.some((sent) => sent.key === event.data.idempotency_key))?.name ?? '?';
    const task = event.data.task ?? event.data.current;
    lines.push(`  #${event.id} ${event.type} ${event.data.kind} by ${by} key ${event.data.idempotency_key} version ${event.data.version ?? task?.version ?? '-'}${event.data.reason ? ` (${event.data.reason})` : ''} title ${JSON.stringify(task?.title)} done ${task?.done} likes ${task?.likes}`);
  }
  return lines.join('\n');
}
