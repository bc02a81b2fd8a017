//! Commands settle on the event, once per key, in per-task order, together in bursts.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn a_command_settles_after_about_the_delay_and_is_readable_then() {
    let app = spawn_app().await;
    let mut events = app.events(None).await;

    let sent = Instant::now();
    let response = app
        .create_task("create-1", json!({ "title": "  write the tests  " }))
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: crate::helpers::Accepted = response.json().await.unwrap();
    assert_eq!(location, format!("/api/commands/{}", accepted.command_id));
    assert_eq!(accepted.status, "pending");

    // Inside the window the projection does not show it yet, and says so honestly.
    let (status, _) = app
        .get_json(&format!("/api/tasks/{}", accepted.task_id))
        .await;
    assert_eq!(status, 404, "not readable before it settles");
    let (_, command) = app.get_json(&location).await;
    assert_eq!(command["status"], "pending");

    let (event, before) = events.until_command(accepted.command_id).await;
    let waited = sent.elapsed();
    assert!(before.is_empty(), "no other event came first: {before:?}");
    assert_eq!(event.name, "projection:settled");
    assert!(
        waited >= Duration::from_millis(600),
        "settled after about the 700 ms delay, not {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "settled in time, not after {waited:?}"
    );
    assert_eq!(event.data["kind"], "create");
    assert_eq!(event.data["idempotency_key"], "create-1");
    assert_eq!(event.data["version"], 1);
    assert_eq!(event.data["accepted_at"], accepted.accepted_at.as_str());
    assert_eq!(
        event.data["task"]["title"], "write the tests",
        "the title is trimmed"
    );
    assert!(event.data["window_ms"].as_u64().unwrap() >= 650);

    // Readable the moment the event is seen.
    let (status, task) = app
        .get_json(&format!("/api/tasks/{}", accepted.task_id))
        .await;
    assert_eq!(status, 200);
    assert_eq!(task, event.data["task"]);
    let (_, list) = app.get_json("/api/tasks").await;
    assert!(list["watermark"].as_u64().unwrap() >= event.id);
    let (_, command) = app.get_json(&location).await;
    assert_eq!(command["status"], "settled");
    assert_eq!(command["event_id"], event.id);
    assert_eq!(command["kind"], "create");
    assert!(command["settled_at"].is_string());
    let (_, counts) = app
        .get_json(&format!("/api/tasks/{}/counts", accepted.task_id))
        .await;
    assert_eq!(
        counts,
        json!({ "id": accepted.task_id, "likes": 0, "version": 1 })
    );
    app.stop().await;
}

#[tokio::test]
async fn every_kind_of_command_applies_and_bumps_the_version() {
    let app = spawn_app_with(|config| config.delay_ms = 50).await;
    let mut events = app.events(None).await;
    let id = Uuid::now_v7();
    let created = app
        .accepted(
            Method::POST,
            "/api/tasks",
            "c",
            json!({ "id": id, "title": "a", "notes": "n" }),
        )
        .await;
    assert_eq!(created.task_id, id, "the client's id is kept");
    let path = format!("/api/tasks/{id}");
    let likes = format!("/api/tasks/{id}/likes");
    app.accepted(
        Method::PATCH,
        &path,
        "u",
        json!({ "title": "b", "done": true }),
    )
    .await;
    app.accepted(Method::POST, &likes, "l1", json!({ "delta": 1 }))
        .await;
    app.accepted(Method::POST, &likes, "l2", json!({ "delta": 1 }))
        .await;
    app.accepted(Method::POST, &likes, "l3", json!({ "delta": -1 }))
        .await;
    let settled = events.take(5).await;
    let versions: Vec<_> = settled
        .iter()
        .map(|e| e.data["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    let (_, task) = app.get_json(&path).await;
    assert_eq!(
        (task["title"].as_str(), task["notes"].as_str()),
        (Some("b"), Some("n"))
    );
    assert_eq!(
        (task["done"].as_bool(), task["likes"].as_i64()),
        (Some(true), Some(1))
    );

    let deleted = app
        .accepted(Method::DELETE, &path, "d", json!({ "base_version": 5 }))
        .await;
    let (event, _) = events.until_command(deleted.command_id).await;
    assert_eq!(event.name, "projection:settled");
    assert!(
        event.data["task"].is_null(),
        "a delete settles with task null"
    );
    assert_eq!(event.data["version"], 6);
    assert_eq!(app.get_json(&path).await.0, 404);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_duplicates_with_one_key_create_one_row() {
    let app = spawn_app_with(|config| config.delay_ms = 200).await;
    let mut events = app.events(None).await;
    let requests = (0..24).map(|_| app.create_task("double-submit", json!({ "title": "once" })));
    let responses = join_all(requests).await;
    let mut command_ids = HashSet::new();
    let mut first_body = serde_json::Value::Null;
    for response in responses {
        match response.status().as_u16() {
            202 => {
                let body: serde_json::Value = response.json().await.unwrap();
                command_ids.insert(body["command_id"].as_str().unwrap().to_owned());
                first_body = body;
            }
            409 => {} // raced the first one's accept: allowed, and retryable
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(command_ids.len(), 1, "every 202 names the same command");

    // A retry after the fact gets the stored response, marked as a replay.
    let replay = app
        .create_task("double-submit", json!({ "title": "once" }))
        .await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");

    let first = events.next().await;
    assert_eq!(first.name, "projection:settled");
    events
        .assert_quiet(Duration::from_millis(700), "exactly one effect")
        .await;
    let (_, list) = app.get_json("/api/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(metrics["accepted"], 1);
    assert_eq!(metrics["settled"], 1);
    assert!(metrics["deduplicated"].as_u64().unwrap() >= 1);

    // Replays of a settled command still answer with the 202 as it was first sent.
    let late = app
        .create_task("double-submit", json!({ "title": "once" }))
        .await;
    assert_eq!(late.headers()["idempotent-replayed"], "true");
    let late: serde_json::Value = late.json().await.unwrap();
    assert!(command_ids.contains(late["command_id"].as_str().unwrap()));
    assert_eq!(
        late, first_body,
        "the first 202's body, status pending included"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_refused() {
    let app = spawn_app().await;
    let first = app
        .accepted(Method::POST, "/api/tasks", "k", json!({ "title": "one" }))
        .await;
    let other_body = app.create_task("k", json!({ "title": "two" })).await;
    crate::helpers::assert_problem(other_body, 422, "same key, other body").await;
    let id = Uuid::now_v7();
    let other_path = app
        .command(
            Method::POST,
            &format!("/api/tasks/{id}/likes"),
            "k",
            json!({ "delta": 1 }),
        )
        .await;
    crate::helpers::assert_problem(other_path, 422, "same key, other path").await;
    // A quoted key is the same key: a replay of the first command.
    let quoted = app.create_task("\"k\"", json!({ "title": "one" })).await;
    assert_eq!(quoted.status(), 202);
    assert_eq!(quoted.headers()["idempotent-replayed"], "true");
    let quoted: serde_json::Value = quoted.json().await.unwrap();
    assert_eq!(quoted["command_id"], first.command_id.to_string());
    app.stop().await;
}

/// A client that never saw its 202 has only the key: the command is found by it,
/// percent-encoded, pending and then settled, as by its id.
#[tokio::test]
async fn a_command_is_found_by_its_idempotency_key() {
    let app = spawn_app().await;
    let key = "create/1+2?&=%";
    let accepted = app
        .accepted(Method::POST, "/api/tasks", key, json!({ "title": "keyed" }))
        .await;
    let path = "/api/commands?key=create%2F1%2B2%3F%26%3D%25";
    let (status, command) = app.get_json(path).await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["command_id"], accepted.command_id.to_string());
    assert_eq!(command["idempotency_key"], key);
    assert_eq!(command["status"], "pending");

    let mut events = app.events(None).await;
    let (event, _) = events.until_command(accepted.command_id).await;
    let (status, command) = app.get_json(path).await;
    assert_eq!(status, 200);
    assert_eq!(command["status"], "settled");
    assert_eq!(command["event_id"], event.id);
    let (_, by_id) = app
        .get_json(&format!("/api/commands/{}", accepted.command_id))
        .await;
    assert_eq!(command, by_id, "the same record as by its id");
    // Unencoded, `+` is a space: no such key, and said so.
    let (status, problem) = app.get_json("/api/commands?key=create/1+2").await;
    assert_eq!(status, 400, "{problem}");
    app.stop().await;
}

/// With `--max-lag-ms`, a new command is refused while the consumer applies further
/// behind due times than that: here a task's likes that fall due while the server is
/// down, which apply one step each once it is back. The refused key is taken as new
/// once the consumer has caught up.
#[tokio::test]
async fn beyond_max_lag_a_new_command_is_refused_until_the_consumer_catches_up() {
    // A step takes tens of microseconds, so the chain is long, and the task has the
    // longest notes: each like's step copies, encodes and logs them.
    const LIKES: u64 = 2000;
    // One connection per like, both ends in this process.
    settle::net::raise_open_file_limit().expect("the open file limit");
    let app = spawn_app_with(|config| config.delay_ms = 0).await;
    let created = app
        .accepted(
            Method::POST,
            "/api/tasks",
            "create",
            json!({ "title": "liked", "notes": "n".repeat(settle::model::NOTES_MAX_CHARS) }),
        )
        .await;
    let give_up = Instant::now() + Duration::from_secs(60);
    while app
        .get_json(&format!("/api/tasks/{}", created.task_id))
        .await
        .0
        != 200
    {
        assert!(Instant::now() < give_up, "the task was never created");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // None falls due before the server stops, on a slow machine too (checked below).
    let delay = Duration::from_secs(5);
    let accepting = Instant::now();
    app.put_faults(json!({ "delay_ms": delay.as_millis() as u64 }))
        .await;
    let path = format!("/api/tasks/{}/likes", created.task_id);
    let (served, path) = (&app, &path);
    let likes = join_all((0..LIKES).map(|n| async move {
        let key = format!("like-{n}");
        served
            .command(Method::POST, path, &key, json!({ "delta": 1 }))
            .await
    }))
    .await;
    assert!(likes.iter().all(|like| like.status() == 202));
    assert!(
        accepting.elapsed() < delay,
        "accepting the likes took {:?}, longer than their delay",
        accepting.elapsed()
    );
    // Back once every like is due: the consumer resumes them all at once, and their
    // chain runs behind their due times.
    let app = app
        .restart_after(delay + Duration::from_secs(1), |config| {
            config.max_lag_ms = 5;
        })
        .await;

    let finished = |metrics: &serde_json::Value| {
        metrics["settled"].as_u64().unwrap() + metrics["failed"].as_u64().unwrap()
    };
    // New keys at once, until one is refused: the chain runs from the start, and the
    // lag with it; the first, unless the chain ended meanwhile on a fast machine;
    // nothing but the chain can refuse one.
    let mut attempt = 0;
    let refused_key = loop {
        let key = format!("late-{attempt}");
        let response = app.create_task(&key, json!({ "title": "late" })).await;
        if response.status() == 503 {
            let problem = crate::helpers::assert_problem(response, 503, "beyond max lag").await;
            assert_eq!(problem["type"], "/problems/overloaded");
            let detail = problem["detail"].as_str().unwrap();
            let lag_ms: u64 = detail
                .split_once(" ms behind their due times")
                .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no lag in {detail:?}"));
            // Refused while the lag is above 5 ms; the detail gives it in whole ms,
            // rounded down, so a lag of 5.4 ms reads 5.
            assert!(lag_ms >= 5, "refused for the lag: {detail}");
            assert!(detail.contains("(--max-lag-ms)"), "{detail}");
            break key;
        }
        assert_eq!(response.status(), 202, "{key}");
        let (_, metrics) = app.get_json("/api/metrics").await;
        assert!(
            finished(&metrics) < LIKES && Instant::now() < give_up,
            "never refused: {metrics}"
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    };

    loop {
        let (_, metrics) = app.get_json("/api/metrics").await;
        if metrics["lag_ms"] == 0 && metrics["pending"] == 0 {
            assert_eq!(metrics["refused"], 1);
            break;
        }
        assert!(Instant::now() < give_up, "not caught up: {metrics}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, task) = app
        .get_json(&format!("/api/tasks/{}", created.task_id))
        .await;
    assert_eq!(task["likes"], LIKES, "every like applied once");
    let late = app
        .create_task(&refused_key, json!({ "title": "late" }))
        .await;
    assert_eq!(late.status(), 202, "taken once the consumer caught up");
    assert!(
        late.headers().get("idempotent-replayed").is_none(),
        "the refusal stored nothing"
    );
    app.stop().await;
}

/// A node holds at most `--max-pending` unapplied commands. Beyond it a new command is
/// answered 503 with Retry-After and stored nowhere, while a retry of a known key
/// (pending, or finished and in sled) still gets its 202; once the backlog has applied,
/// the refused key is accepted as new. Lost deliveries hold the backlog, not a clock.
#[tokio::test]
async fn beyond_max_pending_a_new_command_is_refused_until_the_backlog_applies() {
    let app = spawn_app_with(|config| {
        config.delay_ms = 50;
        config.drop_rate = 1.0;
        config.redeliver_after_ms = 300;
        config.max_pending = 2;
    })
    .await;
    let mut events = app.events(None).await;
    let served = &app;
    let create = |key: &'static str| async move {
        let response = served.create_task(key, json!({ "title": key })).await;
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").cloned();
        let retry_after = response.headers().get("retry-after").cloned();
        (status, replayed, retry_after, response)
    };
    let accept_new = |key: &'static str| {
        served.accepted(Method::POST, "/api/tasks", key, json!({ "title": key }))
    };
    let first = accept_new("first").await;
    let second = accept_new("second").await;

    let (status, _, retry_after, refused) = create("third").await;
    assert_eq!(status, 503, "beyond the bound");
    assert_eq!(retry_after.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
    let problem = crate::helpers::assert_problem(refused, 503, "beyond max pending").await;
    assert_eq!(problem["type"], "/problems/overloaded");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("(--max-pending)"), "{detail}");
    let (status, replayed, _, _) = create("first").await;
    assert_eq!(status, 202, "a pending key is answered as always");
    assert_eq!(replayed.as_ref().map(|v| v.to_str().unwrap()), Some("true"));
    let (_, metrics) = app.get_json("/api/metrics").await;
    // Lost deliveries wait for their redelivery, not for the consumer: no lag.
    assert_eq!(
        (
            &metrics["accepted"],
            &metrics["refused"],
            &metrics["pending"],
            &metrics["lag_ms"]
        ),
        (&json!(2), &json!(1), &json!(2), &json!(0))
    );
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines().any(|l| l == "settle_commands_refused_total 1"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "settle_consumer_lag_seconds 0.0"),
        "{text}"
    );

    app.put_faults(json!({ "drop_rate": 0.0 })).await;
    for accepted in [&first, &second] {
        let (event, _) = events.until_command(accepted.command_id).await;
        assert_eq!(event.name, "projection:settled");
    }
    app.put_faults(json!({ "drop_rate": 1.0 })).await;
    let (status, replayed, _, third) = create("third").await;
    assert_eq!(status, 202, "room again once the backlog applied");
    assert!(
        replayed.is_none(),
        "the refusal stored nothing: this is the key's first command"
    );
    let third: crate::helpers::Accepted = third.json().await.expect("a 202 body");
    let (status, _, _, _) = create("fourth").await;
    assert_eq!(status, 202);
    let (status, replayed, _, _) = create("first").await;
    assert_eq!(
        status, 202,
        "at the bound, a finished key is answered from sled"
    );
    assert_eq!(replayed.as_ref().map(|v| v.to_str().unwrap()), Some("true"));
    let (status, _, _, _) = create("fifth").await;
    assert_eq!(status, 503);

    app.put_faults(json!({ "drop_rate": 0.0 })).await;
    let (event, _) = events.until_command(third.command_id).await;
    assert_eq!(event.data["task"]["title"], "third");
    app.stop().await;
}

#[tokio::test]
async fn a_stale_base_version_fails_with_conflict_and_the_current_row() {
    let app = spawn_app_with(|config| config.delay_ms = 50).await;
    let mut events = app.events(None).await;
    let created = app.create("shared").await;
    events.until_command(created.command_id).await;
    let path = format!("/api/tasks/{}", created.task_id);

    let theirs = app
        .accepted(
            Method::PATCH,
            &path,
            "theirs",
            json!({ "title": "theirs", "base_version": 1 }),
        )
        .await;
    let mine = app
        .accepted(
            Method::PATCH,
            &path,
            "mine",
            json!({ "title": "mine", "base_version": 1 }),
        )
        .await;
    let (event, _) = events.until_command(theirs.command_id).await;
    assert_eq!(event.name, "projection:settled");
    let (event, _) = events.until_command(mine.command_id).await;
    assert_eq!(event.name, "command:failed");
    assert_eq!(event.data["reason"], "conflict");
    assert_eq!(event.data["current"]["title"], "theirs");
    assert_eq!(event.data["current"]["version"], 2);
    assert!(event.data["message"]
        .as_str()
        .unwrap()
        .contains("base_version"));
    let (_, task) = app.get_json(&path).await;
    assert_eq!(task["title"], "theirs", "no silent overwrite");

    let (_, command) = app
        .get_json(&format!("/api/commands/{}", mine.command_id))
        .await;
    assert_eq!(command["status"], "failed");
    assert_eq!(command["error"]["reason"], "conflict");

    // A stale delete conflicts too, and a likes delta never does.
    let likes = format!("/api/tasks/{}/likes", created.task_id);
    let like = app
        .accepted(Method::POST, &likes, "like", json!({ "delta": 1 }))
        .await;
    let delete = app
        .accepted(Method::DELETE, &path, "del", json!({ "base_version": 1 }))
        .await;
    assert_eq!(
        events.until_command(like.command_id).await.0.name,
        "projection:settled"
    );
    let (event, _) = events.until_command(delete.command_id).await;
    assert_eq!(event.data["reason"], "conflict");
    app.stop().await;
}

#[tokio::test]
async fn commands_on_a_missing_task_fail_with_not_found() {
    let app = spawn_app_with(|config| config.delay_ms = 50).await;
    let mut events = app.events(None).await;
    let ghost = Uuid::now_v7();
    let patch = app
        .accepted(
            Method::PATCH,
            &format!("/api/tasks/{ghost}"),
            "p",
            json!({ "done": true }),
        )
        .await;
    let (event, _) = events.until_command(patch.command_id).await;
    assert_eq!(event.name, "command:failed");
    assert_eq!(event.data["reason"], "not_found");
    assert!(event.data["current"].is_null());
    app.stop().await;
}

#[tokio::test]
async fn commands_on_one_task_apply_in_acceptance_order_under_jitter() {
    let app = spawn_app_with(|config| {
        config.delay_ms = 20;
        config.jitter_ms = 400;
    })
    .await;
    let mut events = app.events(None).await;
    let created = app.create("v0").await;
    let path = format!("/api/tasks/{}", created.task_id);
    let mut command_ids = vec![created.command_id];
    for n in 1..=20 {
        let patch = app
            .accepted(
                Method::PATCH,
                &path,
                &format!("rename-{n}"),
                json!({ "title": format!("v{n}") }),
            )
            .await;
        command_ids.push(patch.command_id);
    }
    let settled = events.take(21).await;
    let order: Vec<_> = settled.iter().map(|e| e.command_id().unwrap()).collect();
    assert_eq!(order, command_ids, "applied in acceptance order");
    let titles: Vec<_> = settled
        .iter()
        .map(|e| e.data["task"]["title"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<_> = (0..=20).map(|n| format!("v{n}")).collect();
    assert_eq!(titles, expected);
    let (_, task) = app.get_json(&path).await;
    assert_eq!(
        (task["title"].as_str(), task["version"].as_u64()),
        (Some("v20"), Some(21))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_burst_settles_together_not_one_after_another() {
    const BURST: usize = 400;
    let app = spawn_app().await;
    let mut events = app.events(None).await;
    let started = Instant::now();
    let creates = (0..BURST).map(|n| {
        let app = &app;
        async move {
            let key = format!("burst-{n}");
            app.accepted(Method::POST, "/api/tasks", &key, json!({ "title": key }))
                .await
        }
    });
    let accepted = join_all(creates).await;
    let accept_span = started.elapsed();

    let settled = events.take(BURST).await;
    let settle_span = started.elapsed();
    assert!(settled.iter().all(|e| e.name == "projection:settled"));
    let ids: HashSet<_> = settled.iter().map(|e| e.command_id().unwrap()).collect();
    assert_eq!(
        ids,
        accepted
            .iter()
            .map(|a| a.command_id)
            .collect::<HashSet<_>>()
    );
    // Applied one after another, 400 commands would take 400 x 700 ms. On a timer
    // each, they all land about one delay after their own accept (the slack is for a
    // busy machine: it is still a tenth of one after another).
    let limit = accept_span + Duration::from_millis(700 + 25_000);
    assert!(
        settle_span < limit,
        "burst settled within {settle_span:?}, limit {limit:?}"
    );
    for event in &settled {
        let window = event.data["window_ms"].as_u64().unwrap();
        assert!(
            (690..10_000).contains(&window),
            "window {window} ms is about the delay"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_served_as_json_and_as_prometheus_text_or_openmetrics() {
    let app = spawn_app_with(|config| config.delay_ms = 20).await;
    let mut events = app.events(None).await;
    app.create("counted").await;
    assert_eq!(events.next().await.name, "projection:settled");

    // As JSON: the command was one apply step of one command, timed in its
    // transaction and its flush.
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(
        (
            &metrics["settled"],
            &metrics["window_ms"]["count"],
            &metrics["window_recent_ms"]["count"]
        ),
        (&json!(1), &json!(1), &json!(1))
    );
    let steps = &metrics["apply_steps"];
    assert_eq!(
        (&steps["commands"]["count"], &steps["commands"]["max"]),
        (&json!(1), &json!(1))
    );
    // One command fills no intake segment: nothing released, so no sync.
    assert_eq!(steps["release_sync_us"]["count"], 0, "{steps}");
    // Each part is within the command's own window (accept to readable, which covers
    // its step), in µs: a unit mix-up or a missing figure fails here.
    let window_us = metrics["window_ms"]["max"].as_u64().expect("a window") * 1000 + 1000;
    for part in ["transaction_us", "flush_us"] {
        let timing = &steps[part];
        assert_eq!(timing["count"], 1, "{part}: {steps}");
        let max = timing["max"].as_u64().expect("a max");
        assert_eq!(
            timing["p50"].as_u64(),
            Some(max),
            "one step: {part}: {steps}"
        );
        assert!(
            (1..=window_us).contains(&max),
            "{part}: {max} µs, window {window_us} µs"
        );
    }

    let classic = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(
        classic.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = classic.text().await.unwrap();
    for line in [
        "# TYPE settle_commands_accepted_total counter",
        "settle_commands_accepted_total 1",
        "settle_commands_settled_total 1",
        "# TYPE settle_window_seconds histogram",
        "settle_window_seconds_count 1",
        "settle_window_seconds_bucket{le=\"+Inf\"} 1",
        "# TYPE settle_apply_transaction_seconds histogram",
        "settle_apply_transaction_seconds_count 1",
        "settle_apply_flush_seconds_count 1",
        "# TYPE settle_release_sync_seconds histogram",
        "settle_release_sync_seconds_count 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in {text}");
    }
    assert!(!text.contains("# EOF"), "{text}");

    let open = app
        .http
        .get(app.url("/metrics"))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(open.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = open.text().await.unwrap();
    assert!(
        text.contains("# TYPE settle_commands_accepted counter\n"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    app.stop().await;
}
