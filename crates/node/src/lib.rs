//! An antnest peer. Every peer is both a worker (its slots pull taskunits
//! and run them in the sandbox) and, for the jobs submitted to it, a
//! master (it splits, hands out, collects and combines).
//!
//! - [`peer`]: [`start`] a peer and [`RunningPeer::shutdown`] it; the
//!   dispatch of network events.
//! - [`config`]: how a peer runs ([`PeerConfig`]).
//! - `state` (private): what the parts of a peer share, behind [`Peer`].
//! - [`net`]: everything libp2p: one `EventLoop` owns the swarm, a
//!   `Client` talks to it; the request-response codec; the accept loop.
//! - [`master`]: a job being mastered: its start and report (`submit`),
//!   serving pulls, results and long polls, the split feeding the book.
//!   The rules of what to hand out live in the `antnest-sched` crate.
//! - [`worker`]: the slot loop, pulls from masters, remote batches a
//!   master may take back from, the slot's thread. Taskunits run in the
//!   `antnest-sandbox` crate.
//! - [`local`]: the control socket (`antnest submit`) and the web view.

pub mod config;
pub mod local;
pub mod master;
pub mod net;
pub mod peer;
mod state;
pub mod worker;

pub use config::{PeerConfig, default_cache_dir};
pub use master::SubmitError;
pub use peer::{PeerError, RunningPeer, start, tune_allocator};
pub use state::Peer;
