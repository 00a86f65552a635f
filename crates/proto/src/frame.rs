//! The one framing of antnest messages: a message is one CBOR value
//! (cbor4ii via serde), alone on a stream of its own (request-response) or,
//! on a long-lived stream and on the control socket, after its length as a
//! u32 little-endian ([`Frames`], [`write_frame`], [`read_frame`]).
//! Encoding writes big taskunits from their own buffers, and decoding
//! makes taskunits slices of the message buffer (see
//! [`crate::msg::SharedBytes`]): a batch is copied once, from the network.

use serde::Serialize;

use crate::limits::{MAX_REQUEST, MAX_RESPONSE};
use crate::msg::{DECODING, Request, Response, TaskUnit};

/// Reads into this much at a time before appending to the message.
const READ_CHUNK: usize = 64 << 10;

/// Read a whole message (the stream ends after it), up to `limit` bytes
/// (more is cut off, and fails to decode), into a buffer that starts at
/// `expect` bytes (the size of the last batch, when a batch is likely), so
/// that it is neither zeroed nor regrown as it fills.
pub async fn read_to_end<T>(io: &mut T, limit: u64, expect: usize) -> std::io::Result<Vec<u8>>
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

/// A message encoded for the wire, as the request-response codec and
/// [`Frames`] send it.
pub enum Encoded<'a> {
    /// In one buffer sized for the message up front.
    Whole(Vec<u8>),
    /// A batch of taskunits not first copied into one message: the
    /// encoder's own bytes are gathered, taskunits of [`GATHER_MIN`] bytes
    /// or more are written from where they are.
    Gathered(Gather<'a>),
}

impl<'a> Encoded<'a> {
    pub fn request(request: &Request) -> std::io::Result<Encoded<'static>> {
        Self::whole(request, request.size_hint())
    }

    pub fn response(response: &'a Response) -> std::io::Result<Encoded<'a>> {
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

    pub async fn write_to<T>(&self, io: &mut T) -> std::io::Result<()>
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

/// Requests and responses on a long-lived stream: each message is its
/// length (u32, little-endian) and then the bytes the request-response codec would send on a
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

/// Write `message` (any serde value: a control-socket message, say) as
/// one frame, as [`Frames`] writes requests.
pub async fn write_frame<T, M>(io: &mut T, message: &M) -> std::io::Result<()>
where
    T: futures::AsyncWrite + Unpin + Send,
    M: Serialize,
{
    Frames::write(io, Encoded::whole(message, 256)?).await
}

/// Read one frame of at most `limit` bytes written by [`write_frame`];
/// `Ok(None)` when the other side closed the stream between frames.
pub async fn read_frame<T, M>(io: &mut T, limit: u64) -> std::io::Result<Option<M>>
where
    T: futures::AsyncRead + Unpin + Send,
    M: serde::de::DeserializeOwned,
{
    match Frames::read_message(io, limit).await? {
        Some(message) => decode(message).map(Some),
        None => Ok(None),
    }
}

/// Taskunits at least this big are written from their own buffers instead
/// of being copied into the encoded message.
const GATHER_MIN: usize = 4096;

/// An encoded message in pieces: the encoder's own bytes (headers, small
/// values) copied into `own`, big taskunits referred to by position.
/// Serde hands each taskunit's bytes to the writer as the very slice the
/// unit holds, in order, so a pointer comparison finds them.
pub struct Gather<'a> {
    units: &'a [TaskUnit],
    /// The next unit to look for.
    next: usize,
    own: Vec<u8>,
    /// Where the own bytes not yet in `pieces` start.
    flushed: usize,
    pieces: Vec<Piece>,
}

pub(crate) enum Piece {
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

/// Decodes one message; its taskunits share `message`'s buffer.
pub fn decode<T: serde::de::DeserializeOwned>(message: Vec<u8>) -> std::io::Result<T> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::lies_within;
    use crate::samples::sample_responses;

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
            // The small taskunit and the message around the units (an
            // `Assigned` carries the job's announcement) are all it copies.
            assert!(gather.own.len() < units[0].data.len() + 400);
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
        let cut = futures::executor::block_on(read_to_end(
            &mut futures::io::Cursor::new(message.clone()),
            (message.len() - 1) as u64,
            0,
        ))
        .unwrap();
        assert_eq!(cut.len(), message.len() - 1);
        assert!(decode::<Response>(cut).is_err());
    }
}
