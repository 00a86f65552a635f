//! CPU-bound job: each input line is an integer `n`; the taskunit counts the
//! primes below `n` by naive trial division (the same algorithm as the
//! benchmark harness's W2), and `combine` prints the sum of all counts.

wit_bindgen::generate!({ path: "../../wit", world: "job" });

use antnest::job::host;

struct Primes;

fn count_primes(n: u64) -> u64 {
    let mut count = 0;
    for k in 2..n {
        let mut d = 2;
        let mut is_prime = true;
        while d * d <= k {
            if k % d == 0 {
                is_prime = false;
                break;
            }
            d += 1;
        }
        if is_prime {
            count += 1;
        }
    }
    count
}

impl Guest for Primes {
    fn split() -> Result<bool, String> {
        Ok(false)
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(&unit).map_err(|e| e.to_string())?;
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|e| format!("not an integer {text:?}: {e}"))?;
        Ok(count_primes(n).to_string().into_bytes())
    }

    fn combine() -> Result<bool, String> {
        let mut sum: u64 = 0;
        while let Some(result) = host::next_result() {
            let text = std::str::from_utf8(&result).map_err(|e| e.to_string())?;
            sum += text
                .parse::<u64>()
                .map_err(|e| format!("bad result {text:?}: {e}"))?;
        }
        host::write_output(sum.to_string().as_bytes());
        Ok(true)
    }
}

export!(Primes);
