//! antnest: a peer-to-peer compute mesh. A job is a WebAssembly component
//! with three functions (split / process / combine, see `wit/job.wit`);
//! any peer can submit one, becoming its master, and every peer pulls
//! taskunits when it has free slots.
//!
//! Crate map:
//! - [`wire`]: what peers say to each other, and the size limits.
//! - [`executor`]: the wasmtime sandbox and the compiled-module cache.
//! - [`scheduler`]: a master's book-keeping for one job (leases, re-issue).
//! - [`network`]: the libp2p swarm, behind a `Client` and one `EventLoop`.
//! - [`peer`]: a running peer: worker slots, jobs, request handling.
//! - [`journal`]: results on disk as they arrive, for `--resume`.
//! - [`http`]: the live web page, JSON status and Prometheus metrics.
//! - [`control`]: the local control socket used by `antnest submit`.
//! - [`source`]: building job components from Rust crates and Python files.
//! - [`config`]: the bootstrap config file.

mod accept;
pub mod config;
pub mod control;
pub mod executor;
pub mod http;
pub mod journal;
pub mod mapped;
pub mod network;
pub mod peer;
pub mod scheduler;
pub mod source;
pub mod wire;
