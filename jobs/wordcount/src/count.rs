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

use std::borrow::Cow;
use std::collections::HashMap;

#[derive(Clone, Copy, Default)]
struct Slot {
    a: u64,
    b: u64,
    /// The count shifted left by [`LEN_BITS`], below it the word's length;
    /// 0 marks an empty slot (words are never empty). 24 bytes a slot
    /// instead of 32 keeps more of the table in cache.
    tally: u64,
}

const LEN_BITS: u32 = 5;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;

pub struct Counter<'a> {
    slots: Vec<Slot>,
    used: usize,
    long: HashMap<Cow<'a, [u8]>, u64>,
}

impl Slot {
    #[inline(always)]
    fn len(&self) -> usize {
        (self.tally & LEN_MASK) as usize
    }

    #[inline(always)]
    fn holds(&self, a: u64, b: u64, len: usize) -> bool {
        (self.len() == len) & (self.a == a) & (self.b == b)
    }

    /// Hands the slot's word (rebuilt from its two `u64`s) and count to `f`.
    #[inline(always)]
    fn visit(&self, f: &mut impl FnMut(&[u8], u64)) {
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&self.a.to_le_bytes());
        w[8..].copy_from_slice(&self.b.to_le_bytes());
        f(&w[..self.len()], self.tally >> LEN_BITS);
    }
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// `MASKS[n]` keeps the low `n` bytes of a `u64`.
const MASKS: [u64; 9] = {
    let mut m = [0u64; 9];
    let mut n = 1;
    while n < 9 {
        m[n] = u64::MAX >> (64 - 8 * n);
        n += 1;
    }
    m
};

#[inline(always)]
fn hash(a: u64, b: u64, len: usize) -> u64 {
    (a ^ b.rotate_left(23) ^ len as u64).wrapping_mul(K)
}

impl Default for Counter<'_> {
    fn default() -> Self {
        Self::new()
    }
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
    fn first_slot(&self, a: u64, b: u64, len: usize) -> usize {
        (hash(a, b, len) >> 32) as usize & (self.slots.len() - 1)
    }

    /// The first probe is outside any loop: most words are found there,
    /// and a wasm loop costs an epoch check each time it is entered.
    #[inline(always)]
    fn add_short(&mut self, a: u64, b: u64, len: usize, n: u64) {
        let i = self.first_slot(a, b, len);
        let s = &mut self.slots[i];
        if s.holds(a, b, len) {
            s.tally += n << LEN_BITS;
            return;
        }
        self.add_short_probe(i, a, b, len, n);
    }

    /// The rest of a lookup: a new word, or one past a collision.
    #[inline(never)]
    fn add_short_probe(&mut self, mut i: usize, a: u64, b: u64, len: usize, n: u64) {
        let mask = self.slots.len() - 1;
        loop {
            let s = &mut self.slots[i];
            if s.holds(a, b, len) {
                s.tally += n << LEN_BITS;
                return;
            }
            if s.tally == 0 {
                *s = Slot {
                    a,
                    b,
                    tally: n << LEN_BITS | len as u64,
                };
                self.used += 1;
                // At most a quarter full, so a lookup rarely probes twice.
                if self.used * 4 > self.slots.len() {
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
        for s in old.into_iter().filter(|s| s.tally != 0) {
            let mut i = self.first_slot(s.a, s.b, s.len());
            while self.slots[i].tally != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Counts the words of `data`.
    pub fn count(&mut self, data: &'a [u8]) {
        let len = data.len();
        // Per 64-byte block: `starts` marks the first byte of each word,
        // `ends` the first whitespace byte after each word. A word that runs
        // past the block is `pending` until the next block's first end.
        let mut pending: Option<usize> = None;
        let mut prev_word = 0u64; // 1 if the byte before the block is in a word
        let mut base = 0usize;
        while base < len {
            let n = (len - base).min(64);
            let mut ws = whitespace_mask(&data[base..base + n]);
            if n < 64 {
                // Bytes past the end count as whitespace: they end a word.
                ws |= u64::MAX << n;
            }
            let word = !ws;
            let shifted = (word << 1) | prev_word;
            let mut starts = word & !shifted;
            let mut ends = ws & shifted;
            prev_word = word >> 63;
            if let Some(start) = pending {
                if ends == 0 {
                    base += 64;
                    continue;
                }
                self.add(data, start, base + ends.trailing_zeros() as usize, 1);
                ends &= ends - 1;
                pending = None;
            }
            // Every end has its start in this block; a start left over
            // begins a word that runs on. Two words per turn: a wasm loop
            // costs an epoch check per turn.
            while ends != 0 {
                let (s, e) = next_word(&mut starts, &mut ends, base);
                self.add(data, s, e, 1);
                if ends == 0 {
                    break;
                }
                let (s, e) = next_word(&mut starts, &mut ends, base);
                self.add(data, s, e, 1);
            }
            if starts != 0 {
                pending = Some(base + starts.trailing_zeros() as usize);
            }
            base += 64;
        }
        if let Some(start) = pending {
            self.add(data, start, len, 1);
        }
    }

    /// Adds `n` to the count of the word `data[start..end]`.
    #[inline(always)]
    pub fn add(&mut self, data: &'a [u8], start: usize, end: usize, n: u64) {
        if !self.add_if_short(data, start, end, n) {
            self.add_long(&data[start..end], n);
        }
    }

    /// Words over 16 bytes are rare: kept out of line so the hot loop
    /// stays small (fewer spills in wasm).
    #[cold]
    #[inline(never)]
    fn add_long(&mut self, word: &'a [u8], n: u64) {
        *self.long.entry(Cow::Borrowed(word)).or_insert(0) += n;
    }

    /// The same, copying the word if it is kept (so `data` may go away).
    pub fn add_copied(&mut self, data: &[u8], start: usize, end: usize, n: u64) {
        if !self.add_if_short(data, start, end, n) {
            let word = &data[start..end];
            match self.long.get_mut(word) {
                Some(c) => *c += n,
                None => {
                    self.long.insert(Cow::Owned(word.to_vec()), n);
                }
            }
        }
    }

    #[inline(always)]
    fn add_if_short(&mut self, data: &[u8], start: usize, end: usize, n: u64) -> bool {
        let len = end - start;
        if len > 16 {
            return false;
        }
        // Load 16 bytes from the word's start (near the end of `data`, from
        // a zero-filled copy).
        let (a, b) = match data.get(start..start + 16) {
            Some(w) => (
                u64::from_le_bytes(w[..8].try_into().unwrap()),
                u64::from_le_bytes(w[8..].try_into().unwrap()),
            ),
            None => load_tail(&data[start..end]),
        };
        // Keep the word's bytes only, without branching on its length.
        let a = a & MASKS[len.min(8)];
        let b = b & MASKS[len.saturating_sub(8)];
        self.add_short(a, b, len, n);
        true
    }

    /// Calls `f` with every word and its count, and forgets them all but
    /// keeps the table's memory, so the next chunk does not allocate, zero
    /// and grow a table again. Each used slot is cleared as it is read; the
    /// rest of the table is clear already and is not written at all. The
    /// result borrows nothing.
    pub fn drain<'b>(mut self, mut f: impl FnMut(&[u8], u64)) -> Counter<'b> {
        for s in self.slots.iter_mut().filter(|s| s.tally != 0) {
            s.visit(&mut f);
            *s = Slot::default();
        }
        for (w, c) in &self.long {
            f(w.as_ref(), *c);
        }
        Counter {
            slots: self.slots,
            used: 0,
            long: HashMap::new(),
        }
    }

    /// Calls `f` with every word and its count, sorted by word (byte
    /// order). A short word sorts by its 16 bytes read as a big-endian
    /// number and then by length (zero-filled, a word that is a prefix of
    /// another comes first), so sorting compares integers and never
    /// touches the words' bytes.
    pub fn each_sorted(&self, mut f: impl FnMut(&[u8], u64)) {
        let mut short: Vec<(u128, usize, u64)> = self
            .slots
            .iter()
            .filter(|s| s.tally != 0)
            .map(|s| {
                let key = u128::from(s.a.swap_bytes()) << 64 | u128::from(s.b.swap_bytes());
                (key, s.len(), s.tally >> LEN_BITS)
            })
            .collect();
        short.sort_unstable_by_key(|&(key, len, _)| (key, len));
        let mut long: Vec<(&[u8], u64)> = self.long.iter().map(|(w, c)| (w.as_ref(), *c)).collect();
        long.sort_unstable();
        let mut long = long.into_iter().peekable();
        for (key, len, count) in short {
            let bytes = key.to_be_bytes();
            let word = &bytes[..len];
            while let Some((w, c)) = long.next_if(|(w, _)| *w < word) {
                f(w, c);
            }
            f(word, count);
        }
        for (w, c) in long {
            f(w, c);
        }
    }

    /// Calls `f` with every word and its count, in no particular order.
    #[allow(dead_code)] // tests/count.rs checks the table through it
    pub fn each(&self, mut f: impl FnMut(&[u8], u64)) {
        for s in self.slots.iter().filter(|s| s.tally != 0) {
            s.visit(&mut f);
        }
        for (w, c) in &self.long {
            f(w.as_ref(), *c);
        }
    }
}

/// Takes the lowest start and end bits: the next word of a block at
/// `base`, as `(start, end)` offsets into the chunk.
#[inline(always)]
fn next_word(starts: &mut u64, ends: &mut u64, base: usize) -> (usize, usize) {
    let s = base + starts.trailing_zeros() as usize;
    let e = base + ends.trailing_zeros() as usize;
    *starts &= *starts - 1;
    *ends &= *ends - 1;
    (s, e)
}

/// The first 16 bytes of `word` (at most 16 long) as two little-endian
/// `u64`s, zero-filled.
#[cold]
#[inline(never)]
fn load_tail(word: &[u8]) -> (u64, u64) {
    let mut w = [0u8; 16];
    w[..word.len()].copy_from_slice(word);
    (
        u64::from_le_bytes(w[..8].try_into().unwrap()),
        u64::from_le_bytes(w[8..].try_into().unwrap()),
    )
}

/// Bit i set when `chunk[i]` is ASCII whitespace (`chunk.len() <= 64`).
#[inline(always)]
fn whitespace_mask(chunk: &[u8]) -> u64 {
    if chunk.len() < 64 {
        return whitespace_mask_scalar(chunk);
    }
    let mut m = 0u64;
    for k in 0..4 {
        m |= u64::from(whitespace16(chunk, 16 * k)) << (16 * k);
    }
    m
}

/// The whitespace bits of `chunk[at..at + 16]` (in bounds: `chunk` has 64
/// bytes and `at` is at most 48), with wasm SIMD.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn whitespace16(chunk: &[u8], at: usize) -> u16 {
    use core::arch::wasm32::*;
    debug_assert!(at + 16 <= chunk.len());
    // SAFETY: 16 bytes at `at` are in bounds (see above); v128_load has no
    // alignment requirement.
    let v = unsafe { v128_load(chunk.as_ptr().add(at) as *const v128) };
    let space = u8x16_eq(v, u8x16_splat(b' '));
    // 9..=13 except 11 (vertical tab is not ASCII whitespace in Rust).
    let ctl = u8x16_le(u8x16_sub(v, u8x16_splat(9)), u8x16_splat(4));
    let vt = u8x16_eq(v, u8x16_splat(11));
    u8x16_bitmask(v128_or(space, v128_andnot(ctl, vt)))
}

/// The same with SSE2 (always there on x86-64), for running this file
/// natively (`examples/mesh_bench.rs` compares against it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn whitespace16(chunk: &[u8], at: usize) -> u16 {
    use std::arch::x86_64::*;
    debug_assert!(at + 16 <= chunk.len());
    // SAFETY: SSE2 is part of x86-64; 16 bytes at `at` are in bounds;
    // unaligned load.
    unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().add(at) as *const __m128i);
        let space = _mm_cmpeq_epi8(v, _mm_set1_epi8(b' ' as i8));
        // 9..=13 except 11: (v - 9) as unsigned <= 4, via min.
        let d = _mm_sub_epi8(v, _mm_set1_epi8(9));
        let ctl = _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(4)), d);
        let vt = _mm_cmpeq_epi8(v, _mm_set1_epi8(11));
        _mm_movemask_epi8(_mm_or_si128(space, _mm_andnot_si128(vt, ctl))) as u16
    }
}

#[cfg(not(any(
    all(target_arch = "wasm32", target_feature = "simd128"),
    target_arch = "x86_64"
)))]
#[inline(always)]
fn whitespace16(chunk: &[u8], at: usize) -> u16 {
    whitespace_mask_scalar(&chunk[at..at + 16]) as u16
}

#[inline(always)]
fn whitespace_mask_scalar(chunk: &[u8]) -> u64 {
    chunk
        .iter()
        .enumerate()
        .fold(0, |m, (i, b)| m | (u64::from(b.is_ascii_whitespace()) << i))
}
