//! The queue between a job's split and its book ([`split_channel`]),
//! bounded in taskunits and in bytes, so that the split runs ahead of the
//! workers by a bounded amount.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};

use antnest_proto::SharedBytes;

/// The queue between a job's split and its book, bounded in taskunits and in
/// bytes: the split runs ahead of the workers by at most `max_bytes` (a
/// single bigger taskunit still passes), so a big input is never all in
/// memory and the memory of taskunits already run is reused.
pub fn split_channel(max_units: usize, max_bytes: usize) -> (SplitSender, SplitReceiver) {
    let (tx, rx) = std::sync::mpsc::sync_channel(max_units);
    let budget = Arc::new(Budget {
        state: Mutex::new(BudgetState::default()),
        changed: Condvar::new(),
        max: max_bytes,
    });
    (
        SplitSender {
            tx,
            budget: budget.clone(),
        },
        SplitReceiver { rx, budget },
    )
}

struct Budget {
    state: Mutex<BudgetState>,
    changed: Condvar,
    max: usize,
}

#[derive(Default)]
struct BudgetState {
    /// Bytes queued, and taskunits.
    queued: usize,
    units: usize,
    /// The receiver is gone.
    closed: bool,
    /// The split waits for room: only then does taking a taskunit notify
    /// it (a `Condvar` notify is a system call even with nobody waiting,
    /// and the book takes every taskunit).
    waiting: bool,
}

#[derive(Clone)]
pub struct SplitSender {
    tx: SyncSender<SharedBytes>,
    budget: Arc<Budget>,
}

/// The receiving end was dropped (the job ended or was cancelled).
#[derive(Debug)]
pub struct SplitClosed;

impl SplitSender {
    /// Queue a taskunit, blocking while the queue is full.
    pub fn send(&self, unit: impl Into<SharedBytes>) -> Result<(), SplitClosed> {
        let unit = unit.into();
        let len = unit.len();
        {
            let b = &self.budget;
            let mut state = b.state.lock().unwrap();
            while !state.closed && state.queued > 0 && state.queued + len > b.max {
                state.waiting = true;
                state = b.changed.wait(state).unwrap();
            }
            state.waiting = false;
            if state.closed {
                return Err(SplitClosed);
            }
            state.queued += len;
            state.units += 1;
        }
        self.tx.send(unit).map_err(|_| SplitClosed)
    }
}

pub struct SplitReceiver {
    rx: Receiver<SharedBytes>,
    budget: Arc<Budget>,
}

impl SplitReceiver {
    pub(crate) fn try_recv(&self) -> Result<SharedBytes, TryRecvError> {
        let unit = self.rx.try_recv()?;
        let mut state = self.budget.state.lock().unwrap();
        state.queued -= unit.len();
        state.units -= 1;
        if state.waiting {
            self.budget.changed.notify_all();
        }
        Ok(unit)
    }

    /// Taskunits the split has made and the book has not taken yet.
    pub(crate) fn queued_units(&self) -> usize {
        self.budget.state.lock().unwrap().units
    }
}

impl Drop for SplitReceiver {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().unwrap();
        state.closed = true;
        if state.waiting {
            self.budget.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn split_channel_bounds_bytes_and_closes() {
        let (tx, rx) = split_channel(100, 10);
        tx.send(vec![0; 6]).unwrap();
        // A second 6-byte unit would pass the 10-byte bound: it waits until
        // the first is taken.
        let sender = {
            let tx = tx.clone();
            std::thread::spawn(move || tx.send(vec![1; 6]))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!sender.is_finished(), "send should wait for room");
        assert_eq!(&rx.try_recv().unwrap()[..], &[0; 6]);
        sender.join().unwrap().unwrap();
        assert_eq!(&rx.try_recv().unwrap()[..], &[1; 6]);
        // One unit bigger than the bound still passes when the queue is empty.
        tx.send(vec![2; 50]).unwrap();
        // A blocked sender is released with an error when the receiver goes.
        let blocked = std::thread::spawn(move || tx.send(vec![3; 6]));
        std::thread::sleep(Duration::from_millis(50));
        drop(rx);
        assert!(blocked.join().unwrap().is_err());
    }
}
