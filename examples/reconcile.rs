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
use settle::api::TaskList;
use settle::model::{
    FailedEvent, FailureReason, SettledEvent, Task, EVENT_FAILED, EVENT_RESET, EVENT_SETTLED,
};
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

/// Likes sent at once on each task.
const LIKES: i64 = 3;

/// What became of one command, as its event said (the server's own event types: the
/// JSON contract, so an event of another shape stops the program).
#[derive(Debug)]
enum Outcome {
    Settled(SettledEvent),
    Failed(FailedEvent),
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
    fn again(&self, failed: &FailedEvent, retry: Retry) -> anyhow::Result<Self> {
        let body = retry(self, failed)
            .with_context(|| format!("{} {} failed: {}", self.method, self.path, failed.message))?;
        Ok(Self::new(self.method.clone(), self.path.clone(), body))
    }
}

/// What a failed command is sent again with, from its failure event (its reason, and
/// the task as it is now); `None`: not sent again.
type Retry = fn(&Command, &FailedEvent) -> Option<Value>;

/// The command as it was: an injected failure or a dead letter says nothing against it.
fn as_it_was(command: &Command, _failed: &FailedEvent) -> Option<Value> {
    Some(command.body.clone())
}

/// A create as it was, unless refused as a conflict: then its id exists.
fn create_unless_exists(command: &Command, failed: &FailedEvent) -> Option<Value> {
    (failed.reason != FailureReason::Conflict).then(|| command.body.clone())
}

/// A rename refused as a conflict on the version its event reports; otherwise as it
/// was. Sent before the likes, a rename applies first; sent again after a failure, it
/// comes after them, and they moved the version (nobody else changes these tasks).
fn rename_on_current(command: &Command, failed: &FailedEvent) -> Option<Value> {
    let version = match (&failed.reason, &failed.current) {
        (FailureReason::Conflict, Some(current)) => json!(current.version),
        _ => command.body["base_version"].clone(),
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
        let snapshot: TaskList = http
            .get(format!("{base}/api/tasks"))
            .send()
            .await
            .context("reading the snapshot: is the server running?")?
            .error_for_status()?
            .json()
            .await?;
        let watermark = snapshot.watermark;
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
            snapshot.tasks.len()
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
        if event.event_type == EVENT_RESET {
            // The log no longer holds where this stream resumed: a client would read the
            // snapshot again. Here it means events of ours may be gone; say so and stop.
            bail!("the server reset the stream: {}", event.data);
        }
        let shape = || {
            format!(
                "{} data in the contract's shape: {}",
                event.event_type, event.data
            )
        };
        let (key, outcome) = match event.event_type.as_str() {
            EVENT_SETTLED => {
                let settled: SettledEvent =
                    serde_json::from_str(&event.data).with_context(shape)?;
                (settled.idempotency_key.clone(), Outcome::Settled(settled))
            }
            EVENT_FAILED => {
                let failed: FailedEvent = serde_json::from_str(&event.data).with_context(shape)?;
                (failed.idempotency_key.clone(), Outcome::Failed(failed))
            }
            _ => return Ok(()),
        };
        if self.sent.contains(&key) {
            self.outcomes.insert(key, outcome);
        }
        Ok(())
    }

    async fn task(&self, id: Uuid) -> anyhow::Result<Task> {
        Ok(self
            .http
            .get(format!("{}/api/tasks/{id}", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Reads the task after its settled event: it must be there, at the event's version
    /// or a later one, and at that very version exactly as the event showed it.
    async fn read_your_write(&self, settled: &SettledEvent) -> anyhow::Result<Task> {
        let (id, version) = (settled.task_id, settled.version);
        let shown = settled
            .task
            .as_ref()
            .with_context(|| format!("task {id} settled at version {version} without its row"))?;
        let read = self.task(id).await?;
        ensure!(
            read.version >= version,
            "read-your-writes: task {id} read at version {} after its event at {version}",
            read.version
        );
        ensure!(
            read.version > version || read == **shown,
            "task {id} at version {version} reads {read:?}, its event said {shown:?}"
        );
        Ok(read)
    }
}

fn report(command: &Command, settled: &SettledEvent, sent: Instant) {
    let window = sent.elapsed().as_millis();
    println!(
        "  {} {} settled at version {}, {window} ms after it was sent",
        command.method, command.path, settled.version
    );
}

/// Sends `command`, and again under new keys while the server fails it (`retry`).
/// Returns its settled event.
async fn settle(
    client: &mut Client,
    mut command: Command,
    attempts: u32,
    retry: Retry,
) -> anyhow::Result<SettledEvent> {
    for attempt in 1..=attempts + 1 {
        let sent = Instant::now();
        client.send(&command).await?;
        match client.outcomes_of(&[&command.key]).await?.remove(0) {
            Outcome::Settled(settled) => {
                report(&command, &settled, sent);
                return Ok(settled);
            }
            Outcome::Failed(failed) => {
                println!(
                    "  {} {} failed ({:?}), attempt {attempt}",
                    command.method, command.path, failed.reason
                );
                command = command.again(&failed, retry)?;
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

/// A command's outcome, read in a batch: settled, or failed and then sent again as in
/// `settle`. Its settled event, once the task has been read after it.
async fn followed_up(
    client: &mut Client,
    command: &Command,
    outcome: Outcome,
    sent: Instant,
    attempts: u32,
    retry: Retry,
) -> anyhow::Result<SettledEvent> {
    let settled = match outcome {
        Outcome::Settled(settled) => {
            report(command, &settled, sent);
            settled
        }
        Outcome::Failed(failed) => {
            println!(
                "  {} {} failed ({:?}): sent again as a new intent",
                command.method, command.path, failed.reason
            );
            settle(client, command.again(&failed, retry)?, attempts, retry).await?
        }
    };
    client.read_your_write(&settled).await?;
    Ok(settled)
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
    let created = settle(client, create, attempts, create_unless_exists).await?;
    client.read_your_write(&created).await?;

    // The rename on the version the create settled at, and three likes at once.
    let renamed = format!("{title}, renamed");
    let rename = Command::new(
        reqwest::Method::PATCH,
        format!("/api/tasks/{id}"),
        json!({ "title": renamed, "base_version": created.version }),
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
    let outcome = outcomes.next().expect("one outcome per key");
    followed_up(client, &rename, outcome, sent, attempts, rename_on_current).await?;
    for (like, outcome) in likes.iter().zip(outcomes) {
        followed_up(client, like, outcome, sent, attempts, as_it_was).await?;
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
    let marked = settle(client, done, attempts, as_it_was).await?;
    let task = client.read_your_write(&marked).await?;
    ensure!(
        task.title == renamed && task.done && task.likes == LIKES,
        "task {id} reads {task:?}: expected {renamed:?}, done, {LIKES} likes (one like replayed)"
    );
    println!(
        "  read back: {:?}, done, {} likes; the replayed like applied nothing",
        task.title, task.likes
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
