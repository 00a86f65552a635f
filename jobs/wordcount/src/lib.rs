//! Map-reduce word count.
//!
//! `split` streams the input (never holding more than one chunk) and emits
//! taskunits of whole lines, up to about 1 MiB each (a longer line is its own
//! taskunit). `process` counts the words of one chunk (split on ASCII
//! whitespace) and returns `word\tcount\n` lines; `combine` merges them and
//! writes `word\tcount\n` lines sorted by word (byte order).

wit_bindgen::generate!({ path: "../../wit", world: "job" });

use antnest::job::host;
use std::collections::HashMap;

const CHUNK: usize = 1 << 20;

struct WordCount;

fn parse_counts(bytes: &[u8], into: &mut HashMap<Vec<u8>, u64>) -> Result<(), String> {
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let tab = line
            .iter()
            .rposition(|&b| b == b'\t')
            .ok_or("result line without a tab")?;
        let count: u64 = std::str::from_utf8(&line[tab + 1..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("result line without a count")?;
        *into.entry(line[..tab].to_vec()).or_insert(0) += count;
    }
    Ok(())
}

fn write_counts(counts: HashMap<Vec<u8>, u64>) -> Vec<u8> {
    let mut words: Vec<_> = counts.into_iter().collect();
    words.sort_unstable();
    let mut out = Vec::new();
    for (word, count) in words {
        out.extend_from_slice(&word);
        out.push(b'\t');
        out.extend_from_slice(count.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

impl Guest for WordCount {
    fn split() -> Result<bool, String> {
        // `pending` holds whole lines not yet emitted; `partial` the start of
        // a line whose end has not been read yet.
        let mut pending: Vec<u8> = Vec::new();
        let mut partial: Vec<u8> = Vec::new();
        let add_line = |pending: &mut Vec<u8>, line: &[u8]| {
            if !pending.is_empty() && pending.len() + line.len() + 1 > CHUNK {
                host::emit(&std::mem::take(pending));
            }
            if !pending.is_empty() {
                pending.push(b'\n');
            }
            pending.extend_from_slice(line);
        };
        loop {
            let block = host::read_input(CHUNK as u32);
            if block.is_empty() {
                if !partial.is_empty() {
                    add_line(&mut pending, &partial);
                }
                if !pending.is_empty() {
                    host::emit(&pending);
                }
                return Ok(true);
            }
            let mut rest = block.as_slice();
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                if partial.is_empty() {
                    add_line(&mut pending, &rest[..nl]);
                } else {
                    partial.extend_from_slice(&rest[..nl]);
                    add_line(&mut pending, &partial);
                    partial.clear();
                }
                rest = &rest[nl + 1..];
            }
            partial.extend_from_slice(rest);
        }
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
        for word in unit
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
        {
            match counts.get_mut(word) {
                Some(c) => *c += 1,
                None => {
                    counts.insert(word.to_vec(), 1);
                }
            }
        }
        Ok(write_counts(counts))
    }

    fn combine() -> Result<bool, String> {
        let mut counts = HashMap::new();
        while let Some(result) = host::next_result() {
            parse_counts(&result, &mut counts)?;
        }
        host::write_output(&write_counts(counts));
        Ok(true)
    }
}

export!(WordCount);
