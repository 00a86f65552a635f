//! Replication (`--replicate K`): each taskunit runs on K distinct
//! workers, and is accepted when all K results hash the same; a mismatch
//! is counted and the taskunit runs again, up to the attempt limit.

use antnest_proto::{PeerId, TaskError};
use sha2::{Digest, Sha256};

use super::{JobBook, Vote};

impl JobBook {
    /// Whether `worker` already holds a replica of `index` or voted on it.
    pub(super) fn involved(&self, index: u64, worker: PeerId) -> bool {
        (0..self.votes.replicas).any(|r| {
            self.leases
                .get(&(index, r))
                .is_some_and(|l| l.worker == worker)
        }) || self
            .votes
            .votes
            .get(&index)
            .is_some_and(|v| v.iter().any(|v| v.worker == worker))
    }

    /// `worker`'s result for `index` (it held a replica of it), among the
    /// others'.
    pub(super) fn vote(&mut self, worker: PeerId, index: u64, bytes: Vec<u8>) {
        if self.involved(index, worker) {
            return; // a second vote from the same worker does not count
        }
        let votes = self.votes.votes.entry(index).or_default();
        votes.push(Vote {
            worker,
            digest: Sha256::digest(&bytes).into(),
            bytes,
        });
        if votes.len() < self.votes.replicas as usize {
            return;
        }
        let votes = self.votes.votes.remove(&index).unwrap_or_default();
        if votes.iter().all(|v| v.digest == votes[0].digest) {
            let bytes = votes
                .into_iter()
                .next()
                .map(|v| v.bytes)
                .unwrap_or_default();
            self.accept(index, bytes);
            return;
        }
        self.votes.mismatches += 1;
        tracing::warn!(
            index,
            replicas = self.votes.replicas,
            "replica results differ; running the taskunit again"
        );
        let err = TaskError::Mismatch(votes.len());
        if !self.count_attempt(index, err) {
            for r in 0..self.votes.replicas {
                self.leases.remove(&(index, r));
                self.queue.retain(|s| *s != (index, r));
                self.queue.push_back((index, r));
            }
        }
    }
}
