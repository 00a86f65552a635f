//! What every part of a running peer shares ([`State`], behind the
//! cheap [`Peer`] handle): the sandbox, the network client, the config,
//! the wake-up for idle slots, and each role's own records ([`Masters`]
//! for the jobs this peer masters, [`Known`] for what its worker slots
//! know of other peers' jobs).

use std::sync::Arc;

use antnest_proto::PeerId;
use antnest_proto::control::PeerInfo;
use antnest_sandbox::Sandbox;
use tokio::sync::{Notify, watch};

use crate::config::PeerConfig;
use crate::master::job::Masters;
use crate::net::Client;
use crate::worker::known::Known;

pub(crate) struct State {
    pub(crate) env: Sandbox,
    pub(crate) client: Client,
    pub(crate) config: PeerConfig,
    /// This peer's own id, as its book entries name its slots.
    pub(crate) local: PeerId,
    /// Woken when there may be new work.
    pub(crate) work: Notify,
    /// Taskunits run by this peer's slots (for metrics).
    pub(crate) tasks_done: std::sync::atomic::AtomicU64,
    /// Results and errors this peer's jobs dropped because the peer that
    /// handed them in had not been given those taskunits (for metrics).
    pub(crate) unleased: std::sync::atomic::AtomicU64,
    /// Modules this peer failed to fetch or compile (for metrics).
    pub(crate) module_failures: std::sync::atomic::AtomicU64,
    /// Bytes of modules (`[0]`) and of job files alone (`[1]`) this peer
    /// sent to others (for metrics).
    pub(crate) served: [std::sync::atomic::AtomicU64; 2],
    /// Modules being read from disk for other peers at once.
    pub(crate) module_reads: tokio::sync::Semaphore,
    pub(crate) master: Masters,
    pub(crate) worker: Known,
}

/// A handle on a running peer. Cheap to clone.
#[derive(Clone)]
pub struct Peer {
    pub(crate) state: Arc<State>,
}

impl Peer {
    pub fn peer_id(&self) -> PeerId {
        self.state.local
    }

    pub fn env(&self) -> &Sandbox {
        &self.state.env
    }

    pub async fn peers(&self) -> Vec<PeerInfo> {
        self.state.client.peers().await.unwrap_or_default()
    }

    /// Outcomes dropped from peers not given those taskunits, for metrics.
    pub fn unleased(&self) -> u64 {
        self.state
            .unleased
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of whole modules and of job files alone sent to other peers,
    /// for metrics.
    pub fn served(&self) -> [u64; 2] {
        let [m, f] = &self.state.served;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        [load(m), load(f)]
    }

    /// Modules this peer failed to fetch or compile, for metrics.
    pub fn module_failures(&self) -> u64 {
        self.state
            .module_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Taskunits this peer's slots have completed, for metrics.
    pub fn tasks_done(&self) -> u64 {
        self.state
            .tasks_done
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl State {
    /// A callback for blocking code that wakes idle worker slots.
    pub(crate) fn work_waker(self: &Arc<Self>) -> impl Fn() + Send + Sync + 'static {
        let weak = Arc::downgrade(self);
        move || {
            if let Some(s) = weak.upgrade() {
                s.work.notify_waiters();
            }
        }
    }
}

/// Resolves once `rx` says the peer is stopping.
pub(crate) async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
