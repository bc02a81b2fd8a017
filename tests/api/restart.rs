//! A 202 is a promise that survives kill -9: run the real binary, kill it inside the
//! window, start it again on the same data dir, and count every command's effect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{http_client, BinaryServer, Events, Logs, EVENT_TIMEOUT};

#[tokio::test]
async fn kill_9_inside_the_window_then_restart_settles_every_accepted_command_exactly_once() {
    let data_dir = tempfile::tempdir().unwrap();
    let http = http_client();

    // Some history first, so event ids must continue after the crash.
    let server = BinaryServer::start(data_dir.path(), 50, "info", Logs::Drained);
    let mut events = Events::open(&format!("{}/api/events", server.base), None).await;
    let seed_task = Uuid::now_v7();
    let seed = json!({ "id": seed_task, "title": "seed" });
    server.accepted(&http, "/api/tasks", "seed", seed).await;
    assert_eq!(events.next().await.id, 1);
    drop(events);

    // Accept a mixed batch with a long window, then kill -9 inside it.
    http.put(format!("{}/api/faults", server.base))
        .json(&json!({ "delay_ms": 3_000 }))
        .send()
        .await
        .unwrap();
    let (running, client) = (&server, &http);
    let requests = (0..60).map(|n| async move {
        let (path, body) = if n % 3 == 0 {
            (
                format!("/api/tasks/{seed_task}/likes"),
                json!({ "delta": 1 }),
            )
        } else {
            (
                "/api/tasks".to_owned(),
                json!({ "title": format!("crash {n}") }),
            )
        };
        let body = running
            .accepted(client, &path, &format!("crash-{n}"), body)
            .await;
        body["command_id"].as_str().unwrap().to_owned()
    });
    let accepted: Vec<String> = join_all(requests).await;
    server.kill_9();

    let server = BinaryServer::start(data_dir.path(), 50, "info", Logs::Drained);
    let mut events = Events::open(&format!("{}/api/events", server.base), Some(0)).await;
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut ids = Vec::new();
    while ids.len() < 61 {
        let event = events
            .next_within(EVENT_TIMEOUT)
            .await
            .expect("every accepted command settles after the restart");
        ids.push(event.id);
        *seen
            .entry(event.data["command_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert_eq!(event.name, "projection:settled");
    }
    events
        .assert_quiet(Duration::from_secs(1), "nothing settles twice")
        .await;
    assert_eq!(
        ids,
        (1..=61).collect::<Vec<_>>(),
        "ids continue without reuse or gap"
    );
    for command_id in &accepted {
        assert_eq!(
            seen.get(command_id),
            Some(&1),
            "command {command_id} settled exactly once"
        );
    }
    let tasks = server.get_json(&http, "/api/tasks").await;
    let tasks = tasks["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1 + 40);
    assert_eq!(tasks[0]["likes"], 20, "each like counted once");
    server.kill_9();
}

/// A published event is a promise too: what the consumer applied and announced stays
/// applied, with the same id and payload, when the process dies just after (the apply
/// log holds it until sled's next checkpoint; `store::apply_log`).
#[tokio::test]
async fn kill_9_just_after_the_events_keeps_every_published_apply() {
    let data_dir = tempfile::tempdir().unwrap();
    let http = http_client();
    let server = BinaryServer::start(data_dir.path(), 20, "info", Logs::Drained);
    let mut events = Events::open(&format!("{}/api/events", server.base), None).await;
    let task = Uuid::now_v7();
    let create = json!({ "id": task, "title": "liked" });
    server.accepted(&http, "/api/tasks", "create", create).await;
    let mut published = vec![events.next().await];
    let path = format!("/api/tasks/{task}/likes");
    let keys: Vec<String> = (0..30).map(|n| format!("like-{n}")).collect();
    let likes = keys
        .iter()
        .map(|key| server.accepted(&http, &path, key, json!({ "delta": 1 })));
    join_all(likes).await;
    while published.len() < 31 {
        published.push(events.next().await);
    }
    server.kill_9();

    let server = BinaryServer::start(data_dir.path(), 20, "info", Logs::Drained);
    let mut replayed = Events::open(&format!("{}/api/events", server.base), Some(0)).await;
    for event in &published {
        let again = replayed
            .next_within(EVENT_TIMEOUT)
            .await
            .expect("every published event is in the log after the restart");
        assert_eq!(
            (again.id, &again.name, &again.data),
            (event.id, &event.name, &event.data),
            "the same event under the same id"
        );
    }
    replayed
        .assert_quiet(Duration::from_secs(1), "nothing applies again")
        .await;
    let row = server.get_json(&http, &format!("/api/tasks/{task}")).await;
    assert_eq!(row["likes"], 30);
    assert_eq!(row["version"], 31);
    server.kill_9();
}

/// kill -9 under a load that fills intake segments, so checkpoints run while the
/// process dies (sled's sync on their thread, the apply log's files let go, segments
/// released): after the restart every 202'd command has settled exactly once, under
/// ids that run from 1 without a gap, and every event published before the kill is
/// the same under its id.
#[tokio::test]
async fn kill_9_under_load_across_checkpoints_settles_every_accepted_command_once() {
    let data_dir = tempfile::tempdir().unwrap();
    let http = http_client();
    let server = BinaryServer::start(data_dir.path(), 20, "info", Logs::Drained);
    let mut live = Events::open(&format!("{}/api/events", server.base), None).await;
    let published = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn({
        let published = published.clone();
        async move {
            // Until the kill ends the stream.
            while let Some(event) = live.next_within(EVENT_TIMEOUT).await {
                published.lock().unwrap().push(event);
            }
        }
    });
    // 10000 characters of notes each: a 4 MiB segment holds about 400 of them.
    let notes = "n".repeat(settle::model::NOTES_MAX_CHARS);
    let send = |n: usize| {
        let (http, notes) = (http.clone(), notes.clone());
        let url = format!("{}/api/tasks", server.base);
        async move {
            // Cut off by the kill: not 202'd, so not promised.
            let response = http
                .post(url)
                .header("Idempotency-Key", format!("load-{n}"))
                .json(&json!({ "title": format!("load {n}"), "notes": notes }))
                .send()
                .await
                .ok()?;
            if response.status() != 202 {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            Some(body["command_id"].as_str()?.to_owned())
        }
    };
    let mut accepted: Vec<String> = Vec::new();
    for wave in 0..3 {
        let sent = (wave * 300..(wave + 1) * 300).map(&send);
        accepted.extend(join_all(sent).await.into_iter().flatten());
    }
    assert_eq!(accepted.len(), 900, "all accepted before the kill");
    // Most of them applied, so the first two segments' checkpoints have begun.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while published.lock().unwrap().len() < 850 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer applies"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A last wave in flight when the process dies.
    let last = tokio::spawn(join_all((900..1200).map(send)));
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.kill_9();
    accepted.extend(last.await.unwrap().into_iter().flatten());
    watcher.await.unwrap();
    let published = std::mem::take(&mut *published.lock().unwrap());

    let server = BinaryServer::start(data_dir.path(), 20, "info", Logs::Drained);
    let mut events = Events::open(&format!("{}/api/events", server.base), Some(0)).await;
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut ids = Vec::new();
    loop {
        // Then a second more: commands accepted as the process died but never
        // answered may settle too.
        let all_seen = accepted.iter().all(|id| seen.contains_key(id));
        let wait = if all_seen {
            Duration::from_secs(1)
        } else {
            EVENT_TIMEOUT
        };
        let Some(event) = events.next_within(wait).await else {
            assert!(all_seen, "every 202'd command settles after the restart");
            break;
        };
        assert_eq!(event.name, "projection:settled");
        if let Some(before) = published.get(ids.len()) {
            assert_eq!(
                (event.id, &event.data),
                (before.id, &before.data),
                "a published event is the same after the restart"
            );
        }
        ids.push(event.id);
        *seen
            .entry(event.data["command_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "ids from 1 without a gap or a repeat"
    );
    assert!(
        seen.values().all(|&count| count == 1),
        "nothing settles twice"
    );
    let tasks = server.get_json(&http, "/api/tasks").await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), ids.len());
    server.kill_9();
}
