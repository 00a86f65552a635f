//! The words of antnest: what peers say to each other and what the local
//! tools say to a peer. Plain data and its encoding; no networking, no
//! sandbox, no scheduling, so every other crate can depend on it.
//!
//! - [`ids`]: a module's hash, a job's id, a peer's id.
//! - [`limits`]: per-call limits, the errors a call ends in, message sizes.
//! - [`msg`]: announcements, requests and responses between peers.
//! - [`frame`]: the one encoding (CBOR) and framing of every message.
//! - [`control`]: the control socket's messages and job reports.

pub mod control;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod msg;

pub use ids::{JobId, ModuleHash, PeerId};
pub use limits::{Limits, TaskError};
pub use msg::{Announce, ByteBuf, Request, Response, SharedBytes, TaskOutcome, TaskUnit};
