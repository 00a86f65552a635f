//! Map-reduce word count.
//!
//! `split` asks the host for taskunits of whole lines, up to 1 MiB each (a
//! longer line is its own taskunit). `process` counts the words of one chunk
//! (split on ASCII whitespace, see `count`) and returns `word\tcount\n`
//! lines; `combine` merges them and writes `word\tcount\n` lines sorted by
//! word (byte order).

wit_bindgen::generate!({ path: "../../wit", world: "job" });

mod count;

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
        // Taskunits of whole lines up to CHUNK bytes, cut natively by the host.
        host::emit_lines(CHUNK as u32);
        Ok(true)
    }

    fn process(mut unit: Vec<u8>) -> Result<Vec<u8>, String> {
        let len = unit.len();
        unit.resize(len + count::PAD, 0);
        let mut counter = count::Counter::new();
        counter.count(&unit, len);
        let mut out = Vec::with_capacity(64 * 1024);
        for (word, n) in counter.into_counts() {
            out.extend_from_slice(&word);
            out.push(b'\t');
            out.extend_from_slice(n.to_string().as_bytes());
            out.push(b'\n');
        }
        Ok(out)
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
