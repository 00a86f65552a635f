//! A running peer: [`start`] brings up the network, the event handling,
//! the stream server and the worker slots; [`RunningPeer::shutdown`] stops
//! them. Every peer works (see [`crate::worker`]), and a peer a job is
//! submitted to becomes its master (see [`crate::master`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use antnest_proto::{Request, Response};
use antnest_sandbox::{LoadError, Sandbox};

use crate::config::PeerConfig;
use crate::net::{self, Event};
use crate::state::{Peer, State, stopped};

/// How long a peer shutting down waits for its tasks to end on their own.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Tune glibc's allocator for taskunits of megabytes: one arena, and
/// blocks of up to 32 MiB kept on the heap for reuse instead of being mapped
/// and unmapped each time (a fresh mapping costs a page fault per 4 KiB).
/// One arena also lets [`release_freed_memory`] give everything back when
/// the peer is idle: `malloc_trim` trims the top of the main arena only.
/// Left alone when `GLIBC_TUNABLES` is set. Call once, at start, before
/// other threads allocate.
pub fn tune_allocator() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// A started peer, with the tasks that make it up.
pub struct RunningPeer {
    pub peer: Peer,
    pub listen_addrs: Vec<libp2p::Multiaddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RunningPeer {
    /// Stop every task of the peer and wait for them: slots finish the
    /// batch in hand and hand in its results; what is not done after
    /// [`SHUTDOWN_GRACE`] is stopped.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.peer.state.work.notify_waiters();
        let drain = async {
            while let Some(res) = self.tasks.join_next().await {
                if let Err(e) = res {
                    warn!("peer task ended badly: {e}");
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!("peer tasks still busy {SHUTDOWN_GRACE:?} after shutdown began: stopped");
            self.tasks.shutdown().await;
        }
    }
}

/// Start a peer: network, event handling and worker slots.
pub async fn start(config: PeerConfig) -> Result<RunningPeer, PeerError> {
    let env = Sandbox::new(config.cache_dir.clone())?;
    env.set_max_memory(config.max_memory);
    env.set_cache_max(config.cache_max);
    if let Some(compiler) = &config.compiler {
        env.compile_in_child(compiler.clone());
    }
    let expected_listeners = net::listen_addrs(
        &config.net.listen,
        config.net.quic && config.net.psk.is_none(),
    )
    .len();
    let (client, events, mut event_loop) = net::new(config.net.clone())?;
    let incoming = client.accept_streams()?;
    event_loop
        .wait_listening(expected_listeners, Duration::from_secs(5))
        .await;
    let listen_addrs = event_loop.listen_addrs().to_vec();
    let local = net::id(&client.local_peer_id());
    let state = Arc::new(State {
        env,
        client,
        config,
        local,
        work: Notify::new(),
        tasks_done: std::sync::atomic::AtomicU64::new(0),
        module_reads: tokio::sync::Semaphore::new(2),
        unleased: std::sync::atomic::AtomicU64::new(0),
        served: Default::default(),
        module_failures: std::sync::atomic::AtomicU64::new(0),
        master: Default::default(),
        worker: Default::default(),
    });
    let peer = Peer { state };
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(event_loop.run(stopped(stop_rx.clone())));
    tasks.spawn(peer.clone().handle_events(events, stop_rx.clone()));
    tasks.spawn(peer.clone().serve_streams(incoming, stop_rx.clone()));
    for slot in 0..peer.state.config.slots.max(1) {
        tasks.spawn(peer.clone().work_loop(slot, stop_rx.clone()));
    }
    Ok(RunningPeer {
        peer,
        listen_addrs,
        stop,
        tasks,
    })
}

impl Peer {
    pub(crate) async fn handle_events(
        self,
        mut events: mpsc::Receiver<Event>,
        stop: watch::Receiver<bool>,
    ) {
        let stop = stopped(stop);
        tokio::pin!(stop);
        loop {
            let event = tokio::select! {
                biased;
                _ = &mut stop => return,
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
            };
            match event {
                Event::InboundRequest {
                    peer,
                    request:
                        request @ (Request::FetchModule { hash } | Request::FetchJobFiles { hash }),
                    channel,
                } => {
                    let files_only = matches!(request, Request::FetchJobFiles { .. });
                    // The web view shows it as getting the module until it
                    // takes taskunits.
                    self.fetching(net::id(&peer), hash);
                    // Reading a module from disk (a Python job's is 36 MB)
                    // is off this loop, and two at a time.
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _permit = this.state.module_reads.acquire().await;
                        let read = this.clone();
                        let response = tokio::task::spawn_blocking(move || {
                            if files_only {
                                read.job_files_response(hash)
                            } else {
                                read.module_response(hash)
                            }
                        })
                        .await
                        .unwrap_or_else(|e| {
                            Response::Refused(format!("reading module {hash}: {e}"))
                        });
                        if let Response::Module(b) | Response::JobFiles(b) = &response {
                            this.state.served[usize::from(files_only)]
                                .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        this.state.client.respond(channel, response).await;
                    });
                }
                Event::InboundRequest {
                    peer,
                    request,
                    channel,
                } => {
                    let response = self.answer(peer, request);
                    self.state.client.respond(channel, response).await;
                }
                Event::Announced { from, announce } => {
                    self.learn_job(from, announce);
                }
                Event::PeerGone(peer) => {
                    let who = net::id(&peer);
                    for (id, job) in self.state.master.jobs.lock().unwrap().iter() {
                        let n = job.book.lock().unwrap().release_worker(who);
                        if n > 0 {
                            info!(job = %id, %peer, reissued = n, "peer left; its taskunits are re-issued");
                        }
                    }
                    self.state
                        .worker
                        .remotes
                        .lock()
                        .unwrap()
                        .retain(|_, j| j.master != peer);
                    self.state.work.notify_waiters();
                }
            }
        }
    }
}
