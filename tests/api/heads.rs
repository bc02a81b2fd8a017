//! Requests judged on the wire: a first head hyper would refuse with a bare status,
//! however it arrives, and a body declared or sent over the limit. Raw sockets, since
//! an HTTP client would not send these.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

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
    // Each as a connection's first request, whose head the server reads itself, and as
    // a later one on a keep-alive connection, which hyper reads and answers bare (its
    // answer is written as a problem on its way out).
    const FIRST: &[u8] = b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\n";
    let later: Vec<_> = cases
        .iter()
        .map(|(what, request, status)| {
            let what = format!("{what}, after a request on the connection");
            (what, [FIRST, request].concat(), *status)
        })
        .collect();
    let cases = cases
        .into_iter()
        .map(|(what, request, status)| (what.to_owned(), request, status))
        .chain(later);
    for (what, request, status) in cases {
        let answer = send_raw(&app, &request).await;
        let answer = match answer.strip_prefix("HTTP/1.1 200 OK\r\n") {
            Some(rest) => {
                let (_, after) = rest.split_once("{\"status\":\"ok\"}").unwrap_or_else(|| {
                    panic!("{what}: the first request's answer whole, got {answer:?}")
                });
                after.to_owned()
            }
            None => answer,
        };
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
