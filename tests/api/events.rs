//! The event stream: durable ids, resume without gap or duplicate, reset when history
//! is gone, lagging subscribers caught up from the log, streams that end at shutdown.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use settle::hub::Hub;
use settle::metrics::Metrics;
use settle::model::{CommandBody, CommandRecord};
use settle::store::{Decision, Store};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{assert_problem, spawn_app_with, Events};

#[tokio::test]
async fn resuming_with_last_event_id_replays_every_later_event_without_gap_or_duplicate() {
    let app = spawn_app_with(|config| config.delay_ms = 30).await;
    let mut live = app.events(None).await;
    for n in 0..5 {
        app.create(&format!("task {n}")).await;
    }
    let first = live.take(5).await;
    assert_eq!(
        first.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5],
        "ids start at 1"
    );

    // Resume after 2 while new commands keep settling: the seam between the log and
    // the live broadcast must neither drop nor repeat an event.
    let writer = {
        let http = app.http.clone();
        let url = app.url("/api/tasks");
        tokio::spawn(async move {
            for n in 0..20 {
                http.post(&url)
                    .header("Idempotency-Key", format!("during-{n}"))
                    .json(&json!({ "title": format!("during {n}") }))
                    .send()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut resumed = app.events(Some(2)).await;
    writer.await.unwrap();
    let events = resumed.take(23).await;
    let ids: Vec<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, (3..=25).collect::<Vec<_>>());
    resumed
        .assert_quiet(Duration::from_millis(300), "no duplicate")
        .await;
    // The replayed part is byte-for-byte what live subscribers got.
    assert_eq!(events[0].data, first[2].data);

    // Last-Event-ID: 0 replays the whole retained log; the query form works too.
    let mut everything = app.events(Some(0)).await;
    let all = everything.take(25).await;
    assert_eq!(
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        (1..=25).collect::<Vec<_>>()
    );
    let mut by_query = Events::open(&app.url("/api/events?last_event_id=24"), None).await;
    assert_eq!(by_query.next().await.id, 25);
    app.stop().await;
}

#[tokio::test]
async fn event_ids_keep_increasing_across_restarts() {
    let app = spawn_app_with(|config| config.delay_ms = 20).await;
    let mut events = app.events(None).await;
    app.create("before").await;
    assert_eq!(events.next().await.id, 1);
    drop(events);
    let app = app.restart(|_| {}).await;
    let mut events = app.events(Some(0)).await;
    assert_eq!(events.next().await.id, 1, "the log survived the restart");
    app.create("after").await;
    let next = events.next().await;
    assert_eq!(next.id, 2, "never reused");
    assert_eq!(next.data["task"]["title"], "after");
    let (_, list) = app.get_json("/api/tasks").await;
    assert_eq!(list["watermark"], 2);
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_resume_from_before_the_retained_log_starts_with_reset() {
    let app = spawn_app_with(|config| {
        config.delay_ms = 10;
        config.event_retention = 3;
    })
    .await;
    let mut events = app.events(None).await;
    for n in 0..6 {
        app.create(&format!("t{n}")).await;
    }
    events.take(6).await;
    drop(events);
    // The janitor trims the log when it starts: soon after, a resume from 0 resets.
    let app = app.restart(|_| {}).await;
    let mut trimmed = false;
    for _ in 0..100 {
        let mut probe = app.events(Some(0)).await;
        if probe.next().await.name == "reset" {
            trimmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        trimmed,
        "the janitor trimmed the log within 10 s of the start"
    );

    // The log keeps 4, 5 and 6: a resume from before them is told so first, under the
    // last id it lost, then gets what is kept, then live events.
    for from in [0, 1] {
        let mut stale = app.events(Some(from)).await;
        let reset = stale.next().await;
        assert_eq!(reset.name, "reset");
        assert_eq!(reset.id, 3);
        assert_eq!(reset.data["watermark"], 3);
        assert_eq!(reset.data["reason"], "history_compacted");
        let kept: Vec<u64> = stale.take(3).await.iter().map(|event| event.id).collect();
        assert_eq!(
            kept,
            [4, 5, 6],
            "Last-Event-ID {from}: the whole retained log"
        );
        if from == 1 {
            app.create("fresh").await;
            assert_eq!(stale.next().await.id, 7, "live events follow the replay");
        }
    }

    // Within the retained log there is no reset: from the reset's own id (what an
    // EventSource reconnects with) and from inside the log.
    let mut from_reset = app.events(Some(3)).await;
    let replay: Vec<(String, u64)> = from_reset
        .take(3)
        .await
        .into_iter()
        .map(|event| (event.name, event.id))
        .collect();
    let settled = "projection:settled".to_owned();
    assert_eq!(
        replay,
        [(settled.clone(), 4), (settled.clone(), 5), (settled, 6)]
    );
    let mut recent = app.events(Some(4)).await;
    assert_eq!(recent.next().await.id, 5);

    // A client ahead of the server (another data dir) is told to refetch, too.
    let mut ahead = app.events(Some(999)).await;
    let reset = ahead.next().await;
    assert_eq!((reset.name.as_str(), reset.id), ("reset", 7));
    assert_eq!(reset.data["reason"], "unknown_event_id");
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_last_event_id_is_a_problem() {
    let app = spawn_app_with(|_| {}).await;
    let response = app
        .http
        .get(app.url("/api/events"))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "Last-Event-ID").await;
    // `+` in a query is a space.
    for query in [
        "-1",
        "%2B5",
        "18446744073709551616",
        "%205",
        "5%20",
        "+5",
        "",
    ] {
        let response = app
            .http
            .get(app.url(&format!("/api/events?last_event_id={query}")))
            .send()
            .await
            .unwrap();
        assert_problem(response, 400, "last_event_id").await;
    }
    // Two ids: which one the client meant cannot be told.
    let response = app
        .http
        .get(app.url("/api/events"))
        .header("Last-Event-ID", "5")
        .header("Last-Event-ID", "7")
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "Last-Event-ID").await;
    app.stop().await;
}

#[tokio::test]
async fn the_stream_sends_a_retry_hint_and_counts_its_subscriber() {
    let app = spawn_app_with(|_| {}).await;
    let response = app.http.get(app.url("/api/events")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&first);
    assert!(text.contains("retry: "), "a retry hint first: {text:?}");
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(metrics["subscribers"], 1);
    drop(body);
    app.until_subscribers(0).await;
    app.stop().await;
}

/// Applies a create directly through the store, as the consumer would.
fn settle_one(store: &Store, n: u64) -> settle::hub::EventFrame {
    let now = OffsetDateTime::now_utc();
    let body = CommandBody::Create {
        title: format!("t{n}"),
        notes: String::new(),
    };
    let record = CommandRecord {
        seq: store.next_seq().unwrap(),
        ..CommandRecord::accepted(
            Uuid::now_v7(),
            format!("k{n}"),
            format!("f{n}"),
            body,
            now,
            0,
        )
    };
    let applied = store
        .apply_batch(&[(&record, &Decision::Apply)], now)
        .unwrap()
        .pop()
        .flatten()
        .expect("a pending command applies");
    store.log_applied([&applied]).unwrap();
    store.project(&applied);
    applied.frame
}

/// Reads SSE bytes into `text` until the event with `id` is in it.
async fn read_until<S>(stream: &mut S, text: &mut String, id: u64)
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> + Unpin,
{
    let needle = format!("id: {id}\n");
    while !text.contains(&needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream keeps up")
            .expect("the stream is open")
            .expect("infallible");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_the_broadcast_catches_up_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let hub = Hub::with_capacity(2);
    let shutdown = CancellationToken::new();
    let stream = settle::sse::event_stream(
        store.clone(),
        hub.clone(),
        Metrics::new(),
        shutdown.clone(),
        Some(0),
    );
    futures::pin_mut!(stream);
    // The stream is created but not polled while 50 events go out: its receiver
    // lags far past the broadcast's capacity.
    for n in 0..50 {
        hub.publish(settle_one(&store, n));
    }
    let mut text = String::new();
    read_until(&mut stream, &mut text, 50).await;
    // Caught up: nothing else is due, in particular no stale broadcast frame again.
    let extra = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(extra.is_err(), "nothing after the catch-up: {extra:?}");
    // Live, one at a time.
    for n in 51..=55 {
        hub.publish(settle_one(&store, n));
        read_until(&mut stream, &mut text, n).await;
    }
    // Behind again.
    for n in 56..=60 {
        hub.publish(settle_one(&store, n));
    }
    read_until(&mut stream, &mut text, 60).await;
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|line| line.strip_prefix("id: "))
        .map(|id| id.parse().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=60).collect::<Vec<_>>(),
        "every event once, in order"
    );
    shutdown.cancel();
    let rest = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(rest.is_none(), "the stream ends at shutdown");
}

#[tokio::test]
async fn graceful_shutdown_ends_open_streams_and_idle_connections() {
    let app = spawn_app_with(|_| {}).await;
    let mut events = app.events(None).await;
    let _second = app.events(Some(0)).await;
    // A connection that never sends a request (a browser's preconnect) must not hold
    // the drain up either.
    let addr = app.base.trim_start_matches("http://").to_owned();
    let _idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    app.stop().await; // times out (and fails) if a stream holds the server open
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drained in {:?}",
        started.elapsed()
    );
    let end = events.next_or_end(Duration::from_secs(2)).await;
    assert!(
        matches!(end, crate::helpers::Next::Ended),
        "the stream ended: {end:?}"
    );
}

/// A subscriber that never reads holds the server's write to it up once the socket's
/// buffers are full: the shutdown still ends its stream at once, not after the drain
/// timeout.
#[tokio::test]
async fn graceful_shutdown_does_not_wait_for_a_subscriber_that_never_reads() {
    let app = spawn_app_with(|config| config.delay_ms = 10).await;
    // About 20 KiB an event: 400 of them are more than both buffers hold.
    app.create_settled_with_longest_notes(400).await;
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    // One served on the socket (its first request is the stream), one by hyper (a
    // request before it on the same connection).
    let requests: [&[u8]; 2] = [
        b"GET /api/events HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 0\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /api/events HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 0\r\n\r\n",
    ];
    let mut stalled = Vec::new();
    for request in requests {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, request)
            .await
            .unwrap();
        stalled.push(stream);
    }
    // The replays fill the buffers and wait on their writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "drained in {:?}, the drain timeout is 10 s",
        started.elapsed()
    );
    drop(stalled);
}

/// Reads from a raw connection until `needle` has arrived; returns everything read.
async fn read_raw_until(stream: &mut tokio::net::TcpStream, text: &mut String, needle: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    while !text.contains(needle) {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{needle:?} within 10 s; got {text:?}"))
            .expect("readable");
        assert!(read > 0, "closed before {needle:?}; got {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..read]));
    }
}

#[tokio::test]
async fn a_stream_opened_first_or_after_another_request_carries_the_same_events() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|config| config.delay_ms = 20).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let events_request = "GET /api/events?last_event_id=0 HTTP/1.1\r\nHost: t\r\n\r\n";

    // First request on its connection: served on the socket, close-delimited.
    let mut direct = tokio::net::TcpStream::connect(&addr).await.unwrap();
    direct.write_all(events_request.as_bytes()).await.unwrap();
    let mut direct_text = String::new();
    read_raw_until(&mut direct, &mut direct_text, "retry: ").await;

    // After another request on a keep-alive connection: served by hyper, chunked.
    let mut routed = tokio::net::TcpStream::connect(&addr).await.unwrap();
    routed
        .write_all(b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut routed_text = String::new();
    read_raw_until(&mut routed, &mut routed_text, "{\"status\":\"ok\"}").await;
    routed_text.clear();
    routed.write_all(events_request.as_bytes()).await.unwrap();
    read_raw_until(&mut routed, &mut routed_text, "retry: ").await;

    let created = app.create("seen by both").await;
    for (text, stream) in [
        (&mut direct_text, &mut direct),
        (&mut routed_text, &mut routed),
    ] {
        read_raw_until(stream, text, &created.command_id.to_string()).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
        assert!(
            text.contains("content-type: text/event-stream\r\n"),
            "{text:?}"
        );
        assert!(
            text.contains("id: 1\nevent: projection:settled\ndata: {"),
            "{text:?}"
        );
    }
    assert!(
        direct_text.contains("connection: close\r\n"),
        "{direct_text:?}"
    );
    assert!(
        !direct_text.contains("transfer-encoding"),
        "{direct_text:?}"
    );
    assert!(
        routed_text.contains("transfer-encoding: chunked\r\n"),
        "{routed_text:?}"
    );

    // A malformed resume point is the same problem on the direct path.
    let mut bad = tokio::net::TcpStream::connect(&addr).await.unwrap();
    bad.write_all(b"GET /api/events?last_event_id=x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut bad_text = String::new();
    read_raw_until(&mut bad, &mut bad_text, "\"status\":400").await;
    assert!(
        bad_text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{bad_text:?}"
    );
    assert!(bad_text.contains("content-type: application/problem+json\r\n"));

    // Hanging up ends the subscription at once, also when no event is due.
    drop(direct);
    drop(routed);
    app.until_subscribers(0).await;
    app.stop().await;
}
