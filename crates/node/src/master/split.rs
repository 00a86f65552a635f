//! A job's split feeding its book, and the results feeding its combine
//! in taskunit order ([`InOrder`]).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use antnest_proto::control::InputSpec;
use antnest_proto::limits::MAX_TASKUNIT;
use antnest_proto::{Limits, SharedBytes};
use antnest_sandbox::mapped::Damage;
use antnest_sandbox::{
    Module, NativePython, NativeRunner, Sandbox, SplitOutcome, input, lines, run_split,
};
use antnest_sched::SplitSender;

/// How far a job's split has gone through its input.
#[derive(Debug, Default)]
pub(crate) struct InputSplit {
    /// The input's size, if known (a file, or bytes sent with the job).
    pub(crate) size: Option<u64>,
    /// Taskunits made, shared by all forks of a [`UnitSender`].
    pub(crate) units: AtomicU64,
    /// Bytes of taskunits made, each with a line end: the input gone
    /// through by a split that cuts it into lines.
    pub(crate) emitted: AtomicU64,
    /// Bytes a split read from a stream (or a job's split through the
    /// host), for splits that make taskunits of their own.
    pub(crate) read: AtomicU64,
    /// Set for each mapping of the input file the split made.
    pub(crate) damage: Mutex<Vec<Damage>>,
}

impl InputSplit {
    pub(crate) fn of(input: &InputSpec) -> InputSplit {
        InputSplit {
            size: match input {
                InputSpec::Path(p) => std::fs::metadata(p).ok().map(|m| m.len()),
                InputSpec::Bytes(b) => Some(b.len() as u64),
            },
            ..InputSplit::default()
        }
    }

    /// Bytes of the input gone through so far (at most its size).
    pub(crate) fn bytes(&self) -> u64 {
        let gone = self
            .emitted
            .load(Ordering::Relaxed)
            .max(self.read.load(Ordering::Relaxed));
        self.size.map_or(gone, |s| gone.min(s))
    }

    /// `p` with what the split has gone through of the input.
    pub(crate) fn fill(
        &self,
        mut p: antnest_proto::control::Progress,
    ) -> antnest_proto::control::Progress {
        // The bytes first: a taskunit's bytes are counted before the
        // taskunit, so the count read after holds every one of them.
        p.input_bytes = self.bytes();
        p.made = p.made.max(self.units.load(Ordering::Relaxed));
        p.input_size = self.size;
        p
    }
}

/// A stream that counts what is read from it.
struct Counting<R> {
    inner: R,
    read: Arc<InputSplit>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Hands taskunits from the split to the job's book, waking idle worker
/// slots now and then (on the first units, then every 1024).
pub(crate) struct UnitSender<W> {
    pub(crate) tx: SplitSender,
    pub(crate) wake: Arc<W>,
    /// Taskunits and their bytes sent, shared by all forks.
    pub(crate) made: Arc<InputSplit>,
}

impl<W: Fn()> UnitSender<W> {
    pub(crate) fn send(&mut self, unit: SharedBytes) -> Result<(), String> {
        if unit.len() > MAX_TASKUNIT {
            return Err(format!(
                "a taskunit of {} bytes is larger than the {MAX_TASKUNIT}-byte limit",
                unit.len()
            ));
        }
        let len = unit.len() as u64;
        self.tx
            .send(unit)
            .map_err(|_| "job cancelled".to_string())?;
        self.made.emitted.fetch_add(len + 1, Ordering::Relaxed);
        let count = self.made.units.fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() || count.is_multiple_of(1024) {
            (self.wake)();
        }
        Ok(())
    }

    pub(crate) fn fork(&self) -> Self {
        UnitSender {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
            made: self.made.clone(),
        }
    }
}

/// Run the job's split (or the default line split) into `tx`; returns how
/// many taskunits it made. A Python job whose split fails in wasm before
/// it made a taskunit (a package only native CPython has, imported at the
/// job's top) splits again in `native`, this peer's own CPython, if its
/// taskunits may run natively here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn split_job(
    env: &Sandbox,
    module: &Module,
    limits: Limits,
    input: &InputSpec,
    made: &Arc<InputSplit>,
    tx: SplitSender,
    wake: impl Fn() + Send + Sync + 'static,
    native: Option<(NativePython, Arc<[u8]>)>,
) -> Result<u64, String> {
    let mut sender = UnitSender {
        tx,
        wake: Arc::new(wake),
        made: made.clone(),
    };
    let emit = {
        let mut sender = sender.fork();
        Box::new(move |unit: SharedBytes| sender.send(unit))
    };
    let open = || {
        let (input, mapped) =
            input::open(input).map_err(|e| format!("cannot open the input: {e}"))?;
        made.damage.lock().unwrap().extend(mapped);
        Ok::<_, String>(match input {
            input::SplitInput::Stream(r) => input::SplitInput::Stream(Box::new(Counting {
                inner: r,
                read: made.clone(),
            })),
            mapped => mapped,
        })
    };
    let mut outcome = run_split(env, module, limits, open()?, emit);
    if let (Err(_), Some((python, files))) = (&outcome, native)
        && made.units.load(Ordering::Relaxed) == 0
    {
        let mut sender = sender.fork();
        let native = NativeRunner::new(python, files, limits);
        outcome = native.split(open()?, &mut |unit| sender.send(unit));
    }
    match outcome {
        Ok(SplitOutcome::Emitted(_)) => {}
        Ok(SplitOutcome::Default) => lines::each_line(open()?, &mut |unit| sender.send(unit))?,
        Err(e) => return Err(e.to_string()),
    }
    (sender.wake)();
    Ok(made.units.load(Ordering::Relaxed))
}

/// Results from a job's feed, in taskunit order, waiting for each as it is
/// needed. Once the feed ends, indexes that never came (taskunits that
/// failed, with `keep_going`) are skipped.
pub(crate) struct InOrder {
    pub(crate) feed: std::sync::mpsc::Receiver<Vec<(u64, Vec<u8>)>>,
    pub(crate) pending: std::collections::BTreeMap<u64, Vec<u8>>,
    pub(crate) next: u64,
    pub(crate) ended: bool,
}

impl InOrder {
    pub(crate) fn new(feed: std::sync::mpsc::Receiver<Vec<(u64, Vec<u8>)>>) -> Self {
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

#[cfg(test)]
mod tests {
    use super::InOrder;

    #[test]
    pub(crate) fn results_come_in_order_and_missing_ones_are_skipped_at_the_end() {
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
