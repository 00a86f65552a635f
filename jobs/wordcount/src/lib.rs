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
const CHUNK: usize = 1 << 20;

struct WordCount;

/// Adds the `word\tcount\n` lines of `bytes[..len]` to `into`; `bytes` has
/// `count::PAD` bytes after `len`.
fn parse_counts(bytes: &[u8], len: usize, into: &mut count::Counter) -> Result<(), String> {
    let mut start = 0;
    while start < len {
        let end = bytes[start..len]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(len, |p| start + p);
        let line = &bytes[start..end];
        if !line.is_empty() {
            let tab = line
                .iter()
                .rposition(|&b| b == b'\t')
                .ok_or("result line without a tab")?;
            let digits = &line[tab + 1..];
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err("result line without a count".into());
            }
            let n = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            into.add_copied(bytes, start, start + tab, n);
        }
        start = end + 1;
    }
    Ok(())
}

/// `word\tcount\n` lines, sorted by word when `sorted`.
fn write_counts(counter: &count::Counter, sorted: bool) -> Vec<u8> {
    let mut words: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut out = Vec::with_capacity(64 * 1024);
    let line = |out: &mut Vec<u8>, word: &[u8], mut n: u64| {
        out.extend_from_slice(word);
        out.push(b'\t');
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[i..]);
        out.push(b'\n');
    };
    if sorted {
        counter.each(|w, n| words.push((w.to_vec(), n)));
        words.sort_unstable();
        for (w, n) in &words {
            line(&mut out, w, *n);
        }
    } else {
        counter.each(|w, n| line(&mut out, w, n));
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
        Ok(write_counts(&counter, false))
    }

    fn combine() -> Result<bool, String> {
        // Each result is merged as it arrives (the host hands them over
        // while the job still runs).
        let mut counter = count::Counter::new();
        while let Some(mut r) = host::next_result() {
            let len = r.len();
            r.resize(len + count::PAD, 0);
            parse_counts(&r, len, &mut counter)?;
        }
        host::write_output(&write_counts(&counter, true));
        Ok(true)
    }
}

export!(WordCount);
