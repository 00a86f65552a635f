//! Where a split reads from: a job's input opened as [`SplitInput`], a
//! regular file mapped (see [`crate::mapped`]), anything else read.

use std::io::Read;

use antnest_proto::SharedBytes;
use antnest_proto::control::InputSpec;

use crate::mapped::{self, Damage};

/// What a split reads: a stream, or bytes already in memory or mapped from
/// a file, which the line split cuts into taskunits without copying them.
pub enum SplitInput {
    Stream(Box<dyn Read + Send>),
    Bytes { data: SharedBytes, pos: usize },
}

impl Read for SplitInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            SplitInput::Stream(r) => r.read(buf),
            SplitInput::Bytes { data, pos } => {
                let n = (&data[*pos..]).read(buf)?;
                *pos += n;
                Ok(n)
            }
        }
    }
}

/// The input for a split. A regular file is mapped, so the line split
/// cuts taskunits out of the page cache without reading them into
/// buffers first (with the [`Damage`] flag that tells whether the file
/// changed meanwhile); anything else (a pipe, or a failed mapping) is read.
pub fn open(input: &InputSpec) -> std::io::Result<(SplitInput, Option<Damage>)> {
    Ok(match input {
        InputSpec::Path(p) => {
            let file = std::fs::File::open(p)?;
            match mapped::map_file(&file) {
                Some((data, damage)) => (SplitInput::Bytes { data, pos: 0 }, Some(damage)),
                None => (
                    SplitInput::Stream(Box::new(std::io::BufReader::new(file))),
                    None,
                ),
            }
        }
        InputSpec::Bytes(b) => (
            SplitInput::Bytes {
                data: b.clone().into_vec().into(),
                pos: 0,
            },
            None,
        ),
    })
}

/// The most one ask of a split for its input gets.
const MAX_BLOCK: usize = 4 << 20;

/// What a split asking for up to `max` bytes of its input gets: what one
/// read gives (at most [`MAX_BLOCK`]), empty at the input's end.
pub(crate) fn read_block(input: &mut impl Read, max: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; (max as usize).min(MAX_BLOCK)];
    let n = loop {
        match input.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            read => break read?,
        }
    };
    buf.truncate(n);
    Ok(buf)
}
