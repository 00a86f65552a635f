//! How a slot gets work from a master: pulls and results on its task
//! stream to that master (request-response when no stream can be had),
//! long polls, the jobs announced, and the job's module fetched once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use antnest_proto::frame::Frames;
use antnest_proto::limits::{MAX_MODULE, MAX_WEIGHT};
use antnest_proto::{Announce, JobId, Limits, ModuleHash, Request, Response, TaskOutcome};
use libp2p::PeerId;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::master::job::MasterJob;
use crate::master::serve::WAIT_MAX;
use crate::net::{self, TaskStream};
use crate::state::Peer;
use crate::worker::batch::{Batch, BatchFrom, units_for};
use crate::worker::known::{Getting, RemoteJob};
use crate::worker::remote_batch::RemoteBatch;
use crate::worker::slot::{LOCAL_BATCH, REMOTE_BATCH};

/// How long a module's fetch and compile may take before it counts as
/// failed (a Python component takes tens of seconds to compile).
const COMPILE_MAX: Duration = Duration::from_secs(300);
/// How long a module that could not be had is not asked for again (the
/// first time; twice as long after each failure, up to
/// [`MODULE_RETRY_MAX`]).
const MODULE_RETRY: Duration = Duration::from_secs(5);
const MODULE_RETRY_MAX: Duration = Duration::from_secs(600);
/// Modules whose state is kept at most (past it, settled ones are dropped).
const MAX_MODULE_STATES: usize = 256;
/// Why a module could not be had.
enum NotHad {
    /// Fetching it failed (no connection yet, the master busy or gone).
    Fetch(String),
    /// The module itself: invalid, too big, past its compile bounds.
    Module(String),
}

/// Modules fetched and compiled at once: each compile is a child process
/// of up to `--compile-memory-mb`, so hundreds of jobs announced at once
/// must not start hundreds of them.
const GETS_AT_ONCE: usize = 4;
/// Of those, for one master's jobs: a master announcing many modules (or
/// one that compiles slowly) does not hold back other masters' modules.
const GETS_AT_ONCE_PER_MASTER: usize = 1;

impl Peer {
    /// A master's `Reclaim`: give back the taskunits of `job` that this
    /// peer's slots have not started and would end later than the
    /// master's slot, which takes `pace` per taskunit.
    pub(crate) fn released(&self, job: JobId, master: PeerId, pace: Duration) -> Response {
        let batches: Vec<Arc<RemoteBatch>> = (self.state.worker.batches.lock().unwrap().iter())
            .filter(|c| c.job == job && c.master == master)
            .cloned()
            .collect();
        let units: Vec<u64> = batches.iter().flat_map(|c| c.release(pace)).collect();
        if !units.is_empty() {
            debug!(%job, n = units.len(), "taskunits given back");
        }
        Response::Released { units }
    }

    /// Take note of a job announced (or assigned) by `from`; whether it is
    /// one this peer may work on.
    pub(crate) fn learn_job(&self, from: PeerId, a: Announce) -> bool {
        let Ok(master) = PeerId::from_bytes(&a.master) else {
            debug!(%from, "announcement with a bad master id ignored");
            return false;
        };
        if net::id(&master) == self.state.local || a.module_size as usize > MAX_MODULE {
            return false;
        }
        if let Some(allowed) = &self.state.config.allowed_masters
            && !allowed.contains(&master)
        {
            debug!(%master, job = %a.job, "job from a master not on the allowlist ignored");
            return false;
        }
        if !self.takes_runtime(a.runtime, false) {
            debug!(%master, job = %a.job, "job for native Python only ignored");
            return false;
        }
        // A master may ask for at most MAX_WEIGHT times an equal share.
        let weight = a.weight.clamp(1, MAX_WEIGHT);
        let now = Instant::now();
        let mut remotes = self.state.worker.remotes.lock().unwrap();
        let new = !remotes.contains_key(&a.job);
        let job = remotes.entry(a.job).or_insert_with(|| {
            debug!(%master, job = %a.job, "job announced");
            RemoteJob {
                master,
                module: a.module,
                code: a.code,
                limits: a.limits,
                runtime: a.runtime,
                weight,
                seen: now,
                retry_at: now,
            }
        });
        job.seen = now;
        drop(remotes);
        if new {
            self.state.worker.shares.join(a.job, weight);
            // Get the module now, before any slot is free to pull: it is
            // ready when one is, also while every slot is busy elsewhere.
            let _ = self.module_state(a.job, master, a.module);
        }
        self.state.work.notify_waiters();
        true
    }

    /// Send results with no pull, by request-response from a task of their
    /// own (after the previous such send), so the slot goes on at once.
    pub(crate) async fn deliver(
        &self,
        delivering: &mut Option<tokio::task::JoinHandle<()>>,
        peer: PeerId,
        req: Request,
    ) {
        if let Some(previous) = delivering.take() {
            let _ = previous.await;
        }
        let client = self.state.client.clone();
        *delivering = Some(tokio::spawn(async move {
            if let Err(e) = client.request(peer, req).await {
                // The leases will expire and the master re-issues them.
                debug!("results not delivered: {e}");
            }
        }));
    }

    /// Results of a remote job of `module`, asking for the next batch: none
    /// when another job is behind its share (the slot goes to it), else about
    /// [`REMOTE_BATCH`] of work. With the number asked for.
    pub(crate) fn results_with_pull(
        &self,
        per_unit: &HashMap<ModuleHash, Duration>,
        job: JobId,
        module: ModuleHash,
        outcomes: Vec<TaskOutcome>,
        compute: Duration,
    ) -> (Request, u32) {
        let pull = if self.state.worker.shares.should_yield(job) {
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
    pub(crate) fn batch_size(
        per_unit: &HashMap<ModuleHash, Duration>,
        module: ModuleHash,
        target: Duration,
    ) -> usize {
        per_unit.get(&module).map_or(1, |d| units_for(*d, target))
    }

    /// The next batch for a slot: from the job furthest behind its share
    /// (see [`crate::worker::share`]) that has work, this peer's own or
    /// one announced by another.
    pub(crate) async fn find_work(
        &self,
        per_unit: &HashMap<ModuleHash, Duration>,
        streams: &mut HashMap<PeerId, TaskStream>,
    ) -> Option<Batch> {
        let locals: HashMap<JobId, Arc<MasterJob>> = self.master_jobs().into_iter().collect();
        let now = Instant::now();
        let (remotes, known): (HashMap<JobId, RemoteJob>, HashSet<JobId>) = {
            let mut remotes = self.state.worker.remotes.lock().unwrap();
            // Forget jobs not announced for a while.
            remotes.retain(|_, j| now.duration_since(j.seen) < Duration::from_secs(10));
            let known = remotes.keys().chain(locals.keys()).copied().collect();
            let ready = remotes
                .iter()
                .filter(|(_, j)| j.retry_at <= now)
                .map(|(id, j)| (*id, j.clone()))
                .collect();
            (ready, known)
        };
        let weights: Vec<(JobId, u32)> = (locals.iter())
            .filter(|(_, m)| self.takes_runtime(m.runtime, true))
            .map(|(id, m)| (*id, m.weight))
            .chain(remotes.iter().map(|(id, j)| (*id, j.weight)))
            .collect();
        let shares = &self.state.worker.shares;
        for job in shares.order(&weights, |id| known.contains(id)) {
            let batch = match (locals.get(&job), remotes.get(&job)) {
                (Some(master), _) => self.local_batch(job, master, per_unit),
                (None, Some(remote)) => self.remote_batch(job, remote, per_unit, streams).await,
                (None, None) => None,
            };
            if batch.is_some() {
                shares.chosen(job);
                return batch;
            }
        }
        None
    }

    /// Taskunits of this peer's own `job` for a slot, if it has any left
    /// to hand out.
    fn local_batch(
        &self,
        job: JobId,
        master: &Arc<MasterJob>,
        per_unit: &HashMap<ModuleHash, Duration>,
    ) -> Option<Batch> {
        let max = Self::batch_size(per_unit, master.module, LOCAL_BATCH);
        let units =
            (master.book.lock().unwrap()).lease_local(self.state.local, max, Instant::now());
        if units.is_empty() {
            // Nothing here for this slot: ask slower workers for what they
            // have not started (the book holds back backups until asked).
            self.reclaim(job, master);
            return None;
        }
        Some(Batch {
            job,
            module: master.module,
            limits: master.limits,
            source: BatchFrom::Local(master.clone()),
            units,
        })
    }

    /// A batch pulled from the master of `job`, another peer, if its module
    /// is ready here and the master has taskunits to hand out.
    async fn remote_batch(
        &self,
        job: JobId,
        remote: &RemoteJob,
        per_unit: &HashMap<ModuleHash, Duration>,
        streams: &mut HashMap<PeerId, TaskStream>,
    ) -> Option<Batch> {
        let RemoteJob {
            master,
            module,
            limits,
            ..
        } = *remote;
        if !self.module_ready(job, master, module) {
            return None;
        }
        let limits = limits.min(self.state.config.limits);
        let max = Self::batch_size(per_unit, module, REMOTE_BATCH) as u32;
        let pull = Request::Pull { job, max };
        self.request_batch(job, master, module, limits, pull, streams)
            .await
    }

    /// Whether every job this peer knows of is `master`'s (none its own).
    pub(crate) fn waits_only_on(&self, master: PeerId) -> bool {
        self.state.master.jobs.lock().unwrap().is_empty()
            && self
                .state
                .worker
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
    pub(crate) async fn wait_at<'a>(
        &'a self,
        master: PeerId,
        per_unit: &HashMap<ModuleHash, Duration>,
        streams: &mut HashMap<PeerId, TaskStream>,
        mut notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'a>>,
        stop: &watch::Receiver<bool>,
    ) -> Option<Batch> {
        use futures::AsyncBufReadExt as _;
        let stream = streams.get_mut(&master)?;
        // None of a module this peer failed to get lately (first: a master
        // reads only so many): else the master would assign its taskunits
        // again and again, each batch refused at once.
        let now = Instant::now();
        let mut sizes: Vec<(ModuleHash, u32)> = (self.state.worker.modules.lock().unwrap())
            .iter()
            .filter(|(_, g)| matches!(g, Getting::Failed { until, .. } if *until > now))
            .map(|(m, _)| (*m, 0))
            .collect();
        sizes.extend(
            per_unit
                .iter()
                .map(|(m, d)| (*m, units_for(*d, REMOTE_BATCH) as u32)),
        );
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
                            notified.set(self.state.work.notified());
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
        let limit = WAIT_MAX + self.state.config.net.request_timeout;
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
        if !self.module_ready_now(job.job, master, job.module).await {
            return None;
        }
        Some(Batch {
            job: job.job,
            source: BatchFrom::Remote(master),
            module: job.module,
            limits: job.limits.min(self.state.config.limits),
            units,
        })
    }

    /// This slot's stream to `master`, opened on first use.
    pub(crate) async fn stream_to<'s>(
        &self,
        streams: &'s mut HashMap<PeerId, TaskStream>,
        master: PeerId,
    ) -> Option<&'s mut TaskStream> {
        match streams.entry(master) {
            std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                match self.state.client.open_stream(master).await {
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
    pub(crate) fn knows_no_jobs(&self) -> bool {
        self.state.master.jobs.lock().unwrap().is_empty()
            && self.state.worker.remotes.lock().unwrap().is_empty()
    }

    /// Send `request` (a pull, or results with a pull) and take the batch
    /// that comes back, if any.
    pub(crate) async fn request_batch(
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
                source: BatchFrom::Remote(master),
                units,
            }),
            Ok(Response::NoWork { finished: true }) => {
                self.state.worker.remotes.lock().unwrap().remove(&job);
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
    pub(crate) async fn exchange(
        &self,
        streams: &mut HashMap<PeerId, TaskStream>,
        master: PeerId,
        request: Request,
    ) -> Result<Response, net::NetError> {
        if let Some(stream) = self.stream_to(streams, master).await {
            let exchange = async {
                Frames::write_request(stream.get_mut(), &request).await?;
                Frames::read_response(stream).await
            };
            match tokio::time::timeout(self.state.config.net.request_timeout, exchange).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) => debug!(%master, "stream failed: {e}"),
                Err(_) => debug!(%master, "stream timed out"),
            }
            streams.remove(&master);
        }
        self.state.client.request(master, request).await
    }

    pub(crate) fn back_off(&self, job: JobId, wait: Duration) {
        if let Some(j) = self.state.worker.remotes.lock().unwrap().get_mut(&job) {
            j.retry_at = Instant::now() + wait;
        }
    }

    /// Whether `job`'s module is compiled here. If not, it is fetched from
    /// `master` and compiled in the background (once, whichever slot asks
    /// first), and this says `false` at once: the slot goes on to other
    /// work and is woken when the module is ready. A module that cannot be
    /// had sets its job aside for a while.
    pub(crate) fn module_ready(&self, job: JobId, master: PeerId, module: ModuleHash) -> bool {
        self.module_state(job, master, module) == Some(true)
    }

    /// [`Self::ensure_module`] for `job`: `Some(ready)`, or `None` when the
    /// module cannot be had (logged, and the job set aside for a while).
    fn module_state(&self, job: JobId, master: PeerId, module: ModuleHash) -> Option<bool> {
        let native = self.native_for(job).is_some();
        let code = (self.state.worker.remotes.lock().unwrap())
            .get(&job)
            .and_then(|j| j.code);
        self.ensure_module(master, module, code, native)
            .inspect_err(|e| {
                warn!(%job, %master, "cannot get the job's module: {e}");
                self.back_off(job, MODULE_RETRY);
            })
            .ok()
    }

    /// [`Self::module_ready`], waiting for the module (taskunits already
    /// leased to this peer are to run): whether it is ready.
    pub(crate) async fn module_ready_now(
        &self,
        job: JobId,
        master: PeerId,
        module: ModuleHash,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + COMPILE_MAX;
        loop {
            let done = self.state.worker.module_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            match self.module_state(job, master, module) {
                Some(true) => return true,
                Some(false) => {}
                None => return false,
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return false;
            }
        }
    }

    /// `Ok(true)` if the module is compiled here (or, for a job run by
    /// native Python, its files are at hand); else start getting it
    /// (unless under way) and `Ok(false)`; `Err` if it failed lately.
    fn ensure_module(
        &self,
        from: PeerId,
        hash: ModuleHash,
        code: Option<ModuleHash>,
        native: bool,
    ) -> Result<bool, String> {
        let env = &self.state.env;
        if env.is_compiled(&hash) || native && env.files_in_memory(&hash).is_some() {
            return Ok(true);
        }
        {
            let mut modules = self.state.worker.modules.lock().unwrap();
            match modules.get(&hash) {
                Some(Getting::UnderWay { .. }) => return Ok(false),
                Some(Getting::Failed { until, why, .. }) if Instant::now() < *until => {
                    return Err(why.clone());
                }
                _ => {}
            }
            if modules.len() >= MAX_MODULE_STATES {
                let now = Instant::now();
                modules.retain(|_, g| {
                    matches!(g, Getting::Failed { until, .. } if *until > now)
                        || matches!(g, Getting::UnderWay { .. })
                });
            }
            // Not started now if too many are under way: a slot looking
            // for work (woken when one ends) or the next announcement
            // starts it.
            let (all, theirs) = modules.values().fold((0, 0), |(all, theirs), g| match g {
                Getting::UnderWay { from: m, .. } => (all + 1, theirs + usize::from(*m == from)),
                Getting::Failed { .. } => (all, theirs),
            });
            if all >= GETS_AT_ONCE || theirs >= GETS_AT_ONCE_PER_MASTER {
                return Ok(false);
            }
            let failures = match modules.get(&hash) {
                Some(Getting::Failed { failures, .. }) => *failures,
                _ => 0,
            };
            modules.insert(hash, Getting::UnderWay { from, failures });
        }
        let peer = self.clone();
        tokio::spawn(async move {
            let got = tokio::time::timeout(COMPILE_MAX, peer.get_module(from, hash, code, native))
                .await
                .unwrap_or_else(|_| {
                    Err(NotHad::Module(format!(
                        "not fetched and compiled within {COMPILE_MAX:?}"
                    )))
                });
            let worker = &peer.state.worker;
            {
                let mut modules = worker.modules.lock().unwrap();
                match got {
                    Ok(()) => {
                        modules.remove(&hash);
                    }
                    Err(not_had) => {
                        let before = match modules.get(&hash) {
                            Some(Getting::UnderWay { failures, .. }) => *failures,
                            _ => 0,
                        };
                        // A module at fault waits longer each time (one
                        // that cannot be compiled in time would otherwise
                        // take a compile slot again and again); a fetch
                        // that failed (no connection yet, a busy master)
                        // is tried again soon.
                        let (why, failures, wait) = match not_had {
                            NotHad::Module(why) => (
                                why,
                                before + 1,
                                MODULE_RETRY
                                    .saturating_mul(1 << before.min(16))
                                    .min(MODULE_RETRY_MAX),
                            ),
                            NotHad::Fetch(why) => (why, before, MODULE_RETRY),
                        };
                        info!(%hash, failures, retry_in = ?wait, "module not had: {why}");
                        peer.state
                            .module_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let until = Instant::now() + wait;
                        modules.insert(
                            hash,
                            Getting::Failed {
                                until,
                                why,
                                failures,
                            },
                        );
                    }
                }
            }
            worker.module_done.notify_waiters();
            peer.state.work.notify_waiters();
        });
        Ok(false)
    }

    /// Fetch the module from `from` (unless it is on disk here; only its
    /// job files if its `code` is) and compile it; for `native` Python, a
    /// module with job files is only kept.
    async fn get_module(
        &self,
        from: PeerId,
        hash: ModuleHash,
        code: Option<ModuleHash>,
        native: bool,
    ) -> Result<(), NotHad> {
        // Reading and hashing a module (tens of MB for a Python job) is
        // blocking work; `component` checks fetched bytes against the hash.
        let env = self.state.env.clone();
        let (stored, code) = tokio::task::spawn_blocking(move || {
            let stored = env.stored_module(&hash);
            let code = code
                .filter(|_| stored.is_none())
                .and_then(|c| env.stored_module(&c));
            (stored, code)
        })
        .await
        .map_err(|e| NotHad::Module(e.to_string()))?;
        let files = match code {
            Some(_) => self.fetch_job_files(from, hash).await,
            None => None,
        };
        let bytes = match (stored, code, files) {
            (Some(b), _, _) => b,
            // The code this peer has and the files: the module, checked
            // against its hash by `component` (a master's wrong code hash
            // or files only fail its own job).
            (None, Some(mut code), Some(files)) => {
                code.extend_from_slice(&files);
                code
            }
            _ => match self
                .state
                .client
                .request(from, Request::FetchModule { hash })
                .await
                .map_err(|e| NotHad::Fetch(e.to_string()))?
            {
                Response::Module(b) if b.len() <= MAX_MODULE => b,
                Response::Module(_) => {
                    return Err(NotHad::Module(
                        "the master sent a module over the size limit".into(),
                    ));
                }
                Response::Refused(why) => {
                    return Err(NotHad::Fetch(format!("module fetch refused: {why}")));
                }
                _ => return Err(NotHad::Fetch("module fetch: an unexpected answer".into())),
            },
        };
        let env = self.state.env.clone();
        tokio::task::spawn_blocking(move || {
            if native && env.store_uncompiled(&hash, &bytes)?.is_some() {
                return Ok(());
            }
            env.component(&hash, || Some(bytes)).map(drop)
        })
        .await
        .map_err(|e| NotHad::Module(e.to_string()))?
        .map_err(|e| NotHad::Module(e.to_string()))
    }

    /// A module's job files from `from`; `None` if it would not give them
    /// (the whole module is asked for then).
    async fn fetch_job_files(&self, from: PeerId, hash: ModuleHash) -> Option<Vec<u8>> {
        let request = Request::FetchJobFiles { hash };
        match self.state.client.request(from, request).await {
            Ok(Response::JobFiles(files)) if files.len() <= MAX_MODULE => Some(files),
            other => {
                let why = match other {
                    Ok(Response::Refused(why)) => why,
                    Ok(_) => "an unexpected answer".into(),
                    Err(e) => e.to_string(),
                };
                debug!(%hash, "job files not had, the whole module is asked for: {why}");
                None
            }
        }
    }
}
