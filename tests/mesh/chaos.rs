//! Chaos: a 10,000-taskunit job on 4 peer processes while the workers are
//! killed and restarted at random. The result must equal the
//! single-machine result.

use std::time::{Duration, Instant};

use crate::common::*;

/// A small xorshift generator; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[test]
fn killing_and_restarting_workers_at_random_loses_nothing() {
    let seed = std::env::var("ANTNEST_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos seed: {seed} (replay with ANTNEST_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = scratch();
    let args: Vec<&str> = LOOPBACK_PEER
        .iter()
        .copied()
        .chain(["--lease", "5s"])
        .collect();
    let master = PeerProc::start(dir.path(), "master", &args);
    let worker_args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--bootstrap", master.addr()])
        .collect();
    let mut workers: Vec<Option<PeerProc>> = (0..3)
        .map(|i| Some(PeerProc::start(dir.path(), &format!("w{i}"), &worker_args)))
        .collect();

    let ns: Vec<u64> = (0..10_000).map(|i| 30_000 + (i % 5_000)).collect();
    let input: String = ns.iter().map(|n| format!("{n}\n")).collect();
    let want: u64 = count_primes_below(&ns).iter().sum();
    let stats = dir.path().join("s.json");
    let mut job = master.spawn_submit(
        &artifact("primes"),
        &["-q", "--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut kills = 0;
    let mut restarts = 0;
    while job.running() {
        assert!(Instant::now() < deadline, "chaos job did not finish");
        std::thread::sleep(Duration::from_millis(150 + rng.next(350)));
        let i = rng.next(3) as usize;
        match workers[i].take() {
            Some(mut w) => {
                w.kill();
                kills += 1;
            }
            None => {
                workers[i] = Some(PeerProc::start(
                    dir.path(),
                    &format!("w{i}-{restarts}"),
                    &worker_args,
                ));
                restarts += 1;
            }
        }
    }
    let out = job.finish(Duration::from_secs(60));
    eprintln!("chaos: {kills} kills, {restarts} restarts");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        kills >= 2,
        "the job ended before any real chaos; make it longer"
    );
    assert_eq!(
        text(&out.stdout),
        want.to_string(),
        "same result as one machine"
    );
    let s = stats_of(&stats);
    assert_eq!(s["tasks"], 10_000);
    assert_eq!(s["failed"], 0);
}
