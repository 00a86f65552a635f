//! The line splitter: taskunits cut at line ends, from a stream or from
//! bytes in memory (or mapped from a file, then cut without copying).
//!
//! One rule set: a line ends at `\n` or `\r\n` (a lone `\r` is data),
//! and the line end where two taskunits meet belongs to neither.
//! [`each_line`] makes one taskunit per line (the default split), so an
//! empty line is an empty taskunit; [`split_lines`] and
//! [`split_lines_shared`] pack whole lines into taskunits of up to a size
//! (the guest's `host.emit-lines`), keeping the line ends inside a
//! taskunit, and never hand out an empty one.

use std::io::Read;

use antnest_proto::SharedBytes;
use antnest_proto::limits::MAX_TASKUNIT;

use crate::input::SplitInput;

/// Read `input` to its end and hand it to `emit` as taskunits of whole
/// lines, each at most `max` bytes where the lines allow (a longer line is a
/// taskunit of its own). The line end (`\n` or `\r\n`) ending a taskunit is
/// dropped and empty taskunits are skipped. Memory stays around two taskunits; a line longer
/// than [`MAX_TASKUNIT`] is an error.
pub fn split_lines(
    input: &mut dyn Read,
    max: usize,
    emit: &mut dyn FnMut(SharedBytes) -> Result<(), String>,
) -> Result<(), String> {
    let max = max.clamp(1, MAX_TASKUNIT);
    let capacity = max + max / 2;
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut eof = false;
    // Read until `buf` holds more than `want` bytes or the input ends
    // (`read_to_end` reads into spare capacity without zeroing it first).
    let mut fill = |buf: &mut Vec<u8>, want: usize, eof: &mut bool| -> Result<(), String> {
        while !*eof && buf.len() <= want {
            let room = (want + 1 - buf.len()).max(64 << 10);
            buf.reserve(room);
            let n = (&mut *input)
                .take(room as u64)
                .read_to_end(buf)
                .map_err(|e| format!("reading job input: {e}"))?;
            *eof = n < room;
        }
        Ok(())
    };
    loop {
        fill(&mut buf, max, &mut eof)?;
        if buf.is_empty() {
            return Ok(());
        }
        let window = buf.len().min(max + 1);
        let cut = match last_line_end(&buf, max) {
            Some(nl) => nl,
            None if buf.len() <= max => buf.len(), // the end of the input
            None => {
                // A line longer than `max`: it ends at the next newline.
                let mut from = window;
                loop {
                    if let Some(nl) = memchr::memchr(b'\n', &buf[from..]) {
                        break from + nl;
                    }
                    if eof {
                        break buf.len();
                    }
                    if buf.len() > MAX_TASKUNIT {
                        return Err(line_too_long());
                    }
                    from = buf.len();
                    let want = buf.len() * 2;
                    fill(&mut buf, want, &mut eof)?;
                }
            }
        };
        // The taskunit keeps `buf`'s allocation (shrunk in place, no copy);
        // what follows the cut moves to a fresh buffer.
        let mut next = Vec::with_capacity(capacity.max(buf.len() - cut));
        next.extend_from_slice(&buf[(cut + 1).min(buf.len())..]);
        let at_newline = cut < buf.len();
        let mut unit = std::mem::replace(&mut buf, next);
        unit.truncate(cut);
        if at_newline && unit.last() == Some(&b'\r') {
            unit.pop();
        }
        if !unit.is_empty() {
            unit.shrink_to_fit();
            emit(unit.into())?;
        }
    }
}

/// [`split_lines`] over bytes in memory (or mapped from a file) from
/// `*pos` on: the same taskunits, each a slice of `data`, none copied.
pub fn split_lines_shared(
    data: &SharedBytes,
    pos: &mut usize,
    max: usize,
    emit: &mut dyn FnMut(SharedBytes) -> Result<(), String>,
) -> Result<(), String> {
    let max = max.clamp(1, MAX_TASKUNIT);
    while *pos < data.len() {
        let rest = &data[*pos..];
        let window = rest.len().min(max + 1);
        let cut = match last_line_end(rest, max) {
            Some(nl) => nl,
            None if rest.len() <= max => rest.len(),
            // A line longer than `max`: it ends at the next newline.
            None => match memchr::memchr(b'\n', &rest[window..]) {
                Some(nl) => window + nl,
                None => rest.len(),
            },
        };
        if cut > MAX_TASKUNIT {
            return Err(line_too_long());
        }
        let end = if cut < rest.len() && cut > 0 && rest[cut - 1] == b'\r' {
            cut - 1
        } else {
            cut
        };
        let unit = data.slice(*pos..*pos + end);
        *pos = (*pos + cut + 1).min(data.len());
        if !unit.is_empty() {
            emit(unit)?;
        }
    }
    Ok(())
}

/// Where the taskunit at the start of `buf` ends if whole lines of at most
/// `max` bytes fit: at the last newline among the first `max + 1` bytes
/// (the newline itself is not part of the taskunit).
fn last_line_end(buf: &[u8], max: usize) -> Option<usize> {
    memchr::memrchr(b'\n', &buf[..buf.len().min(max + 1)])
}

fn line_too_long() -> String {
    format!("the input has a line longer than the {MAX_TASKUNIT}-byte taskunit limit")
}

/// One taskunit per line of `input`, without its `\n` or `\r\n` (the
/// default split: an empty line is a taskunit too), handed to `emit`.
pub fn each_line(
    input: SplitInput,
    emit: &mut dyn FnMut(SharedBytes) -> Result<(), String>,
) -> Result<(), String> {
    match input {
        SplitInput::Bytes { data, pos } => {
            let mut start = pos;
            while start < data.len() {
                let (end, next) = match memchr::memchr(b'\n', &data[start..]) {
                    Some(nl) if nl > 0 && data[start + nl - 1] == b'\r' => {
                        (start + nl - 1, start + nl + 1)
                    }
                    Some(nl) => (start + nl, start + nl + 1),
                    None => (data.len(), data.len()),
                };
                emit(data.slice(start..end))?;
                start = next;
            }
        }
        SplitInput::Stream(stream) => {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| format!("reading the input: {e}"))?;
                if n == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                emit(line.clone().into())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{split_lines, split_lines_shared};
    use antnest_proto::SharedBytes;
    use proptest::prelude::*;

    /// Hands out the input a few bytes at a time, as a pipe might.
    struct Trickle<'a>(&'a [u8], usize);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn lines(bytes: &[u8]) -> Vec<&[u8]> {
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect()
    }

    proptest! {
        #[test]
        fn split_lines_keeps_every_line_within_the_bound(
            line_lens in proptest::collection::vec(0usize..40, 0..200),
            max in 1usize..64,
            step in 1usize..100,
        ) {
            let mut input = Vec::new();
            for (i, len) in line_lens.iter().enumerate() {
                input.extend((0..*len).map(|k| b'a' + ((i + k) % 26) as u8));
                input.push(b'\n');
            }
            if line_lens.len() % 2 == 1 {
                input.pop(); // sometimes no final newline
            }
            let mut units = Vec::new();
            split_lines(&mut Trickle(&input, step), max, &mut |u| {
                units.push(u);
                Ok(())
            })
            .unwrap();
            let mut got = Vec::new();
            for u in &units {
                prop_assert!(!u.is_empty());
                // Over the bound only when it is one line.
                prop_assert!(u.len() <= max || !u.contains(&b'\n'), "unit {:?}", u);
                got.extend(lines(u));
            }
            prop_assert_eq!(got, lines(&input));
            // Cutting the same bytes in memory gives the same taskunits,
            // each a slice of the input rather than a copy.
            let shared = SharedBytes::from(input.clone());
            let mut sliced = Vec::new();
            split_lines_shared(&shared, &mut 0, max, &mut |u| {
                sliced.push(u);
                Ok(())
            })
            .unwrap();
            prop_assert_eq!(&sliced, &units);
            let within = shared.as_ptr_range();
            for u in &sliced {
                let r = u.as_ptr_range();
                prop_assert!(within.start <= r.start && r.end <= within.end, "not a slice of the input");
            }
        }
    }

    #[test]
    fn split_lines_fills_taskunits_up_to_the_bound() {
        let input = b"aaaa\nbbbb\ncccc\ndddd\n".repeat(3);
        let mut units = Vec::new();
        split_lines(&mut &input[..], 10, &mut |u| {
            units.push(u);
            Ok(())
        })
        .unwrap();
        assert_eq!(units.len(), 6, "{units:?}");
        assert!(
            units
                .iter()
                .all(|u| &u[..] == b"aaaa\nbbbb" || &u[..] == b"cccc\ndddd")
        );
    }

    #[test]
    fn split_lines_stops_when_emit_fails() {
        let input = b"one\ntwo\nthree\n";
        let mut calls = 0;
        let err = split_lines(&mut &input[..], 3, &mut |_| {
            calls += 1;
            Err("job cancelled".into())
        })
        .unwrap_err();
        assert_eq!((calls, err.as_str()), (1, "job cancelled"));
    }

    /// Both splitters end a line at `\n` or `\r\n`, in memory and from a
    /// stream alike.
    #[test]
    fn crlf_ends_a_line_for_every_splitter() {
        let input = b"ab\r\ncd\r\n\r\nef\rg\r\n".to_vec();
        let units = |input: crate::input::SplitInput| {
            let mut units = Vec::new();
            super::each_line(input, &mut |u| {
                units.push(u.to_vec());
                Ok(())
            })
            .unwrap();
            units
        };
        let shared = SharedBytes::from(input.clone());
        let want: Vec<Vec<u8>> = vec![b"ab".to_vec(), b"cd".to_vec(), vec![], b"ef\rg".to_vec()];
        let mapped = crate::input::SplitInput::Bytes {
            data: shared.clone(),
            pos: 0,
        };
        assert_eq!(units(mapped), want);
        let stream =
            crate::input::SplitInput::Stream(Box::new(std::io::Cursor::new(input.clone())));
        assert_eq!(units(stream), want);
        // Packed two lines at most: the line end at each cut is dropped,
        // those inside a taskunit are kept.
        let mut packed = Vec::new();
        split_lines(&mut &input[..], 8, &mut |u| {
            packed.push(u.to_vec());
            Ok(())
        })
        .unwrap();
        // The empty line goes inside the second, with its line end.
        assert_eq!(packed, [b"ab\r\ncd".to_vec(), b"\r\nef\rg".to_vec()]);
        let mut sliced = Vec::new();
        split_lines_shared(&shared, &mut 0, 8, &mut |u| {
            sliced.push(u.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(sliced, packed);
    }
}
