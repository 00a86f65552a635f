//! What peers say to each other: job announcements (gossipsub) and the
//! request-response protocol (cbor) for pulling taskunits, returning
//! results and fetching modules. Also the size limits that bound them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::executor::{Limits, TaskError};

/// The request-response protocol name.
pub const PROTOCOL: &str = "/antnest/task/1";
/// The gossipsub topic jobs are announced on.
pub const JOBS_TOPIC: &str = "antnest/jobs/1";
/// Largest request (a batch of results) in bytes.
pub const MAX_REQUEST: u64 = 64 << 20;
/// Largest response (a batch of taskunits, or a module) in bytes.
pub const MAX_RESPONSE: u64 = 128 << 20;
/// A batch of taskunits handed to another peer stops growing at this many
/// bytes (a slot of the master's own peer is not capped). Small enough that
/// a batch of data-heavy taskunits crosses the network in a few
/// milliseconds and its buffers come from the heap instead of fresh
/// mappings (W3, 1 MB taskunits: 16 MiB batches took 176 ms a job, 4 MiB
/// batches 159 ms, with 10% less CPU).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Largest single taskunit.
pub const MAX_TASKUNIT: usize = 16 << 20;
/// Largest module a peer will fetch or accept.
pub const MAX_MODULE: usize = 100 << 20;

/// The request-response codec with antnest's size limits. Every inbound
/// request and response is decoded by this (cbor4ii via serde).
pub fn codec() -> libp2p::request_response::cbor::codec::Codec<Request, Response> {
    libp2p::request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(MAX_REQUEST)
        .set_response_size_maximum(MAX_RESPONSE)
}

/// SHA-256 of a module's bytes: its identity everywhere in the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    pub fn of(bytes: &[u8]) -> Self {
        ModuleHash(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({})", &hex::encode(self.0)[..12])
    }
}

/// A job's id, chosen by its master.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl JobId {
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        JobId(h.finish())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl std::str::FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(JobId)
    }
}

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

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(|b| b.into_vec().into())
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
}

/// Bytes that serialize compactly in CBOR.
pub type ByteBuf = serde_bytes::ByteBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Give me up to `max` taskunits of `job`.
    Pull { job: JobId, max: u32 },
    /// Here are results for `job`; `compute` is the time spent computing them.
    Results {
        job: JobId,
        outcomes: Vec<TaskOutcome>,
        compute: Duration,
    },
    /// Send me the module with this hash.
    FetchModule { hash: ModuleHash },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Taskunits leased to the asker until `lease` runs out.
    Tasks {
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
    /// The request was understood but refused.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug>(v: T) {
        let mut buf = Vec::new();
        ciborium::into_writer(&v, &mut buf).unwrap();
        let back: T = ciborium::from_reader(buf.as_slice()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn messages_roundtrip_through_cbor() {
        roundtrip(Request::Pull {
            job: JobId(7),
            max: 3,
        });
        roundtrip(Request::Results {
            job: JobId(1),
            outcomes: vec![
                TaskOutcome {
                    index: 0,
                    result: Ok(ByteBuf::from(b"ok".to_vec())),
                    stderr: Some("a note".into()),
                },
                TaskOutcome {
                    index: 1,
                    result: Err(TaskError::Timeout(Duration::from_secs(1))),
                    stderr: None,
                },
            ],
            compute: Duration::from_millis(5),
        });
        roundtrip(Response::Tasks {
            units: vec![TaskUnit {
                index: 9,
                data: vec![0, 255].into(),
            }],
            lease: Duration::from_secs(30),
        });
        roundtrip(Announce {
            job: JobId::random(),
            master: vec![1, 2, 3],
            module: ModuleHash::of(b"x"),
            module_size: 1,
            limits: Limits::default(),
        });
    }

    /// Decode `bytes` as an inbound request with the real wire codec.
    fn decode_request(bytes: &[u8]) -> std::io::Result<Request> {
        use libp2p::request_response::Codec as _;
        let protocol = libp2p::StreamProtocol::new(PROTOCOL);
        futures::executor::block_on(
            codec().read_request(&protocol, &mut futures::io::Cursor::new(bytes)),
        )
    }

    fn encode(req: &Request) -> Vec<u8> {
        use libp2p::request_response::Codec as _;
        let protocol = libp2p::StreamProtocol::new(PROTOCOL);
        let mut out = futures::io::Cursor::new(Vec::new());
        futures::executor::block_on(codec().write_request(&protocol, &mut out, req.clone()))
            .unwrap();
        out.into_inner()
    }

    fn sample_requests() -> Vec<Request> {
        vec![
            Request::Pull {
                job: JobId(0xdead_beef),
                max: 64,
            },
            Request::FetchModule {
                hash: ModuleHash::of(b"m"),
            },
            Request::Results {
                job: JobId(3),
                outcomes: vec![TaskOutcome {
                    index: 5,
                    result: Err(TaskError::OutOfMemory(1 << 20)),
                    stderr: None,
                }],
                compute: Duration::from_micros(7),
            },
        ]
    }

    #[test]
    fn wire_codec_roundtrips_requests() {
        for req in sample_requests() {
            assert_eq!(decode_request(&encode(&req)).unwrap(), req);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the decoder; they decode or fail.
        #[test]
        fn garbage_never_panics_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = decode_request(&bytes);
        }

        /// Valid messages with bytes flipped, cut short or extended never
        /// panic the decoder, and an intact prefix never decodes as
        /// something else silently when cut.
        #[test]
        fn mutated_messages_never_panic(
            which in 0usize..3,
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..8),
            cut in proptest::prelude::any::<usize>(),
        ) {
            let req = sample_requests().swap_remove(which);
            let mut bytes = encode(&req);
            for (at, value) in flips {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            let _ = decode_request(&bytes);
            let cut = cut % bytes.len();
            let clean = encode(&req);
            if let Ok(decoded) = decode_request(&clean[..cut]) {
                proptest::prop_assert_eq!(decoded, req);
            }
        }
    }

    #[test]
    fn module_hash_is_sha256_hex() {
        assert_eq!(
            ModuleHash::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn job_id_parses_its_display() {
        let id = JobId::random();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
    }
}
