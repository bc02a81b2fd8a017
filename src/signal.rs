//! The signals that ask a process to stop: SIGINT (ctrl-c) and SIGTERM. The server
//! drains on either (`main`); the load generator stops what it started and dies by it.

/// A stop signal that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    pub name: &'static str,
    pub number: i32,
}

pub const SIGINT: Signal = Signal {
    name: "SIGINT",
    number: libc::SIGINT,
};
pub const SIGTERM: Signal = Signal {
    name: "SIGTERM",
    number: libc::SIGTERM,
};

/// Completes with the first SIGINT or SIGTERM. One that cannot be listened for is
/// logged and left out; if neither can, this never completes.
pub async fn stop_requested() -> Signal {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => SIGINT,
        () = terminate => SIGTERM,
    }
}
