//! Bad input gets a clear RFC 9457 problem and loses nothing; never a 5xx.

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_problem, spawn_app, TestApp};

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = app.http.request(method, app.url(path)).body(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    request.send().await.unwrap()
}

fn json_body(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

/// What, method, path, Idempotency-Key, Content-Type, body, expected status.
type Case<'a> = (
    &'a str,
    Method,
    String,
    Option<String>,
    Option<&'a str>,
    Vec<u8>,
    u16,
);

#[tokio::test]
async fn each_bad_input_gets_a_problem_and_no_command() {
    let app = spawn_app().await;
    let id = Uuid::now_v7();
    let task = format!("/api/tasks/{id}");
    let likes = format!("/api/tasks/{id}/likes");
    let json_type = Some("application/json");
    let title = |t: &str| json_body(json!({ "title": t }));
    let cases: Vec<Case> = vec![
        (
            "missing key",
            Method::POST,
            "/api/tasks".into(),
            None,
            json_type,
            title("a"),
            400,
        ),
        (
            "empty key",
            Method::POST,
            "/api/tasks".into(),
            Some(String::new()),
            json_type,
            title("a"),
            400,
        ),
        (
            "key with a space",
            Method::POST,
            "/api/tasks".into(),
            Some("a b".into()),
            json_type,
            title("a"),
            400,
        ),
        (
            "key of 256 characters",
            Method::POST,
            "/api/tasks".into(),
            Some("k".repeat(256)),
            json_type,
            title("a"),
            400,
        ),
        (
            "unterminated quoted key",
            Method::POST,
            "/api/tasks".into(),
            Some("\"abc".into()),
            json_type,
            title("a"),
            400,
        ),
        (
            "empty title",
            Method::POST,
            "/api/tasks".into(),
            Some("k1".into()),
            json_type,
            title(""),
            422,
        ),
        (
            "blank title",
            Method::POST,
            "/api/tasks".into(),
            Some("k2".into()),
            json_type,
            title("   \t "),
            422,
        ),
        (
            "title of 201 characters",
            Method::POST,
            "/api/tasks".into(),
            Some("k3".into()),
            json_type,
            title(&"é".repeat(201)),
            422,
        ),
        (
            "missing title",
            Method::POST,
            "/api/tasks".into(),
            Some("k4".into()),
            json_type,
            json_body(json!({ "notes": "x" })),
            422,
        ),
        (
            "title not a string",
            Method::POST,
            "/api/tasks".into(),
            Some("k5".into()),
            json_type,
            json_body(json!({ "title": 5 })),
            422,
        ),
        (
            "notes over 10000",
            Method::POST,
            "/api/tasks".into(),
            Some("k6".into()),
            json_type,
            json_body(json!({ "title": "a", "notes": "n".repeat(10_001) })),
            422,
        ),
        (
            "malformed id in body",
            Method::POST,
            "/api/tasks".into(),
            Some("k7".into()),
            json_type,
            json_body(json!({ "id": "nope", "title": "a" })),
            422,
        ),
        (
            "unknown field",
            Method::POST,
            "/api/tasks".into(),
            Some("k8".into()),
            json_type,
            json_body(json!({ "title": "a", "colour": "red" })),
            422,
        ),
        (
            "malformed JSON",
            Method::POST,
            "/api/tasks".into(),
            Some("k9".into()),
            json_type,
            b"{\"title\": ".to_vec(),
            400,
        ),
        (
            "JSON that is not an object",
            Method::POST,
            "/api/tasks".into(),
            Some("k10".into()),
            json_type,
            b"[1,2]".to_vec(),
            422,
        ),
        (
            "text content type",
            Method::POST,
            "/api/tasks".into(),
            Some("k11".into()),
            Some("text/plain"),
            title("a"),
            415,
        ),
        (
            "no content type",
            Method::POST,
            "/api/tasks".into(),
            Some("k12".into()),
            None,
            title("a"),
            415,
        ),
        (
            "body over 64 KiB",
            Method::POST,
            "/api/tasks".into(),
            Some("k13".into()),
            json_type,
            json_body(json!({ "title": "a", "notes": "n".repeat(70_000) })),
            413,
        ),
        (
            "malformed task id in path",
            Method::PATCH,
            "/api/tasks/not-a-uuid".into(),
            Some("k14".into()),
            json_type,
            json_body(json!({ "done": true })),
            400,
        ),
        (
            "empty patch",
            Method::PATCH,
            task.clone(),
            Some("k15".into()),
            json_type,
            json_body(json!({})),
            422,
        ),
        (
            "patch with only base_version",
            Method::PATCH,
            task.clone(),
            Some("k16".into()),
            json_type,
            json_body(json!({ "base_version": 1 })),
            422,
        ),
        (
            "patch with a blank title",
            Method::PATCH,
            task.clone(),
            Some("k17".into()),
            json_type,
            json_body(json!({ "title": " " })),
            422,
        ),
        (
            "negative base_version",
            Method::PATCH,
            task.clone(),
            Some("k18".into()),
            json_type,
            json_body(json!({ "done": true, "base_version": -1 })),
            422,
        ),
        (
            "delete with a text body",
            Method::DELETE,
            task.clone(),
            Some("k19".into()),
            Some("text/plain"),
            b"base_version=1".to_vec(),
            415,
        ),
        (
            "delete with malformed JSON",
            Method::DELETE,
            task.clone(),
            Some("k20".into()),
            json_type,
            b"{".to_vec(),
            400,
        ),
        (
            "delete of a malformed id",
            Method::DELETE,
            "/api/tasks/123".into(),
            Some("k21".into()),
            None,
            Vec::new(),
            400,
        ),
        (
            "like delta 2",
            Method::POST,
            likes.clone(),
            Some("k22".into()),
            json_type,
            json_body(json!({ "delta": 2 })),
            422,
        ),
        (
            "like delta 0",
            Method::POST,
            likes.clone(),
            Some("k23".into()),
            json_type,
            json_body(json!({ "delta": 0 })),
            422,
        ),
        (
            "like delta 1.5",
            Method::POST,
            likes.clone(),
            Some("k24".into()),
            json_type,
            json_body(json!({ "delta": 1.5 })),
            422,
        ),
        (
            "like without a key",
            Method::POST,
            likes.clone(),
            None,
            json_type,
            json_body(json!({ "delta": 1 })),
            400,
        ),
        (
            "read of a malformed id",
            Method::GET,
            "/api/tasks/xyz".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "read of a missing task",
            Method::GET,
            task.clone(),
            None,
            None,
            Vec::new(),
            404,
        ),
        (
            "counts of a missing task",
            Method::GET,
            format!("{task}/counts"),
            None,
            None,
            Vec::new(),
            404,
        ),
        (
            "unknown command",
            Method::GET,
            format!("/api/commands/{id}"),
            None,
            None,
            Vec::new(),
            404,
        ),
        (
            "command lookup without a key",
            Method::GET,
            "/api/commands".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "command lookup by an empty key",
            Method::GET,
            "/api/commands?key=".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "command lookup by a key with a space",
            Method::GET,
            "/api/commands?key=a%20b".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "command lookup by a key over 255 characters",
            Method::GET,
            "/api/commands?key=kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "command lookup with another parameter",
            Method::GET,
            "/api/commands?key=k&id=1".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "command lookup by an unknown key",
            Method::GET,
            "/api/commands?key=never-sent".into(),
            None,
            None,
            Vec::new(),
            404,
        ),
        (
            "malformed command id",
            Method::GET,
            "/api/commands/42".into(),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "unknown API route",
            Method::GET,
            "/api/nothing-here".into(),
            None,
            None,
            Vec::new(),
            404,
        ),
        (
            "unknown page",
            Method::GET,
            "/no/such/file.js".into(),
            None,
            None,
            Vec::new(),
            404,
        ),
        (
            "wrong method",
            Method::PUT,
            "/api/tasks".into(),
            Some("k25".into()),
            json_type,
            title("a"),
            405,
        ),
    ];
    for (what, method, path, key, content_type, body, status) in cases {
        let response = send(&app, method, &path, key.as_deref(), content_type, body).await;
        assert_problem(response, status, what).await;
    }
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(metrics["accepted"], 0, "no bad request became a command");
    assert_eq!(
        app.get_json("/api/health").await.0,
        200,
        "and the server is fine"
    );
    app.stop().await;
}

#[tokio::test]
async fn limits_are_inclusive_and_quoted_keys_are_keys() {
    let app = spawn_app().await;
    let json_type = Some("application/json");
    let ok = [
        (
            "a 200-character title",
            "k1".to_owned(),
            json!({ "title": format!("  {}  ", "t".repeat(200)) }),
        ),
        (
            "10000 characters of notes",
            "k2".to_owned(),
            json!({ "title": "n", "notes": "ñ".repeat(10_000) }),
        ),
        (
            "a 255-character key",
            "k".repeat(255),
            json!({ "title": "long key" }),
        ),
        (
            "a quoted key with escapes",
            "\"a\\\"b\"".to_owned(),
            json!({ "title": "quoted" }),
        ),
        (
            "visible punctuation",
            "!#$%&'()*+,-./:;<=>?@[]^_`{|}~".to_owned(),
            json!({ "title": "punct" }),
        ),
    ];
    for (what, key, body) in ok {
        let response = send(
            &app,
            Method::POST,
            "/api/tasks",
            Some(&key),
            json_type,
            json_body(body),
        )
        .await;
        assert_eq!(response.status(), 202, "{what} is accepted");
    }
    // The quoted key is stored unquoted, its escape undone: found by the bare key.
    let (status, command) = app.get_json("/api/commands?key=a%22b").await;
    assert_eq!(status, 200, "found by its key unquoted: {command}");
    assert_eq!(command["idempotency_key"], "a\"b");
    // A DELETE needs no body at all.
    let id = Uuid::now_v7();
    let response = send(
        &app,
        Method::DELETE,
        &format!("/api/tasks/{id}"),
        Some("del"),
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(response.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn the_app_is_served_at_the_root_with_a_strict_policy() {
    let app = spawn_app().await;
    let response = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(policy.contains("default-src 'self'"));
    let etag = response.headers()["etag"].clone();
    assert!(response.text().await.unwrap().contains("<html"));
    let cached = app
        .http
        .get(app.url("/"))
        .header("If-None-Match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    app.stop().await;
}

/// Sends `request` on a connection of its own and reads the answer to its end (the
/// server closes the connection after a refused head).
async fn send_raw(app: &TestApp, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the server answers and closes within 10 s")
    .expect("readable");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends `pieces` on a connection of its own, 50 ms apart (each its own segment), and
/// reads until `done` holds for what came back, or the server closes.
async fn send_in_pieces(app: &TestApp, pieces: &[&[u8]], done: impl Fn(&str) -> bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in pieces {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut answer = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.expect("readable");
            answer.extend_from_slice(&chunk[..n]);
            if n == 0 || done(&String::from_utf8_lossy(&answer)) {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_first_head_is_judged_whole_however_many_pieces_it_comes_in() {
    let app = spawn_app().await;
    let closed = |_: &str| false;

    // The fault is in the second piece: refused with a problem, not hyper's bare 400.
    let answer = send_in_pieces(
        &app,
        &[
            b"POST /api/tasks HTTP/1.1\r\nHost: t\r\n",
            b"Content-Length: -1\r\n\r\n",
        ],
        closed,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains("application/problem+json"), "{answer:?}");

    // A good head in three pieces, then a body: hyper reads what was read for it.
    let body = br#"{"title":"in pieces"}"#;
    let length = format!("Content-Length: {}\r\n\r\n", body.len());
    let answer = send_in_pieces(
        &app,
        &[
            b"POST /api/tasks HTTP/1.1\r\nHo",
            b"st: t\r\nContent-Type: application/json\r\nIdempotency-Key: pieces\r\n",
            format!("Connection: close\r\n{length}").as_bytes(),
            body,
        ],
        closed,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 202 "), "{answer:?}");

    // Two requests in one write: both answered, in order.
    let answer = send_in_pieces(
        &app,
        &[b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\nGET /api/nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"],
        closed,
    )
    .await;
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answer[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "404"], "{answer:?}");

    // An event-stream request sent a byte at a time is a stream still.
    let request = b"GET /api/events HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n";
    let bytes: Vec<&[u8]> = request.chunks(1).collect();
    let answer = send_in_pieces(&app, &bytes, |answer| answer.contains("\r\n\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert!(
        answer.contains("content-type: text/event-stream"),
        "{answer:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_head_hyper_cannot_take_gets_a_problem_with_its_status() {
    let app = spawn_app().await;
    let fields: Vec<u8> = (0..120)
        .flat_map(|n| format!("X-Field-{n}: v\r\n").into_bytes())
        .collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("another HTTP", b"GET / HTTP/9.9\r\n\r\n".to_vec(), 400),
        (
            "bytes that are no URI",
            b"GET /api/tasks/\xff\xfe HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a Content-Length past u64",
            b"POST /api/tasks HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a negative Content-Length",
            b"POST /api/tasks HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            400,
        ),
        (
            "120 header fields",
            [&b"GET /api/tasks HTTP/1.1\r\n"[..], &fields, b"\r\n"].concat(),
            431,
        ),
        (
            "a 256 KiB header field",
            [
                &b"GET /api/tasks HTTP/1.1\r\nX-Big: "[..],
                &vec![b'a'; 256 << 10],
                b"\r\n\r\n",
            ]
            .concat(),
            431,
        ),
        (
            "a 70000-byte target",
            [&b"GET /"[..], &vec![b'a'; 70_000], b" HTTP/1.1\r\n\r\n"].concat(),
            414,
        ),
    ];
    for (what, request, status) in cases {
        let answer = send_raw(&app, &request).await;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: a whole answer, got {answer:?}"));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {head:?}"
        );
        assert!(
            head.contains("content-type: application/problem+json\r\n"),
            "{what}: {head:?}"
        );
        let problem: Value = serde_json::from_str(body).expect("a JSON problem body");
        assert_eq!(problem["status"], status, "{what}: {problem}");
        for field in ["type", "title", "detail"] {
            assert!(problem[field].is_string(), "{what}: {field} in {problem}");
        }
    }
    // A long head within the bound is served, and the server is still up.
    let long_field = [
        &b"GET /api/health HTTP/1.1\r\nHost: t\r\nX-Long: "[..],
        &vec![b'a'; 20_000],
        b"\r\nConnection: close\r\n\r\n",
    ]
    .concat();
    let answer = send_raw(&app, &long_field).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    app.stop().await;
}

/// The limit is judged on the length a body declares, before any of it is read: a
/// client that announced too much is answered at once, whether it waits on `Expect:
/// 100-continue` (and is never told to go on) or sends nothing more.
#[tokio::test]
async fn a_body_declared_over_the_limit_is_refused_before_it_is_sent() {
    let app = spawn_app().await;
    let head = "POST /api/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                Idempotency-Key: declared\r\nContent-Length: 99999999\r\n";
    for expect in ["", "Expect: 100-continue\r\n"] {
        let request = format!("{head}{expect}\r\n");
        let whole = |answer: &str| answer.contains("\r\n\r\n") && answer.ends_with('}');
        let answer = send_in_pieces(&app, &[request.as_bytes()], whole).await;
        assert!(
            answer.starts_with("HTTP/1.1 413 "),
            "{expect:?}: {answer:?}"
        );
        assert!(!answer.contains("100 Continue"), "{expect:?}: {answer:?}");
        assert!(
            answer.contains("content-type: application/problem+json"),
            "{expect:?}: {answer:?}"
        );
        assert!(answer.contains("99999999"), "{expect:?}: {answer:?}");
    }
    // Nothing was accepted.
    let response = app
        .http
        .get(app.url("/api/commands?key=declared"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    app.stop().await;
}

/// A body with no declared length (chunked) is cut off as it is read, at the limit.
#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_as_it_comes() {
    let app = spawn_app().await;
    let notes = "n".repeat(70_000);
    let body = serde_json::to_vec(&json!({ "title": "a", "notes": notes })).unwrap();
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = body
        .chunks(8 * 1024)
        .map(|piece| Ok(piece.to_vec()))
        .collect();
    let response = app
        .http
        .post(app.url("/api/tasks"))
        .header("Idempotency-Key", "chunked")
        .header("Content-Type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    app.stop().await;
}
