//! Running a job's three functions: [`TaskRunner`] runs `process` for one
//! module, keeping one instance alive across taskunits (re-instantiating
//! per call is far slower) and throwing it away after a trap, since a
//! trapped instance may not be entered again; [`run_split`] and
//! [`run_combine`] run the other two once per job; [`Renderer`] turns
//! results into text for a submitter watching them come.
//!
//! Calls are synchronous and block their thread; callers run them on
//! `spawn_blocking` or a dedicated thread.

use std::time::Instant;

use crate::engine::{Module, Sandbox};
use crate::guest::{GuestState, HostIo, Job, STDERR_CAPTURE, classify};
use crate::input::SplitInput;
use antnest_proto::{Limits, ModuleHash, SharedBytes, TaskError};
use wasmtime::Store;
use wasmtime::component::Instance;

/// Runs `process` for one module, reusing one instance across taskunits.
pub struct TaskRunner {
    env: Sandbox,
    module: Module,
    limits: Limits,
    instance: Option<(Store<GuestState>, Job)>,
    /// Bytes of the instance's stderr already handed out.
    stderr_seen: usize,
    /// What the last taskunit wrote to stderr.
    last_stderr: String,
}

impl TaskRunner {
    pub fn new(env: Sandbox, module: Module, limits: Limits) -> Self {
        TaskRunner {
            env,
            module,
            limits,
            instance: None,
            stderr_seen: 0,
            last_stderr: String::new(),
        }
    }

    /// What the last taskunit wrote to stderr (empty if nothing; after a
    /// trap it is part of the error instead).
    pub fn take_stderr(&mut self) -> String {
        std::mem::take(&mut self.last_stderr)
    }

    /// Keep the instance for the next taskunit, collecting what this one
    /// wrote to stderr. An instance whose stderr buffer is filling up is
    /// replaced, so a chatty guest never hits the buffer's end.
    fn keep(&mut self, store: Store<GuestState>, job: Job) {
        let all = store.data().stderr.contents();
        self.last_stderr =
            String::from_utf8_lossy(&all[self.stderr_seen.min(all.len())..]).into_owned();
        self.stderr_seen = all.len();
        // A deterministic job's instance is never used again: the next
        // taskunit must not see what this one left.
        if self.stderr_seen < STDERR_CAPTURE * 3 / 4 && !self.limits.deterministic {
            self.instance = Some((store, job));
        } else {
            self.stderr_seen = 0;
        }
    }

    /// Process one taskunit (as taskunit 0, for a deterministic job).
    pub fn process(&mut self, unit: &[u8]) -> Result<Vec<u8>, TaskError> {
        self.process_at(0, unit)
    }

    /// Process taskunit `index`. For a deterministic job
    /// ([`Limits::deterministic`]) it gets a fresh instance, its random
    /// numbers seeded from its index and bytes: the same on every peer.
    pub fn process_at(&mut self, index: u64, unit: &[u8]) -> Result<Vec<u8>, TaskError> {
        let (mut store, job) = match self.instance.take() {
            Some(inst) => inst,
            None if self.limits.deterministic => {
                let seed = ModuleHash::of(&[&index.to_le_bytes()[..], unit].concat()).0;
                self.env
                    .instantiate_seeded(&self.module, self.limits, HostIo::None, seed)?
            }
            None => self
                .env
                .instantiate(&self.module, self.limits, HostIo::None)?,
        };
        store.data_mut().deadline = Instant::now() + self.limits.time;
        let called = {
            let _running = self.env.running(self.limits.time);
            job.call_process(&mut store, unit)
        };
        match called {
            Ok(Ok(out)) if out.len() > self.limits.output => {
                self.keep(store, job);
                Err(TaskError::OutputTooLarge {
                    size: out.len(),
                    limit: self.limits.output,
                })
            }
            Ok(result) => {
                self.keep(store, job);
                result.map_err(TaskError::Guest)
            }
            // The instance trapped: drop it; the next taskunit gets a fresh one.
            Err(e) => {
                self.stderr_seen = 0;
                self.last_stderr.clear();
                Err(classify(e, &store, self.limits))
            }
        }
    }
}

/// Turns results, as they travel, into the text `--stream` prints: what a
/// module's optional `render` export makes of them (antnest's Python
/// runner has one, since a Python job's results travel pickled for its
/// combine). One instance serves all the results of a job.
pub struct Renderer {
    env: Sandbox,
    module: Module,
    limits: Limits,
    /// Gone after a trap (a trapped instance may not be entered again).
    instance: Option<(Store<GuestState>, Instance)>,
}

impl Renderer {
    /// `None` if the module has no `render` export: its results are
    /// already what is printed.
    pub fn new(env: Sandbox, module: Module, limits: Limits) -> Result<Option<Self>, TaskError> {
        let (mut store, instance) = env.instance(&module, limits, HostIo::None)?;
        if instance.get_func(&mut store, RENDER).is_none() {
            return Ok(None);
        }
        Ok(Some(Renderer {
            env,
            module,
            limits,
            instance: Some((store, instance)),
        }))
    }

    /// One result as text.
    pub fn render(&mut self, result: &[u8]) -> Result<Vec<u8>, TaskError> {
        let (mut store, instance) = match self.instance.take() {
            Some(inst) => inst,
            None => self.env.instance(&self.module, self.limits, HostIo::None)?,
        };
        let func = instance
            .get_typed_func::<(&[u8],), (Result<Vec<u8>, String>,)>(&mut store, RENDER)
            .map_err(|e| TaskError::Load(format!("render: {e:#}")))?;
        store.data_mut().deadline = Instant::now() + self.limits.time;
        let called = {
            let _running = self.env.running(self.limits.time);
            func.call(&mut store, (result,)).map(|(out,)| out)
        };
        match called {
            Ok(out) => {
                self.instance = Some((store, instance));
                out.map_err(TaskError::Guest)
            }
            Err(e) => Err(classify(e, &store, self.limits)),
        }
    }
}

/// The name of the optional export [`Renderer`] calls.
const RENDER: &str = "render";

/// What `split` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitOutcome {
    /// The job emitted this many taskunits itself.
    Emitted(u64),
    /// The job asked for the default split (one taskunit per line).
    Default,
}

/// Run the job's `split` over `input`, handing each taskunit to `emit`
/// (which may block, to keep memory bounded, and fails to stop the split).
/// For [`SplitOutcome::Default`] the caller splits by lines itself.
pub fn run_split(
    env: &Sandbox,
    module: &Module,
    limits: Limits,
    input: SplitInput,
    emit: Box<dyn FnMut(SharedBytes) -> Result<(), String> + Send>,
) -> Result<SplitOutcome, TaskError> {
    let io = HostIo::Split {
        input,
        emit,
        emitted: 0,
    };
    let (mut store, job) = env.instantiate(module, limits, io)?;
    store.data_mut().deadline = Instant::now() + limits.time;
    let result = {
        let _running = env.running(limits.time);
        job.call_split(&mut store)
    };
    let emitted = match &store.data().io {
        HostIo::Split { emitted, .. } => *emitted,
        _ => 0,
    };
    match result {
        Ok(Ok(true)) => Ok(SplitOutcome::Emitted(emitted)),
        Ok(Ok(false)) if emitted == 0 => Ok(SplitOutcome::Default),
        Ok(Ok(false)) => Err(TaskError::Guest(
            "split emitted taskunits and then asked for the default split".into(),
        )),
        Ok(Err(e)) => Err(TaskError::Guest(e)),
        Err(e) => Err(classify(e, &store, limits)),
    }
}

/// Run the job's `combine` over the results (in taskunit order). `None`
/// means the job asked for the default combine.
pub fn run_combine(
    env: &Sandbox,
    module: &Module,
    limits: Limits,
    results: Box<dyn Iterator<Item = Vec<u8>> + Send>,
) -> Result<Option<Vec<u8>>, TaskError> {
    let io = HostIo::Combine {
        results,
        output: Vec::new(),
        limit: limits.combined_output(),
    };
    let (mut store, job) = env.instantiate(module, limits, io)?;
    store.data_mut().deadline = Instant::now() + limits.time;
    let result = {
        let _running = env.running(limits.time);
        job.call_combine(&mut store)
    };
    let output = match &mut store.data_mut().io {
        HostIo::Combine { output, .. } => std::mem::take(output),
        _ => Vec::new(),
    };
    match result {
        Ok(Ok(true)) => Ok(Some(output)),
        Ok(Ok(false)) if output.is_empty() => Ok(None),
        Ok(Ok(false)) => Err(TaskError::Guest(
            "combine wrote output and then asked for the default combine".into(),
        )),
        Ok(Err(e)) => Err(TaskError::Guest(e)),
        Err(e) => Err(classify(e, &store, limits)),
    }
}

/// The default combine: results joined by newlines, in taskunit order.
pub fn default_combine(
    results: impl Iterator<Item = Vec<u8>>,
    limit: usize,
) -> Result<Vec<u8>, TaskError> {
    let mut out = Vec::new();
    for (i, r) in results.enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(&r);
        if out.len() > limit {
            return Err(TaskError::OutputTooLarge {
                size: out.len(),
                limit,
            });
        }
    }
    Ok(out)
}
