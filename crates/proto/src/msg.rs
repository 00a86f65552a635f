//! What peers say to each other: job announcements (gossipsub), and the
//! requests and responses for pulling taskunits, returning results and
//! fetching modules (one CBOR value each; see [`crate::frame`]).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, ModuleHash};
use crate::limits::{Limits, TaskError};

/// The request-response protocol name.
pub const PROTOCOL: &str = "/antnest/task/1";
/// The same requests and responses on one long-lived stream per worker
/// slot and master, each message framed by its length (see [`Frames`]).
pub const STREAM_PROTOCOL: &str = "/antnest/task-stream/1";
/// The gossipsub topic jobs are announced on.
pub const JOBS_TOPIC: &str = "antnest/jobs/1";

/// Gossiped by a master while its job has taskunits left. Small by design
/// (gossipsub messages are capped at 64 KiB): it says where to ask, not what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub job: JobId,
    /// The master's peer id, as bytes.
    pub master: Vec<u8>,
    pub module: ModuleHash,
    pub module_size: u64,
    pub limits: Limits,
    #[serde(default)]
    pub runtime: Runtime,
    /// The job's share of a worker's slots against other jobs'
    /// (`antnest submit --weight`): slot time goes to jobs in proportion.
    #[serde(default = "one")]
    pub weight: u32,
    /// Where the master listens (multiaddrs as bytes, at most
    /// [`MAX_ANNOUNCED_ADDRS`] taken): a worker the announcement reached
    /// through the gossip mesh, with no connection to the master, dials it
    /// there to pull.
    #[serde(default)]
    pub addrs: Vec<ByteBuf>,
    /// For a module that is code with job files appended (a Python job:
    /// antnest's runner and the job's files), the hash of the code: a
    /// worker that has that code asks only for the files
    /// (`FetchJobFiles`), not for the whole module again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ModuleHash>,
}

/// A master's addresses a worker takes from an announcement at most.
pub const MAX_ANNOUNCED_ADDRS: usize = 8;

fn one() -> u32 {
    1
}

/// Where a Python job's taskunits may run on a worker. Other jobs run in
/// wasm whatever this says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runtime {
    /// In the wasm runner, on every worker.
    Wasm,
    /// In the worker's own CPython, only on workers that allow it
    /// (`antnest peer --allow-native-python`).
    Native,
    /// Natively where a worker allows it, in wasm elsewhere.
    #[default]
    Auto,
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wasm" => Ok(Runtime::Wasm),
            "native" => Ok(Runtime::Native),
            "auto" => Ok(Runtime::Auto),
            _ => Err(format!("unknown runtime {s:?} (use wasm, native or auto)")),
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runtime::Wasm => "wasm",
            Runtime::Native => "native",
            Runtime::Auto => "auto",
        })
    }
}

thread_local! {
    /// The message being decoded on this thread, so that taskunits can be
    /// slices of it (see `SharedBytes`'s `Deserialize`).
    pub(crate) static DECODING: std::cell::RefCell<Option<bytes::Bytes>> = const { std::cell::RefCell::new(None) };
}

/// Whether `part` lies in the memory of `whole` (a buffer's pointer range).
pub(crate) fn lies_within(whole: std::ops::Range<*const u8>, part: &[u8]) -> bool {
    let part = part.as_ptr_range();
    whole.start <= part.start && part.end <= whole.end
}

/// One taskunit handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskUnit {
    pub index: u64,
    pub data: SharedBytes,
}

/// Bytes shared instead of copied: the master holds each taskunit once, and
/// every lease (local slot, batch for a remote peer, backup) points at it.
/// A taskunit cut from a mapped input file is a slice of the mapping. On the
/// wire it is a plain CBOR byte string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedBytes(pub bytes::Bytes);

impl SharedBytes {
    /// Bytes owned by `owner` (a file mapping, say), without copying them.
    pub fn from_owner(owner: impl AsRef<[u8]> + Send + 'static) -> Self {
        SharedBytes(bytes::Bytes::from_owner(owner))
    }

    /// `self[range]`, sharing the same bytes.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        SharedBytes(self.0.slice(range))
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> Self {
        SharedBytes(v.into())
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

/// A byte string borrowed from the message being decoded by [`crate::frame::decode`]
/// becomes a slice of that message's buffer instead of a copy; from
/// anywhere else it is copied.
impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = SharedBytes;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<SharedBytes, E> {
                let shared = DECODING.with(|d| {
                    let d = d.borrow();
                    let message = d.as_ref()?;
                    lies_within(message.as_ptr_range(), v).then(|| message.slice_ref(v))
                });
                Ok(SharedBytes(
                    shared.unwrap_or_else(|| bytes::Bytes::copy_from_slice(v)),
                ))
            }

            fn visit_bytes<E>(self, v: &[u8]) -> Result<SharedBytes, E> {
                Ok(SharedBytes(bytes::Bytes::copy_from_slice(v)))
            }

            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<SharedBytes, E> {
                Ok(v.into())
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<SharedBytes, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element()? {
                    v.push(b);
                }
                Ok(v.into())
            }
        }
        d.deserialize_bytes(Visit)
    }
}

/// One taskunit's outcome, sent back to the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub index: u64,
    pub result: Result<ByteBuf, TaskError>,
    /// What the taskunit wrote to stderr, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Run by native CPython rather than in wasm (see [`Runtime`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub native: bool,
}

/// Bytes that serialize compactly in CBOR.
pub type ByteBuf = serde_bytes::ByteBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Give me up to `max` taskunits of `job`.
    Pull { job: JobId, max: u32 },
    /// Here are results for `job`; `compute` is the time spent computing
    /// them. With `pull` above 0, also lease me up to `pull` more taskunits
    /// of the job, as a `Pull` would: one round trip instead of two.
    Results {
        job: JobId,
        outcomes: Vec<TaskOutcome>,
        compute: Duration,
        #[serde(default)]
        pull: u32,
    },
    /// Send me the module with this hash.
    FetchModule { hash: ModuleHash },
    /// Send me the job files of the module with this hash (the bytes after
    /// its code, see [`Announce::code`]): I have the code. Answered
    /// `JobFiles`.
    FetchJobFiles { hash: ModuleHash },
    /// Lease me a batch of any of your jobs as soon as one has taskunits
    /// (a long poll, on a task stream only): up to `sizes`' count for a
    /// module listed there (none for a count of 0: a module the asker
    /// cannot get now), one of any other. Answered `Assigned`, or
    /// `NoWork` after a while or as soon as anything else comes on the
    /// stream (see `EndWait`).
    Wait { sizes: Vec<(ModuleHash, u32)> },
    /// Stop waiting: the open `Wait` is answered first, then this, `Ack`.
    EndWait,
    /// From a job's master, whose own slots have run out of its taskunits,
    /// to a worker holding some: give back those you have not started and
    /// would finish later than I would (I take `pace` per taskunit).
    /// Answered `Released`.
    Reclaim { job: JobId, pace: Duration },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Taskunits leased to the asker until `lease` runs out.
    Tasks {
        units: Vec<TaskUnit>,
        lease: Duration,
    },
    /// The answer to a `Wait`: taskunits of the job `job` describes,
    /// leased to the asker until `lease` runs out.
    Assigned {
        job: Announce,
        units: Vec<TaskUnit>,
        lease: Duration,
    },
    /// Nothing to hand out now; `finished` means never again.
    NoWork {
        finished: bool,
    },
    /// Results taken.
    Ack,
    Module(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The answer to a `FetchJobFiles`: the bytes that follow the module's
    /// code.
    JobFiles(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The request was understood but refused.
    Refused(String),
    /// The answer to a `Reclaim`: these taskunits (by index) will not be
    /// run here; their leases are the master's again.
    Released {
        units: Vec<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug>(v: T) {
        let buf = cbor4ii::serde::to_vec(Vec::new(), &v).unwrap();
        let back: T = cbor4ii::serde::from_slice(&buf).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn messages_roundtrip_through_cbor() {
        roundtrip(Request::Pull {
            job: JobId(7),
            max: 3,
        });
        roundtrip(Request::Reclaim {
            job: JobId(7),
            pace: Duration::from_micros(2300),
        });
        roundtrip(Response::Released {
            units: vec![62, 63],
        });
        roundtrip(Request::Results {
            job: JobId(1),
            outcomes: vec![
                TaskOutcome {
                    index: 0,
                    result: Ok(ByteBuf::from(b"ok".to_vec())),
                    stderr: Some("a note".into()),
                    native: true,
                },
                TaskOutcome {
                    index: 1,
                    result: Err(TaskError::Timeout(Duration::from_secs(1))),
                    stderr: None,
                    native: false,
                },
            ],
            compute: Duration::from_millis(5),
            pull: 0,
        });
        roundtrip(Response::Tasks {
            units: vec![TaskUnit {
                index: 9,
                data: vec![0, 255].into(),
            }],
            lease: Duration::from_secs(30),
        });
        let announce = Announce {
            job: JobId::random(),
            master: vec![1, 2, 3],
            module: ModuleHash::of(b"x"),
            module_size: 1,
            limits: Limits::default(),
            runtime: Runtime::Native,
            weight: 1,
            addrs: Vec::new(),
            code: Some(ModuleHash::of(b"c")),
        };
        roundtrip(announce.clone());
        roundtrip(Request::Wait {
            sizes: vec![(ModuleHash::of(b"x"), 12)],
        });
        roundtrip(Request::EndWait);
        roundtrip(Response::Assigned {
            job: announce,
            units: vec![TaskUnit {
                index: 4,
                data: vec![7; 3].into(),
            }],
            lease: Duration::from_secs(30),
        });
    }
}
