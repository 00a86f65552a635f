//! A job that misbehaves on request, for the sandbox tests.
//!
//! Each taskunit is a command: `loop` spins forever, `bomb` allocates until
//! the memory limit stops it, `grow` uses 48 MiB for a moment (the
//! instance's memory stays that big), `trap` panics, `big` returns 4 MiB, `exit`
//! calls `std::process::exit(3)`, `random`
//! returns a different number each time (for replica mismatches), `nan`
//! returns the bits of 0.0 / 0.0 in hex, `say`
//! writes a line to stderr; anything else is returned upper-cased.

wit_bindgen::generate!({ path: "../../wit", world: "job" });

struct Faulty;

impl Guest for Faulty {
    fn split() -> Result<bool, String> {
        Ok(false)
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        match unit.as_slice() {
            b"loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            b"bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            b"grow" => {
                let v = vec![1u8; 48 << 20];
                std::hint::black_box(&v);
                Ok(b"GREW".to_vec())
            }
            b"nan" => {
                let zero = std::hint::black_box(0.0f64);
                Ok(format!("{:016x}", (zero / zero).to_bits()).into_bytes())
            }
            b"trap" => panic!("the faulty job was asked to trap"),
            b"big" => Ok(vec![b'x'; 4 << 20]),
            b"exit" => std::process::exit(3),
            b"say" => {
                eprintln!("hello from the guest");
                Ok(b"SAID".to_vec())
            }
            b"random" => {
                // RandomState is seeded from WASI's random source.
                use std::hash::{BuildHasher, Hasher};
                let h = std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish();
                Ok(h.to_string().into_bytes())
            }
            other => Ok(other.to_ascii_uppercase()),
        }
    }

    fn combine() -> Result<bool, String> {
        Ok(false)
    }
}

export!(Faulty);
