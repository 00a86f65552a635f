//! The OS thread of one worker slot.

use tokio::sync::oneshot;

/// The OS thread that runs one worker slot's wasm calls. Each slot keeps
/// its own long-lived thread (rather than any thread of the blocking pool
/// per batch), so the kernel keeps the slots' threads on their own cores
/// instead of now and then stacking two on one core while another idles.
pub(crate) struct SlotThread {
    pub(crate) jobs: std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
}

impl SlotThread {
    pub(crate) fn spawn(slot: usize) -> Self {
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
    pub(crate) async fn run<R: Send + 'static>(
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
    use super::SlotThread;

    #[tokio::test]
    pub(crate) async fn a_slot_thread_runs_calls_on_one_thread_and_survives_a_panic() {
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
}
