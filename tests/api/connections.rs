//! What a connection gets when the server has no more to give: an answer that says
//! so, never silence.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{http_client, BinaryServer, Logs};

/// What came back on `stream` within 5 s: up to the end of the head (the stream then
/// goes on, an event stream) or to the end of what the server sent before closing.
async fn answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&chunk[..read]),
            }
            let text = String::from_utf8_lossy(&answer);
            if text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// At the open-file limit, a new connection is taken only to be told so, with a 503
/// problem, rather than left in the queue without an answer; once connections close,
/// new ones are served again.
#[tokio::test]
async fn at_the_open_file_limit_a_new_connection_is_answered_503() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = BinaryServer::start_with_file_limit(dir.path(), 64, Logs::Drained);
    let addr = server.base.trim_start_matches("http://").to_owned();
    // More subscribers than 64 files can hold, each holding one while it stays.
    let mut streams = Vec::new();
    for _ in 0..80 {
        let mut stream = TcpStream::connect(&addr).await.expect("connected");
        stream
            .write_all(b"GET /api/events HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("sent");
        streams.push(stream);
    }
    let mut served = 0;
    let mut refused = Vec::new();
    for stream in &mut streams {
        let answer = answer(stream).await;
        if answer.starts_with("HTTP/1.1 200") {
            served += 1;
        } else {
            refused.push(answer);
        }
    }
    assert!(served >= 20, "served as many as the files allow: {served}");
    assert!(!refused.is_empty(), "80 cannot all be held in 64 files");
    for answer in &refused {
        assert!(
            answer.starts_with("HTTP/1.1 503"),
            "every other one told why: {answer:?}"
        );
        assert!(answer.contains("application/problem+json"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        assert!(answer.contains("/problems/at-capacity"), "{answer}");
    }
    drop(streams);
    let http = http_client();
    let mut health = None;
    for _ in 0..50 {
        health = http
            .get(format!("{}/api/health", server.base))
            .send()
            .await
            .ok()
            .map(|r| r.status());
        if health == Some(reqwest::StatusCode::OK) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health,
        Some(reqwest::StatusCode::OK),
        "served again once they closed"
    );
}

/// At shutdown, a response still being read may finish: a client reading a large
/// snapshot slowly gets all of it, though it takes longer than a stalled client is
/// given (5 s without a byte written).
#[tokio::test]
async fn at_shutdown_a_response_still_being_read_is_finished() {
    let app = crate::helpers::spawn_app_with(|config| config.delay_ms = 10).await;
    app.create_settled_with_longest_notes(300).await;
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    // A request before it makes this a connection hyper serves.
    stream
        .write_all(b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\nGET /api/tasks HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // About 6 MB at 1 MB/s: some 6 s, past the 5 s a stalled response gets. The
    // shutdown begins once the snapshot's answer has begun: a request not yet read
    // when it begins is not served.
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut app = Some(app);
    let mut stopping = None;
    loop {
        if stopping.is_none()
            && String::from_utf8_lossy(&answer)
                .matches("HTTP/1.1 200")
                .count()
                == 2
        {
            stopping = app.take().map(|app| tokio::spawn(app.stop()));
        }
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(read)) => answer.extend_from_slice(&chunk[..read]),
            Ok(Err(err)) => panic!("the connection failed after {} bytes: {err}", answer.len()),
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    stopping
        .expect("the snapshot's answer began")
        .await
        .expect("stopped");
    let text = String::from_utf8_lossy(&answer);
    let second = text.rfind("HTTP/1.1 200").expect("the snapshot's answer");
    let (head, body) = text[second..].split_once("\r\n\r\n").expect("a head");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a length")
        .parse()
        .unwrap();
    assert!(length > 5_000_000, "a large snapshot: {length} bytes");
    assert_eq!(body.len(), length, "the whole snapshot");
}
