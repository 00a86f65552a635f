//! Counting the words of one chunk, fast.
//!
//! Words are runs of bytes other than ASCII whitespace (space, `\t`, `\n`,
//! `\x0c`, `\r`, as `u8::is_ascii_whitespace`). The scan classifies 64 bytes
//! at a time into a whitespace bitmask (wasm SIMD when built with
//! `+simd128`) and walks the word boundaries with `trailing_zeros`, so there
//! is no branch per byte. A word of up to 16 bytes is its own key: two
//! little-endian `u64`s and its length, kept in an open-addressing table, so
//! a lookup is one multiply and two compares and never touches the word's
//! bytes again. Longer words go to an ordinary hash map.

use std::collections::HashMap;

/// Bytes that must follow the data so a 16-byte load at any word start stays
/// inside the buffer.
pub const PAD: usize = 16;

#[derive(Clone, Copy, Default)]
struct Slot {
    a: u64,
    b: u64,
    /// 0 marks an empty slot (words are never empty).
    len: u32,
    count: u32,
}

pub struct Counter<'a> {
    slots: Vec<Slot>,
    used: usize,
    long: HashMap<&'a [u8], u64>,
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
fn low_bytes(n: usize) -> u64 {
    // n in 0..=8
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}

#[inline(always)]
fn hash(a: u64, b: u64, len: usize) -> u64 {
    (a ^ b.rotate_left(23) ^ len as u64)
        .wrapping_mul(K)
        .rotate_left(29)
        .wrapping_mul(K)
}

impl<'a> Counter<'a> {
    pub fn new() -> Self {
        Counter {
            slots: vec![Slot::default(); 1 << 13],
            used: 0,
            long: HashMap::new(),
        }
    }

    #[inline(always)]
    fn add_short(&mut self, a: u64, b: u64, len: usize) {
        let mask = self.slots.len() - 1;
        let mut i = (hash(a, b, len) >> 32) as usize & mask;
        loop {
            let s = &mut self.slots[i];
            if s.len == len as u32 && s.a == a && s.b == b {
                s.count += 1;
                return;
            }
            if s.len == 0 {
                *s = Slot {
                    a,
                    b,
                    len: len as u32,
                    count: 1,
                };
                self.used += 1;
                if self.used * 2 > self.slots.len() {
                    self.grow();
                }
                return;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let bigger = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        let mask = self.slots.len() - 1;
        for s in old.into_iter().filter(|s| s.len != 0) {
            let mut i = (hash(s.a, s.b, s.len as usize) >> 32) as usize & mask;
            while self.slots[i].len != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Counts the words of `data[..len]`; `data` must have `PAD` bytes after
    /// `len` (their value does not matter).
    pub fn count(&mut self, data: &'a [u8], len: usize) {
        assert!(data.len() >= len + PAD);
        let mut start = 0usize; // start of the current word, if in one
        let mut in_word = false;
        let mut base = 0usize;
        while base < len {
            let n = (len - base).min(64);
            let mut ws = whitespace_mask(&data[base..base + n]);
            if n < 64 {
                // Bytes past the end count as whitespace: they end a word.
                ws |= u64::MAX << n;
            }
            // Bit i of `edges` is set where byte i differs in kind from byte i-1.
            let prev = if in_word { 0 } else { 1 };
            let mut edges = ws ^ ((ws << 1) | prev);
            while edges != 0 {
                let p = base + edges.trailing_zeros() as usize;
                edges &= edges - 1;
                if in_word {
                    self.add(data, start, p);
                } else {
                    start = p;
                }
                in_word = !in_word;
            }
            base += 64;
        }
        if in_word {
            self.add(data, start, len);
        }
    }

    #[inline(always)]
    fn add(&mut self, data: &'a [u8], start: usize, end: usize) {
        let len = end - start;
        if len <= 16 {
            let word = &data[start..start + 16];
            let a = u64::from_le_bytes(word[..8].try_into().unwrap());
            let b = u64::from_le_bytes(word[8..].try_into().unwrap());
            let (a, b) = if len <= 8 {
                (a & low_bytes(len), 0)
            } else {
                (a, b & low_bytes(len - 8))
            };
            self.add_short(a, b, len);
        } else {
            *self.long.entry(&data[start..end]).or_insert(0) += 1;
        }
    }

    /// Every word with its count, in no particular order.
    pub fn into_counts(self) -> Vec<(Vec<u8>, u64)> {
        let mut out: Vec<(Vec<u8>, u64)> = self
            .slots
            .iter()
            .filter(|s| s.len != 0)
            .map(|s| {
                let mut w = [0u8; 16];
                w[..8].copy_from_slice(&s.a.to_le_bytes());
                w[8..].copy_from_slice(&s.b.to_le_bytes());
                (w[..s.len as usize].to_vec(), u64::from(s.count))
            })
            .collect();
        out.extend(self.long.into_iter().map(|(w, c)| (w.to_vec(), c)));
        out
    }
}

/// Bit i set when `chunk[i]` is ASCII whitespace (`chunk.len() <= 64`).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn whitespace_mask(chunk: &[u8]) -> u64 {
    use core::arch::wasm32::*;
    if chunk.len() < 64 {
        return whitespace_mask_scalar(chunk);
    }
    let mut m = 0u64;
    for k in 0..4 {
        // SAFETY: chunk has 64 bytes, so 16 bytes at 16*k are in bounds;
        // v128_load has no alignment requirement.
        let v = unsafe { v128_load(chunk.as_ptr().add(16 * k) as *const v128) };
        let space = u8x16_eq(v, u8x16_splat(b' '));
        // 9..=13 except 11 (vertical tab is not ASCII whitespace in Rust).
        let ctl = u8x16_le(u8x16_sub(v, u8x16_splat(9)), u8x16_splat(4));
        let vt = u8x16_eq(v, u8x16_splat(11));
        let ws = v128_or(space, v128_andnot(ctl, vt));
        m |= u64::from(u8x16_bitmask(ws)) << (16 * k);
    }
    m
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
#[inline(always)]
fn whitespace_mask(chunk: &[u8]) -> u64 {
    whitespace_mask_scalar(chunk)
}

#[inline(always)]
fn whitespace_mask_scalar(chunk: &[u8]) -> u64 {
    chunk
        .iter()
        .enumerate()
        .fold(0, |m, (i, b)| m | (u64::from(b.is_ascii_whitespace()) << i))
}
