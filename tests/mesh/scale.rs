//! Many peers: a hundred peer processes, each in a network namespace of
//! its own on one bridge, finding each other by mDNS alone.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(600);

#[test]
fn a_hundred_peers_found_by_mdns_alone_all_work_on_a_job_from_any_of_them() {
    alone(|| {
        const N: usize = 100;
        // Taskunits per peer (about 20 ms each): enough that every peer
        // takes some even when slow to start (a debug build, other tests
        // running beside).
        const PER_PEER: u64 = 40;
        let Some(net) = lan(N, "100-peer test") else {
            return;
        };
        let dir = scratch();
        let peers: Vec<PeerProc> = (0..N)
            .map(|i| {
                let mut cmd = antnest_in(&net, i);
                cmd.env("RUST_LOG", "error");
                let args = ["--listen", "/ip4/0.0.0.0/tcp/0", "--slots", "1"];
                PeerProc::start_with(cmd, dir.path(), &format!("p{i}"), &args)
            })
            .collect();
        // A peer in the middle submits, once it has found some others.
        let master = &peers[N / 2 + 7];
        eventually(Duration::from_secs(60), "the master found a peer", || {
            let out = run(
                &["peers", "--control", master.control.to_str().unwrap()],
                b"",
                T,
            );
            text(&out.stdout).contains(" connected")
        });
        // Enough taskunits (tens of ms each) that every peer may take some.
        let (input, want) = primes_input(PER_PEER * N as u64, 200_000);
        let stats = dir.path().join("s.json");
        let out = run_cmd(
            antnest_in(&net, N / 2 + 7).args([
                "submit",
                "--control",
                master.control.to_str().unwrap(),
                artifact("primes").to_str().unwrap(),
                "-q",
                "--stats-json",
                stats.to_str().unwrap(),
            ]),
            input.as_bytes(),
            T,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            want.to_string(),
            "the result of a local run"
        );
        let s = stats_of(&stats);
        let per_peer = s["per_peer"].as_object().unwrap();
        let idle: Vec<usize> = (0..N)
            .filter(|i| {
                per_peer
                    .get(&peers[*i].peer_id)
                    .and_then(|n| n.as_u64())
                    .unwrap_or(0)
                    == 0
            })
            .collect();
        let connections = |i: usize| {
            let out = run(
                &["peers", "--control", peers[i].control.to_str().unwrap()],
                b"",
                T,
            );
            text(&out.stdout).matches(" connected").count()
        };
        assert!(
            idle.is_empty(),
            "peers that did none of the job: {:?} (of {N}, with their connections); per peer: {per_peer:?}",
            idle.iter()
                .map(|i| (*i, connections(*i)))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            per_peer.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
            PER_PEER * N as u64,
            "each taskunit's result counted once"
        );
    });
}
