//! A Rust client of a running server that closes each command's consistency window on its
//! event, never on a timer, and checks what it then reads: the kind of program that uses
//! the `eventsource-client` crate to assert event-driven reconciliation.
//!
//! ```sh
//! cargo run --release                            # the server, in another terminal
//! cargo run --example reconcile                  # exits 0 when every check held
//! cargo run --example reconcile -- --url http://127.0.0.1:3000 --tasks 5
//! ```
//!
//! It reads the snapshot (`GET /api/tasks`) and opens the event stream at its watermark,
//! so no event after the snapshot is missed. Then, for each of `--tasks` tasks in turn:
//! 1. it creates the task and waits for the event that names the create's key;
//! 2. it renames the task on the version the create settled at, and likes it three times
//!    at once (likes are deltas: they commute and never conflict), and waits for the
//!    four events by their keys, in whatever order they come;
//! 3. it sends the first like again under its own key: the server answers 202 with
//!    `Idempotent-Replayed: true`; then it marks the task done and waits for that event
//!    (a task's commands apply in acceptance order, so had the replay applied again, it
//!    would have by then);
//! 4. after every settled event it reads the task: it shows the change (read your own
//!    writes), at the event's version or a later one; at the end, the rename, done, and
//!    three likes, not four.
//!
//! A command the server fails (turn the failure knobs: the app's fault panel or
//! `PUT /api/faults`) is told, with its reason, and sent again as a new intent under a new
//! key, up to `--attempts` times; a rename refused as a conflict is sent again on the
//! version its event reports. A lost delivery is redelivered by the server, so its event
//! comes later; a client waits for it all the same. `--deadline-secs` only bounds a wait,
//! so that a server that never answers ends the program with an error, not a window
//! closed by a timer. The stream reconnects by itself with `Last-Event-ID`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use es::Client as _;
use eventsource_client as es;
use futures::stream::BoxStream;
use futures::StreamExt;
use launchdarkly_sdk_transport::HyperTransport;
use serde_json::{json, Value};
use uuid::Uuid;

/// Checks event-driven reconciliation against a running settle server.
#[derive(Parser)]
struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Tasks to create, rename and like, one after another.
    #[arg(long, default_value_t = 3)]
    tasks: usize,
    /// How many times a command the server fails is sent again as a new intent.
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    /// The longest wait for one event before giving up (a bound, not the window).
    #[arg(long, default_value_t = 60)]
    deadline_secs: u64,
}

/// The events this client reads: `projection:settled` and `command:failed`.
const EVENT_SETTLED: &str = "projection:settled";
const EVENT_FAILED: &str = "command:failed";
/// Likes sent at once on each task.
const LIKES: i64 = 3;

/// What became of one command, as its event said.
#[derive(Debug)]
enum Outcome {
    Settled { version: u64, task: Value },
    Failed { reason: String, current: Value },
}

/// One command as sent: its request and its key.
struct Command {
    method: reqwest::Method,
    path: String,
    body: Value,
    key: String,
}

impl Command {
    fn new(method: reqwest::Method, path: String, body: Value) -> Self {
        Self {
            method,
            path,
            body,
            key: Uuid::new_v4().to_string(),
        }
    }

    /// The intent of this failed command again, under a new key (the failed one keeps
    /// its answer), with the body `retry` gives for its failure; `None` from it: the
    /// failure stands.
    fn again(&self, reason: &str, current: &Value, retry: Retry) -> anyhow::Result<Self> {
        let body = retry(self, reason, current)
            .with_context(|| format!("{} {} failed: {reason}", self.method, self.path))?;
        Ok(Self::new(self.method.clone(), self.path.clone(), body))
    }
}

/// What a failed command is sent again with, from its failure's reason and the task as
/// its event reports it (`current`); `None`: not sent again.
type Retry = fn(&Command, &str, &Value) -> Option<Value>;

/// The command as it was: an injected failure or a dead letter says nothing against it.
fn as_it_was(command: &Command, _reason: &str, _current: &Value) -> Option<Value> {
    Some(command.body.clone())
}

/// A create as it was, unless refused as a conflict: then its id exists.
fn create_unless_exists(command: &Command, reason: &str, _current: &Value) -> Option<Value> {
    (reason != "conflict").then(|| command.body.clone())
}

/// A rename refused as a conflict on the version its event reports; otherwise as it
/// was. Sent before the likes, a rename applies first; sent again after a failure, it
/// comes after them, and they moved the version (nobody else changes these tasks).
fn rename_on_current(command: &Command, reason: &str, current: &Value) -> Option<Value> {
    let version = if reason == "conflict" {
        current["version"].clone()
    } else {
        command.body["base_version"].clone()
    };
    Some(json!({ "title": command.body["title"], "base_version": version }))
}

/// The server's HTTP API and its event stream, with the outcomes read off it so far.
struct Client {
    base: String,
    http: reqwest::Client,
    events: BoxStream<'static, es::Result<es::SSE>>,
    /// The keys this client sent: the events it keeps (others' events pass by).
    sent: HashSet<String>,
    /// Outcomes of events of keys in `sent`, read off the stream and not taken yet.
    outcomes: HashMap<String, Outcome>,
    deadline: Duration,
}

impl Client {
    /// Reads the snapshot's watermark and opens the stream from it.
    async fn connect(base: &str, deadline: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::new();
        let snapshot: Value = http
            .get(format!("{base}/api/tasks"))
            .send()
            .await
            .context("reading the snapshot: is the server running?")?
            .error_for_status()?
            .json()
            .await?;
        let watermark = snapshot["watermark"]
            .as_u64()
            .context("the snapshot has a watermark")?;
        let transport = HyperTransport::builder()
            .disable_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build_http()
            .context("an HTTP transport")?;
        let events = es::ClientBuilder::for_url(&format!("{base}/api/events"))?
            .last_event_id(watermark.to_string())
            .reconnect(es::ReconnectOptions::reconnect(true).build())
            .build_with_transport(transport)
            .stream();
        println!(
            "{} tasks in the snapshot, stream from event {watermark}",
            snapshot["tasks"].as_array().map_or(0, Vec::len)
        );
        Ok(Self {
            base: base.to_owned(),
            http,
            events,
            sent: HashSet::new(),
            outcomes: HashMap::new(),
            deadline,
        })
    }

    /// Sends `command` and returns whether the server said it replayed a stored 202.
    async fn send(&mut self, command: &Command) -> anyhow::Result<bool> {
        self.sent.insert(command.key.clone());
        let response = self
            .http
            .request(
                command.method.clone(),
                format!("{}{}", self.base, command.path),
            )
            .header("Idempotency-Key", &command.key)
            .json(&command.body)
            .send()
            .await?;
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let answer = response.text().await?;
        ensure!(
            status == reqwest::StatusCode::ACCEPTED,
            "{} {} answered {status}: {answer}",
            command.method,
            command.path
        );
        Ok(replayed)
    }

    /// Waits for the events of `keys`, in whatever order they come.
    async fn outcomes_of(&mut self, keys: &[&str]) -> anyhow::Result<Vec<Outcome>> {
        while let Some(missing) = keys.iter().find(|key| !self.outcomes.contains_key(**key)) {
            let missing = (*missing).to_owned();
            let next = tokio::time::timeout(self.deadline, self.events.next())
                .await
                .with_context(|| format!("no event for key {missing} in {:?}", self.deadline))?;
            match next {
                Some(Ok(es::SSE::Event(event))) => self.read(&event)?,
                Some(Ok(_)) => {}
                // The client reconnects by itself, from the last id it read.
                Some(Err(err)) => println!("  stream: {err:?}, reconnecting"),
                None => bail!("the event stream ended"),
            }
        }
        Ok(keys
            .iter()
            .map(|key| self.outcomes.remove(*key).expect("waited for above"))
            .collect())
    }

    fn read(&mut self, event: &es::Event) -> anyhow::Result<()> {
        if event.event_type == "reset" {
            // The log no longer holds where this stream resumed: a client would read the
            // snapshot again. Here it means events of ours may be gone; say so and stop.
            bail!("the server reset the stream: {}", event.data);
        }
        let data: Value = serde_json::from_str(&event.data)
            .with_context(|| format!("event data is JSON: {}", event.data))?;
        let Some(key) = data["idempotency_key"]
            .as_str()
            .filter(|key| self.sent.contains(*key))
        else {
            return Ok(());
        };
        let outcome = match event.event_type.as_str() {
            EVENT_SETTLED => Outcome::Settled {
                version: data["version"]
                    .as_u64()
                    .context("a settled event's version")?,
                task: data["task"].clone(),
            },
            EVENT_FAILED => Outcome::Failed {
                reason: data["reason"].as_str().unwrap_or_default().to_owned(),
                current: data["current"].clone(),
            },
            _ => return Ok(()),
        };
        self.outcomes.insert(key.to_owned(), outcome);
        Ok(())
    }

    async fn task(&self, id: Uuid) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/api/tasks/{id}", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Reads the task after its settled event at `version`: it must be there, at that
    /// version or a later one, and at that very version exactly as the event showed it.
    async fn read_your_write(
        &self,
        id: Uuid,
        version: u64,
        shown: &Value,
    ) -> anyhow::Result<Value> {
        let read = self.task(id).await?;
        let read_version = read["version"].as_u64().unwrap_or_default();
        ensure!(
            read_version >= version,
            "read-your-writes: task {id} read at version {read_version} after its event at {version}"
        );
        ensure!(
            read_version > version || read == *shown,
            "task {id} at version {version} reads {read}, its event said {shown}"
        );
        Ok(read)
    }
}

fn settled(command: &Command, version: u64, sent: Instant) {
    let window = sent.elapsed().as_millis();
    println!(
        "  {} {} settled at version {version}, {window} ms after it was sent",
        command.method, command.path
    );
}

/// Sends `command`, and again under new keys while the server fails it (`retry`).
/// Returns the settled outcome.
async fn settle(
    client: &mut Client,
    mut command: Command,
    attempts: u32,
    retry: Retry,
) -> anyhow::Result<(u64, Value)> {
    for attempt in 1..=attempts + 1 {
        let sent = Instant::now();
        client.send(&command).await?;
        match client.outcomes_of(&[&command.key]).await?.remove(0) {
            Outcome::Settled { version, task } => {
                settled(&command, version, sent);
                return Ok((version, task));
            }
            Outcome::Failed { reason, current } => {
                println!(
                    "  {} {} failed ({reason}), attempt {attempt}",
                    command.method, command.path
                );
                command = command.again(&reason, &current, retry)?;
            }
        }
    }
    bail!(
        "{} {} failed {} times",
        command.method,
        command.path,
        attempts + 1
    )
}

/// One task's round: create, rename and three likes, a replayed like, the checks.
async fn round(client: &mut Client, index: usize, attempts: u32) -> anyhow::Result<()> {
    let id = Uuid::now_v7();
    let title = format!("reconcile {index}");
    println!("task {id}");
    let create = Command::new(
        reqwest::Method::POST,
        "/api/tasks".into(),
        json!({ "id": id, "title": title }),
    );
    let (version, task) = settle(client, create, attempts, create_unless_exists).await?;
    client.read_your_write(id, version, &task).await?;

    // The rename on the version the create settled at, and three likes at once.
    let renamed = format!("{title}, renamed");
    let rename = Command::new(
        reqwest::Method::PATCH,
        format!("/api/tasks/{id}"),
        json!({ "title": renamed, "base_version": version }),
    );
    let likes: Vec<Command> = (0..LIKES)
        .map(|_| {
            Command::new(
                reqwest::Method::POST,
                format!("/api/tasks/{id}/likes"),
                json!({ "delta": 1 }),
            )
        })
        .collect();
    let sent = Instant::now();
    client.send(&rename).await?;
    for like in &likes {
        client.send(like).await?;
    }
    let keys: Vec<&str> = std::iter::once(&rename)
        .chain(&likes)
        .map(|command| command.key.as_str())
        .collect();
    let mut outcomes = client.outcomes_of(&keys).await?.into_iter();

    match outcomes.next().expect("one outcome per key") {
        Outcome::Settled { version, task } => {
            settled(&rename, version, sent);
            client.read_your_write(id, version, &task).await?;
        }
        Outcome::Failed { reason, current } => {
            println!("  the rename failed ({reason}): sent again as a new intent");
            let again = rename.again(&reason, &current, rename_on_current)?;
            let (version, task) = settle(client, again, attempts, rename_on_current).await?;
            client.read_your_write(id, version, &task).await?;
        }
    }
    let mut liked = 0;
    for (like, outcome) in likes.iter().zip(outcomes) {
        match outcome {
            Outcome::Settled { version, task } => {
                settled(like, version, sent);
                client.read_your_write(id, version, &task).await?;
                liked += 1;
            }
            Outcome::Failed { reason, current } => {
                println!("  a like failed ({reason}): sent again as a new intent");
                let again = like.again(&reason, &current, as_it_was)?;
                let (version, task) = settle(client, again, attempts, as_it_was).await?;
                client.read_your_write(id, version, &task).await?;
                liked += 1;
            }
        }
    }

    // The first like again, under its own key: answered as before. Whether it applied
    // again shows once a later command on the task has: mark the task done and read it
    // after that event. (A like whose first send failed keeps that answer too.)
    let replayed = client.send(&likes[0]).await?;
    ensure!(
        replayed,
        "a like sent again under its key was not answered as a replay"
    );
    let done = Command::new(
        reqwest::Method::PATCH,
        format!("/api/tasks/{id}"),
        json!({ "done": true }),
    );
    let (version, task) = settle(client, done, attempts, as_it_was).await?;
    let task = client.read_your_write(id, version, &task).await?;
    ensure!(
        task["title"] == json!(renamed)
            && task["done"] == json!(true)
            && task["likes"] == json!(liked),
        "task {id} reads {task}: expected \"{renamed}\", done, {liked} likes (one like replayed)"
    );
    println!(
        "  read back: {:?}, done, {} likes; the replayed like applied nothing",
        task["title"].as_str().unwrap_or_default(),
        task["likes"]
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut client = Client::connect(&args.url, Duration::from_secs(args.deadline_secs)).await?;
    for index in 1..=args.tasks {
        round(&mut client, index, args.attempts).await?;
    }
    println!("every check held on {} tasks", args.tasks);
    Ok(())
}
