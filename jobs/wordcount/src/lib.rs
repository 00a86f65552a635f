//! Map-reduce word count.
//!
//! `split` streams the input (holding about two chunks at most) and emits
//! taskunits of whole lines, up to about 1 MiB each (a longer line is its own
//! taskunit). `process` counts the words of one chunk (split on ASCII
//! whitespace) and returns `word\tcount\n` lines; `combine` merges them and
//! writes `word\tcount\n` lines sorted by word (byte order).

wit_bindgen::generate!({ path: "../../wit", world: "job" });

use antnest::job::host;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const CHUNK: usize = 1 << 20;

/// The Fx hash (rustc's): a multiply-rotate per 8 bytes. Words are short
/// and not adversarial here, so this beats SipHash several times over.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.0 =
            (self.0.rotate_left(5) ^ u64::from_le_bytes(tail) ^ rest.len() as u64).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Counts<K> = HashMap<K, u64, BuildHasherDefault<Fx>>;

struct WordCount;

fn parse_counts(bytes: &[u8], into: &mut Counts<Vec<u8>>) -> Result<(), String> {
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let tab = line
            .iter()
            .rposition(|&b| b == b'\t')
            .ok_or("result line without a tab")?;
        let count: u64 = std::str::from_utf8(&line[tab + 1..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("result line without a count")?;
        match into.get_mut(&line[..tab]) {
            Some(c) => *c += count,
            None => {
                into.insert(line[..tab].to_vec(), count);
            }
        }
    }
    Ok(())
}

fn write_counts<K: AsRef<[u8]> + Ord>(counts: Counts<K>) -> Vec<u8> {
    let mut words: Vec<_> = counts.into_iter().collect();
    words.sort_unstable();
    let mut out = Vec::new();
    for (word, count) in words {
        out.extend_from_slice(word.as_ref());
        out.push(b'\t');
        out.extend_from_slice(count.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

impl Guest for WordCount {
    fn split() -> Result<bool, String> {
        // `buf` holds input read but not yet emitted. A taskunit is cut at
        // the last newline within CHUNK bytes (or, for a longer line, at its
        // end), so memory stays around two chunks whatever the input size.
        let mut buf: Vec<u8> = Vec::with_capacity(2 * CHUNK);
        let mut eof = false;
        loop {
            while buf.len() >= CHUNK || (eof && !buf.is_empty()) {
                let cut = match memchr::memrchr(b'\n', &buf[..CHUNK.min(buf.len())]) {
                    Some(nl) => nl,
                    None => match memchr::memchr(b'\n', &buf) {
                        Some(nl) => nl,
                        None if eof => buf.len(),
                        None => break, // a long line: read on
                    },
                };
                if cut > 0 {
                    host::emit(&buf[..cut]);
                }
                buf.drain(..(cut + 1).min(buf.len()));
            }
            if eof {
                return Ok(true);
            }
            let block = host::read_input(CHUNK as u32);
            eof = block.is_empty();
            buf.extend_from_slice(&block);
        }
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        // Keys borrow from the taskunit: no allocation per word.
        let mut counts: Counts<&[u8]> = Counts::default();
        let (mut i, n) = (0, unit.len());
        while i < n {
            while i < n && unit[i].is_ascii_whitespace() {
                i += 1;
            }
            let start = i;
            while i < n && !unit[i].is_ascii_whitespace() {
                i += 1;
            }
            if i > start {
                *counts.entry(&unit[start..i]).or_insert(0) += 1;
            }
        }
        Ok(write_counts(counts))
    }

    fn combine() -> Result<bool, String> {
        let mut counts = Counts::default();
        while let Some(result) = host::next_result() {
            parse_counts(&result, &mut counts)?;
        }
        host::write_output(&write_counts(counts));
        Ok(true)
    }
}

export!(WordCount);
