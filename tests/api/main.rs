//! Integration tests: the real server on port 0, asserted from outside over HTTP and
//! SSE (with the `eventsource-client` crate), the way a Rust client would use it.

mod helpers;

mod bench;
mod commands;
mod connections;
mod events;
mod faults;
mod heads;
mod restart;
mod signals;
mod validation;
