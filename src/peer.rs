//! A running peer: the network, the wasm environment, the worker slots and
//! the jobs this peer is master of.
//!
//! Every peer works: each of its `slots` is a loop that asks for a batch of
//! taskunits (from its own jobs first, then from jobs other peers announced),
//! runs the batch on the slot's own thread with a reused instance, and returns
//! the results. A peer that submits a job becomes its master: it splits,
//! leases, re-issues and combines (see [`crate::scheduler`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::executor::{self, Environment, Limits, SplitInput, SplitOutcome, TaskError, TaskRunner};
use crate::journal::{Journal, JournalError};
use crate::mapped::{self, Damage};
use crate::network::{self, Client, Event, NetConfig, PeerInfo};
use crate::scheduler::{self, JobBook, Progress, WorkerTimes};
use crate::wire::{
    Announce, ByteBuf, Frames, JobId, MAX_MODULE, MAX_TASKUNIT, ModuleHash, Request, Response,
    SharedBytes, TaskOutcome,
};

/// Hand memory freed by the allocator back to the OS (glibc keeps it).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no
    // preconditions and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

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

/// How far (in bytes of taskunits) a job's split may run ahead of its workers.
const SPLIT_AHEAD_BYTES: usize = 32 << 20;

/// Work per batch from this peer's own jobs. The slot's thread takes the
/// next batch itself, so small batches cost nothing and let the master's
/// own slots even out the end of a job.
const LOCAL_BATCH: Duration = Duration::from_millis(1);
/// How often a slot running its own peer's job wakes the job's loop, when
/// it has results to pass on (to the combine, or to a submitter that
/// streams them); the end of the job wakes it at once.
const NOTIFY_EVERY: Duration = Duration::from_millis(5);
/// How often a job's loop looks at its book unwoken: for progress reports,
/// announcements, and to nudge idle slots and waiting workers (a lease
/// expired, a straggler to back up).
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// A master passes accepted results to the job's combine once this many
/// bytes, or this many results, are waiting (and at the job's end).
const FEED_BYTES: usize = 64 << 10;
const FEED_RESULTS: usize = 1024;

/// Whether `n` results of `bytes` in all are enough to pass to a combine.
fn enough_to_feed(n: usize, bytes: usize) -> bool {
    n >= FEED_RESULTS || bytes >= FEED_BYTES
}

/// Work per batch pulled from another peer: longer, so the pull's round
/// trip is a smaller share of it.
const REMOTE_BATCH: Duration = Duration::from_millis(80);

/// How long a peer shutting down waits for its tasks to end on their own.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A remote batch's early results leave at least this long (of work)
/// before the batch's end: more if exchanges with its master take longer.
const PREFETCH_MIN: Duration = Duration::from_micros(500);

/// A worker slot idle this long drops its cached instances.
const IDLE_RELEASE: Duration = Duration::from_secs(5);
/// How long a slot with no job known anywhere sleeps between looks, unless
/// woken first (a job announced or submitted wakes it at once).
const IDLE_NO_JOBS: Duration = Duration::from_secs(5);
/// How long a master holds a worker's `Wait` before it answers `NoWork`
/// (and the worker asks again).
const WAIT_MAX: Duration = Duration::from_secs(5);

/// A task stream, read through a buffer: a slot waiting on it, or a master
/// holding a `Wait` on it, can look for the next bytes without taking them
/// (`fill_buf` is cancel-safe where a half-read message would be lost).
type TaskStream = futures::io::BufReader<libp2p::Stream>;

/// How a peer runs.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub net: NetConfig,
    /// Taskunits this peer runs at once (default: one per core).
    pub slots: usize,
    /// The most any job may use per taskunit on this peer.
    pub limits: Limits,
    /// Where modules and compiled artifacts are kept; `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// How long a worker holds leased taskunits before they are re-issued.
    pub lease: Duration,
    /// How often a master re-announces a job that still has work.
    pub announce_every: Duration,
    /// Work only on jobs whose master is one of these; `None`: any master.
    pub allowed_masters: Option<std::collections::HashSet<PeerId>>,
    /// Jobs this peer is master of at once; more submissions are refused.
    pub max_jobs: usize,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            net: NetConfig::default(),
            slots: std::thread::available_parallelism().map_or(1, |n| n.get()),
            limits: Limits::default(),
            cache_dir: default_cache_dir(),
            lease: Duration::from_secs(30),
            announce_every: Duration::from_millis(500),
            allowed_masters: None,
            max_jobs: 8,
        }
    }
}

/// `$ANTNEST_CACHE`, else `$XDG_CACHE_HOME/antnest`, else `~/.cache/antnest`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("ANTNEST_CACHE") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("antnest"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/antnest"))
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error(transparent)]
    Net(#[from] network::NetError),
    #[error(transparent)]
    Load(#[from] executor::LoadError),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    #[error("the job module is not usable: {0}")]
    InvalidModule(String),
    #[error("module is {size} bytes, more than the {max}-byte limit")]
    ModuleTooLarge { size: usize, max: usize },
    #[error("split failed: {0}")]
    Split(String),
    #[error("combine failed: {0}")]
    Combine(String),
    #[error("{failed} of {tasks} taskunits failed; first: taskunit {index}: {error}")]
    TasksFailed {
        tasks: u64,
        failed: u64,
        index: u64,
        error: TaskError,
        report: Box<JobReport>,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("the job was cancelled")]
    Cancelled,
    #[error(
        "the input file changed while the job ran (it was truncated, written or appended to); run the job again"
    )]
    InputChanged,
    #[error("--replicate {need} needs {need} peers, but this peer sees {have} (itself included)")]
    NotEnoughPeers { need: u8, have: usize },
    #[error("this peer already runs {0} jobs, its limit (--max-jobs)")]
    Busy(usize),
    #[error("this peer does not have module {0}: send its bytes")]
    ModuleNotHere(ModuleHash),
}

/// Where a job's input comes from. Re-openable, so the default split can
/// read it after the job's own split declined.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum InputSpec {
    Path(PathBuf),
    Bytes(ByteBuf),
}

impl InputSpec {
    /// The input for a split. A regular file is mapped, so the line split
    /// cuts taskunits out of the page cache without reading them into
    /// buffers first (with the [`Damage`] flag that tells whether the file
    /// changed meanwhile); anything else (a pipe, or a failed mapping) is read.
    fn open(&self) -> std::io::Result<(SplitInput, Option<Damage>)> {
        Ok(match self {
            InputSpec::Path(p) => {
                let file = std::fs::File::open(p)?;
                match mapped::map_file(&file) {
                    Some((data, damage)) => (SplitInput::Bytes { data, pos: 0 }, Some(damage)),
                    None => (
                        SplitInput::Stream(Box::new(std::io::BufReader::new(file))),
                        None,
                    ),
                }
            }
            InputSpec::Bytes(b) => (
                SplitInput::Bytes {
                    data: b.clone().into_vec().into(),
                    pos: 0,
                },
                None,
            ),
        })
    }
}

/// A job as submitted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobSpec {
    /// The module's bytes; empty when `module_hash` names a module the
    /// peer may have already (it answers [`SubmitError::ModuleNotHere`] if
    /// not, and the submitter sends the bytes).
    pub module: ByteBuf,
    #[serde(default)]
    pub module_hash: Option<ModuleHash>,
    pub input: InputSpec,
    /// Tighter limits than the peer's, if wanted.
    pub limits: Option<Limits>,
    /// Attempts per taskunit before it counts as failed.
    pub max_attempts: u32,
    /// Combine the successful results even if some taskunits failed.
    pub keep_going: bool,
    /// Continue this earlier job from its journal (same module and input).
    pub resume: Option<JobId>,
    /// Run each taskunit on this many distinct peers and compare results.
    pub replicate: u8,
    /// Send each result to the submitter as it arrives.
    pub stream: bool,
}

/// Figures about a finished job (`--stats-json`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JobStats {
    pub job_id: String,
    pub module: String,
    pub tasks: u64,
    pub failed: u64,
    pub wall_ms: u64,
    /// Taskunits completed by each peer (by peer id).
    pub per_peer: std::collections::BTreeMap<String, u64>,
    /// Components compiled by the master for this job (0 on a cache hit).
    pub compiled: u64,
    /// Results taken from the journal of an earlier run (`--resume`).
    pub resumed: u64,
    /// Taskunits whose replicas disagreed and were run again (`--replicate`).
    pub mismatches: u64,
    /// Taskunits slower workers gave back unstarted, for a faster one.
    #[serde(default)]
    pub taken_back: u64,
    /// From submission to the first taskunit result, in milliseconds.
    pub first_result_ms: Option<f64>,
    /// Whether the submitter sent the module's bytes (not when the peer
    /// had them already and the hash was enough).
    #[serde(default)]
    pub module_sent: bool,
}

/// What a finished job gives back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobReport {
    pub output: ByteBuf,
    pub stats: JobStats,
    /// Taskunits that failed every attempt (only with `keep_going`).
    pub failures: Vec<(u64, String)>,
}

/// What a submitter hears while its job runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum JobEvent {
    /// The job has an id (sent first).
    Started(JobId),
    Progress(Progress),
    /// What a taskunit wrote to stderr, wherever it ran.
    Log {
        index: u64,
        text: String,
    },
    /// One taskunit's result as it arrives (with [`JobSpec::stream`]).
    Result {
        index: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// A running job, for `antnest jobs` and the web view.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobInfo {
    pub job_id: String,
    pub module: String,
    pub progress: Progress,
    pub running_ms: u64,
    /// Results so far by worker peer id.
    pub per_peer: std::collections::BTreeMap<String, u64>,
}

/// A job this peer is master of.
struct MasterJob {
    started: Instant,
    module: ModuleHash,
    bytes: Arc<Vec<u8>>,
    limits: Limits,
    book: Mutex<JobBook>,
    /// Signalled when results arrive (holds a permit if nobody waits yet).
    progress: Notify,
    /// Set for each mapping of the input file the split made.
    input_damage: Mutex<Vec<Damage>>,
    /// The split has made a taskunit: the job may be announced. (Announced
    /// earlier, a peer's first pull found nothing yet and it backed off
    /// for 20 ms and more: W2 jobs where the remote started 27 ms late.)
    units_made: std::sync::atomic::AtomicBool,
    /// Its submitter takes each result as it comes.
    streams: bool,
}

/// A job some other peer announced.
struct RemoteJob {
    master: PeerId,
    module: ModuleHash,
    limits: Limits,
    seen: Instant,
    /// Don't ask before this (after an error or an empty answer).
    retry_at: Instant,
}

struct Shared {
    env: Environment,
    client: Client,
    config: PeerConfig,
    local: String,
    masters: Mutex<HashMap<JobId, Arc<MasterJob>>>,
    remotes: Mutex<HashMap<JobId, RemoteJob>>,
    /// Serializes module fetches, so each module is fetched once.
    fetching: tokio::sync::Mutex<()>,
    /// Woken when there may be new work.
    work: Notify,
    /// Taskunits run by this peer's slots (for metrics).
    tasks_done: std::sync::atomic::AtomicU64,
    /// What each worker's batches took per taskunit in the last job of each
    /// module this peer was master of (see [`JobBook::with_times`]).
    turnarounds: Mutex<HashMap<ModuleHash, WorkerTimes>>,
    /// The remote batches this peer's slots are working through.
    claims: Mutex<Vec<Arc<Claims>>>,
}

/// Modules whose workers' figures a master remembers.
const REMEMBERED_MODULES: usize = 64;

/// A handle on a running peer. Cheap to clone.
#[derive(Clone)]
pub struct Peer {
    shared: Arc<Shared>,
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
        self.peer.shared.work.notify_waiters();
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

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Start a peer: network, event handling and worker slots.
pub async fn start(config: PeerConfig) -> Result<RunningPeer, PeerError> {
    let env = Environment::new(config.cache_dir.clone())?;
    let expected_listeners = config.net.listen.len();
    let (client, events, mut event_loop) = network::new(config.net.clone())?;
    let incoming = client.accept_streams()?;
    event_loop
        .wait_listening(expected_listeners, Duration::from_secs(5))
        .await;
    let listen_addrs = event_loop.listen_addrs().to_vec();
    let local = client.local_peer_id().to_string();
    let shared = Arc::new(Shared {
        env,
        client,
        config,
        local,
        masters: Mutex::new(HashMap::new()),
        remotes: Mutex::new(HashMap::new()),
        fetching: tokio::sync::Mutex::new(()),
        work: Notify::new(),
        tasks_done: std::sync::atomic::AtomicU64::new(0),
        turnarounds: Mutex::new(HashMap::new()),
        claims: Mutex::new(Vec::new()),
    });
    let peer = Peer { shared };
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(event_loop.run(stopped(stop_rx.clone())));
    tasks.spawn(peer.clone().handle_events(events, stop_rx.clone()));
    tasks.spawn(peer.clone().serve_streams(incoming, stop_rx.clone()));
    for slot in 0..peer.shared.config.slots.max(1) {
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
    pub fn peer_id(&self) -> &str {
        &self.shared.local
    }

    pub fn env(&self) -> &Environment {
        &self.shared.env
    }

    pub async fn peers(&self) -> Vec<PeerInfo> {
        self.shared.client.peers().await.unwrap_or_default()
    }

    async fn handle_events(self, mut events: mpsc::Receiver<Event>, stop: watch::Receiver<bool>) {
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
                    request,
                    channel,
                } => {
                    let response = self.answer(peer, request);
                    self.shared.client.respond(channel, response).await;
                }
                Event::Announced { from, announce } => {
                    self.learn_job(from, announce);
                }
                Event::PeerGone(peer) => {
                    let who = peer.to_string();
                    for (id, job) in self.shared.masters.lock().unwrap().iter() {
                        let n = job.book.lock().unwrap().release_worker(&who);
                        if n > 0 {
                            info!(job = %id, %peer, reissued = n, "peer left; its taskunits are re-issued");
                        }
                    }
                    self.shared
                        .remotes
                        .lock()
                        .unwrap()
                        .retain(|_, j| j.master != peer);
                    self.shared.work.notify_waiters();
                }
            }
        }
    }

    /// Take note of a job announced (or assigned) by `from`; whether it is
    /// one this peer may work on.
    fn learn_job(&self, from: PeerId, a: Announce) -> bool {
        let Ok(master) = PeerId::from_bytes(&a.master) else {
            debug!(%from, "announcement with a bad master id ignored");
            return false;
        };
        if master.to_string() == self.shared.local || a.module_size as usize > MAX_MODULE {
            return false;
        }
        if let Some(allowed) = &self.shared.config.allowed_masters
            && !allowed.contains(&master)
        {
            debug!(%master, job = %a.job, "job from a master not on the allowlist ignored");
            return false;
        }
        let now = Instant::now();
        let mut remotes = self.shared.remotes.lock().unwrap();
        let job = remotes.entry(a.job).or_insert_with(|| {
            debug!(%master, job = %a.job, "job announced");
            RemoteJob {
                master,
                module: a.module,
                limits: a.limits,
                seen: now,
                retry_at: now,
            }
        });
        job.seen = now;
        drop(remotes);
        self.shared.work.notify_waiters();
        true
    }

    /// Answer the exchanges on streams other peers open to this one (a
    /// worker slot keeps one to each master it pulls from).
    async fn serve_streams(
        self,
        incoming: libp2p_stream::IncomingStreams,
        stop: watch::Receiver<bool>,
    ) {
        let incoming = tokio::sync::Mutex::new(incoming);
        let serve = move |(peer, stream)| self.clone().serve_stream(peer, stream);
        crate::accept::serve("stream", incoming, serve, stopped(stop)).await;
    }

    /// One stream: read a request, answer it, until the stream ends. A
    /// malformed or oversized message ends the stream, not the peer.
    async fn serve_stream(self, peer: PeerId, stream: libp2p::Stream) {
        let mut stream = TaskStream::new(stream);
        loop {
            let request = match Frames::read_request(&mut stream).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    debug!(%peer, "stream closed: {e}");
                    return;
                }
            };
            let response = match request {
                Request::Wait { sizes } => self.hold_wait(peer, &sizes, &mut stream).await,
                request => self.answer(peer, request),
            };
            if let Err(e) = Frames::write_response(stream.get_mut(), &response).await {
                debug!(%peer, "stream closed: {e}");
                return;
            }
        }
    }

    /// A worker's `Wait`: lease it a batch as soon as a job of this peer
    /// has taskunits for it; `NoWork` after [`WAIT_MAX`], or as soon as the
    /// worker sends anything else (its `EndWait`, then read and answered as
    /// a request of its own).
    async fn hold_wait(
        &self,
        peer: PeerId,
        sizes: &[(ModuleHash, u32)],
        stream: &mut TaskStream,
    ) -> Response {
        use futures::AsyncBufReadExt as _;
        let sizes: HashMap<ModuleHash, u32> = sizes.iter().take(64).copied().collect();
        let deadline = tokio::time::sleep(WAIT_MAX);
        tokio::pin!(deadline);
        loop {
            // Listen before looking, as a slot does.
            let notified = self.shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(assigned) = self.assign(peer, &sizes) {
                return assigned;
            }
            tokio::select! {
                biased;
                _ = stream.fill_buf() => break,
                _ = &mut deadline => break,
                _ = notified => {}
            }
        }
        Response::NoWork { finished: false }
    }

    /// A batch of the first job of this peer's that has taskunits for
    /// `peer`, as the answer to its `Wait`.
    fn assign(&self, peer: PeerId, sizes: &HashMap<ModuleHash, u32>) -> Option<Response> {
        self.master_jobs().into_iter().find_map(|(id, master)| {
            let max = sizes.get(&master.module).copied().unwrap_or(1);
            match self.lease(&master, peer, max) {
                Response::Tasks { units, lease } => Some(Response::Assigned {
                    job: self.announcement(id, &master),
                    units,
                    lease,
                }),
                _ => None,
            }
        })
    }

    /// The jobs this peer is master of, taken out of the lock.
    fn master_jobs(&self) -> Vec<(JobId, Arc<MasterJob>)> {
        let masters = self.shared.masters.lock().unwrap();
        masters.iter().map(|(id, j)| (*id, j.clone())).collect()
    }

    /// What other peers are told of this peer's job `id`.
    fn announcement(&self, id: JobId, master: &MasterJob) -> Announce {
        Announce {
            job: id,
            master: self.shared.client.local_peer_id().to_bytes(),
            module: master.module,
            module_size: master.bytes.len() as u64,
            limits: master.limits,
        }
    }

    /// Answer a request from another peer. Never blocks for long.
    fn answer(&self, peer: PeerId, request: Request) -> Response {
        match request {
            Request::Wait { .. } => Response::Refused("a wait needs a task stream".into()),
            Request::EndWait => Response::Ack,
            Request::Reclaim { job, pace } => {
                let claims: Vec<Arc<Claims>> = self
                    .shared
                    .claims
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.job == job && c.master == peer)
                    .cloned()
                    .collect();
                let units: Vec<u64> = claims.iter().flat_map(|c| c.release(pace)).collect();
                if !units.is_empty() {
                    debug!(%job, n = units.len(), "taskunits given back");
                }
                Response::Released { units }
            }
            Request::Pull { job, max } => match self.master_job(job) {
                Some(master) => self.lease(&master, peer, max),
                None => Response::NoWork { finished: true },
            },
            Request::Results {
                job,
                outcomes,
                compute,
                pull,
            } => {
                let Some(master) = self.master_job(job) else {
                    return if pull > 0 {
                        Response::NoWork { finished: true }
                    } else {
                        Response::Refused(format!("no job {job} here"))
                    };
                };
                debug!(%job, %peer, n = outcomes.len(), "results in");
                let limit = master.limits.output;
                let outcomes = outcomes
                    .into_iter()
                    .map(|mut o| {
                        if let Ok(bytes) = &o.result
                            && bytes.len() > limit
                        {
                            o.result = Err(TaskError::OutputTooLarge {
                                size: bytes.len(),
                                limit,
                            });
                        }
                        o
                    })
                    .collect();
                master
                    .book
                    .lock()
                    .unwrap()
                    .complete_computed(&peer.to_string(), outcomes, compute);
                master.progress.notify_one();
                if pull > 0 {
                    self.lease(&master, peer, pull)
                } else {
                    Response::Ack
                }
            }
            Request::FetchModule { hash } => {
                let bytes = self
                    .running_module(hash)
                    .map(|b| b.as_ref().clone())
                    .or_else(|| self.shared.env.stored_module(&hash));
                match bytes {
                    Some(b) => Response::Module(b),
                    None => Response::Refused(format!("module {hash} is not here")),
                }
            }
        }
    }

    /// The bytes of `hash`, if a job of it runs with this peer as master.
    fn running_module(&self, hash: ModuleHash) -> Option<Arc<Vec<u8>>> {
        let masters = self.shared.masters.lock().unwrap();
        let job = masters.values().find(|j| j.module == hash)?;
        Some(job.bytes.clone())
    }

    /// Lease up to `max` taskunits of `master`'s job to `peer`.
    fn lease(&self, master: &MasterJob, peer: PeerId, max: u32) -> Response {
        let mut book = master.book.lock().unwrap();
        let units = book.take(&peer.to_string(), max.min(4096) as usize, Instant::now());
        if units.is_empty() {
            Response::NoWork {
                finished: !book.has_work(),
            }
        } else {
            Response::Tasks {
                units,
                lease: self.shared.config.lease,
            }
        }
    }

    /// The jobs this peer is master of, with their progress.
    pub fn jobs(&self) -> Vec<JobInfo> {
        let masters = self.shared.masters.lock().unwrap();
        let mut jobs: Vec<JobInfo> = masters
            .iter()
            .map(|(id, j)| {
                let book = j.book.lock().unwrap();
                JobInfo {
                    job_id: id.to_string(),
                    module: j.module.to_string(),
                    progress: book.progress(),
                    running_ms: j.started.elapsed().as_millis() as u64,
                    per_peer: book.per_worker().clone(),
                }
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.running_ms));
        jobs
    }

    /// Cancel a job this peer is master of; false if there is none.
    pub fn cancel(&self, job: JobId) -> bool {
        match self.master_job(job) {
            Some(m) => {
                m.book.lock().unwrap().cancel();
                m.progress.notify_one();
                true
            }
            None => false,
        }
    }

    /// Taskunits this peer's slots have completed, for metrics.
    pub fn tasks_done(&self) -> u64 {
        self.shared
            .tasks_done
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn master_job(&self, job: JobId) -> Option<Arc<MasterJob>> {
        self.shared.masters.lock().unwrap().get(&job).cloned()
    }

    /// One worker slot: pull a batch, run it, return the results, repeat.
    ///
    /// Results for a remote master go back in the background, so the slot
    /// can pull its next batch meanwhile (one delivery in flight per slot;
    /// an undelivered result's lease expires and the master re-issues the
    /// taskunit).
    async fn work_loop(self, slot: usize, stop: watch::Receiver<bool>) {
        // Per-slot state: one runner per module (instances are reused), and
        // the measured time per taskunit of each module, to size batches (a
        // new job of a module starts from its last job's figure).
        let mut runners: HashMap<ModuleHash, TaskRunner> = HashMap::new();
        let mut per_unit: HashMap<ModuleHash, Duration> = HashMap::new();
        let mut idle = Duration::from_millis(1);
        let mut idle_since = Instant::now();
        let mut delivering: Option<tokio::task::JoinHandle<()>> = None;
        // This slot's stream to each master it pulls from, and the master
        // of the last remote batch it ran (where it waits for more).
        let mut streams: HashMap<PeerId, TaskStream> = HashMap::new();
        let mut last_master: Option<PeerId> = None;
        // A batch that came back with the results of the last one, and the
        // last one's final results, which go with the next one's.
        let mut next: Option<Batch> = None;
        let mut carry: Option<Carry> = None;
        // How long an exchange with each master took last.
        let mut exchange_time: HashMap<PeerId, Duration> = HashMap::new();
        let thread = SlotThread::spawn(slot);
        while !*stop.borrow() {
            // Listen before looking: work that turns up while `find_work`
            // runs (a job announced, taskunits split) still wakes this slot
            // instead of waiting out `idle`.
            let notified = self.shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if next.is_none()
                && let Some(c) = carry.take()
            {
                let (peer, req) = c.into_results();
                self.deliver(&mut delivering, peer, req).await;
            }
            let batch = match next.take() {
                Some(batch) => Some(batch),
                None => self.find_work(&per_unit, &mut streams).await,
            };
            let Some(batch) = batch else {
                // Known only to the master of the last remote batch, the
                // slot waits there: the master answers as soon as a job of
                // its has taskunits, with no announcement and pull between.
                // Otherwise jobs that may have work later (a master that
                // said "not yet", leases that may expire) are looked at
                // again soon; with no job at all, only a wake-up brings work.
                let waiting_at =
                    last_master.filter(|m| streams.contains_key(m) && self.waits_only_on(*m));
                if let Some(master) = waiting_at {
                    next = self
                        .wait_at(master, &per_unit, &mut streams, notified, &stop)
                        .await;
                } else {
                    let wait = if self.knows_no_jobs() {
                        IDLE_NO_JOBS
                    } else {
                        idle
                    };
                    let _ = tokio::time::timeout(wait, notified).await;
                }
                if next.is_some() {
                    continue;
                }
                idle = (idle * 2).min(Duration::from_millis(50));
                // An idle peer gives its instances' memory back.
                if idle_since.elapsed() > IDLE_RELEASE && !runners.is_empty() {
                    runners.clear();
                    per_unit.clear();
                    streams.retain(|m, _| Some(*m) == last_master);
                    release_freed_memory();
                    debug!(slot, "idle: instances dropped, freed memory released");
                }
                continue;
            };
            idle = Duration::from_millis(1);
            idle_since = Instant::now();
            let Batch {
                job,
                source,
                module,
                limits,
                units,
            } = batch;
            let runner = match runners.remove(&module) {
                Some(r) => r,
                None => {
                    let env = self.shared.env.clone();
                    let loaded =
                        tokio::task::spawn_blocking(move || env.component(&module, || None))
                            .await
                            .expect("compile task");
                    match loaded {
                        Ok(c) => TaskRunner::new(self.shared.env.clone(), c, limits),
                        Err(e) => {
                            warn!(slot, %job, "cannot load module: {e}");
                            self.shared.remotes.lock().unwrap().remove(&job);
                            continue;
                        }
                    }
                }
            };
            // A batch of the master's own job goes on from the book on the
            // slot's thread, with no trip through tokio between batches.
            let local = match &source {
                Source::Local(master) => Some((master.clone(), stop.clone())),
                Source::Remote(_) => None,
            };
            let remote = match &source {
                Source::Remote(peer) => Some(*peer),
                Source::Local(_) => None,
            };
            // A remote batch's taskunits are handed out one by one to the
            // slot, so that the master may take back those not started.
            let claims = remote.map(|peer| {
                let claims = Arc::new(Claims::new(job, peer, &units));
                self.shared.claims.lock().unwrap().push(claims.clone());
                claims
            });
            // A remote batch hands in its results early, before its last
            // taskunits (about one exchange's time of work), asking for the
            // next batch: the round trip runs while the slot computes.
            let (early_tx, early_rx) = oneshot::channel::<(Vec<TaskOutcome>, Duration)>();
            let early_at = remote.map_or(usize::MAX, |peer| {
                let ahead = exchange_time
                    .get(&peer)
                    .map_or(PREFETCH_MIN, |t| (*t * 3 / 2).max(PREFETCH_MIN));
                let last = per_unit
                    .get(&module)
                    .map_or(1, |u| (ahead.as_nanos() / u.as_nanos().max(1)) as usize + 1);
                // Not before half the batch is done: its results would
                // wait for the next batch's.
                units.len().saturating_sub(last).max(units.len() / 2)
            });
            let shared = self.shared.clone();
            let claimed = claims.clone();
            let run = thread.run(move || {
                let mut runner = runner;
                let mut units = units;
                if let Some(claims) = claimed {
                    let started = Instant::now();
                    let first = run_claimed(&mut runner, &units, &claims, early_at);
                    let mut n = first.len() as u32;
                    let handed_in = if early_at < units.len() {
                        let _ = early_tx.send((first, started.elapsed()));
                        let rest_started = Instant::now();
                        let rest = run_claimed(&mut runner, &units, &claims, usize::MAX);
                        n += rest.len() as u32;
                        (rest, rest_started.elapsed())
                    } else {
                        (first, started.elapsed())
                    };
                    let total = started.elapsed();
                    batch_ran(&shared, slot, job, n, total);
                    // None run (all given back): no time per taskunit.
                    let unit_time = total.checked_div(n).unwrap_or_default();
                    return (runner, Some(handed_in), unit_time);
                }
                // A batch of this peer's own job (the only other kind).
                let (master, stop) = local.expect("a batch without claims is local");
                let mut notify_at = Instant::now();
                loop {
                    let started = Instant::now();
                    let n = units.len() as u32;
                    let outcomes = run_batch(&mut runner, units);
                    let total = started.elapsed();
                    let unit_time = total / n.max(1);
                    batch_ran(&shared, slot, job, n, total);
                    let now = Instant::now();
                    let stopped = *stop.borrow();
                    let feed;
                    (units, feed) = {
                        let mut book = master.book.lock().unwrap();
                        book.complete(&shared.local, outcomes);
                        let (n, bytes) = book.accepted_waiting();
                        let feed = master.streams || enough_to_feed(n, bytes);
                        let units = if stopped {
                            Vec::new()
                        } else {
                            book.take_local(&shared.local, units_for(unit_time, LOCAL_BATCH), now)
                        };
                        (units, feed)
                    };
                    // The job's loop looks every [`LOOK_EVERY`] anyway: wake it
                    // when nothing is left to take (a finished job
                    // included), and now and then when it has results to
                    // pass on (to the combine, or to a submitter that
                    // streams them); not for each taskunit, as each
                    // wake-up takes a core from a slot for a moment. Only
                    // with the book unlocked, or the loop wakes to wait
                    // for it.
                    if units.is_empty() {
                        master.progress.notify_one();
                        return (runner, None, unit_time);
                    }
                    if feed && now >= notify_at {
                        master.progress.notify_one();
                        notify_at = now + NOTIFY_EVERY;
                    }
                }
            });
            let prefetch = async {
                let peer = remote?;
                let (mut outcomes, mut compute) = early_rx.await.ok()?;
                if let Some(c) = carry.take_if(|c| c.job == job && c.peer == peer) {
                    outcomes.extend(c.outcomes);
                    compute += c.compute;
                }
                let (req, pull) = self.results_with_pull(&per_unit, job, module, outcomes, compute);
                let asked = Instant::now();
                let batch = if pull > 0 {
                    self.request_batch(job, peer, module, limits, req, &mut streams)
                        .await
                } else {
                    if let Err(e) = self.exchange(&mut streams, peer, req).await {
                        debug!(%job, "results not delivered: {e}");
                    }
                    None
                };
                exchange_time.insert(peer, asked.elapsed());
                batch
            };
            let (done, prefetched) = tokio::join!(run, prefetch);
            if let Some(claims) = &claims {
                self.shared
                    .claims
                    .lock()
                    .unwrap()
                    .retain(|c| !Arc::ptr_eq(c, claims));
            }
            let (runner, handed_in, unit_time) = done.expect("task batch");
            if !unit_time.is_zero() {
                per_unit.insert(module, unit_time);
            }
            if runners.len() >= 4 {
                runners.clear();
            }
            runners.insert(module, runner);
            // Results of a remote job's batch go back to its master.
            let (Some(peer), Some((outcomes, compute))) = (remote, handed_in) else {
                continue;
            };
            last_master = Some(peer);
            if let Some(batch) = prefetched {
                // The last results go with the next batch's.
                carry = Some(Carry {
                    job,
                    peer,
                    outcomes,
                    compute,
                });
                next = Some(batch);
                continue;
            }
            // Ask for the next batch of the job with these results.
            let (req, pull) = self.results_with_pull(&per_unit, job, module, outcomes, compute);
            if pull > 0 {
                next = self
                    .request_batch(job, peer, module, limits, req, &mut streams)
                    .await;
                continue;
            }
            self.deliver(&mut delivering, peer, req).await;
        }
        // Stopping: results held for the next batch go now.
        if let Some(c) = carry.take() {
            let (peer, req) = c.into_results();
            self.deliver(&mut delivering, peer, req).await;
        }
        if let Some(last) = delivering {
            let _ = last.await;
        }
    }

    /// This peer's slot has run out of `job`'s taskunits while other
    /// workers may hold some: ask each (once per batch) to give back those
    /// it has not started and would end later than this slot would.
    fn reclaim(&self, job: JobId, master: &Arc<MasterJob>) {
        let (workers, pace) = {
            let mut book = master.book.lock().unwrap();
            (
                book.to_reclaim(&self.shared.local),
                book.pace(&self.shared.local),
            )
        };
        // Untimed, this slot cannot say when it would end them.
        let Some(pace) = pace else {
            return;
        };
        for worker in workers {
            let Ok(peer) = worker.parse::<PeerId>() else {
                continue;
            };
            let client = self.shared.client.clone();
            let shared = self.shared.clone();
            let master = master.clone();
            tokio::spawn(async move {
                match client.request(peer, Request::Reclaim { job, pace }).await {
                    Ok(Response::Released { units }) if !units.is_empty() => {
                        let n = master.book.lock().unwrap().give_back(&worker, &units);
                        debug!(%job, %peer, n, "taskunits taken back");
                        shared.work.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(e) => debug!(%job, %peer, "reclaim failed: {e}"),
                }
            });
        }
    }

    /// Send results with no pull, by request-response from a task of their
    /// own (after the previous such send), so the slot goes on at once.
    async fn deliver(
        &self,
        delivering: &mut Option<tokio::task::JoinHandle<()>>,
        peer: PeerId,
        req: Request,
    ) {
        if let Some(previous) = delivering.take() {
            let _ = previous.await;
        }
        let client = self.shared.client.clone();
        *delivering = Some(tokio::spawn(async move {
            if let Err(e) = client.request(peer, req).await {
                // The leases will expire and the master re-issues them.
                debug!("results not delivered: {e}");
            }
        }));
    }

    /// Results of a remote job of `module`, asking for the next batch: none
    /// while this peer's own jobs have work (they come first), else about
    /// [`REMOTE_BATCH`] of work. With the number asked for.
    fn results_with_pull(
        &self,
        per_unit: &HashMap<ModuleHash, Duration>,
        job: JobId,
        module: ModuleHash,
        outcomes: Vec<TaskOutcome>,
        compute: Duration,
    ) -> (Request, u32) {
        let pull = if self.local_work_waiting() {
            0
        } else {
            Self::batch_size(per_unit, module, REMOTE_BATCH) as u32
        };
        let req = Request::Results {
            job,
            outcomes,
            compute,
            pull,
        };
        (req, pull)
    }

    /// How many taskunits to ask for: about `target` of work, 1..=4096.
    fn batch_size(
        per_unit: &HashMap<ModuleHash, Duration>,
        module: ModuleHash,
        target: Duration,
    ) -> usize {
        per_unit.get(&module).map_or(1, |d| units_for(*d, target))
    }

    async fn find_work(
        &self,
        per_unit: &HashMap<ModuleHash, Duration>,
        streams: &mut HashMap<PeerId, TaskStream>,
    ) -> Option<Batch> {
        for (job, master) in self.master_jobs() {
            let max = Self::batch_size(per_unit, master.module, LOCAL_BATCH);
            let units =
                master
                    .book
                    .lock()
                    .unwrap()
                    .take_local(&self.shared.local, max, Instant::now());
            if !units.is_empty() {
                return Some(Batch {
                    job,
                    module: master.module,
                    limits: master.limits,
                    source: Source::Local(master),
                    units,
                });
            }
            // Nothing here for this slot: ask slower workers for what they
            // have not started (the book holds back backups until asked).
            self.reclaim(job, &master);
        }
        let now = Instant::now();
        let candidates: Vec<(JobId, PeerId, ModuleHash, Limits)> = {
            let mut remotes = self.shared.remotes.lock().unwrap();
            // Forget jobs not announced for a while.
            remotes.retain(|_, j| now.duration_since(j.seen) < Duration::from_secs(10));
            remotes
                .iter()
                .filter(|(_, j)| j.retry_at <= now)
                .map(|(id, j)| (*id, j.master, j.module, j.limits))
                .collect()
        };
        for (job, master, module, limits) in candidates {
            let limits = limits.min(self.shared.config.limits);
            if !self.module_ready(job, master, module).await {
                continue;
            }
            let max = Self::batch_size(per_unit, module, REMOTE_BATCH) as u32;
            let pull = Request::Pull { job, max };
            if let Some(batch) = self
                .request_batch(job, master, module, limits, pull, streams)
                .await
            {
                return Some(batch);
            }
        }
        None
    }

    /// Whether every job this peer knows of is `master`'s (none its own).
    fn waits_only_on(&self, master: PeerId) -> bool {
        self.shared.masters.lock().unwrap().is_empty()
            && self
                .shared
                .remotes
                .lock()
                .unwrap()
                .values()
                .all(|j| j.master == master)
    }

    /// Park a `Wait` at `master` on this slot's open stream to it, until the
    /// master assigns a batch (returned), or the wait ends without one: the
    /// master's time limit, other work turning up (`notified` with a job
    /// elsewhere; the slot then ends the wait, and takes a batch assigned
    /// meanwhile), shutdown, or a failed stream (dropped).
    async fn wait_at<'a>(
        &'a self,
        master: PeerId,
        per_unit: &HashMap<ModuleHash, Duration>,
        streams: &mut HashMap<PeerId, TaskStream>,
        mut notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'a>>,
        stop: &watch::Receiver<bool>,
    ) -> Option<Batch> {
        use futures::AsyncBufReadExt as _;
        let stream = streams.get_mut(&master)?;
        let sizes = per_unit
            .iter()
            .map(|(m, d)| (*m, units_for(*d, REMOTE_BATCH) as u32))
            .collect();
        let waited = async {
            Frames::write_request(stream.get_mut(), &Request::Wait { sizes }).await?;
            loop {
                tokio::select! {
                    biased;
                    // The answer is coming.
                    read = stream.fill_buf() => {
                        read?;
                        break;
                    }
                    _ = notified.as_mut() => {
                        if *stop.borrow() {
                            return Err(std::io::Error::other("stopping"));
                        }
                        if self.waits_only_on(master) {
                            // Nothing new but `master`'s own jobs: wait on.
                            notified.set(self.shared.work.notified());
                            notified.as_mut().enable();
                            continue;
                        }
                        Frames::write_request(stream.get_mut(), &Request::EndWait).await?;
                        let answer = Frames::read_response(stream).await?;
                        Frames::read_response(stream).await?; // the EndWait's Ack
                        return Ok(answer);
                    }
                }
            }
            Frames::read_response(stream).await
        };
        let limit = WAIT_MAX + self.shared.config.net.request_timeout;
        let (job, units) = match tokio::time::timeout(limit, waited).await {
            Ok(Ok(Response::Assigned { job, units, .. })) if !units.is_empty() => (job, units),
            Ok(Ok(_)) => return None,
            Ok(Err(e)) => {
                debug!(%master, "wait ended: {e}");
                streams.remove(&master);
                return None;
            }
            Err(_) => {
                debug!(%master, "wait timed out");
                streams.remove(&master);
                return None;
            }
        };
        debug!(job = %job.job, units = units.len(), "assigned");
        // Taskunits only from a job of the master that leased them.
        if job.master != master.to_bytes() || !self.learn_job(master, job.clone()) {
            debug!(%master, job = %job.job, "assigned taskunits refused");
            return None;
        }
        if !self.module_ready(job.job, master, job.module).await {
            return None;
        }
        Some(Batch {
            job: job.job,
            source: Source::Remote(master),
            module: job.module,
            limits: job.limits.min(self.shared.config.limits),
            units,
        })
    }

    /// This slot's stream to `master`, opened on first use.
    async fn stream_to<'s>(
        &self,
        streams: &'s mut HashMap<PeerId, TaskStream>,
        master: PeerId,
    ) -> Option<&'s mut TaskStream> {
        match streams.entry(master) {
            std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                match self.shared.client.open_stream(master).await {
                    Ok(s) => Some(e.insert(TaskStream::new(s))),
                    Err(err) => {
                        debug!(%master, "no stream: {err}");
                        None
                    }
                }
            }
        }
    }

    /// Whether this peer knows of no running job, its own or announced.
    fn knows_no_jobs(&self) -> bool {
        self.shared.masters.lock().unwrap().is_empty()
            && self.shared.remotes.lock().unwrap().is_empty()
    }

    /// Whether a job this peer is master of has taskunits to hand out.
    fn local_work_waiting(&self) -> bool {
        self.shared
            .masters
            .lock()
            .unwrap()
            .values()
            .any(|m| m.book.lock().unwrap().has_work())
    }

    /// Send `request` (a pull, or results with a pull) and take the batch
    /// that comes back, if any.
    async fn request_batch(
        &self,
        job: JobId,
        master: PeerId,
        module: ModuleHash,
        limits: Limits,
        request: Request,
        streams: &mut HashMap<PeerId, TaskStream>,
    ) -> Option<Batch> {
        let asked = Instant::now();
        let max = match &request {
            Request::Pull { max, .. } => *max,
            Request::Results { pull, .. } => *pull,
            _ => 0,
        };
        let reply = self.exchange(streams, master, request).await;
        if let Ok(Response::Tasks { units, .. }) = &reply {
            debug!(
                %job,
                max,
                units = units.len(),
                bytes = units.iter().map(|u| u.data.len()).sum::<usize>(),
                ms = asked.elapsed().as_secs_f64() * 1e3,
                "pulled"
            );
        }
        match reply {
            Ok(Response::Tasks { units, .. }) if !units.is_empty() => Some(Batch {
                job,
                module,
                limits,
                source: Source::Remote(master),
                units,
            }),
            Ok(Response::NoWork { finished: true }) => {
                self.shared.remotes.lock().unwrap().remove(&job);
                None
            }
            Ok(_) => {
                self.back_off(job, Duration::from_millis(20));
                None
            }
            Err(e) => {
                debug!(%job, "pull failed: {e}");
                self.back_off(job, Duration::from_secs(1));
                None
            }
        }
    }

    /// Send `request` to `master` on this slot's stream to it (opened on
    /// first use) and read the response. If the stream cannot be opened or
    /// fails, it is dropped and the request goes by request-response
    /// instead; results sent twice that way are ignored as duplicates.
    async fn exchange(
        &self,
        streams: &mut HashMap<PeerId, TaskStream>,
        master: PeerId,
        request: Request,
    ) -> Result<Response, network::NetError> {
        if let Some(stream) = self.stream_to(streams, master).await {
            let exchange = async {
                Frames::write_request(stream.get_mut(), &request).await?;
                Frames::read_response(stream).await
            };
            match tokio::time::timeout(self.shared.config.net.request_timeout, exchange).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) => debug!(%master, "stream failed: {e}"),
                Err(_) => debug!(%master, "stream timed out"),
            }
            streams.remove(&master);
        }
        self.shared.client.request(master, request).await
    }

    fn back_off(&self, job: JobId, wait: Duration) {
        if let Some(j) = self.shared.remotes.lock().unwrap().get_mut(&job) {
            j.retry_at = Instant::now() + wait;
        }
    }

    /// [`Self::ensure_module`] for `job`'s module; if it cannot be had, the
    /// job is set aside for 5 s.
    async fn module_ready(&self, job: JobId, master: PeerId, module: ModuleHash) -> bool {
        match self.ensure_module(master, module).await {
            Ok(()) => true,
            Err(e) => {
                warn!(%job, %master, "cannot get the job's module: {e}");
                self.back_off(job, Duration::from_secs(5));
                false
            }
        }
    }

    /// Make sure the module is compiled here, fetching it from `from` once.
    async fn ensure_module(&self, from: PeerId, hash: ModuleHash) -> Result<(), String> {
        let env = &self.shared.env;
        if env.is_compiled(&hash) {
            return Ok(());
        }
        let _guard = self.shared.fetching.lock().await;
        if env.is_compiled(&hash) {
            return Ok(());
        }
        let bytes = match env.stored_module(&hash) {
            Some(b) => b,
            None => match self
                .shared
                .client
                .request(from, Request::FetchModule { hash })
                .await
                .map_err(|e| e.to_string())?
            {
                Response::Module(b) if b.len() <= MAX_MODULE && ModuleHash::of(&b) == hash => b,
                Response::Module(_) => {
                    return Err("the master sent a module that does not match its hash".into());
                }
                other => return Err(format!("module fetch refused: {other:?}")),
            },
        };
        let env = env.clone();
        tokio::task::spawn_blocking(move || env.component(&hash, || Some(bytes)).map(drop))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Run a job with this peer as master; returns when it is combined.
    /// `events` receives the job id at once, then progress about every
    /// 100 ms (best effort) and, with `spec.stream`, every result.
    pub async fn submit(
        &self,
        spec: JobSpec,
        events: Option<mpsc::Sender<JobEvent>>,
    ) -> Result<JobReport, SubmitError> {
        let started = Instant::now();
        let module_sent = !spec.module.is_empty();
        let env = self.shared.env.clone();
        let (hash, bytes) = match spec.module_hash {
            // By hash: from a job of this module running here, or (below)
            // from the module store (written only after the bytes matched
            // the hash).
            Some(hash) if !module_sent => (hash, self.running_module(hash)),
            _ => {
                let bytes = spec.module.into_vec();
                if bytes.len() > MAX_MODULE {
                    return Err(SubmitError::ModuleTooLarge {
                        size: bytes.len(),
                        max: MAX_MODULE,
                    });
                }
                (ModuleHash::of(&bytes), Some(Arc::new(bytes)))
            }
        };
        let compiled_before = env.cache_stats().compiled;
        // Looked up only with the bytes at hand (else the blocking path
        // below looks again, and the cache would count two hits).
        let in_memory = bytes.as_ref().and_then(|_| env.loaded(&hash));
        let (bytes, component) = match (bytes, in_memory) {
            // Compiled already and the bytes at hand: no blocking thread.
            (Some(bytes), Some(component)) => (bytes, component),
            (bytes, _) => {
                let env = env.clone();
                tokio::task::spawn_blocking(move || {
                    let bytes = match bytes {
                        Some(b) => b,
                        None => Arc::new(
                            env.stored_module(&hash)
                                .ok_or(SubmitError::ModuleNotHere(hash))?,
                        ),
                    };
                    let component = env
                        .component(&hash, || Some(bytes.as_ref().clone()))
                        .map_err(|e| SubmitError::InvalidModule(e.to_string()))?;
                    Ok::<_, SubmitError>((bytes, component))
                })
                .await
                .expect("compile task")?
            }
        };
        let compiled = env.cache_stats().compiled - compiled_before;
        let limits = spec.limits.map_or(self.shared.config.limits, |l| {
            l.min(self.shared.config.limits)
        });
        {
            let running = self.shared.masters.lock().unwrap().len();
            if running >= self.shared.config.max_jobs {
                return Err(SubmitError::Busy(running));
            }
        }
        if spec.replicate > 1 {
            let have = 1 + self.peers().await.iter().filter(|p| p.connected).count();
            if have < spec.replicate as usize {
                return Err(SubmitError::NotEnoughPeers {
                    need: spec.replicate,
                    have,
                });
            }
        }
        let (tx, rx) = scheduler::split_channel(4096, SPLIT_AHEAD_BYTES);
        let known = self.shared.turnarounds.lock().unwrap().get(&hash).cloned();
        let mut book = JobBook::new(rx, self.shared.config.lease, spec.max_attempts)
            .with_replicas(spec.replicate)
            .with_times(known.unwrap_or_default());
        // Results go to the combine as they are accepted: it runs alongside
        // the job and sees the end of the feed when `feed` is dropped.
        let (feed, feed_rx) = std::sync::mpsc::channel::<Vec<(u64, Vec<u8>)>>();
        let journal_root = self
            .shared
            .config
            .cache_dir
            .as_ref()
            .map(|d| d.join("journal"));
        let id = match (spec.resume, &journal_root) {
            (Some(id), Some(root)) => {
                let (journal, done) = Journal::resume(root, id, &hash)?;
                info!(job = %id, results = done.len(), "resuming from the journal");
                let _ = feed.send(done.iter().map(|(i, r)| (*i, r.clone())).collect());
                book.set_journal(journal, done);
                id
            }
            (Some(id), None) => return Err(SubmitError::Journal(JournalError::NotFound(id))),
            (None, root) => {
                let id = JobId::random();
                if let Some(root) = root {
                    book.set_journal(Journal::create(root, id, &hash), Default::default());
                }
                id
            }
        };
        if let Some(events) = &events {
            let _ = events.send(JobEvent::Started(id)).await;
        }
        let master = Arc::new(MasterJob {
            started,
            module: hash,
            bytes,
            limits,
            book: Mutex::new(book),
            progress: Notify::new(),
            input_damage: Mutex::new(Vec::new()),
            units_made: std::sync::atomic::AtomicBool::new(false),
            streams: spec.stream && events.is_some(),
        });
        self.shared
            .masters
            .lock()
            .unwrap()
            .insert(id, master.clone());
        info!(job = %id, module = %hash, "job submitted");

        // Combine on a blocking thread while the job runs: it reads each
        // result as soon as it and all before it are in, so only the last
        // few are left to merge when the last taskunit finishes. `None`: the
        // job asked for the default combine (done below over all results).
        // Started when there are results to pass it, or nothing is left to
        // hand out (a slot of this peer is about to be free), not with the
        // split: at a job's start the cores are busy enough.
        let start_combine = |feed_rx| {
            let (env, component) = (env.clone(), component.clone());
            tokio::task::spawn_blocking(move || {
                executor::run_combine(&env, &component, limits, Box::new(InOrder::new(feed_rx)))
            })
        };
        let mut feed_rx = Some(feed_rx);
        let mut combiner = None;

        // Split on a blocking thread; `tx` blocks when 4096 taskunits wait.
        let split = {
            let (env, component, master, input) = (
                env.clone(),
                component.clone(),
                master.clone(),
                spec.input.clone(),
            );
            let work = {
                let (slots, master) = (self.shared.work_waker(), master.clone());
                // On the first taskunits (and now and then after): wake idle
                // slots, and the loop below so that it announces the job.
                move || {
                    slots();
                    master
                        .units_made
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    master.progress.notify_one();
                }
            };
            tokio::task::spawn_blocking(move || {
                let result = split_job(
                    &env,
                    &component,
                    limits,
                    &input,
                    &master.input_damage,
                    tx,
                    work,
                );
                debug!(job = %id, ms = master.started.elapsed().as_millis() as u64, ok = result.is_ok(), "split ended");
                let mut book = master.book.lock().unwrap();
                match result {
                    Ok(total) => book.split_done(total),
                    Err(e) => book.fail(e),
                }
                drop(book);
                // A job with no taskunits, or a failed split, is done.
                master.progress.notify_one();
            })
        };
        let announce = self.announcement(id, &master);
        let mut last_announce: Option<Instant> = None;
        let mut last_progress = Instant::now();
        // Results accepted and not yet passed to the combine.
        let mut unfed: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut unfed_bytes = 0;
        loop {
            let (finished, has_work, all_issued, prog, accepted, logs) = {
                let mut book = master.book.lock().unwrap();
                let accepted = book.take_accepted();
                let logs = book.take_logs();
                (
                    book.is_finished(),
                    book.has_work(),
                    book.all_issued(),
                    book.progress(),
                    accepted,
                    logs,
                )
            };
            if let Some(events) = &events {
                for (index, text) in logs {
                    let _ = events.send(JobEvent::Log { index, text }).await;
                }
            }
            if let Some(events) = events.as_ref().filter(|_| master.streams) {
                for (index, bytes) in &accepted {
                    let (index, bytes) = (*index, bytes.clone());
                    let _ = events.send(JobEvent::Result { index, bytes }).await;
                }
            }
            // In pieces of some size: each send may wake the combine's
            // thread, which takes a core from a slot. Small results wait
            // (the combine merges a few small ones at the end in no time).
            unfed_bytes += accepted.iter().map(|(_, r)| r.len()).sum::<usize>();
            unfed.extend(accepted);
            let feeding =
                !unfed.is_empty() && (finished || enough_to_feed(unfed.len(), unfed_bytes));
            if combiner.is_none() && (feeding || finished || all_issued) {
                combiner = feed_rx.take().map(start_combine);
            }
            if feeding {
                let _ = feed.send(std::mem::take(&mut unfed));
                unfed_bytes = 0;
            }
            if finished {
                break;
            }
            if has_work
                && master.units_made.load(std::sync::atomic::Ordering::Relaxed)
                && last_announce.is_none_or(|t| t.elapsed() >= self.shared.config.announce_every)
            {
                self.shared.client.announce(&announce).await;
                debug!(job = %id, "announced");
                last_announce = Some(Instant::now());
            }
            if let Some(events) = &events
                && last_progress.elapsed() >= Duration::from_millis(100)
            {
                let _ = events.try_send(JobEvent::Progress(prog));
                last_progress = Instant::now();
            }
            self.shared.work.notify_waiters();
            let _ = tokio::time::timeout(LOOK_EVERY, master.progress.notified()).await;
        }
        drop(feed);
        let _ = split.await;
        self.shared.masters.lock().unwrap().remove(&id);
        if master
            .input_damage
            .lock()
            .unwrap()
            .iter()
            .any(Damage::happened)
        {
            // Some taskunits may hold zeros or newer bytes: no result to trust.
            if let Some(journal) = master.book.lock().unwrap().finish().journal {
                journal.remove();
            }
            return Err(SubmitError::InputChanged);
        }

        let done = {
            let mut book = master.book.lock().unwrap();
            if book.is_cancelled() {
                return Err(SubmitError::Cancelled);
            }
            if let Some(e) = book.fatal() {
                return Err(SubmitError::Split(e.to_string()));
            }
            let mut known = self.shared.turnarounds.lock().unwrap();
            if known.len() >= REMEMBERED_MODULES && !known.contains_key(&hash) {
                known.clear();
            }
            known.insert(hash, book.times());
            book.finish()
        };
        let prog = done.progress;
        let failures = done.failures;
        let stats = JobStats {
            job_id: id.to_string(),
            module: hash.to_string(),
            tasks: prog.total.unwrap_or(prog.done + prog.failed),
            failed: prog.failed,
            wall_ms: 0,
            per_peer: done.per_worker,
            compiled,
            resumed: done.resumed,
            mismatches: prog.mismatches,
            taken_back: prog.taken_back,
            first_result_ms: done
                .first_result
                .map(|t| t.saturating_duration_since(started).as_secs_f64() * 1000.0),
            module_sent,
        };
        let mut report = JobReport {
            output: ByteBuf::new(),
            stats,
            failures: failures.iter().map(|(i, e)| (*i, e.to_string())).collect(),
        };
        if let Some((index, error)) = failures.first().cloned()
            && !spec.keep_going
        {
            report.stats.wall_ms = started.elapsed().as_millis() as u64;
            return Err(SubmitError::TasksFailed {
                tasks: report.stats.tasks,
                failed: report.stats.failed,
                index,
                error,
                report: Box::new(report),
            });
        }
        let results = done.results;
        debug!(job = %id, ms = started.elapsed().as_millis() as u64, "all results in");
        let combiner = match combiner {
            Some(c) => c,
            None => start_combine(feed_rx.take().expect("the combine starts once")),
        };
        let output = match combiner.await.expect("combine task") {
            Ok(Some(out)) => out,
            Ok(None) => tokio::task::spawn_blocking(move || {
                executor::default_combine(results.into_values(), limits.combined_output())
            })
            .await
            .expect("combine task")
            .map_err(|e| SubmitError::Combine(e.to_string()))?,
            Err(e) => return Err(SubmitError::Combine(e.to_string())),
        };
        if let Some(journal) = done.journal.filter(Journal::on_disk) {
            // Off the answer's path; the runtime waits for it at exit.
            tokio::task::spawn_blocking(move || journal.remove());
        }
        report.output = ByteBuf::from(output);
        report.stats.wall_ms = started.elapsed().as_millis() as u64;
        info!(job = %id, tasks = report.stats.tasks, ms = report.stats.wall_ms, "job done");
        Ok(report)
    }
}

impl Shared {
    /// A callback for blocking code that wakes idle worker slots.
    fn work_waker(self: &Arc<Self>) -> impl Fn() + Send + Sync + 'static {
        let weak = Arc::downgrade(self);
        move || {
            if let Some(s) = weak.upgrade() {
                s.work.notify_waiters();
            }
        }
    }
}

/// About `target` of work at `unit_time` per taskunit, 1..=4096 taskunits.
fn units_for(unit_time: Duration, target: Duration) -> usize {
    (target.as_nanos() / unit_time.as_nanos().max(1)).clamp(1, 4096) as usize
}

/// Count and log a batch of `n` taskunits a slot ran in `took`.
fn batch_ran(shared: &Shared, slot: usize, job: JobId, n: u32, took: Duration) {
    debug!(slot, %job, n, compute_ms = took.as_secs_f64() * 1e3, "batch computed");
    shared
        .tasks_done
        .fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
}

/// Run a batch's taskunits in order on `runner`.
fn run_batch(runner: &mut TaskRunner, units: Vec<crate::wire::TaskUnit>) -> Vec<TaskOutcome> {
    units.iter().map(|u| run_unit(runner, u)).collect()
}

fn run_unit(runner: &mut TaskRunner, unit: &crate::wire::TaskUnit) -> TaskOutcome {
    let result = runner.process(&unit.data).map(ByteBuf::from);
    let stderr = Some(runner.take_stderr()).filter(|s| !s.is_empty());
    TaskOutcome {
        index: unit.index,
        result,
        stderr,
    }
}

/// Run a remote batch's taskunits on `runner` as `claims` hands them out,
/// up to position `limit`.
fn run_claimed(
    runner: &mut TaskRunner,
    units: &[crate::wire::TaskUnit],
    claims: &Claims,
    limit: usize,
) -> Vec<TaskOutcome> {
    let mut outcomes = Vec::new();
    while let Some(i) = claims.next(limit) {
        outcomes.push(run_unit(runner, &units[i]));
    }
    outcomes
}

/// How long a taskunit given back takes to reach the master's idle slot
/// (the answer, the book, a wake-up), at most, on a LAN.
const GIVE_BACK_REACH: Duration = Duration::from_millis(1);

/// A remote batch as its slot works through it, one taskunit at a time; the
/// master may take back those not started yet ([`Request::Reclaim`]).
struct Claims {
    job: JobId,
    master: PeerId,
    indices: Vec<u64>,
    /// Taskunits started (low 32 bits) and where the batch now ends (high
    /// 32 bits), changed together.
    state: std::sync::atomic::AtomicU64,
    started: Instant,
    /// When the taskunit now running started, in ns after `started`.
    current: std::sync::atomic::AtomicU64,
}

impl Claims {
    fn new(job: JobId, master: PeerId, units: &[crate::wire::TaskUnit]) -> Self {
        Claims {
            job,
            master,
            indices: units.iter().map(|u| u.index).collect(),
            state: std::sync::atomic::AtomicU64::new(Self::pack(0, units.len())),
            started: Instant::now(),
            current: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `state` from the taskunits started and where the batch ends.
    fn pack(next: usize, end: usize) -> u64 {
        ((end as u64) << 32) | next as u64
    }

    /// (taskunits started, where the batch ends) from `state`.
    fn unpack(state: u64) -> (usize, usize) {
        ((state & 0xffff_ffff) as usize, (state >> 32) as usize)
    }

    /// The position of the next taskunit to run, if the batch goes on
    /// before position `limit`.
    fn next(&self, limit: usize) -> Option<usize> {
        use std::sync::atomic::Ordering;
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (next, end) = Self::unpack(state);
            if next >= end.min(limit) {
                return None;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let at = self.started.elapsed().as_nanos() as u64;
                    self.current.store(at, Ordering::Release);
                    return Some(next);
                }
                Err(now) => state = now,
            }
        }
    }

    /// Give up the taskunits not started that this slot would end later
    /// than the master's slot, which takes `theirs` per taskunit; their
    /// indices.
    fn release(&self, theirs: Duration) -> Vec<u64> {
        use std::sync::atomic::Ordering;
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (next, end) = Self::unpack(state);
            let unstarted = end.saturating_sub(next);
            if unstarted == 0 {
                return Vec::new();
            }
            // This slot's pace in this batch so far (the taskunits before
            // the running one), else the master's.
            let current = Duration::from_nanos(self.current.load(Ordering::Acquire));
            let mine = match next {
                0 | 1 => theirs,
                n => current / (n as u32 - 1),
            };
            let running_left = if next == 0 {
                Duration::ZERO
            } else {
                mine.saturating_sub(self.started.elapsed().saturating_sub(current))
            };
            let k = give_back_count(unstarted, mine, running_left, theirs, GIVE_BACK_REACH);
            if k == 0 {
                return Vec::new();
            }
            let kept = Self::pack(next, end - k);
            match self
                .state
                .compare_exchange(state, kept, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return self.indices[end - k..end].to_vec(),
                Err(now) => state = now,
            }
        }
    }
}

/// How many of `unstarted` taskunits a worker taking `mine` each (with
/// `running_left` of the one it runs to go) should give to an idle worker
/// taking `theirs` each, `reach` away: the number for which the later of
/// the two ends comes soonest (the fewest, of those alike).
fn give_back_count(
    unstarted: usize,
    mine: Duration,
    running_left: Duration,
    theirs: Duration,
    reach: Duration,
) -> usize {
    let end_here = |k: usize| running_left + mine * (unstarted - k) as u32;
    let end_there = |k: usize| {
        if k == 0 {
            Duration::ZERO
        } else {
            reach + theirs * k as u32
        }
    };
    (0..=unstarted)
        .min_by_key(|&k| (end_here(k).max(end_there(k)), k))
        .unwrap_or(0)
}

enum Source {
    Local(Arc<MasterJob>),
    Remote(PeerId),
}

/// A remote batch's last results, held to go with the next batch's.
struct Carry {
    job: JobId,
    peer: PeerId,
    outcomes: Vec<TaskOutcome>,
    compute: Duration,
}

impl Carry {
    /// The results to send on their own, and where.
    fn into_results(self) -> (PeerId, Request) {
        let req = Request::Results {
            job: self.job,
            outcomes: self.outcomes,
            compute: self.compute,
            pull: 0,
        };
        (self.peer, req)
    }
}

struct Batch {
    job: JobId,
    source: Source,
    module: ModuleHash,
    limits: Limits,
    units: Vec<crate::wire::TaskUnit>,
}

/// Hands taskunits from the split to the job's book, waking idle worker
/// slots now and then (on the first units, then every 1024).
struct UnitSender<W> {
    tx: scheduler::SplitSender,
    wake: Arc<W>,
    /// Taskunits sent, shared by all forks.
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<W: Fn()> UnitSender<W> {
    fn send(&mut self, unit: SharedBytes) -> Result<(), String> {
        if unit.len() > MAX_TASKUNIT {
            return Err(format!(
                "a taskunit of {} bytes is larger than the {MAX_TASKUNIT}-byte limit",
                unit.len()
            ));
        }
        self.tx
            .send(unit)
            .map_err(|_| "job cancelled".to_string())?;
        let count = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if count.is_power_of_two() || count.is_multiple_of(1024) {
            (self.wake)();
        }
        Ok(())
    }

    fn fork(&self) -> Self {
        UnitSender {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
            count: self.count.clone(),
        }
    }
}

/// Run the job's split (or the default line split) into `tx`; returns how
/// many taskunits it made.
fn split_job(
    env: &Environment,
    component: &wasmtime::component::Component,
    limits: Limits,
    input: &InputSpec,
    damage: &Mutex<Vec<Damage>>,
    tx: scheduler::SplitSender,
    wake: impl Fn() + Send + Sync + 'static,
) -> Result<u64, String> {
    let mut sender = UnitSender {
        tx,
        wake: Arc::new(wake),
        count: Default::default(),
    };
    let emit = {
        let mut sender = sender.fork();
        Box::new(move |unit: SharedBytes| sender.send(unit))
    };
    let open = || {
        let (input, mapped) = input
            .open()
            .map_err(|e| format!("cannot open the input: {e}"))?;
        damage.lock().unwrap().extend(mapped);
        Ok::<_, String>(input)
    };
    match executor::run_split(env, component, limits, open()?, emit) {
        Ok(SplitOutcome::Emitted(_)) => {}
        Ok(SplitOutcome::Default) => match open()? {
            // One taskunit per line (without its `\n` or `\r\n`).
            SplitInput::Bytes { data, pos } => {
                let mut start = pos;
                while start < data.len() {
                    let (end, next) = match memchr::memchr(b'\n', &data[start..]) {
                        Some(nl) if nl > 0 && data[start + nl - 1] == b'\r' => {
                            (start + nl - 1, start + nl + 1)
                        }
                        Some(nl) => (start + nl, start + nl + 1),
                        None => (data.len(), data.len()),
                    };
                    sender.send(data.slice(start..end))?;
                    start = next;
                }
            }
            SplitInput::Stream(stream) => {
                use std::io::BufRead;
                let mut reader = std::io::BufReader::new(stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(|e| format!("reading the input: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    sender.send(line.clone().into())?;
                }
            }
        },
        Err(e) => return Err(e.to_string()),
    }
    (sender.wake)();
    Ok(sender.count.load(std::sync::atomic::Ordering::Relaxed))
}

/// Results from a job's feed, in taskunit order, waiting for each as it is
/// needed. Once the feed ends, indexes that never came (taskunits that
/// failed, with `keep_going`) are skipped.
struct InOrder {
    feed: std::sync::mpsc::Receiver<Vec<(u64, Vec<u8>)>>,
    pending: std::collections::BTreeMap<u64, Vec<u8>>,
    next: u64,
    ended: bool,
}

impl InOrder {
    fn new(feed: std::sync::mpsc::Receiver<Vec<(u64, Vec<u8>)>>) -> Self {
        InOrder {
            feed,
            pending: Default::default(),
            next: 0,
            ended: false,
        }
    }
}

impl Iterator for InOrder {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(r) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(r);
            }
            if self.ended {
                self.next = *self.pending.keys().next()?;
                continue;
            }
            match self.feed.recv() {
                Ok(results) => {
                    // Indexes below `next` were already passed on.
                    let fresh = results.into_iter().filter(|(i, _)| *i >= self.next);
                    self.pending.extend(fresh);
                }
                Err(_) => self.ended = true,
            }
        }
    }
}

/// The OS thread that runs one worker slot's wasm calls. Each slot keeps
/// its own long-lived thread (rather than any thread of the blocking pool
/// per batch), so the kernel keeps the slots' threads on their own cores
/// instead of now and then stacking two on one core while another idles.
struct SlotThread {
    jobs: std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
}

impl SlotThread {
    fn spawn(slot: usize) -> Self {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(1);
        std::thread::Builder::new()
            .name(format!("antnest-slot-{slot}"))
            .spawn(move || {
                for f in rx {
                    // A panic drops the reply sender: `run` reports it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                }
            })
            .expect("spawn slot thread");
        SlotThread { jobs }
    }

    /// Run `f` on the slot's thread; `Err` if it panicked.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, oneshot::error::RecvError> {
        let (tx, rx) = oneshot::channel();
        // One call at a time per slot, so the channel always has room.
        let sent = self.jobs.try_send(Box::new(move || {
            let _ = tx.send(f());
        }));
        debug_assert!(sent.is_ok(), "slot thread busy or gone");
        rx.await
    }
}

#[cfg(test)]
mod tests {
    use super::{Claims, InOrder, SlotThread, give_back_count};
    use crate::wire::{JobId, TaskUnit};
    use std::time::Duration;

    #[test]
    fn a_slow_worker_gives_back_what_it_would_end_after_the_idle_one() {
        let ms = |n: u64| Duration::from_millis(n);
        // Nothing left to start: nothing to give.
        assert_eq!(give_back_count(0, ms(3), ms(1), ms(2), ms(1)), 0);
        // On pace (2 ms each, as the master): the reach makes it not worth it.
        assert_eq!(give_back_count(1, ms(2), ms(1), ms(2), ms(1)), 0);
        // Twice as slow, 6 to go: giving 4, it ends in 1 + 4×2 = 9 ms and
        // the master in 1 + 2×4 = 9; giving 3, it ends in 13; giving 5,
        // the master ends in 11.
        assert_eq!(give_back_count(6, ms(4), ms(1), ms(2), ms(1)), 4);
    }

    #[test]
    fn a_batch_hands_out_each_taskunit_once_and_gives_back_only_unstarted_ones() {
        let units: Vec<TaskUnit> = (10..16)
            .map(|i| TaskUnit {
                index: i,
                data: vec![0u8].into(),
            })
            .collect();
        let master = libp2p::PeerId::random();
        let claims = Claims::new(JobId(1), master, &units);
        // Up to a limit, then on.
        assert_eq!(claims.next(2), Some(0));
        assert_eq!(claims.next(2), Some(1));
        assert_eq!(claims.next(2), None);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(claims.next(usize::MAX), Some(2));
        // Two taskunits took 20 ms: 10 ms each. A master taking 1 ms each
        // gets all three not started: it ends them in 1 + 3 = 4 ms, before
        // this slot ends the one it runs.
        let given = claims.release(Duration::from_millis(1));
        assert_eq!(given, vec![13, 14, 15]);
        assert_eq!(claims.next(usize::MAX), None, "given back, not run here");
        assert!(claims.release(Duration::from_millis(1)).is_empty());
    }

    #[tokio::test]
    async fn a_slot_thread_runs_calls_on_one_thread_and_survives_a_panic() {
        let slot = SlotThread::spawn(0);
        let ten = std::time::Duration::from_secs(10);
        let first = tokio::time::timeout(ten, slot.run(|| std::thread::current().id()))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(first, std::thread::current().id());
        // A panicking call is reported, and the thread keeps serving calls.
        let panicked = tokio::time::timeout(ten, slot.run(|| -> u32 { panic!("boom") }))
            .await
            .unwrap();
        assert!(panicked.is_err());
        let again = tokio::time::timeout(ten, slot.run(|| std::thread::current().id()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again, first);
    }

    #[test]
    fn results_come_in_order_and_missing_ones_are_skipped_at_the_end() {
        let (tx, rx) = std::sync::mpsc::channel();
        let result = |i: u64, r: &str| (i, r.as_bytes().to_vec());
        tx.send(vec![result(2, "c"), result(0, "a")]).unwrap();
        tx.send(vec![result(4, "e"), result(3, "d")]).unwrap();
        let mut it = InOrder::new(rx);
        assert_eq!(it.next().as_deref(), Some(&b"a"[..]));
        // 1 never comes (it failed): the rest follows once the feed ends.
        drop(tx);
        let rest: Vec<Vec<u8>> = it.collect();
        assert_eq!(rest, [b"c".to_vec(), b"d".to_vec(), b"e".to_vec()]);
    }
}
