//! What a peer's worker slots know of other peers' jobs ([`Known`]): the
//! jobs announced, the modules being fetched, the remote batches in hand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use antnest_proto::{JobId, Limits, ModuleHash, Runtime};
use libp2p::PeerId;

use crate::worker::remote_batch::RemoteBatch;
use crate::worker::share::Shares;

/// A job some other peer announced.
#[derive(Clone)]
pub(crate) struct RemoteJob {
    pub(crate) master: PeerId,
    pub(crate) module: ModuleHash,
    /// The hash of the module's code, for one with job files.
    pub(crate) code: Option<ModuleHash>,
    pub(crate) limits: Limits,
    pub(crate) runtime: Runtime,
    /// Its share of the slots (see [`crate::worker::share`]).
    pub(crate) weight: u32,
    pub(crate) seen: Instant,
    /// Don't ask before this (after an error or an empty answer).
    pub(crate) retry_at: Instant,
}

/// Where getting a module stands.
#[derive(Debug, Clone)]
pub(crate) enum Getting {
    /// Being fetched from (and compiled for) that master's job, after
    /// `failures` failed tries.
    UnderWay { from: PeerId, failures: u32 },
    /// Failed `failures` times in a row: not tried again before `until`.
    Failed {
        until: Instant,
        why: String,
        failures: u32,
    },
}

/// A worker's records, shared by its slots.
#[derive(Default)]
pub(crate) struct Known {
    pub(crate) remotes: Mutex<HashMap<JobId, RemoteJob>>,
    /// Modules being fetched and compiled (by a task of their own, so that
    /// no slot waits on another module's compile), and those whose fetch or
    /// compile failed lately, with why: not tried again before then.
    pub(crate) modules: Mutex<HashMap<ModuleHash, Getting>>,
    /// Woken when a module is ready or has failed.
    pub(crate) module_done: tokio::sync::Notify,
    /// The remote batches this peer's slots are working through.
    pub(crate) batches: Mutex<Vec<Arc<RemoteBatch>>>,
    /// How the slots share their time between the jobs known.
    pub(crate) shares: Shares,
}
