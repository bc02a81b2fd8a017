//! A minimal HTTP/1.1 client: one hyper client connection per TCP socket, kept alive.
//!
//! The bench controls each socket itself (its source address, its read buffer, one
//! connection per worker) instead of going through a pooling client, so what it
//! measures is the server's work per request and not a pool's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

/// How long connecting a socket may take before the bench gives up on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one request-response may take before it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type RequestBody = Full<Bytes>;

/// One keep-alive HTTP/1.1 connection. Dropping it closes the socket.
pub struct Conn {
    sender: http1::SendRequest<RequestBody>,
    host: String,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens a keep-alive connection to `addr`.
///
/// # Errors
/// When connecting or the HTTP handshake fails, or takes too long.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    open(addr, None, None).await
}

/// Opens a connection to `addr` from `source` (so several processes can spread their
/// sockets over 127.0.0.x and not exhaust one address's ports), reading through a
/// buffer of exactly `read_buf` bytes: a fan-out worker's subscriber.
///
/// # Errors
/// When binding, connecting or the HTTP handshake fails, or takes too long.
pub async fn connect_from(
    addr: SocketAddr,
    source: IpAddr,
    read_buf: usize,
) -> anyhow::Result<Conn> {
    open(addr, Some(source), Some(read_buf)).await
}

async fn open(
    addr: SocketAddr,
    source: Option<IpAddr>,
    read_buf: Option<usize>,
) -> anyhow::Result<Conn> {
    let opening = async {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .context("creating a socket")?;
        if let Some(source) = source {
            defer_port_choice(&socket);
            socket
                .bind(SocketAddr::new(source, 0))
                .with_context(|| format!("binding the source address {source}"))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let mut builder = http1::Builder::new();
        if let Some(size) = read_buf {
            builder.read_buf_exact_size(Some(size));
        }
        let (sender, connection) = builder
            .handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        anyhow::Ok((sender, connection))
    };
    let (sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .with_context(|| format!("connecting to {addr} took over {CONNECT_TIMEOUT:?}"))??;
    // The connection task ends when the socket closes; its error is the request's.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn {
        sender,
        host: addr.to_string(),
        driver,
    })
}

/// Sets IP_BIND_ADDRESS_NO_PORT, so that binding a source address leaves the choice
/// of the port to `connect`. Without it, `bind(ip, 0)` searches for a port free for
/// every destination, which takes seconds of CPU for thousands of sockets (seen in a
/// profile of the fan-out workers); `connect` only needs the 4-tuple to be unique.
/// Best effort: without it, binding is only slower.
fn defer_port_choice(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let enable: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int, on a
    // descriptor owned by `socket` for the whole call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&enable).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        );
    }
}

impl Conn {
    /// Sends a request and returns the response with its body still streaming.
    ///
    /// # Errors
    /// When the connection is closed or the server does not answer in time.
    async fn send(&mut self, request: Request<RequestBody>) -> anyhow::Result<Response<Incoming>> {
        let exchange = async {
            self.sender.ready().await.context("connection closed")?;
            self.sender
                .send_request(request)
                .await
                .context("sending the request")
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("no response within {REQUEST_TIMEOUT:?}"))?
    }

    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host)
    }

    /// A whole exchange: status and full body.
    ///
    /// # Errors
    /// On any transport error.
    async fn exchange(
        &mut self,
        request: Request<RequestBody>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let response = self.send(request).await?;
        let status = response.status();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .context("reading the body took too long")?
            .context("reading the body")?
            .to_bytes();
        Ok((status, body))
    }

    /// Whether the connection is gone (the server closed it, as it does with one idle
    /// past its header-read timeout); a request on it would fail unsent.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// `GET /api/metrics`, as the part of it that `T` reads; `None` when the request
    /// fails or the body does not parse as `T`.
    pub async fn metrics<T: DeserializeOwned>(&mut self) -> Option<T> {
        let (_, body) = self.get("/api/metrics").await.ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// `GET path`.
    ///
    /// # Errors
    /// On any transport error.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        let request = self
            .request(Method::GET, path)
            .body(Full::new(Bytes::new()))
            .context("building a GET")?;
        self.exchange(request).await
    }

    /// `POST path` with a JSON body under an idempotency key: a settle command.
    ///
    /// # Errors
    /// On any transport error.
    pub async fn command(
        &mut self,
        path: &str,
        idempotency_key: &str,
        json: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let request = self
            .request(Method::POST, path)
            .header("idempotency-key", idempotency_key)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(json))
            .context("building a POST")?;
        self.exchange(request).await
    }

    /// Opens `GET /api/events` and returns the streaming body once the server answered
    /// 200 and sent its first frame (the `retry:` hint): from then on the subscription
    /// is live and no later event can be missed.
    ///
    /// # Errors
    /// On a transport error, a non-200 answer, or a stream that ends at once.
    pub async fn subscribe(&mut self) -> anyhow::Result<Incoming> {
        let request = self
            .request(Method::GET, "/api/events")
            .header(ACCEPT, "text/event-stream")
            .body(Full::new(Bytes::new()))
            .context("building the events request")?;
        let response = self.send(request).await?;
        if response.status() != StatusCode::OK {
            bail!("GET /api/events answered {}", response.status());
        }
        let mut body = response.into_body();
        let first = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
            .await
            .context("no first frame on the event stream")?;
        match first {
            Some(Ok(_)) => Ok(body),
            Some(Err(err)) => Err(err).context("reading the event stream"),
            None => bail!("the event stream ended at once"),
        }
    }
}
