//! The test harness: a real server on port 0 with its own temp data dir, an HTTP
//! client, and SSE subscriptions through the `eventsource-client` crate.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use es::Client as _;
use eventsource_client as es;
use futures::stream::BoxStream;
use futures::StreamExt;
use launchdarkly_sdk_transport::HyperTransport;
use serde_json::{json, Value};
use settle::config::Config;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The real `settle` binary on port 0, with its own data directory; killed when
/// dropped, so a failed assertion leaves no server behind.
pub struct BinaryServer {
    pub child: Child,
    pub base: String,
}

/// What becomes of the binary's logs once it has logged its address.
pub enum Logs {
    /// stdout read to its end (the child never blocks on a full pipe), stderr inherited.
    Drained,
    /// Both pipes' readers gone: every later log line fails to be written.
    Closed,
}

impl BinaryServer {
    /// Starts the binary with `RUST_LOG=settle=<log_level>` and waits for the
    /// `listening on http://ADDR` line.
    pub fn start(data_dir: &Path, delay_ms: u64, log_level: &str, logs: Logs) -> Self {
        Self::start_with(
            Command::new(env!("CARGO_BIN_EXE_settle")),
            data_dir,
            delay_ms,
            log_level,
            logs,
        )
    }

    /// [`BinaryServer::start`], with at most `files` open files (soft and hard limit,
    /// so the server cannot raise it), through `bash`'s `ulimit`.
    pub fn start_with_file_limit(data_dir: &Path, files: u64, logs: Logs) -> Self {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(format!(
                "ulimit -Sn {files} && ulimit -Hn {files} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_settle"));
        Self::start_with(command, data_dir, 100, "info", logs)
    }

    fn start_with(
        mut command: Command,
        data_dir: &Path,
        delay_ms: u64,
        log_level: &str,
        logs: Logs,
    ) -> Self {
        // The server's own settings come from the arguments alone.
        for name in Config::env_names() {
            command.env_remove(name);
        }
        let mut child = command
            .args(["--addr", "127.0.0.1:0", "--delay-ms", &delay_ms.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", format!("settle={log_level}"))
            .stdout(Stdio::piped())
            .stderr(match logs {
                Logs::Drained => Stdio::inherit(),
                Logs::Closed => Stdio::piped(),
            })
            .spawn()
            .expect("the settle binary starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("the server logs its address before anything else ends")
                .expect("readable stdout");
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.trim().to_owned();
            }
        };
        match logs {
            Logs::Drained => {
                std::thread::spawn(move || for _ in lines {});
            }
            Logs::Closed => {
                drop(lines);
                drop(child.stderr.take());
            }
        }
        Self { child, base }
    }

    /// POSTs a command under `key` and returns its 202 body; panics on any other status.
    pub async fn accepted(
        &self,
        http: &reqwest::Client,
        path: &str,
        key: &str,
        body: Value,
    ) -> Value {
        let response = http
            .post(format!("{}{path}", self.base))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 202, "a valid command is accepted");
        response.json().await.expect("a 202 body")
    }

    /// GETs `path` and returns its JSON body.
    pub async fn get_json(&self, http: &reqwest::Client, path: &str) -> Value {
        http.get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON body")
    }

    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL delivered");
        self.child.wait().expect("the child is reaped");
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Longest a test waits for any one event: generous, since tests assert order and
/// counts, never exact timings.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _data_dir: TempDir,
}

/// A server with the defaults (700 ms delay, no faults).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A server with a tweaked config; the data dir and port are the harness's.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("a temp dir");
    let mut config = Config::for_tests(data_dir.path());
    config.seed = Some(7);
    tweak(&mut config);
    start(config, data_dir).await
}

async fn start(config: Config, data_dir: TempDir) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("bound address");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(settle::serve(listener, config.clone(), shutdown.clone()));
    TestApp {
        base: format!("http://{addr}"),
        http: http_client(),
        config,
        shutdown,
        server: Some(server),
        _data_dir: data_dir,
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server gracefully and starts it again on the same data dir.
    pub async fn restart(self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        self.restart_after(Duration::ZERO, tweak).await
    }

    /// [`TestApp::restart`], with the server down for `pause` in between.
    pub async fn restart_after(
        mut self,
        pause: Duration,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        self.shutdown_and_wait().await;
        tokio::time::sleep(pause).await;
        let mut config = self.config.clone();
        tweak(&mut config);
        let data_dir = tempfile::tempdir().expect("a temp dir");
        let data_dir = std::mem::replace(&mut self._data_dir, data_dir);
        start(config, data_dir).await
    }

    /// Stops the server gracefully and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown_and_wait().await;
    }

    async fn shutdown_and_wait(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("graceful shutdown finishes although streams are open")
                .expect("server task")
                .expect("server ends cleanly");
        }
    }

    pub async fn create_task(&self, key: &str, body: Value) -> reqwest::Response {
        self.command(reqwest::Method::POST, "/api/tasks", key, body)
            .await
    }

    pub async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Value,
    ) -> reqwest::Response {
        self.http
            .request(method, self.url(path))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// Sends a command and returns its 202 body; panics on any other status.
    pub async fn accepted(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Value,
    ) -> Accepted {
        let response = self.command(method, path, key, body).await;
        assert_eq!(response.status(), 202, "a valid command is accepted");
        response.json().await.expect("a 202 body")
    }

    pub async fn create(&self, title: &str) -> Accepted {
        let key = Uuid::new_v4().to_string();
        self.accepted(
            reqwest::Method::POST,
            "/api/tasks",
            &key,
            json!({ "title": title }),
        )
        .await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Creates `count` tasks whose notes are as long as notes may be (10000 two-byte
    /// characters: about 20 KiB an event), and waits for their events.
    pub async fn create_settled_with_longest_notes(&self, count: usize) {
        let mut events = self.events(None).await;
        let notes = "ñ".repeat(settle::model::NOTES_MAX_CHARS);
        for n in 0..count {
            self.accepted(
                reqwest::Method::POST,
                "/api/tasks",
                &format!("long-notes-{n}"),
                json!({ "title": "long notes", "notes": notes }),
            )
            .await;
        }
        events.take(count).await;
    }

    /// Waits (up to 2 s) until `/api/metrics` counts `count` subscribers.
    pub async fn until_subscribers(&self, count: u64) {
        let mut subscribers = None;
        for _ in 0..100 {
            let (_, metrics) = self.get_json("/api/metrics").await;
            subscribers = metrics["subscribers"].as_u64();
            if subscribers == Some(count) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{count} subscribers counted within 2 s, got {subscribers:?}");
    }

    pub async fn put_faults(&self, faults: Value) -> Value {
        let response = self
            .http
            .put(self.url("/api/faults"))
            .json(&faults)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 200, "valid fault settings are taken");
        response.json().await.expect("the new settings")
    }

    /// Opens `/api/events`, resuming after `last_event_id` when given.
    pub async fn events(&self, last_event_id: Option<u64>) -> Events {
        Events::open(&self.url("/api/events"), last_event_id).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Not stopped (a test that failed or returned early): the server's threads go on
        // writing its store for a while, so its data dir must outlive them. Deleted
        // under them, sled can fail to write a large page to its `blobs/` and leave its
        // log waiting for that write for ever; its drop then holds sled's process-wide
        // lock, and every other test's server in this process hangs behind it. The
        // directory is left in the system's temp dir, named in the message.
        if self.server.is_some() {
            self._data_dir.disable_cleanup(true);
            eprintln!(
                "a server was dropped without a stop; its data dir is kept: {}",
                self._data_dir.path().display()
            );
        }
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Accepted {
    pub command_id: Uuid,
    pub task_id: Uuid,
    pub status: String,
    pub accepted_at: String,
}

/// One SSE event as a client sees it.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: u64,
    pub name: String,
    pub data: Value,
}

impl Received {
    pub fn command_id(&self) -> Option<Uuid> {
        self.data["command_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
    }
}

/// What an event stream gave within a wait ([`Events::next_or_end`]).
#[derive(Debug)]
pub enum Next {
    Event(Received),
    /// The stream ended, or failed (the client does not reconnect).
    Ended,
    /// Nothing came, and the stream is still open.
    Quiet,
}

/// An open event stream, read with the `eventsource-client` crate.
pub struct Events {
    stream: BoxStream<'static, es::Result<es::SSE>>,
}

impl Events {
    pub async fn open(url: &str, last_event_id: Option<u64>) -> Self {
        let transport = HyperTransport::builder()
            .disable_proxy()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build_http()
            .expect("an HTTP transport");
        let mut builder = es::ClientBuilder::for_url(url)
            .expect("a valid URL")
            .reconnect(es::ReconnectOptions::reconnect(false).build());
        if let Some(id) = last_event_id {
            builder = builder.last_event_id(id.to_string());
        }
        let client = builder.build_with_transport(transport);
        let mut events = Self {
            stream: client.stream(),
        };
        // Wait for the connection, so whatever happens next is on the stream.
        tokio::time::timeout(EVENT_TIMEOUT, async {
            loop {
                match events.stream.next().await {
                    Some(Ok(es::SSE::Connected(_))) => break,
                    Some(Ok(_)) => {}
                    Some(Err(err)) => panic!("event stream failed to open: {err:?}"),
                    None => panic!("event stream ended before connecting"),
                }
            }
        })
        .await
        .expect("the event stream connects");
        events
    }

    /// What the stream gives within `timeout`, skipping comments: an event, its end
    /// (or an error, which ends it: it does not reconnect), or nothing.
    pub async fn next_or_end(&mut self, timeout: Duration) -> Next {
        let next = tokio::time::timeout(timeout, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(es::SSE::Event(event))) => {
                        return Next::Event(Received {
                            id: event
                                .id
                                .as_deref()
                                .and_then(|id| id.parse().ok())
                                .expect("every event has an id"),
                            data: serde_json::from_str(&event.data).unwrap_or(Value::Null),
                            name: event.event_type,
                        })
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Next::Ended,
                }
            }
        });
        next.await.unwrap_or(Next::Quiet)
    }

    /// The next event, skipping comments; `None` on timeout or end of stream.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Received> {
        match self.next_or_end(timeout).await {
            Next::Event(event) => Some(event),
            Next::Ended | Next::Quiet => None,
        }
    }

    /// Asserts that nothing arrives for `wait` on a stream that stays open: a stream
    /// that ended would say nothing too, and prove nothing.
    pub async fn assert_quiet(&mut self, wait: Duration, what: &str) {
        match self.next_or_end(wait).await {
            Next::Quiet => {}
            other => panic!("{what}: expected nothing on the open stream, got {other:?}"),
        }
    }

    pub async fn next(&mut self) -> Received {
        self.next_within(EVENT_TIMEOUT)
            .await
            .expect("an event arrives in time")
    }

    /// Reads events until one is about `command_id`; returns it and those before it.
    pub async fn until_command(&mut self, command_id: Uuid) -> (Received, Vec<Received>) {
        let mut before = Vec::new();
        loop {
            let event = self.next().await;
            if event.command_id() == Some(command_id) {
                return (event, before);
            }
            before.push(event);
        }
    }

    /// Collects `count` events.
    pub async fn take(&mut self, count: usize) -> Vec<Received> {
        let mut events = Vec::with_capacity(count);
        while events.len() < count {
            events.push(self.next().await);
        }
        events
    }
}

/// Asserts that a response is an RFC 9457 problem with the given status.
pub async fn assert_problem(response: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{what}: status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        content_type, "application/problem+json",
        "{what}: content type"
    );
    let body: Value = response.json().await.expect("a JSON problem body");
    assert_eq!(body["status"], status, "{what}: status member");
    for member in ["type", "title", "detail"] {
        assert!(
            body[member].is_string(),
            "{what}: `{member}` is a string in {body}"
        );
    }
    body
}
