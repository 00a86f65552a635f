//! The request-response codec: libp2p's cbor codec, byte for byte on the
//! wire (a message is one CBOR value, and the stream ends after it), read
//! and written with fewer copies through [`antnest_proto::frame`].
//! libp2p's reads a message with `read_to_end`, which zeroes its buffer
//! every time it grows it, and decodes every taskunit into a fresh copy;
//! on a remote peer that was as much CPU as decrypting the batch. This
//! one reads into a buffer that starts at the size of the last batch of
//! taskunits when the request was a pull, and decodes taskunits as slices
//! of the message buffer.

use antnest_proto::frame::{Encoded, decode, read_to_end};
use antnest_proto::limits::{MAX_REQUEST, MAX_RESPONSE};
use antnest_proto::{Request, Response};

/// The codec with antnest's size limits. Every inbound request and
/// response is decoded by this.
#[derive(Clone, Default)]
pub struct Codec {
    /// Size of the last batch of taskunits received, shared by all clones
    /// (the behaviour clones the codec for every stream).
    last_batch: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// This clone wrote a pull, so the response it reads is likely a batch.
    pulled: bool,
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<Request>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        decode(read_to_end(io, MAX_REQUEST, 0).await?)
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
        let message = read_to_end(io, MAX_RESPONSE, expect).await?;
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

#[cfg(test)]
mod tests {
    use antnest_proto::msg::PROTOCOL;
    use antnest_proto::samples::{sample_requests, sample_responses};

    use super::*;

    fn codec() -> Codec {
        Codec::default()
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
}
