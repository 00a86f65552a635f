//! A master answering its workers: pulls and results (on task streams
//! and by request-response), long polls (`Wait`), module fetches; the
//! jobs' listing and cancel; and asking slower workers to give back what
//! they have not started (`Reclaim`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use antnest_proto::control::{JobInfo, WorkerInfo};

/// How long a peer that asked for a module is shown as getting it (the
/// longest a worker spends fetching and compiling one).
const GETTING_SHOWN: std::time::Duration = std::time::Duration::from_secs(300);

/// How long a master refuses a worker caught with a wrong result.
const REFUSED_FOR: std::time::Duration = std::time::Duration::from_secs(600);
use antnest_proto::frame::Frames;
use antnest_proto::{Announce, JobId, ModuleHash, Request, Response, TaskError};
use antnest_sandbox::job_files;
use antnest_sched::JobBook;
use libp2p::PeerId;
use tokio::sync::watch;
use tracing::debug;

use crate::master::job::{MasterJob, PER_PEER_KEPT, by_name};
use crate::net::{self, TaskStream};
use crate::state::{Peer, stopped};

/// Task streams one peer may have open to this one at once (a worker keeps
/// one per slot).
const MAX_STREAMS_PER_PEER: usize = 256;
/// A task stream with no request for this long is closed (a worker opens
/// a new one when it next pulls).
const STREAM_IDLE: Duration = Duration::from_secs(120);

/// How many task streams each peer has open to this one.
#[derive(Clone, Default)]
struct OpenStreams(Arc<Mutex<HashMap<PeerId, usize>>>);

/// One task stream counted in [`OpenStreams`], until dropped (whether its
/// task ends, fails or is stopped).
struct Counted {
    open: OpenStreams,
    peer: PeerId,
}

impl OpenStreams {
    /// Count one more stream of `peer`'s, unless it has
    /// [`MAX_STREAMS_PER_PEER`] open already.
    fn count(&self, peer: PeerId) -> Option<Counted> {
        let mut open = self.0.lock().unwrap();
        let n = open.entry(peer).or_default();
        if *n >= MAX_STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Counted {
            open: self.clone(),
            peer,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap();
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// How long a master holds a worker's `Wait` before it answers `NoWork`
/// (and the worker asks again).
pub(crate) const WAIT_MAX: Duration = Duration::from_secs(5);

impl Peer {
    /// Answer the exchanges on streams other peers open to this one (a
    /// worker slot keeps one to each master it pulls from).
    pub(crate) async fn serve_streams(
        self,
        incoming: libp2p_stream::IncomingStreams,
        stop: watch::Receiver<bool>,
    ) {
        let incoming = tokio::sync::Mutex::new(incoming);
        let open = OpenStreams::default();
        let serve = move |(peer, stream): (PeerId, libp2p::Stream)| {
            let (me, counted) = (self.clone(), open.count(peer));
            async move {
                let Some(_counted) = counted else {
                    debug!(%peer, "task stream refused: too many open");
                    return;
                };
                me.serve_stream(peer, stream).await;
            }
        };
        crate::net::accept::serve("stream", incoming, serve, stopped(stop)).await;
    }

    /// One stream: read a request, answer it, until the stream ends. A
    /// malformed or oversized message, or a stream silent for
    /// [`STREAM_IDLE`] (or slow to take an answer), ends the stream, not
    /// the peer.
    pub(crate) async fn serve_stream(self, peer: PeerId, stream: libp2p::Stream) {
        let mut stream = TaskStream::new(stream);
        let write_limit = self.state.config.net.request_timeout;
        let timed_out = |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
        loop {
            let read = tokio::time::timeout(STREAM_IDLE, Frames::read_request(&mut stream));
            let request = match read.await.unwrap_or_else(|_| Err(timed_out("idle"))) {
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
            let write = tokio::time::timeout(
                write_limit,
                Frames::write_response(stream.get_mut(), &response),
            );
            let written = write
                .await
                .unwrap_or_else(|_| Err(timed_out("answer not taken")));
            if let Err(e) = written {
                debug!(%peer, "stream closed: {e}");
                return;
            }
        }
    }

    /// A worker's `Wait`: lease it a batch as soon as a job of this peer
    /// has taskunits for it; `NoWork` after [`WAIT_MAX`], or as soon as the
    /// worker sends anything else (its `EndWait`, then read and answered as
    /// a request of its own).
    pub(crate) async fn hold_wait(
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
            let notified = self.state.work.notified();
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
    pub(crate) fn assign(
        &self,
        peer: PeerId,
        sizes: &HashMap<ModuleHash, u32>,
    ) -> Option<Response> {
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
    pub(crate) fn master_jobs(&self) -> Vec<(JobId, Arc<MasterJob>)> {
        let masters = self.state.master.jobs.lock().unwrap();
        masters.iter().map(|(id, j)| (*id, j.clone())).collect()
    }

    /// What other peers are told of this peer's job `id`.
    pub(crate) fn announcement(&self, id: JobId, master: &MasterJob) -> Announce {
        Announce {
            job: id,
            master: self.state.client.local_peer_id().to_bytes(),
            module: master.module,
            module_size: master.module_size,
            limits: master.limits,
            runtime: master.runtime,
            weight: master.weight,
            addrs: Vec::new(),
            code: master.code,
        }
    }

    /// Answer a request from another peer. Never blocks for long.
    pub(crate) fn answer(&self, peer: PeerId, request: Request) -> Response {
        match request {
            Request::Wait { .. } => Response::Refused("a wait needs a task stream".into()),
            Request::EndWait => Response::Ack,
            Request::Reclaim { job, pace } => self.released(job, peer, pace),
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
                master.record(|book| book.complete_computed(net::id(&peer), outcomes, compute));
                master.progress.notify_one();
                if pull > 0 {
                    self.lease(&master, peer, pull)
                } else {
                    Response::Ack
                }
            }
            Request::FetchModule { hash } => self.module_response(hash),
            Request::FetchJobFiles { hash } => self.job_files_response(hash),
        }
    }

    /// The answer to a `FetchJobFiles`: what follows the module's code (its
    /// job-files section), from
    /// a running job's bytes, else from the disk cache (blocking: file I/O).
    pub(crate) fn job_files_response(&self, hash: ModuleHash) -> Response {
        let files = match self.running_module(hash) {
            // The whole section, as it is appended to the code.
            Some(bytes) => job_files::split(&bytes).map(|(code, _)| bytes[code.len()..].to_vec()),
            None => self.state.env.stored_files(&hash).map(|(_, files)| files),
        };
        match files {
            Some(files) => Response::JobFiles(files),
            None => Response::Refused(format!("no job files of module {hash} here")),
        }
    }

    /// The answer to a `FetchModule`: the bytes from a running job, else
    /// from the disk cache (blocking: file I/O).
    pub(crate) fn module_response(&self, hash: ModuleHash) -> Response {
        let bytes = self
            .running_module(hash)
            .map(|b| b.as_ref().clone())
            .or_else(|| self.state.env.stored_module(&hash));
        match bytes {
            Some(b) => Response::Module(b),
            None => Response::Refused(format!("module {hash} is not here")),
        }
    }

    /// The bytes of `hash`, if a job of it runs with this peer as master.
    pub(crate) fn running_module(&self, hash: ModuleHash) -> Option<Arc<Vec<u8>>> {
        let masters = self.state.master.jobs.lock().unwrap();
        masters
            .values()
            .filter(|j| j.module == hash)
            .find_map(|j| j.bytes.clone())
    }

    /// Lease up to `max` taskunits of `master`'s job to `peer`.
    pub(crate) fn lease(&self, master: &MasterJob, peer: PeerId, max: u32) -> Response {
        if self.is_refused(net::id(&peer)) {
            return Response::NoWork { finished: false };
        }
        let mut book = master.book.lock().unwrap();
        let units = book.lease(net::id(&peer), max.min(4096) as usize, Instant::now());
        if units.is_empty() {
            Response::NoWork {
                finished: !book.has_work(),
            }
        } else {
            Response::Tasks {
                units,
                lease: self.state.config.lease,
            }
        }
    }

    /// Results of this peer's finished jobs by the peer that computed them.
    pub fn results_per_peer(&self) -> Vec<(String, u64)> {
        let counted = self.state.master.per_peer.lock().unwrap();
        counted.iter().map(|(p, n)| (p.to_string(), *n)).collect()
    }

    /// The last jobs this peer was master of that have ended, newest first.
    pub fn finished_jobs(&self) -> Vec<antnest_proto::control::FinishedJob> {
        let finished = self.state.master.finished.lock().unwrap();
        finished.iter().rev().cloned().collect()
    }

    /// `peer` asked for `module`: until it takes taskunits it is getting
    /// the module (fetching, then compiling it).
    pub(crate) fn fetching(&self, peer: antnest_proto::PeerId, module: ModuleHash) {
        let mut fetching = self.state.master.fetching.lock().unwrap();
        if fetching.len() >= PER_PEER_KEPT {
            let stale = Instant::now() - GETTING_SHOWN;
            fetching.retain(|_, (_, at)| *at > stale);
        }
        if fetching.len() < PER_PEER_KEPT {
            fetching.insert(peer, (module, Instant::now()));
        }
    }

    /// Refuse `workers` (caught with a wrong result) for [`REFUSED_FOR`].
    pub(crate) fn refuse(&self, workers: impl Iterator<Item = antnest_proto::PeerId>) {
        let until = Instant::now() + REFUSED_FOR;
        let mut refused = self.state.master.refused.lock().unwrap();
        refused.retain(|_, t| *t > Instant::now());
        for w in workers {
            refused.insert(w, until);
        }
    }

    fn is_refused(&self, worker: antnest_proto::PeerId) -> bool {
        let refused = self.state.master.refused.lock().unwrap();
        refused.get(&worker).is_some_and(|t| *t > Instant::now())
    }

    /// The jobs this peer is master of, with their progress.
    pub fn jobs(&self) -> Vec<JobInfo> {
        let masters = self.state.master.jobs.lock().unwrap();
        let mut jobs: Vec<JobInfo> = masters
            .iter()
            .map(|(id, j)| {
                let book = j.book.lock().unwrap();
                let progress = j.input.fill(book.progress());
                JobInfo {
                    job_id: id.to_string(),
                    module: j.module.to_string(),
                    progress,
                    running_ms: j.started.elapsed().as_millis() as u64,
                    per_peer: by_name(book.per_worker()),
                    workers: self.workers_of(j, &book),
                    fraction: progress.fraction(),
                    total_estimate: progress.total_estimate(),
                }
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.running_ms));
        jobs
    }

    /// The workers of job `j`: those holding taskunits or timed, and those
    /// that asked for its module lately and have taken nothing since.
    fn workers_of(&self, j: &MasterJob, book: &JobBook) -> BTreeMap<String, WorkerInfo> {
        let mut workers: BTreeMap<String, WorkerInfo> = book
            .workers()
            .into_iter()
            .map(|(w, (held, pace))| {
                let info = WorkerInfo {
                    held,
                    pace_ms: pace.map(|p| p.as_secs_f64() * 1000.0),
                    state: if held > 0 { "working" } else { "idle" }.into(),
                };
                (w.to_string(), info)
            })
            .collect();
        let since = Instant::now() - GETTING_SHOWN;
        let fetching = self.state.master.fetching.lock().unwrap();
        for (peer, (module, at)) in fetching.iter() {
            let name = peer.to_string();
            let started = book.per_worker().contains_key(peer) || workers.contains_key(&name);
            if *module == j.module && *at > since && !started {
                let info = WorkerInfo {
                    held: 0,
                    pace_ms: None,
                    state: "getting the module".into(),
                };
                workers.insert(name, info);
            }
        }
        workers
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

    pub(crate) fn master_job(&self, job: JobId) -> Option<Arc<MasterJob>> {
        self.state.master.jobs.lock().unwrap().get(&job).cloned()
    }

    /// This peer's slot has run out of `job`'s taskunits while other
    /// workers may hold some: ask each (once per batch) to give back those
    /// it has not started and would end later than this slot would.
    pub(crate) fn reclaim(&self, job: JobId, master: &Arc<MasterJob>) {
        let (workers, pace) = {
            let mut book = master.book.lock().unwrap();
            (
                book.to_reclaim(self.state.local),
                book.pace(self.state.local),
            )
        };
        // Untimed, this slot cannot say when it would end them.
        let Some(pace) = pace else {
            return;
        };
        for worker in workers {
            let Some(peer) = net::libp2p_id(worker) else {
                continue;
            };
            let client = self.state.client.clone();
            let state = self.state.clone();
            let master = master.clone();
            tokio::spawn(async move {
                match client.request(peer, Request::Reclaim { job, pace }).await {
                    Ok(Response::Released { units }) if !units.is_empty() => {
                        let n = master.book.lock().unwrap().give_back(worker, &units);
                        debug!(%job, %peer, n, "taskunits taken back");
                        state.work.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(e) => debug!(%job, %peer, "reclaim failed: {e}"),
                }
            });
        }
    }
}
