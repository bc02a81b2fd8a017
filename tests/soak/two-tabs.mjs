// The long chaos run, outside CI (a few minutes a seed): two tabs click fast through every
// action (creates, renames, notes, done, likes, deletes, double clicks, Retry, Discard,
// Keep mine, Take theirs, reloads) while the server fails 30% of commands and drops 10% of
// deliveries, set in the app's own fault panel. Then it judges, by versions and counts
// (tests/soak/checks.js):
// 1. faults still on, once the clicks stop: nothing spins, what shows as settled is what
//    the server has, nothing applied twice;
// 2. faults off, every Retry and Take theirs clicked: both tabs show exactly the server's
//    rows, no op left; each browser's like share is 0 or 1 and the shares add up to the
//    count; no conflict view says someone else changed what nobody else changed; no edit
//    re-sent without asking overwrote another tab's change; every notice names a title
//    its task had;
// 3. across the window, from every row each tab showed as it changed: read your own writes
//    and monotonic reads (checkShownRows).
// ./scripts/test runs 12 steps of it in each mode; tests/e2e/chaos.test.js is a short
// chaos run with assertions of its own. A problem prints the story of its task (every send
// and event) and the run exits 1; the same seed replays the clicks.
//
//   cargo build && npm run soak -- --seed 44 --runs 5 --browsers 2
//
// Options: --seed N (first seed, 1), --runs K (seeds N..N+K-1, 1), --actions A (150),
// --reload P (chance a step reloads a tab, 0.05), --browsers 1|2 (two tabs of one browser
// context sharing localStorage, or one tab in each of two; 2), --tabs T (2; more go to the
// browsers in turn, so --tabs 3 --browsers 1 is three tabs sharing one localStorage),
// --failure-rate (0.3), --drop-rate (0.1), --transient-rate (0: applies that fail and are
// retried with backoff, dead-lettered after five), --jitter-ms (0: applies out of
// acceptance order across tasks). SETTLE_BIN and CHROMIUM_PATH as for the e2e tests.

import { parseArgs } from 'node:util';

import {
  startServer, launchBrowser, openTab, eventually, sleep, recordCommands, waitForLive, seededRandom,
} from '../e2e/helpers.js';
import { browserShares } from '../../static/like-records.js';
import { memoryStorage } from '../js/like-tabs.js';
import {
  checkRows, checkDuplicates, checkShares, checkConflictViews, checkRebases, checkNoticeTitles, checkShownRows,
  firstSends, timeline, EVENT_SETTLED, EVENT_FAILED,
} from './checks.js';

const { values: options } = parseArgs({
  options: {
    seed: { type: 'string', default: '1' },
    runs: { type: 'string', default: '1' },
    actions: { type: 'string', default: '150' },
    reload: { type: 'string', default: '0.05' },
    browsers: { type: 'string', default: '2' },
    tabs: { type: 'string', default: '2' },
    'failure-rate': { type: 'string', default: '0.3' },
    'drop-rate': { type: 'string', default: '0.1' },
    'transient-rate': { type: 'string', default: '0' },
    'jitter-ms': { type: 'string', default: '0' },
  },
});

/**
 * Runs in every page before the app: reports each conflict view as it opens, each notice,
 * and each row as it changes (what it shows, the version it is confirmed at, its stack and
 * the tab's watermark), through the context's `soakRecord` binding (which outlives a
 * reload).
 */
function watchPage() {
  const watch = () => {
    const core = window.settle?.core;
    if (!core) return void setTimeout(watch, 5);
    const open = new Set();
    const noticed = new Set();
    const edits = new Set();
    const rows = new Map();
    const load = performance.timeOrigin;
    const look = () => {
      const snapshot = core.getSnapshot();
      for (const item of snapshot.items) {
        if (rows.get(item.id) === item) continue;
        rows.set(item.id, item);
        const ops = item.ops.map(({ key, kind }) => {
          const { title, patch, delta } = core.getOp(key) ?? {};
          return { key, kind, title, patch, delta };
        });
        const { title, done, likes } = item.task;
        window.soakRecord('row', {
          load, task_id: item.id, version: item.confirmed?.version ?? null, watermark: snapshot.watermark, title, done, likes, ops,
        });
      }
      for (const op of core.pendingOps()) {
        // An edit or delete on a base keeps the confirmed version its editor opened on.
        if (op.made_on === undefined || edits.has(op.key)) continue;
        edits.add(op.key);
        window.soakRecord('edit', { key: op.key, confirmed: op.made_on });
      }
      const now = new Set();
      for (const { conflict } of snapshot.items) {
        if (!conflict) continue;
        const id = `${conflict.task_id} ${conflict.kind} ${JSON.stringify(conflict.yours)}`;
        now.add(id);
        if (!open.has(id)) {
          const { task_id, kind, yours, theirs, kept_moving, changed } = conflict;
          window.soakRecord('view', { at: Date.now(), task_id, kind, yours, theirs, kept_moving, changed });
        }
      }
      open.clear();
      for (const id of now) open.add(id);
      for (const notice of snapshot.notices) {
        if (noticed.has(notice.id)) continue;
        noticed.add(notice.id);
        window.soakRecord('notice', { at: Date.now(), task_id: notice.task_id, reason: notice.reason, text: notice.text });
      }
    };
    // Run among the app's own listeners: a fault here must not break the app under test.
    const guarded = () => {
      try {
        look();
      } catch (error) {
        window.soakRecord('fault', { at: Date.now(), text: String(error?.stack ?? error) });
      }
    };
    core.subscribe(guarded);
    guarded();
  };
  watch();
}

/**
 * What the watcher of each page reported, by page (a reload keeps the page): `views`,
 * `notices`, and `edits`, the confirmed version each edit's key was made on.
 */
const reports = new Map();
function reportsOf(page) {
  if (!reports.has(page)) reports.set(page, { views: [], notices: [], edits: new Map(), faults: [], samples: [] });
  return reports.get(page);
}

/** A browser context with the page watcher and the binding it reports to. */
async function newBrowser(browser) {
  const context = await browser.newContext();
  await context.exposeBinding('soakRecord', ({ page }, kind, entry) => {
    const report = reportsOf(page);
    if (kind === 'view') report.views.push(entry);
    else if (kind === 'notice') report.notices.push(entry);
    else if (kind === 'fault') report.faults.push(entry);
    else if (kind === 'row') report.samples.push(entry);
    else if (!report.edits.has(entry.key)) report.edits.set(entry.key, entry.confirmed);
  });
  await context.addInitScript(watchPage);
  return context;
}

async function addTab(context, url, name) {
  const opened = await openTab(context, url);
  return { name, context, ...opened, ...reportsOf(opened.page), sends: recordCommands(opened.page) };
}

/** What a tab shows: every row, and the ops its core holds. */
function shownBy(page) {
  return page.evaluate(() => ({
    rows: [...document.querySelectorAll('[data-testid="task-list"] > [data-testid="task"]')].map((li) => ({
      id: li.dataset.id,
      state: li.dataset.state,
      title: li.querySelector('[data-testid="title"]').textContent,
      done: li.querySelector('[data-testid="done"]').checked,
      likes: Number(li.querySelector('[data-testid="likes"]').textContent),
      liked: li.querySelector('[data-testid="like"]').getAttribute('aria-pressed') === 'true',
      retry: !!li.querySelector('[data-testid="retry"]'),
      discard: !!li.querySelector('[data-testid="discard"]'),
    })),
    ops: window.settle.core.pendingOps().map(({ key, kind, task_id, state }) => ({ key, kind, task_id, state })),
  }));
}

/**
 * Each task's like share of the browser the page is in, as the app counts it from its
 * tabs' records in localStorage (`browserShares`: records taken in by another are not
 * counted twice).
 */
async function sharesOf(page) {
  const storage = memoryStorage();
  const entries = await page.evaluate(() => Array.from({ length: localStorage.length }, (_, index) => {
    const key = localStorage.key(index);
    return [key, localStorage.getItem(key)];
  }));
  for (const [key, value] of entries) storage.setItem(key, value);
  return Object.fromEntries(browserShares(storage));
}

/** The whole event log, read the way a browser reads it (EventSource from id 0) until quiet. */
function eventLog(page) {
  return page.evaluate(({ settled, failed }) => new Promise((resolve) => {
    const events = [];
    const source = new EventSource('/api/events?last_event_id=0');
    let quiet;
    const done = () => {
      source.close();
      resolve(events);
    };
    const take = (event) => {
      events.push({ id: Number(event.lastEventId), type: event.type, data: JSON.parse(event.data) });
      clearTimeout(quiet);
      quiet = setTimeout(done, 1000);
    };
    source.addEventListener(settled, take);
    source.addEventListener(failed, take);
    quiet = setTimeout(done, 2000);
  }), { settled: EVENT_SETTLED, failed: EVENT_FAILED });
}

/** One user action on `tab`, chosen by `next`. A click whose item went meanwhile misses. */
async function act(tab, next, counts, labels) {
  const { page } = tab;
  // The user switches to the tab first: a background tab gets no frames, and a click
  // waits for them (with one browser, the other tab is in the background).
  await page.bringToFront();
  const count = (what) => { counts[what] = (counts[what] ?? 0) + 1; };
  const fast = { timeout: 800 };
  // A row being deleted takes no changes (its controls are disabled): the user picks another.
  const rows = page.locator('[data-testid="task-list"] > [data-testid="task"]:not([data-deleting="true"])');
  const listed = await rows.count();
  const roll = next();
  try {
    if (listed < 3 || roll < 0.16) {
      const title = labels.next(tab, 'c');
      await page.getByTestId('new-title').fill(title, fast);
      const how = next();
      if (how < 0.2) {
        await page.getByTestId('new-title').press('Enter');
        await page.getByTestId('new-title').press('Enter');
        count('create, Enter twice');
      } else if (how < 0.35) {
        await page.getByTestId('add').dblclick(fast);
        count('create, double click');
      } else {
        await page.getByTestId('new-title').press('Enter');
        count('create');
      }
      return;
    }
    const row = rows.nth(next.below(listed));
    if (roll < 0.36) {
      await row.getByTestId('rename').click(fast);
      const input = row.getByTestId('rename-input');
      await input.fill(labels.next(tab, 'r'), fast);
      await input.press('Enter', fast);
      if (next() < 0.25) {
        await input.press('Enter', { timeout: 200 }).catch(() => {});
        count('rename, Enter twice');
      } else count('rename');
    } else if (roll < 0.42) {
      await row.getByTestId('rename').click(fast);
      await row.getByTestId('notes-input').fill(labels.next(tab, 'n'), fast);
      await row.getByTestId('save').click(fast);
      count('notes');
    } else if (roll < 0.54) {
      await row.getByTestId('done').click(fast);
      count('done');
    } else if (roll < 0.72) {
      const like = row.getByTestId('like');
      const how = next();
      if (how < 0.15) {
        await like.dblclick(fast);
        count('like, double click');
      } else {
        const clicks = how < 0.25 ? 3 : how < 0.4 ? 2 : 1;
        for (let click = 0; click < clicks; click += 1) await like.click(fast);
        count(`like, ${clicks} click${clicks > 1 ? 's' : ''}`);
      }
    } else if (roll < 0.81) {
      if (next() < 0.2) {
        await row.getByTestId('delete').dblclick(fast);
        count('delete, double click');
      } else {
        await row.getByTestId('delete').click(fast);
        count('delete');
      }
    } else if (roll < 0.91) {
      const buttons = page.locator('[data-testid="retry"], [data-testid="discard"], [data-testid="keep-mine"], [data-testid="take-theirs"]');
      const offered = await buttons.count();
      if (!offered) return;
      const button = buttons.nth(next.below(offered));
      const which = await button.getAttribute('data-testid');
      await button.click(fast);
      count(which);
    } else if (roll < 0.91 + Number(options.reload)) {
      await page.reload();
      await waitForLive(page);
      count('reload');
    } else {
      await row.getByTestId('like').click(fast);
      await row.getByTestId('rename').click(fast);
      const input = row.getByTestId('rename-input');
      await input.fill(labels.next(tab, 'r'), fast);
      await input.press('Enter', fast);
      count('like, then rename');
    }
  } catch {
    count('missed');
  }
}

/** Titles of their own for every create, rename and note: a value names its intent. */
function labeller() {
  let made = 0;
  return { next: (tab, what) => `${tab.name}-${what}${(made += 1)}` };
}

async function setFaultsInPanel(page, { failure, drop, transient, jitter }) {
  await page.getByTestId('fault-failure-rate').fill(String(failure));
  await page.getByTestId('fault-drop-rate').fill(String(drop));
  await page.getByTestId('fault-transient-rate').fill(String(transient));
  await page.getByTestId('fault-jitter-ms').fill(String(jitter));
  await page.getByTestId('fault-apply').click();
  await page.getByTestId('fault-status').filter({ hasText: 'Applied.' }).waitFor();
}

/** What `checkRows` finds in the tabs, asked again until it finds nothing or `timeout` ends. */
function rowProblems(server, tabs, timeout) {
  return eventually(async () => {
    const { tasks } = await server.api.tasks();
    const found = [];
    for (const tab of tabs) found.push(...checkRows(tab.name, await shownBy(tab.page), tasks));
    if (found.length) throw Object.assign(new Error('rows differ'), { found });
    return [];
  }, { timeout, interval: 250 }).catch((error) => error.found ?? [error.message]);
}

async function run(browser, seed) {
  const problems = [];
  const server = await startServer(['--seed', String(seed)]);
  const tabs = [];
  const contexts = [];
  try {
    contexts.push(await newBrowser(browser));
    if (options.browsers === '2') contexts.push(await newBrowser(browser));
    for (let index = 0; index < Number(options.tabs); index += 1) {
      tabs.push(await addTab(contexts[index % contexts.length], server.url, String.fromCharCode(65 + index)));
    }
    await setFaultsInPanel(tabs[0].page, {
      failure: options['failure-rate'],
      drop: options['drop-rate'],
      transient: options['transient-rate'],
      jitter: options['jitter-ms'],
    });

    const next = seededRandom(seed);
    const counts = {};
    const labels = labeller();
    const started = Date.now();
    for (let step = 0; step < Number(options.actions); step += 1) {
      if (next() < 0.5) {
        // Every tab: the browsers side by side at once; a browser shows one tab at a time.
        await Promise.all(contexts.map(async (context) => {
          for (const tab of tabs.filter((each) => each.context === context)) await act(tab, next, counts, labels);
        }));
      } else await act(tabs[next.below(tabs.length)], next, counts, labels);
      await sleep(next.below(120));
    }
    console.log(`seed ${seed}: ${options.actions} steps in ${Math.round((Date.now() - started) / 1000)} s: ${JSON.stringify(counts)}`);

    // 1. Faults on, clicks stopped: past the stuck timeout nothing is pending any more, and
    // settled rows show what the server has (read again while a tab is an event ahead).
    problems.push(...(await rowProblems(server, tabs, 40_000)).map((problem) => `faults on: ${problem}`));

    // 2. Faults off; Retry what is stuck, Take theirs where a conflict is open, until done.
    await server.api.setFaults({ failure_rate: 0, drop_rate: 0, transient_rate: 0, jitter_ms: 0 });
    for (let round = 0; round < 8; round += 1) {
      let busy = 0;
      for (const tab of tabs) {
        await tab.page.bringToFront();
        for (const testid of ['retry', 'take-theirs']) {
          for (let guard = 0; guard < 30; guard += 1) {
            const button = tab.page.getByTestId(testid);
            if (!(await button.count())) break;
            await button.first().click({ timeout: 1000 }).catch(() => {});
            busy += 1;
          }
        }
        busy += (await shownBy(tab.page)).ops.length;
      }
      if (!busy) break;
      if (round === 7) problems.push(`faults off: still busy after 8 rounds of Retry and Take theirs (${busy} clicks and ops in the last)`);
      await sleep(5000);
    }
    problems.push(...(await rowProblems(server, tabs, 10_000)).map((problem) => `faults off: ${problem}`));
    const { tasks } = await server.api.tasks();
    const events = await eventLog(tabs[0].page);
    for (const tab of tabs) {
      const shown = await shownBy(tab.page);
      if (shown.ops.length) problems.push(`faults off: [${tab.name}] ${shown.ops.length} ops left: ${JSON.stringify(shown.ops)}`);
      if (shown.rows.some((row) => row.state !== 'settled')) problems.push(`faults off: [${tab.name}] rows not settled: ${shown.rows.filter((row) => row.state !== 'settled').map((row) => `"${row.title}" (${row.id}) ${row.state}`).join(', ')}`);
      tab.shown = shown;
    }
    problems.push(...checkDuplicates(events));
    const browsers = [];
    for (const context of contexts) {
      const inIt = tabs.filter((tab) => tab.context === context);
      browsers.push({
        name: inIt.map((tab) => tab.name).join('+'),
        shares: await sharesOf(inIt[0].page),
        pressed: inIt.flatMap((tab) => tab.shown.rows.map((row) => ({ tab: tab.name, id: row.id, liked: row.liked }))),
      });
    }
    problems.push(...checkShares(browsers, tasks));
    for (const tab of tabs) {
      const sends = firstSends(tab.sends);
      problems.push(...checkConflictViews(tab.name, sends, events, tab.views, tab.edits));
      problems.push(...checkRebases(tab.name, sends, events, tab.views, tab.edits));
      problems.push(...checkNoticeTitles(tab.name, tab.notices, events, sends));
      problems.push(...checkShownRows(tab.name, tab.samples, events));
      problems.push(...tab.pageErrors.map((error) => `[${tab.name}] page error: ${error}`));
      problems.push(...[...new Set(tab.faults.map((fault) => fault.text))].map((text) => `[${tab.name}] the soak's page watcher failed (not the app): ${text}`));
    }

    const failed = events.filter((event) => event.type === EVENT_FAILED).length;
    const views = tabs.reduce((total, tab) => total + tab.views.length, 0);
    console.log(`seed ${seed}: ${tasks.length} tasks, ${events.length} events (${failed} failed), ${views} conflict views`);
    const taskIds = new Set(events.map((event) => event.data.task_id));
    const named = new Set(problems.flatMap((problem) => problem.match(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g) ?? [])
      .filter((id) => taskIds.has(id)));
    const stories = [...named].map((taskId) => `task ${taskId}:\n${timeline(taskId, tabs.map((tab) => ({ name: tab.name, sends: firstSends(tab.sends) })), events)}`);
    return { problems, stories };
  } finally {
    for (const context of contexts) await context.close().catch(() => {});
    await server.stop();
  }
}

const browser = await launchBrowser();
let failing = 0;
try {
  const first = Number(options.seed);
  for (let seed = first; seed < first + Number(options.runs); seed += 1) {
    const { problems, stories } = await run(browser, seed);
    if (problems.length) {
      failing += 1;
      console.log(`seed ${seed}: ${problems.length} problems\n  ${problems.join('\n  ')}\n${stories.join('\n')}`);
    } else console.log(`seed ${seed}: no problems`);
  }
} finally {
  await browser.close();
}
console.log(failing ? `${failing} of ${options.runs} runs found problems` : `all ${options.runs} runs clean`);
process.exitCode = failing ? 1 : 0;
