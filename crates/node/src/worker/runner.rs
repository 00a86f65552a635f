//! What runs a slot's taskunits ([`Runner`]): an instance of the job's
//! wasm component, or, for a Python job on a peer that allows it, a
//! native CPython process (see `antnest_sandbox::native`).

use antnest_proto::{
    ByteBuf, JobId, Limits, ModuleHash, Runtime, TaskError, TaskOutcome, TaskUnit,
};
use antnest_sandbox::{NativePython, NativeRunner, TaskRunner};

use crate::config::NativeConfig;
use crate::state::Peer;
use crate::worker::batch::run_unit;

pub(crate) enum Runner {
    Wasm(TaskRunner),
    Native(NativeRunner),
}

impl Runner {
    /// Process taskunit `index` (its index seeds a deterministic job's
    /// random numbers).
    pub(crate) fn process(&mut self, index: u64, unit: &[u8]) -> Result<Vec<u8>, TaskError> {
        match self {
            Runner::Wasm(r) => r.process_at(index, unit),
            Runner::Native(r) => r.process(unit),
        }
    }

    /// What the last taskunit wrote to stderr (empty if nothing).
    pub(crate) fn take_stderr(&mut self) -> String {
        match self {
            Runner::Wasm(r) => r.take_stderr(),
            Runner::Native(r) => r.take_stderr(),
        }
    }

    /// Run the taskunits `next` hands out, in order, giving each outcome
    /// to `done`. A native process gets several at once (see
    /// `NativeRunner::process_each`); a wasm instance one after another.
    pub(crate) fn run_each<'u>(
        &mut self,
        mut next: impl FnMut() -> Option<&'u TaskUnit>,
        mut done: impl FnMut(TaskOutcome),
    ) {
        match self {
            Runner::Wasm(_) => {
                while let Some(unit) = next() {
                    done(run_unit(self, unit));
                }
            }
            Runner::Native(r) => {
                r.process_each(
                    &mut || next().map(|u| (u.index, &u.data[..])),
                    &mut |index, result, printed| {
                        done(TaskOutcome {
                            index,
                            result: result.map(ByteBuf::from),
                            stderr: Some(printed).filter(|s| !s.is_empty()),
                            native: true,
                        });
                    },
                );
            }
        }
    }

    pub(crate) fn is_native(&self) -> bool {
        matches!(self, Runner::Native(_))
    }
}

impl Peer {
    /// This peer's native Python, if it may run jobs of this peer
    /// (`own`) or of other masters natively: its own whenever it has the
    /// native runtime, other masters' only if it trusts them.
    fn native_allowed(&self, own: bool) -> Option<&NativeConfig> {
        (self.state.config.native_python.as_ref()).filter(|n| own || n.others)
    }

    /// The native Python to run `job`'s taskunits with, if its runtime
    /// allows native and so does this peer ([`Self::native_allowed`]).
    /// Whether the job is a Python job is the module's to say.
    pub(crate) fn native_for(&self, job: JobId) -> Option<NativePython> {
        // No native runtime here: no locks taken, on every batch.
        self.state.config.native_python.as_ref()?;
        let own = (self.state.master.jobs.lock().unwrap())
            .get(&job)
            .map(|m| m.runtime);
        let (runtime, own) = match own {
            Some(runtime) => (runtime, true),
            None => (
                self.state.worker.remotes.lock().unwrap().get(&job)?.runtime,
                false,
            ),
        };
        let native = self
            .native_allowed(own)
            .filter(|_| runtime != Runtime::Wasm)?;
        Some(native.python.clone())
    }

    /// Whether this peer's slots may take `runtime`'s taskunits of a job
    /// of its own (`own`) or of another master: not a native-only job if
    /// they cannot run it natively.
    pub(crate) fn takes_runtime(&self, runtime: Runtime, own: bool) -> bool {
        runtime != Runtime::Native || self.native_allowed(own).is_some()
    }

    /// A runner for `job`'s taskunits of `module`: native if
    /// [`Self::native_for`] says so and the module is a Python job's, else
    /// wasm (compiled here if it is not yet; call it off the async runtime).
    pub(crate) fn runner_for(
        &self,
        job: JobId,
        module: ModuleHash,
        limits: Limits,
    ) -> Result<Runner, String> {
        let env = &self.state.env;
        if let Some(python) = self.native_for(job)
            && let Some(files) = env.job_files(&module)
        {
            return Ok(Runner::Native(NativeRunner::new(python, files, limits)));
        }
        let component = env.component(&module, || None).map_err(|e| e.to_string())?;
        Ok(Runner::Wasm(TaskRunner::new(
            env.clone(),
            component,
            limits,
        )))
    }
}
