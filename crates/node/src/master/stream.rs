//! Results sent to a submitter watching them come (`antnest submit
//! --stream`), as the text it prints. A module with a `render` export
//! (antnest's Python runner: a Python job's results travel pickled, for its
//! combine) has each result rendered on a thread of its own, in the order
//! the results were accepted; other modules' results go as they are.

use antnest_proto::Limits;
use antnest_proto::control::JobEvent;
use antnest_sandbox::{Module, Renderer, Sandbox};
use tokio::sync::mpsc;

/// Batches of accepted results waiting to be rendered: a bound on what a
/// slow renderer holds back (the job's loop waits when it is reached).
const WAITING_BATCHES: usize = 16;

pub(crate) enum Streamer {
    Raw(mpsc::Sender<JobEvent>),
    Rendered {
        batches: mpsc::Sender<Vec<(u64, Vec<u8>)>>,
        thread: tokio::task::JoinHandle<()>,
    },
}

impl Streamer {
    pub(crate) async fn start(
        env: Sandbox,
        module: Module,
        limits: Limits,
        events: mpsc::Sender<JobEvent>,
    ) -> Streamer {
        let renderer =
            tokio::task::spawn_blocking(move || Renderer::new(env, module, limits)).await;
        let mut renderer = match renderer {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Streamer::Raw(events),
            Ok(Err(e)) => {
                tracing::warn!("streamed results go unrendered: {e}");
                return Streamer::Raw(events);
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let (batches, mut rx) = mpsc::channel::<Vec<(u64, Vec<u8>)>>(WAITING_BATCHES);
        let thread = tokio::task::spawn_blocking(move || {
            while let Some(batch) = rx.blocking_recv() {
                for (index, bytes) in batch {
                    let event = match renderer.render(&bytes) {
                        Ok(text) => JobEvent::Result { index, bytes: text },
                        Err(e) => JobEvent::Log {
                            index,
                            text: format!("its result cannot be printed: {e}"),
                        },
                    };
                    if events.blocking_send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Streamer::Rendered { batches, thread }
    }

    /// Send these results on (copies: the job's combine takes them too).
    pub(crate) async fn send(&self, accepted: &[(u64, Vec<u8>)]) {
        if accepted.is_empty() {
            return;
        }
        match self {
            Streamer::Raw(events) => {
                for (index, bytes) in accepted {
                    let (index, bytes) = (*index, bytes.clone());
                    let _ = events.send(JobEvent::Result { index, bytes }).await;
                }
            }
            Streamer::Rendered { batches, .. } => {
                let _ = batches.send(accepted.to_vec()).await;
            }
        }
    }

    /// Once every result was sent: wait until all are rendered and on
    /// their way, so that the job's report comes after them.
    pub(crate) async fn finish(self) {
        if let Streamer::Rendered { batches, thread } = self {
            drop(batches);
            let _ = thread.await;
        }
    }
}
