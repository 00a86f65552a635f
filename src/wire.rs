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
/// The same requests and responses on one long-lived stream per worker
/// slot and master, each message framed by its length (see [`Frames`]).
pub const STREAM_PROTOCOL: &str = "/antnest/task-stream/1";
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
/// request and response is decoded by this.
pub fn codec() -> Codec {
    Codec::default()
}

/// libp2p's cbor codec, byte for byte on the wire (a message is one CBOR
/// value, cbor4ii via serde, and the stream ends after it), read and
/// written with fewer copies. libp2p's reads a message with `read_to_end`,
/// which zeroes its buffer every time it grows it, and decodes every
/// taskunit into a fresh copy; on a remote peer that was as much CPU as
/// decrypting the batch. This one:
///
/// - reads through a small scratch buffer into one that starts at the size
///   of the last batch of taskunits when the request was a pull, so it is
///   neither zeroed nor regrown;
/// - decodes taskunits as slices of the message buffer (see
///   [`SharedBytes`]);
/// - encodes into a buffer sized for the message up front.
#[derive(Clone, Default)]
pub struct Codec {
    /// Size of the last batch of taskunits received, shared by all clones
    /// (the behaviour clones the codec for every stream).
    last_batch: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// This clone wrote a pull, so the response it reads is likely a batch.
    pulled: bool,
}

/// Reads into this much at a time before appending to the message.
const READ_CHUNK: usize = 64 << 10;

impl Codec {
    async fn read_message<T>(io: &mut T, limit: u64, expect: usize) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use futures::AsyncReadExt as _;
        let mut io = io.take(limit);
        let mut message = Vec::with_capacity(expect.min(limit as usize));
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            match io.read(&mut chunk).await? {
                0 => return Ok(message),
                n => message.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// A message encoded for the wire, as [`Codec`] and [`Frames`] send it.
enum Encoded<'a> {
    /// In one buffer sized for the message up front.
    Whole(Vec<u8>),
    /// A batch of taskunits not first copied into one message: the
    /// encoder's own bytes are gathered, taskunits of [`GATHER_MIN`] bytes
    /// or more are written from where they are.
    Gathered(Gather<'a>),
}

impl<'a> Encoded<'a> {
    fn request(request: &Request) -> std::io::Result<Encoded<'static>> {
        Self::whole(request, request.size_hint())
    }

    fn response(response: &'a Response) -> std::io::Result<Encoded<'a>> {
        let (Response::Tasks { units, .. } | Response::Assigned { units, .. }) = response else {
            return Self::whole(response, response.size_hint());
        };
        let mut gather = Gather::new(units);
        cbor4ii::serde::to_writer(&mut gather, response).map_err(std::io::Error::other)?;
        gather.finish();
        Ok(Encoded::Gathered(gather))
    }

    fn whole(message: &impl Serialize, size: usize) -> std::io::Result<Encoded<'static>> {
        cbor4ii::serde::to_vec(Vec::with_capacity(size), message)
            .map(Encoded::Whole)
            .map_err(std::io::Error::other)
    }

    fn len(&self) -> usize {
        match self {
            Encoded::Whole(bytes) => bytes.len(),
            Encoded::Gathered(gather) => gather.pieces().map(<[u8]>::len).sum(),
        }
    }

    async fn write_to<T>(&self, io: &mut T) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt as _;
        match self {
            Encoded::Whole(bytes) => io.write_all(bytes).await,
            Encoded::Gathered(gather) => {
                for piece in gather.pieces() {
                    io.write_all(piece).await?;
                }
                Ok(())
            }
        }
    }
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<Request>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        decode(Self::read_message(io, MAX_REQUEST, 0).await?)
    }

    async fn read_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> std::io::Result<Response>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let expect = if self.pulled {
            self.last_batch.load(Relaxed)
        } else {
            0
        };
        let message = Self::read_message(io, MAX_RESPONSE, expect).await?;
        let len = message.len();
        let response = decode(message)?;
        if let Response::Tasks { .. } = &response {
            self.last_batch.store(len, Relaxed);
        }
        Ok(response)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        request: Request,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        self.pulled = matches!(
            request,
            Request::Pull { .. } | Request::Results { pull: 1.., .. }
        );
        Encoded::request(&request)?.write_to(io).await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        response: Response,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Encoded::response(&response)?.write_to(io).await
    }
}

/// Requests and responses on a long-lived stream: each message is its
/// length (u32, little-endian) and then the bytes [`Codec`] would send on a
/// stream of its own. A stream carries one exchange at a time: a request,
/// then its response. Compared with a stream per request, this saves
/// opening, negotiating and closing a stream (three TCP segments where one
/// does) and libp2p-request-response's timer per request.
pub struct Frames;

impl Frames {
    pub async fn write_request<T>(io: &mut T, request: &Request) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Self::write(io, Encoded::request(request)?).await
    }

    pub async fn write_response<T>(io: &mut T, response: &Response) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Self::write(io, Encoded::response(response)?).await
    }

    async fn write<T>(io: &mut T, message: Encoded<'_>) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt as _;
        let len = u32::try_from(message.len())
            .map_err(|_| std::io::Error::other("message over 4 GiB"))?;
        io.write_all(&len.to_le_bytes()).await?;
        message.write_to(io).await?;
        io.flush().await
    }

    /// The next request; `Ok(None)` when the other side closed the stream
    /// between messages.
    pub async fn read_request<T>(io: &mut T) -> std::io::Result<Option<Request>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        match Self::read_message(io, MAX_REQUEST).await? {
            Some(message) => decode(message).map(Some),
            None => Ok(None),
        }
    }

    pub async fn read_response<T>(io: &mut T) -> std::io::Result<Response>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        match Self::read_message(io, MAX_RESPONSE).await? {
            Some(message) => decode(message),
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }

    async fn read_message<T>(io: &mut T, limit: u64) -> std::io::Result<Option<Vec<u8>>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use futures::AsyncReadExt as _;
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < len.len() {
            match io.read(&mut len[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        let len = u64::from(u32::from_le_bytes(len));
        if len > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("message of {len} bytes, over the {limit}-byte limit"),
            ));
        }
        // Read in pieces as it arrives, so a length that lies costs no
        // more memory than the bytes that really come.
        let mut message = Vec::with_capacity((len as usize).min(READ_CHUNK));
        io.take(len).read_to_end(&mut message).await?;
        if message.len() as u64 != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Some(message))
    }
}

/// Taskunits at least this big are written from their own buffers instead
/// of being copied into the encoded message.
const GATHER_MIN: usize = 4096;

/// An encoded message in pieces: the encoder's own bytes (headers, small
/// values) copied into `own`, big taskunits referred to by position.
/// Serde hands each taskunit's bytes to the writer as the very slice the
/// unit holds, in order, so a pointer comparison finds them.
struct Gather<'a> {
    units: &'a [TaskUnit],
    /// The next unit to look for.
    next: usize,
    own: Vec<u8>,
    /// Where the own bytes not yet in `pieces` start.
    flushed: usize,
    pieces: Vec<Piece>,
}

enum Piece {
    /// `own[range]`.
    Own(std::ops::Range<usize>),
    Unit(usize),
}

impl<'a> Gather<'a> {
    fn new(units: &'a [TaskUnit]) -> Self {
        // Headers, and the small units that are copied.
        let own: usize = units
            .iter()
            .map(|u| {
                16 + if u.data.len() < GATHER_MIN {
                    u.data.len()
                } else {
                    0
                }
            })
            .sum();
        Gather {
            units,
            next: 0,
            own: Vec::with_capacity(256 + own),
            flushed: 0,
            pieces: Vec::new(),
        }
    }

    /// Ends the last piece of own bytes.
    fn finish(&mut self) {
        if self.own.len() > self.flushed {
            self.pieces.push(Piece::Own(self.flushed..self.own.len()));
            self.flushed = self.own.len();
        }
    }

    fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|p| match p {
            Piece::Own(range) => &self.own[range.clone()],
            Piece::Unit(i) => self.units[*i].data.as_ref(),
        })
    }
}

impl std::io::Write for Gather<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Units come in order, so only the next one can match. Whether it
        // does or not, the bytes written are the same.
        let unit = self
            .units
            .get(self.next)
            .is_some_and(|u| std::ptr::eq(u.data.as_ref(), buf));
        if unit {
            self.next += 1;
        }
        if unit && buf.len() >= GATHER_MIN {
            self.finish();
            self.pieces.push(Piece::Unit(self.next - 1));
        } else {
            self.own.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Request {
    /// About how many bytes the message takes encoded (a little more).
    fn size_hint(&self) -> usize {
        let payload = match self {
            Request::Results { outcomes, .. } => outcomes
                .iter()
                .map(|o| o.result.as_ref().map_or(64, |r| r.len() + 32))
                .sum(),
            _ => 0,
        };
        payload + 128
    }
}

impl Response {
    /// About how many bytes the message takes encoded (a little more).
    fn size_hint(&self) -> usize {
        let payload = match self {
            Response::Tasks { units, .. } | Response::Assigned { units, .. } => {
                units.iter().map(|u| u.data.len() + 16).sum()
            }
            Response::Module(bytes) => bytes.len(),
            _ => 0,
        };
        payload + 128
    }
}

thread_local! {
    /// The message being decoded on this thread, so that taskunits can be
    /// slices of it (see `SharedBytes`'s `Deserialize`).
    static DECODING: std::cell::RefCell<Option<bytes::Bytes>> = const { std::cell::RefCell::new(None) };
}

/// Whether `part` lies in the memory of `whole` (a buffer's pointer range).
fn lies_within(whole: std::ops::Range<*const u8>, part: &[u8]) -> bool {
    let part = part.as_ptr_range();
    whole.start <= part.start && part.end <= whole.end
}

/// Decodes one message; its taskunits share `message`'s buffer.
fn decode<T: serde::de::DeserializeOwned>(message: Vec<u8>) -> std::io::Result<T> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            DECODING.with(|d| d.borrow_mut().take());
        }
    }
    let message = bytes::Bytes::from(message);
    DECODING.with(|d| *d.borrow_mut() = Some(message.clone()));
    let _reset = Reset;
    cbor4ii::serde::from_slice(&message).map_err(|e| {
        use cbor4ii::core::error::DecodeError as Core;
        use cbor4ii::serde::DecodeError;
        let kind = match &e {
            DecodeError::Core(Core::Eof { .. }) => std::io::ErrorKind::UnexpectedEof,
            DecodeError::Core(Core::Unsupported { .. }) => std::io::ErrorKind::Unsupported,
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e.to_string())
    })
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

/// A byte string borrowed from the message being decoded by [`Codec`]
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
    /// Lease me a batch of any of your jobs as soon as one has taskunits
    /// (a long poll, on a task stream only): up to `sizes`' count for a
    /// module listed there, one of any other. Answered `Assigned`, or
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
                },
                TaskOutcome {
                    index: 1,
                    result: Err(TaskError::Timeout(Duration::from_secs(1))),
                    stderr: None,
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
            Request::Wait {
                sizes: vec![(ModuleHash::of(b"m"), 3)],
            },
            Request::EndWait,
            Request::Results {
                job: JobId(3),
                outcomes: vec![TaskOutcome {
                    index: 5,
                    result: Err(TaskError::OutOfMemory(1 << 20)),
                    stderr: None,
                }],
                compute: Duration::from_micros(7),
                pull: 9,
            },
        ]
    }

    fn sample_responses() -> Vec<Response> {
        let units: Vec<TaskUnit> = (0..3)
            .map(|i| TaskUnit {
                index: i,
                // Below and above GATHER_MIN: copied and gathered.
                data: vec![i as u8; [1000, 9000, 5000][i as usize]].into(),
            })
            .collect();
        vec![
            Response::Tasks {
                units: units.clone(),
                lease: Duration::from_secs(30),
            },
            Response::Assigned {
                job: Announce {
                    job: JobId(5),
                    master: vec![9; 38],
                    module: ModuleHash::of(b"m"),
                    module_size: 4,
                    limits: Limits::default(),
                },
                units,
                lease: Duration::from_secs(30),
            },
            Response::NoWork { finished: true },
            Response::Ack,
            Response::Module(vec![0, 97, 115, 109]),
            Response::Refused("no".into()),
        ]
    }

    /// Our codec and libp2p's cbor codec put the same bytes on the wire and
    /// read each other's messages.
    #[test]
    fn codec_speaks_libp2p_cbor() {
        use futures::executor::block_on;
        use libp2p::request_response::Codec as _;
        let protocol = libp2p::StreamProtocol::new(PROTOCOL);
        let mut theirs =
            libp2p::request_response::cbor::codec::Codec::<Request, Response>::default()
                .set_request_size_maximum(MAX_REQUEST)
                .set_response_size_maximum(MAX_RESPONSE);
        for req in sample_requests() {
            let mut a = futures::io::Cursor::new(Vec::new());
            block_on(theirs.write_request(&protocol, &mut a, req.clone())).unwrap();
            let mut b = futures::io::Cursor::new(Vec::new());
            block_on(codec().write_request(&protocol, &mut b, req.clone())).unwrap();
            assert_eq!(a.get_ref(), b.get_ref());
            let mut read = futures::io::Cursor::new(a.into_inner());
            assert_eq!(
                block_on(codec().read_request(&protocol, &mut read)).unwrap(),
                req
            );
        }
        for resp in sample_responses() {
            let mut a = futures::io::Cursor::new(Vec::new());
            block_on(theirs.write_response(&protocol, &mut a, resp.clone())).unwrap();
            let mut b = futures::io::Cursor::new(Vec::new());
            block_on(codec().write_response(&protocol, &mut b, resp.clone())).unwrap();
            assert_eq!(a.get_ref(), b.get_ref());
            let mut read = futures::io::Cursor::new(b.into_inner());
            assert_eq!(
                block_on(theirs.read_response(&protocol, &mut read)).unwrap(),
                resp
            );
            let mut read = futures::io::Cursor::new(a.into_inner());
            assert_eq!(
                block_on(codec().read_response(&protocol, &mut read)).unwrap(),
                resp
            );
        }
    }

    /// A batch is written with its big taskunits straight from their own
    /// buffers: only the small one is copied among the encoder's bytes.
    #[test]
    fn big_taskunits_are_written_without_a_copy() {
        for response in &sample_responses()[..2] {
            let (Response::Tasks { units, .. } | Response::Assigned { units, .. }) = response
            else {
                unreachable!()
            };
            let mut gather = Gather::new(units);
            cbor4ii::serde::to_writer(&mut gather, response).unwrap();
            gather.finish();
            let gathered: Vec<usize> = gather
                .pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Unit(i) => Some(*i),
                    Piece::Own(_) => None,
                })
                .collect();
            assert_eq!(gathered, [1, 2]);
            assert!(gather.own.len() < units[0].data.len() + 300);
            assert_eq!(
                gather.pieces().collect::<Vec<_>>().concat(),
                cbor4ii::serde::to_vec(Vec::new(), response).unwrap()
            );
        }
    }

    /// Decoded taskunits are slices of the message, not copies; byte
    /// strings decoded from anything else are still copied.
    #[test]
    fn decoded_taskunits_share_the_message_buffer() {
        let Response::Tasks { units, .. } = &sample_responses()[0] else {
            unreachable!()
        };
        let message = cbor4ii::serde::to_vec(Vec::new(), &sample_responses()[0]).unwrap();
        let within = message.as_ptr_range();
        let Response::Tasks { units: decoded, .. } = decode::<Response>(message).unwrap() else {
            panic!("not a batch")
        };
        assert_eq!(&decoded, units);
        for u in &decoded {
            assert!(
                lies_within(within.clone(), &u.data),
                "unit {} was copied",
                u.index
            );
        }
        let elsewhere: Response = cbor4ii::serde::from_slice(
            &cbor4ii::serde::to_vec(Vec::new(), &sample_responses()[0]).unwrap(),
        )
        .unwrap();
        assert_eq!(&elsewhere, &sample_responses()[0]);
        DECODING.with(|d| assert!(d.borrow().is_none(), "decode left its message behind"));
    }

    /// A response cut short by the size limit is an error, not a panic or
    /// a silently shorter batch.
    #[test]
    fn a_response_over_the_limit_fails_to_decode() {
        let message = cbor4ii::serde::to_vec(Vec::new(), &sample_responses()[0]).unwrap();
        let cut = futures::executor::block_on(Codec::read_message(
            &mut futures::io::Cursor::new(message.clone()),
            (message.len() - 1) as u64,
            0,
        ))
        .unwrap();
        assert_eq!(cut.len(), message.len() - 1);
        assert!(decode::<Response>(cut).is_err());
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
