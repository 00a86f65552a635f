//! The original antnest's first job: reverse every line of the input.
//!
//! Only `process` does anything; `split` and `combine` ask for the defaults
//! (one taskunit per line, results joined by newlines).
//!
//! Build: `cargo build --release --target wasm32-wasip2 -p reverse_strings`.
//! Run:   `printf 'hello\nworld\n' | antnest submit jobs/reverse_strings`.

wit_bindgen::generate!({ path: "../../wit", world: "job" });

struct ReverseStrings;

impl Guest for ReverseStrings {
    fn split() -> Result<bool, String> {
        Ok(false)
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(unit).map_err(|e| format!("taskunit is not UTF-8: {e}"))?;
        Ok(text.chars().rev().collect::<String>().into_bytes())
    }

    fn combine() -> Result<bool, String> {
        Ok(false)
    }
}

export!(ReverseStrings);
