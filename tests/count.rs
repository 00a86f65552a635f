//! The word count job's counting code (`jobs/wordcount/src/count.rs`), run
//! natively (its SSE2 path) against a plain count, including words that end
//! at the very end of the buffer and a table reused between chunks.

#[path = "../jobs/wordcount/src/count.rs"]
#[allow(dead_code)]
pub mod count;

use std::collections::HashMap;

use proptest::prelude::*;

fn plain(data: &[u8]) -> HashMap<Vec<u8>, u64> {
    let mut m = HashMap::new();
    for w in data
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        *m.entry(w.to_vec()).or_default() += 1;
    }
    m
}

fn counted(c: &count::Counter) -> HashMap<Vec<u8>, u64> {
    let mut m = HashMap::new();
    c.each(|w, n| {
        assert!(m.insert(w.to_vec(), n).is_none(), "word listed twice");
    });
    m
}

/// Bytes drawn mostly from a few letters and whitespace (so words repeat),
/// with vertical tab, NUL and non-ASCII bytes, which are not whitespace.
fn text() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            8 => proptest::sample::select(b"abcdexyz".to_vec()),
            3 => proptest::sample::select(b" \t\n\r\x0c".to_vec()),
            1 => proptest::sample::select(vec![0x0b, 0xc3, 0xa9, b'_', 0]),
        ],
        0..400,
    )
}

proptest! {
    #[test]
    fn counts_match_a_plain_count(chunks in proptest::collection::vec(text(), 1..6)) {
        // One counter reused for every chunk, as the job's `process` does.
        let mut counter = count::Counter::new();
        for chunk in &chunks {
            counter.count(chunk);
            prop_assert_eq!(counted(&counter), plain(chunk));
            counter = counter.drain(|_, _| {});
            prop_assert!(counted(&counter).is_empty());
        }
    }

    #[test]
    fn drain_lists_every_count_and_leaves_the_table_empty(chunks in proptest::collection::vec(text(), 1..6)) {
        // The same, emptying the table with `drain` as the job does.
        let mut counter = count::Counter::new();
        for chunk in &chunks {
            counter.count(chunk);
            let mut drained = HashMap::new();
            counter = counter.drain(|w, n| {
                assert!(drained.insert(w.to_vec(), n).is_none(), "word listed twice");
            });
            prop_assert_eq!(drained, plain(chunk));
            prop_assert!(counted(&counter).is_empty());
        }
    }
}

proptest! {
    #[test]
    fn each_sorted_lists_every_word_once_in_byte_order(
        chunk in text(),
        long in proptest::collection::vec(proptest::collection::vec(b'a'..=b'c', 14..20), 0..8),
    ) {
        // Words around 16 bytes (the table's limit; longer ones live in a
        // map) next to short ones, with NUL bytes: "ab" and "ab\0" differ
        // only in length once zero-filled.
        let mut data = chunk.clone();
        for w in &long {
            data.push(b' ');
            data.extend_from_slice(w);
        }
        let mut counter = count::Counter::new();
        counter.count(&data);
        let mut listed = Vec::new();
        counter.each_sorted(|w, n| listed.push((w.to_vec(), n)));
        let mut expected: Vec<(Vec<u8>, u64)> = plain(&data).into_iter().collect();
        expected.sort();
        prop_assert_eq!(listed, expected);
    }
}

#[test]
fn long_words_and_words_at_the_end_are_counted() {
    // Words of every length from 1 to 40, each ending the buffer once.
    for len in 1..=40 {
        let word: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let mut data = b"x ".repeat(len);
        data.extend_from_slice(&word);
        data.push(b' ');
        data.extend_from_slice(&word);
        let mut counter = count::Counter::new();
        counter.count(&data);
        assert_eq!(counted(&counter), plain(&data), "word length {len}");
    }
}

#[test]
fn a_table_that_grows_keeps_every_word() {
    let data: Vec<u8> = (0..50_000u32)
        .flat_map(|i| format!("w{} ", i % 20_000).into_bytes())
        .collect();
    let mut counter = count::Counter::new();
    counter.count(&data);
    let m = counted(&counter);
    assert_eq!(m.len(), 20_000);
    assert_eq!(m, plain(&data));
}
