//! Injected failures, lost deliveries, transient faults and the live fault knobs.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_problem, spawn_app_with};

#[tokio::test]
async fn an_injected_failure_fails_the_command_and_leaves_no_row() {
    let app = spawn_app_with(|config| {
        config.delay_ms = 100;
        config.failure_rate = 1.0;
    })
    .await;
    let mut events = app.events(None).await;
    let created = app.create("doomed").await;
    let (event, _) = events.until_command(created.command_id).await;
    assert_eq!(event.name, "command:failed");
    assert_eq!(event.data["reason"], "injected");
    assert_eq!(event.data["kind"], "create");
    assert!(event.data["current"].is_null());
    assert!(!event.data["message"].as_str().unwrap().is_empty());
    assert_eq!(
        app.get_json(&format!("/api/tasks/{}", created.task_id))
            .await
            .0,
        404
    );
    let (_, list) = app.get_json("/api/tasks").await;
    assert_eq!(list["tasks"], json!([]));
    let (_, command) = app
        .get_json(&format!("/api/commands/{}", created.command_id))
        .await;
    assert_eq!(command["status"], "failed");
    assert_eq!(command["error"]["reason"], "injected");
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(
        (metrics["failed"].as_u64(), metrics["pending"].as_i64()),
        (Some(1), Some(0))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_lost_delivery_is_redelivered_and_applies_once() {
    let app = spawn_app_with(|config| {
        config.delay_ms = 100;
        config.drop_rate = 1.0;
        config.redeliver_after_ms = 400;
    })
    .await;
    let mut events = app.events(None).await;
    let created = app.create("lost once").await;
    // Every delivery is lost for a while: the command stays pending, no event.
    events
        .assert_quiet(Duration::from_millis(1_200), "no event while lost")
        .await;
    let (_, command) = app
        .get_json(&format!("/api/commands/{}", created.command_id))
        .await;
    assert_eq!(
        command["status"], "pending",
        "a lost delivery leaves it pending"
    );

    app.put_faults(json!({ "drop_rate": 0.0 })).await;
    let (event, before) = events.until_command(created.command_id).await;
    assert!(before.is_empty());
    assert_eq!(event.name, "projection:settled");
    events
        .assert_quiet(Duration::from_millis(1_000), "applied at most once")
        .await;
    let (_, list) = app.get_json("/api/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_client_retry_of_an_overdue_command_redelivers_it_at_once() {
    // Lost at 6 s; the broker-style redelivery would come at 6 s + 4 s = 10 s. A
    // client's retry past both the due time and the redelivery timeout (4 s after
    // its accept) nudges it at once.
    let app = spawn_app_with(|config| {
        config.delay_ms = 6_000;
        config.drop_rate = 1.0;
        config.redeliver_after_ms = 4_000;
    })
    .await;
    let mut events = app.events(None).await;
    let accepted_at = Instant::now();
    let body = json!({ "title": "retry me" });
    let created = app
        .accepted(Method::POST, "/api/tasks", "retry-key", body.clone())
        .await;
    tokio::time::sleep_until((accepted_at + Duration::from_millis(6_400)).into()).await;
    app.put_faults(json!({ "drop_rate": 0.0 })).await;
    tokio::time::sleep_until((accepted_at + Duration::from_millis(6_500)).into()).await;

    let retried = app
        .accepted(Method::POST, "/api/tasks", "retry-key", body)
        .await;
    assert_eq!(
        retried.command_id, created.command_id,
        "the retry is the same command"
    );
    let (event, _) = events.until_command(created.command_id).await;
    let settled_after = accepted_at.elapsed();
    assert_eq!(event.name, "projection:settled");
    assert!(
        settled_after < Duration::from_millis(9_000),
        "the retry re-enqueued it at once (settled after {settled_after:?}, the timer was due at 10 s)"
    );
    events
        .assert_quiet(Duration::from_millis(1_500), "and only once")
        .await;
    app.stop().await;
}

#[tokio::test]
async fn transient_faults_are_retried_then_dead_lettered() {
    let app = spawn_app_with(|config| {
        config.delay_ms = 50;
        config.transient_rate = 1.0;
    })
    .await;
    let mut events = app.events(None).await;
    let created = app.create("cursed").await;
    let (event, _) = events.until_command(created.command_id).await;
    assert_eq!(event.name, "command:failed");
    assert_eq!(event.data["reason"], "dead_lettered");
    assert!(event.data["message"]
        .as_str()
        .unwrap()
        .contains("5 attempts"));
    let (_, dead) = app.get_json("/api/dead-letters").await;
    let dead = dead["dead_letters"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["command_id"], created.command_id.to_string());
    assert_eq!(dead[0]["error"]["reason"], "dead_lettered");
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(metrics["dead_lettered"], 1);
    app.stop().await;
}

#[tokio::test]
async fn fault_settings_are_live_and_validated() {
    let app = spawn_app_with(|_| {}).await;
    let (status, faults) = app.get_json("/api/faults").await;
    assert_eq!(status, 200);
    assert_eq!(faults["delay_ms"], 700);
    assert_eq!(faults["failure_rate"], 0.0);
    let updated = app
        .put_faults(json!({ "delay_ms": 10, "failure_rate": 0.5 }))
        .await;
    assert_eq!(
        (
            updated["delay_ms"].as_u64(),
            updated["failure_rate"].as_f64()
        ),
        (Some(10), Some(0.5))
    );
    assert_eq!(updated["drop_rate"], 0.0, "absent fields keep their value");
    let zero = app.put_faults(json!({ "failure_rate": -0.0 })).await;
    assert!(
        zero["failure_rate"]
            .as_f64()
            .is_some_and(|rate| rate == 0.0 && rate.is_sign_positive()),
        "a rate of -0.0 is held as 0: {zero}"
    );
    for bad in [
        json!({ "failure_rate": 1.5 }),
        json!({ "drop_rate": -0.1 }),
        json!({ "delay_ms": 60_001 }),
        json!({ "jitter_ms": 100_000 }),
        json!({ "delay_ms": -1 }),
        json!({ "failure_rate": "often" }),
        json!({ "latency": 5 }),
    ] {
        let response = app
            .http
            .put(app.url("/api/faults"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_problem(response, 422, &format!("faults {bad}")).await;
    }
    let (_, faults) = app.get_json("/api/faults").await;
    assert_eq!(faults["delay_ms"], 10, "a refused update changes nothing");
    app.stop().await;
}
