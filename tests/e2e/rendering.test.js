// Rendering: titles are text (no XSS), items keep their DOM node and focus across settle,
// and two tabs see each other's changes live.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, openTab, eventually, createViaUi, renameViaUi, shown, listedTitles, taskItem, sleep,
  waitSettled, recordCommands,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const XSS_TITLE = '<img src=x onerror=alert(1)>';
const XSS_FROM_ELSEWHERE = '<script>alert(2)</script><b onmouseover=alert(3)>bold</b>';

test('an XSS title, typed here or written by someone else, renders as text', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { page, dialogs, pageErrors } = await openApp(browser, server.url);
    const id = await createViaUi(page, XSS_TITLE);
    assert.equal((await shown(page, id)).title, XSS_TITLE, 'the prediction is text');
    await waitSettled(page, id);
    const other = await server.api.createSettled(XSS_FROM_ELSEWHERE);
    await eventually(async () => assert.deepEqual(await listedTitles(page), [XSS_TITLE, XSS_FROM_ELSEWHERE]));
    await taskItem(page, other.id).getByTestId('title').hover();

    const list = page.getByTestId('task-list');
    assert.equal(await list.locator('img, script, b').count(), 0, 'no element was created from a title');
    await page.waitForTimeout(300); // an injected onerror would fire by now
    assert.deepEqual(dialogs, []);
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('an item keeps its DOM node and its focus from prediction through settle', async () => {
  const server = await startServer(['--delay-ms', '800']);
  try {
    const { page } = await openApp(browser, server.url);
    const id = await createViaUi(page, 'stable node');
    const item = taskItem(page, id);
    await item.evaluate((li) => { li.stableMarker = 'set while the create was pending'; });
    await waitSettled(page, id);

    const like = item.getByTestId('like');
    await like.focus();
    await page.keyboard.press('Enter'); // like from the keyboard: focus stays on the button
    assert.equal((await shown(page, id)).pending, true);
    await waitSettled(page, id);

    assert.equal(await item.evaluate((li) => li.stableMarker), 'set while the create was pending', 'never remounted');
    assert.equal(await like.evaluate((button) => document.activeElement === button), true, 'focus kept');
    assert.equal((await shown(page, id)).likes, 1);
  } finally {
    await server.stop();
  }
});

test('two tabs see each other’s changes live', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { page: tabA, context } = await openApp(browser, server.url);
    const { page: tabB } = await openTab(context, server.url);

    const id = await createViaUi(tabA, 'from tab A');
    await eventually(async () => assert.deepEqual(await shown(tabB, id), {
      title: 'from tab A', likes: 0, done: false, pending: false, state: 'settled',
    }));

    // The user switches tabs before clicking (a background tab gets no animation frames).
    await tabB.bringToFront();
    await taskItem(tabB, id).getByTestId('done').click();
    await renameViaUi(tabB, id, 'renamed in tab B');
    await eventually(async () => assert.deepEqual(await shown(tabA, id), {
      title: 'renamed in tab B', likes: 0, done: true, pending: false, state: 'settled',
    }));

    // Likes are a toggle per browser: tab A's like reads Liked in tab B at once, so tab
    // B's click takes it back instead of liking twice.
    await tabA.bringToFront();
    await taskItem(tabA, id).getByTestId('like').click();
    await eventually(async () => assert.equal(
      await taskItem(tabB, id).getByTestId('like').getAttribute('aria-pressed'), 'true',
    ));
    await eventually(async () => assert.equal((await shown(tabB, id)).likes, 1));
    await tabB.bringToFront();
    await taskItem(tabB, id).getByTestId('like').click();
    await eventually(async () => assert.deepEqual(
      [(await shown(tabA, id)).likes, (await shown(tabA, id)).state], [0, 'settled'],
    ));
    assert.equal(await taskItem(tabA, id).getByTestId('like').getAttribute('aria-pressed'), 'false');
    assert.equal((await server.api.task(id)).likes, 0);

    await tabA.bringToFront();
    await taskItem(tabA, id).getByTestId('delete').click();
    await eventually(async () => assert.equal(await shown(tabB, id), null));
    assert.equal(await server.api.task(id), null);
  } finally {
    await server.stop();
  }
});

test('two tabs that create in the same window list the tasks alike, in the server’s order', async () => {
  // Each tab learns of the other's task only when it settles, after its own was
  // predicted: both list them in the order the server took the creates.
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const { page: tabA, context } = await openApp(browser, server.url);
    const { page: tabB } = await openTab(context, server.url);
    await createViaUi(tabA, 'first');
    await sleep(300);
    await tabB.bringToFront();
    await createViaUi(tabB, 'second');
    assert.deepEqual(await listedTitles(tabB), ['second'], 'tab B has not heard of first yet');
    const listed = async () => (await server.api.tasks()).tasks.map((task) => task.title);
    await eventually(async () => assert.deepEqual(await listed(), ['first', 'second']));
    for (const [name, tab] of [['A', tabA], ['B', tabB]]) {
      await eventually(async () => assert.deepEqual(await listedTitles(tab), ['first', 'second'], `tab ${name}`));
    }
  } finally {
    await server.stop();
  }
});

test('tasks entered in a burst are listed in the order typed, by the page and by the server', async () => {
  // Sent at once, a later create could be taken first, and the list (which follows the
  // server's order) would move the rows out of the order typed.
  const server = await startServer(['--delay-ms', '200']);
  try {
    const { page } = await openApp(browser, server.url);
    const typed = [];
    for (let round = 0; round < 6; round += 1) {
      const titles = ['a', 'b', 'c', 'd', 'e'].map((letter) => `r${round}-${letter}`);
      typed.push(...titles);
      // As fast as a paste-and-Enter macro: every submit in one task of the page.
      await page.evaluate((burst) => {
        const input = document.getElementById('new-title');
        const form = document.getElementById('new-task');
        for (const title of burst) {
          input.value = title;
          input.dispatchEvent(new Event('input'));
          form.requestSubmit();
        }
      }, titles);
      assert.deepEqual(await listedTitles(page), typed, 'predicted in the order typed');
    }
    const listed = async () => (await server.api.tasks()).tasks.map((task) => task.title);
    await eventually(async () => assert.deepEqual(await listed(), typed, 'the server took them in that order'));
    await eventually(async () => assert.equal(await page.locator('[data-testid="task"][data-pending="true"]').count(), 0));
    assert.deepEqual(await listedTitles(page), typed);
  } finally {
    await server.stop();
  }
});

test('two tabs of one browser that both like in one window end at one like', async () => {
  const server = await startServer(['--delay-ms', '1500']);
  try {
    const task = await server.api.createSettled('liked twice');
    const { page: tabA, context, pageErrors } = await openApp(browser, server.url);
    const { page: tabB } = await openTab(context, server.url);
    const sent = [tabA, tabB].map((tab) => recordCommands(tab));

    // Tab B cannot see tab A's pending like: both send +1 within the window.
    await tabA.bringToFront();
    await taskItem(tabA, task.id).getByTestId('like').click();
    await tabB.bringToFront();
    await taskItem(tabB, task.id).getByTestId('like').click();

    await eventually(async () => {
      assert.equal((await server.api.task(task.id)).likes, 1, 'the browser likes once');
      for (const tab of [tabA, tabB]) {
        assert.deepEqual([(await shown(tab, task.id)).likes, (await shown(tab, task.id)).state], [1, 'settled']);
        assert.equal(await taskItem(tab, task.id).getByTestId('like').getAttribute('aria-pressed'), 'true');
      }
    }, { timeout: 15_000 });
    // Both tabs liked, and one like was taken back: not one tab doing nothing.
    const deltas = sent.map((commands) => commands.filter((command) => command.path.endsWith('/likes'))
      .map((command) => command.body.delta));
    assert.deepEqual(deltas.map((tab) => tab[0]), [1, 1], 'each tab sent its like');
    assert.deepEqual(deltas.flat().sort(), [-1, 1, 1], 'and one of them was taken back');
    assert.equal((await server.api.task(task.id)).version, 4, 'created, liked twice, unliked once');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('after a reload with a pending create, the list says it is loading until the snapshot comes', async () => {
  const server = await startServer(['--delay-ms', '8000']);
  try {
    await server.api.createSettled('already there');
    const { page, pageErrors } = await openApp(browser, server.url);
    const empty = page.getByTestId('empty');
    const list = page.getByTestId('task-list');
    assert.equal(await empty.isHidden(), true);
    assert.equal(await list.getAttribute('aria-busy'), 'false');
    await createViaUi(page, 'mine, pending');

    // The snapshot after the reload is held back; the pending create comes back from
    // sessionStorage at once, and must not pass for the whole list.
    let release;
    const held = new Promise((resolve) => { release = resolve; });
    await page.route((url) => url.pathname === '/api/tasks', async (route) => {
      if (route.request().method() !== 'GET') return route.continue();
      await held;
      return route.continue();
    });
    await page.reload({ waitUntil: 'domcontentloaded' });
    await eventually(async () => assert.deepEqual(await listedTitles(page), ['mine, pending']));
    assert.equal(await list.getAttribute('aria-busy'), 'true');
    assert.match(await empty.textContent(), /^Loading the task list… Until it comes, only your own pending changes are shown\.$/);
    assert.equal(await empty.isVisible(), true);

    release();
    await eventually(async () => assert.deepEqual(await listedTitles(page), ['already there', 'mine, pending']));
    assert.equal(await list.getAttribute('aria-busy'), 'false');
    assert.equal(await empty.isHidden(), true);
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

/**
 * Tab A likes, and goes (`goAway`) with the like still pending: tab B of the same browser
 * takes the like over, counts it once it applies, and a click there unlikes.
 */
async function likeTakenOverWhenTabGoes(title, goAway) {
  const server = await startServer(['--delay-ms', '1500']);
  try {
    const task = await server.api.createSettled(title);
    const { page: tabA, context, pageErrors: errorsInA } = await openApp(browser, server.url);
    const { page: tabB, pageErrors: errorsInB } = await openTab(context, server.url);
    await taskItem(tabA, task.id).getByTestId('like').click();
    await eventually(async () => assert.equal((await shown(tabA, task.id)).state, 'pending'));
    await goAway(tabA, tabB, context);

    // The like applies; tab B, which took it over, counts it as this browser's.
    const likeInB = taskItem(tabB, task.id).getByTestId('like');
    await eventually(async () => {
      assert.equal((await server.api.task(task.id)).likes, 1);
      assert.equal(await likeInB.getAttribute('aria-pressed'), 'true');
      assert.deepEqual([(await shown(tabB, task.id)).likes, (await shown(tabB, task.id)).state], [1, 'settled']);
    }, { timeout: 15_000 });
    await likeInB.click();
    await eventually(async () => assert.equal((await server.api.task(task.id)).likes, 0, 'a click in B unlikes'), { timeout: 10_000 });
    assert.deepEqual([...errorsInA, ...errorsInB], []);
  } finally {
    await server.stop();
  }
}

test('a tab closed with its like still pending: another tab of the browser takes it over and counts it', () =>
  likeTakenOverWhenTabGoes('liked, then closed', (tabA) => tabA.close()));

test('a tab that crashes with its like pending: another tab of the browser takes the like over and counts it', () =>
  likeTakenOverWhenTabGoes('liked, then crashed', async (tabA, tabB, context) => {
    // The renderer dies: no pagehide, no orphans; the tab's Web Lock is let go.
    const crashed = new Promise((resolve) => tabA.once('crash', resolve));
    const cdp = await context.newCDPSession(tabA);
    cdp.send('Page.crash').catch(() => {}); // never answered: the page is gone
    await crashed; // tab B is waiting on A's lock, and looks as soon as it is let go
  }));

test('a like taken over after it applied is counted once, also while it is being taken over', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const task = await server.api.createSettled('applied, then taken over');
    const { page: tabA, context, pageErrors } = await openApp(browser, server.url);
    await taskItem(tabA, task.id).getByTestId('like').click();
    await eventually(async () => assert.equal((await shown(tabA, task.id)).state, 'pending'));
    await tabA.close(); // its like pending, left as an orphan
    await eventually(async () => assert.equal((await server.api.task(task.id)).likes, 1));

    // B opens after the like applied: its snapshot has it, and no event for it will come.
    const { page: tabB } = await openTab(context, server.url);
    const counts = new Set();
    const until = Date.now() + 6000; // past the take-over (3 s after A left)
    while (Date.now() < until) {
      counts.add((await shown(tabB, task.id)).likes);
      await sleep(50);
    }
    assert.deepEqual([...counts], [1], 'never 2: the like taken over is asked after at once');
    assert.equal(await taskItem(tabB, task.id).getByTestId('like').getAttribute('aria-pressed'), 'true');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a like pending across a reload that applies before the page holds its tab lock is counted once', async () => {
  const server = await startServer(['--delay-ms', '100']);
  try {
    const task = await server.api.createSettled('liked, then reloaded');
    const { page: tab, context, pageErrors } = await openApp(browser, server.url);
    const sends = recordCommands(tab);
    // Another page of the browser asks for this tab's lock, and once the tab lets it go
    // holds it until the like has applied, and its event has had time to come: the
    // reloaded page learns its id is its own only then (well within the 2 s after which it
    // would take itself for a copy).
    const lock = `settle.tab.${await tab.evaluate(() => window.settle.likes.tabId)}`;
    const other = await context.newPage();
    await other.goto(`${server.url}/api/health`);
    await other.evaluate(({ name, url }) => {
      const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
      window.lockHeld = navigator.locks.request(name, async () => {
        while ((await (await fetch(url)).json()).likes !== 1) await pause(20);
        await pause(300);
      });
    }, { name: lock, url: `/api/tasks/${task.id}` });
    const locks = () => other.evaluate(() => navigator.locks.query());
    await eventually(async () => assert.ok((await locks()).pending.some((entry) => entry.name === lock)));
    await taskItem(tab, task.id).getByTestId('like').click();
    await tab.reload();
    await other.evaluate(() => window.lockHeld);
    assert.equal((await server.api.task(task.id)).likes, 1, 'applied while the other page held the lock');
    await eventually(async () => {
      assert.ok((await locks()).held.some((entry) => entry.name === lock), 'the reloaded page holds its lock');
      assert.equal((await shown(tab, task.id)).state, 'settled');
    });
    await sleep(1500); // a compensation would be sent by now
    // One key, sent again by the reloaded page when the reload cut its first send short.
    const likes = new Map(sends.filter((command) => command.path.endsWith('/likes')).map((command) => [command.key, command.body.delta]));
    assert.deepEqual([...likes.values()], [1], 'nothing sent to make up for a like counted twice');
    assert.equal((await server.api.task(task.id)).likes, 1);
    assert.equal(await taskItem(tab, task.id).getByTestId('like').getAttribute('aria-pressed'), 'true');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a tab closed for a while has its like record taken into an open tab: one record left, the like still counted', async () => {
  const server = await startServer(['--delay-ms', '200']);
  try {
    const task = await server.api.createSettled('liked, then closed for good');
    const { page: tabA, context, pageErrors } = await openApp(browser, server.url);
    await taskItem(tabA, task.id).getByTestId('like').click();
    await eventually(async () => assert.equal((await shown(tabA, task.id)).state, 'settled'));
    await tabA.close();

    const { page: tabB } = await openTab(context, server.url, '?absorb_after_ms=500');
    const records = () => tabB.evaluate(() => Object.entries(localStorage)
      .filter(([key]) => key.startsWith('settle.like-tab.v2.'))
      .map(([, value]) => JSON.parse(value).share));
    await eventually(async () => assert.deepEqual(await records(), [{ [task.id]: 1 }], "A's share, now in B's record"));
    const likeInB = taskItem(tabB, task.id).getByTestId('like');
    assert.equal(await likeInB.getAttribute('aria-pressed'), 'true');
    await likeInB.click();
    await eventually(async () => {
      assert.equal((await server.api.task(task.id)).likes, 0, 'a click in B unlikes');
      assert.deepEqual(await records(), [{}]);
    });
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a tab opened as a copy of another (window.open) keeps a like share of its own', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const x = await server.api.createSettled('x');
    const y = await server.api.createSettled('y');
    const { page: opener, context, pageErrors } = await openApp(browser, server.url);
    await taskItem(opener, x.id).getByTestId('like').click();
    await eventually(async () => assert.equal((await server.api.task(x.id)).likes, 1));

    // The popup starts with the opener's sessionStorage, its tab id included.
    const [popup] = await Promise.all([context.waitForEvent('page'), opener.evaluate(() => { window.open(location.href); })]);
    await popup.waitForSelector('[data-testid="connection"][data-state="live"]');
    const ids = async () => Promise.all([opener, popup].map((page) => page.evaluate(() => window.settle.likes.tabId)));
    await eventually(async () => {
      const [openerId, popupId] = await ids();
      assert.notEqual(popupId, openerId, 'the copy took an id of its own');
    });

    const likeX = (page) => taskItem(page, x.id).getByTestId('like');
    assert.equal(await likeX(popup).getAttribute('aria-pressed'), 'true');
    await likeX(popup).click(); // unlike, from the copy
    await eventually(async () => assert.equal((await server.api.task(x.id)).likes, 0));
    await taskItem(opener, y.id).getByTestId('like').click(); // a like elsewhere, from the opener
    await eventually(async () => {
      assert.equal((await server.api.task(y.id)).likes, 1);
      for (const page of [opener, popup]) {
        assert.equal(await likeX(page).getAttribute('aria-pressed'), 'false', 'x is not liked, in either tab');
        assert.equal(await taskItem(page, y.id).getByTestId('like').getAttribute('aria-pressed'), 'true');
      }
    });
    await likeX(opener).click();
    await eventually(async () => assert.equal((await server.api.task(x.id)).likes, 1, 'a click in the opener likes x again'));

    // A reload is no copy: the page keeps its id (its old page let go of the lock).
    const [openerId] = await ids();
    await opener.reload();
    await opener.waitForSelector('[data-testid="connection"][data-state="live"]');
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.equal(await opener.evaluate(() => window.settle.likes.tabId), openerId);
    assert.equal(await likeX(opener).getAttribute('aria-pressed'), 'true');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
