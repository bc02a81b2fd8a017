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
            "braced id in body",
            Method::POST,
            "/api/tasks".into(),
            Some("k7b".into()),
            json_type,
            json_body(json!({ "id": format!("{{{id}}}"), "title": "a" })),
            422,
        ),
        (
            "unhyphenated id in body",
            Method::POST,
            "/api/tasks".into(),
            Some("k7c".into()),
            json_type,
            json_body(json!({ "id": id.simple().to_string(), "title": "a" })),
            422,
        ),
        (
            "URN id in body",
            Method::POST,
            "/api/tasks".into(),
            Some("k7d".into()),
            json_type,
            json_body(json!({ "id": id.urn().to_string(), "title": "a" })),
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
            "unhyphenated task id in path",
            Method::GET,
            format!("/api/tasks/{}", id.simple()),
            None,
            None,
            Vec::new(),
            400,
        ),
        (
            "braced task id in a like's path",
            Method::POST,
            format!("/api/tasks/%7B{id}%7D/likes"),
            Some("k26".into()),
            json_type,
            json_body(json!({ "delta": 1 })),
            400,
        ),
        (
            "URN command id",
            Method::GET,
            format!("/api/commands/{}", id.urn()),
            None,
            None,
            Vec::new(),
            400,
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
    // An id in capitals is the same id, hyphenated as the API writes them.
    let id = Uuid::now_v7();
    let upper = id.hyphenated().to_string().to_uppercase();
    let response = send(
        &app,
        Method::POST,
        "/api/tasks",
        Some("upper"),
        json_type,
        json_body(json!({ "id": upper, "title": "capitals" })),
    )
    .await;
    assert_eq!(response.status(), 202, "an id in capitals is accepted");
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(
        accepted["task_id"],
        id.to_string(),
        "and written back in lowercase"
    );
    let response = send(
        &app,
        Method::POST,
        &format!("/api/tasks/{upper}/likes"),
        Some("upper-like"),
        json_type,
        json_body(json!({ "delta": 1 })),
    )
    .await;
    assert_eq!(response.status(), 202, "in a path too");
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

/// A body in a content coding the server does not decode is refused 415, saying which
/// it takes (RFC 9110, 15.5.16), rather than read as JSON; `identity` is no coding.
#[tokio::test]
async fn an_encoded_body_is_refused_415_and_identity_is_taken() {
    let app = spawn_app().await;
    for (coding, key) in [("gzip", "gz"), ("identity, br", "br")] {
        let response = app
            .http
            .post(app.url("/api/tasks"))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", coding)
            .body(json_body(json!({ "title": "packed" })))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["accept-encoding"],
            "identity",
            "{coding}: says what it takes"
        );
        let problem = assert_problem(response, 415, coding).await;
        assert_eq!(problem["type"], "/problems/unsupported-content-coding");
    }
    let response = app
        .http
        .post(app.url("/api/tasks"))
        .header("Idempotency-Key", "plain")
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "identity")
        .body(json_body(json!({ "title": "plain" })))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let (_, metrics) = app.get_json("/api/metrics").await;
    assert_eq!(
        metrics["accepted"], 1,
        "only the unencoded body became a command"
    );
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
    let page = response.text().await.unwrap();
    assert!(page.contains("<html"));
    let body_length = page.len();
    let cached = app
        .http
        .get(app.url("/"))
        .header("If-None-Match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    // A problem quotes what it was sent only so far: not a 60000-character path.
    let long = app
        .http
        .get(app.url(&format!("/{}", "a".repeat(60_000))))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(long, 404, "a long unknown path").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.chars().count() < 600, "{} characters", detail.len());
    assert!(detail.ends_with("(cut at 500 characters)"), "{detail}");
    // Another method on an asset: 405, saying which it takes.
    for method in [Method::POST, Method::OPTIONS, Method::DELETE] {
        let refused = app
            .http
            .request(method.clone(), app.url("/app.js"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.headers()["allow"], "GET,HEAD", "{method}");
        assert_problem(refused, 405, "another method on an asset").await;
    }
    // HEAD: the headers of the GET, its length included, and no body.
    let head = app.http.head(app.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], body_length.to_string());
    assert!(head.bytes().await.unwrap().is_empty());
    app.stop().await;
}
