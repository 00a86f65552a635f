//! Map-reduce word count.
//!
//! `split` asks the host for taskunits of whole lines, up to 1 MiB each (a
//! longer line is its own taskunit). `process` counts the words of one chunk
//! (split on ASCII whitespace, see `count`) and returns compact binary
//! records; `combine` merges them and writes `word\tcount\n` lines sorted by
//! word (byte order).

wit_bindgen::generate!({ path: "../../wit", world: "job" });

mod count;

use antnest::job::host;
const CHUNK: usize = 1 << 20;

struct WordCount;

thread_local! {
    static TABLE: std::cell::Cell<Option<count::Counter<'static>>> = const { std::cell::Cell::new(None) };
}

/// A taskunit's counts travel to `combine` as records of
/// `varint(word length) word varint(count)` (LEB128), which is cheaper to
/// write and to merge than text. Returns them and the emptied counter.
fn write_records(counter: count::Counter) -> (Vec<u8>, count::Counter<'static>) {
    let mut out = Vec::with_capacity(64 * 1024);
    let empty = counter.drain(|w, n| {
        put_varint(&mut out, w.len() as u64);
        out.extend_from_slice(w);
        put_varint(&mut out, n);
    });
    (out, empty)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Most lengths and counts fit in one byte: that case stays inline.
#[inline(always)]
fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
    match bytes.get(*at) {
        Some(&b) if b < 0x80 => {
            *at += 1;
            Ok(u64::from(b))
        }
        _ => get_long_varint(bytes, at),
    }
}

#[inline(never)]
fn get_long_varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at).ok_or("truncated result")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err("malformed result: varint too long".into())
}

/// Adds the records of one result (see `write_records`) to `into`.
fn merge_records(bytes: &[u8], into: &mut count::Counter) -> Result<(), String> {
    let mut at = 0;
    while at < bytes.len() {
        let len = get_varint(bytes, &mut at)?;
        let start = at;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or("truncated result")?;
        at = end;
        let n = get_varint(bytes, &mut at)?;
        into.add_copied(bytes, start, end, n);
    }
    Ok(())
}

/// `word\tcount\n` lines sorted by word (byte order): the job's output.
fn write_sorted(counter: &count::Counter) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 1024);
    counter.each_sorted(|w, n| {
        out.extend_from_slice(w);
        out.push(b'\t');
        put_decimal(&mut out, n);
        out.push(b'\n');
    });
    out
}

fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

impl Guest for WordCount {
    fn split() -> Result<bool, String> {
        // Taskunits of whole lines up to CHUNK bytes, cut natively by the host.
        host::emit_lines(CHUNK as u32);
        Ok(true)
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        // One table serves every taskunit this instance counts.
        let mut counter: count::Counter = TABLE.take().unwrap_or_default();
        counter.count(&unit);
        let (out, empty) = write_records(counter);
        TABLE.set(Some(empty));
        Ok(out)
    }

    fn combine() -> Result<bool, String> {
        // Each result is merged as it arrives (the host hands them over
        // while the job still runs).
        let mut counter = count::Counter::new();
        while let Some(r) = host::next_result() {
            merge_records(&r, &mut counter)?;
        }
        host::write_output(&write_sorted(&counter));
        Ok(true)
    }
}

export!(WordCount);
