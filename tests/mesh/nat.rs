//! Peers behind NAT: two peers each behind its own router (iptables
//! MASQUERADE in a namespace), a relay peer on the "public" side between
//! the routers. A job submitted behind one NAT runs on the peer behind the
//! other: first through the relay, then directly after hole punching.

use std::process::Command;
use std::time::Duration;

use crate::bridge::sh;
use crate::common::*;

const T: Duration = Duration::from_secs(300);

/// The namespaces: `wan` holds the public bridge; `relay` on it at .1
/// (10.79.0.1 in the first test); routers `nat1` and `nat2` on it at .11
/// and .12, each masquerading its LAN (192.168.1.0/24, 192.168.2.0/24 in
/// the first test) where peers `a` and `b` sit at .2. As home routers do, a router drops what comes to it
/// from outside unasked (a Linux router would otherwise answer a SYN with
/// a reset, and no hole could be punched through it).
struct Nat {
    names: Vec<String>,
    /// The public side's prefix (e.g. `10.79.0`).
    wan_net: String,
}

impl Nat {
    /// The namespaces for test `what`, with the public side at
    /// `wan_net`.0/24 and the LANs at `lan_net`.1.0/24 and `lan_net`.2.0/24
    /// (prefixes of dotted quads); `None`, said, where they cannot be made
    /// here (no iptables, not root).
    fn for_test(what: &str, wan_net: &str, lan_net: &str) -> Option<Nat> {
        if Command::new("iptables").arg("--version").output().is_err() {
            skipped(what, "iptables is not installed");
            return None;
        }
        match Self::create(wan_net, lan_net) {
            None => {
                skipped(what, "`ip netns add` is not permitted here (needs root)");
                None
            }
            Some(nat) => Some(nat.expect("namespaces made but not set up")),
        }
    }

    fn create(wan_net: &str, lan_net: &str) -> Option<Result<Nat, String>> {
        // Two of these may exist at once in one test process.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = (std::process::id() % 10_000) * 10 + made % 10;
        let name = |n: &str| format!("nt{tag}{n}");
        if sh(&format!("ip netns add {}", name("wan"))).is_err() {
            return None;
        }
        let mut nat = Nat {
            names: vec![name("wan")],
            wan_net: wan_net.to_string(),
        };
        let made = (|| {
            for n in ["relay", "nat1", "nat2", "a", "b"] {
                sh(&format!("ip netns add {}", name(n)))?;
                nat.names.push(name(n));
            }
            let wan = name("wan");
            sh(&format!(
                "ip -n {wan} link add br0 type bridge && ip -n {wan} link set br0 up"
            ))?;
            for (n, host) in [("relay", 1), ("nat1", 11), ("nat2", 12)] {
                let ip = format!("{wan_net}.{host}");
                let ns = name(n);
                sh(&format!(
                    "ip link add w{tag}{n} netns {wan} type veth peer name wan netns {ns} \
                     && ip -n {wan} link set w{tag}{n} master br0 up \
                     && ip -n {ns} addr add {ip}/24 dev wan && ip -n {ns} link set wan up \
                     && ip -n {ns} link set lo up"
                ))?;
            }
            for (i, host) in [(1, "a"), (2, "b")] {
                let (router, ns) = (name(&format!("nat{i}")), name(host));
                sh(&format!(
                    "ip link add lan netns {router} type veth peer name eth0 netns {ns} \
                     && ip -n {router} addr add {lan_net}.{i}.1/24 dev lan && ip -n {router} link set lan up \
                     && ip -n {ns} addr add {lan_net}.{i}.2/24 dev eth0 && ip -n {ns} link set eth0 up \
                     && ip -n {ns} link set lo up && ip -n {ns} route add default via {lan_net}.{i}.1 \
                     && ip netns exec {router} sysctl -qw net.ipv4.ip_forward=1 \
                     && ip netns exec {router} iptables -t nat -A POSTROUTING -o wan -j MASQUERADE \
                     && ip netns exec {router} iptables -A INPUT -i wan -m conntrack --ctstate NEW,INVALID -j DROP"
                ))?;
            }
            Ok::<(), String>(())
        })();
        Some(made.map(|()| nat))
    }

    /// A relay peer (`common` flags and `--relay`) on the public side,
    /// and its public TCP address.
    fn relay(&self, dir: &std::path::Path, common: &[&str]) -> (PeerProc, String) {
        let args: Vec<&str> = common.iter().copied().chain(["--relay"]).collect();
        let relay = PeerProc::start_with(self.cmd("relay"), dir, "relay", &args);
        let public = format!("/ip4/{}.1/tcp/", self.wan_net);
        let addr = relay
            .addrs
            .iter()
            .find(|a| a.starts_with(&public))
            .unwrap_or_else(|| panic!("the relay's public address in {:?}", relay.addrs))
            .clone();
        (relay, addr)
    }

    fn cmd(&self, host: &str) -> Command {
        let ns = self.names.iter().find(|n| n.ends_with(host)).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_antnest")]);
        cmd.env("ANTNEST_CACHE", cache_dir())
            .env("RUST_LOG", "warn,antnest_node::net=info,libp2p_dcutr=debug");
        cmd
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn a_job_crosses_two_nats_through_a_relay_then_directly_after_hole_punching() {
    let Some(nat) = Nat::for_test("NAT test", "10.79.0", "192.168") else {
        return;
    };
    let dir = scratch();
    let common = [
        "--no-mdns",
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--slots",
        "1",
    ];
    let (relay, relay_addr) = nat.relay(dir.path(), &common);
    // a is told of the relay; b only meets it (its bootstrap peer), sees
    // that it listens on no global address, and reserves on it too.
    let told: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--bootstrap", &relay_addr, "--relay-via", &relay_addr])
        .collect();
    let behind: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--bootstrap", &relay_addr])
        .collect();
    let a = PeerProc::start_with(nat.cmd("a"), dir.path(), "a", &told);
    // A job from a, long enough for b to join through the relay and then
    // to punch a hole. A punch can fail (three tries at once, all lost to
    // timing on a busy machine): then b starts afresh, up to three times;
    // every job must give the right result either way.
    let mut tries = Vec::new();
    let b = loop {
        let name = format!("b{}", tries.len());
        let b = PeerProc::start_with(nat.cmd("b"), dir.path(), &name, &behind);
        let (input, want) = primes_input(600, 200_000);
        let stats = dir.path().join(format!("{name}.json"));
        let args = ["-q", "--stats-json", stats.to_str().unwrap()];
        let out = a.submit(&artifact("primes"), &args, input.as_bytes());
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            want.to_string(),
            "the result of a local run"
        );
        let s = stats_of(&stats);
        let did = s["per_peer"]
            .get(&b.peer_id)
            .and_then(|n| n.as_u64())
            .unwrap_or(0);
        let via = s["reached"]
            .get(&b.peer_id)
            .and_then(|v| v.as_str())
            .map(str::to_string);
        if did > 0 && via.as_deref() == Some("relay, then direct") {
            break b;
        }
        tries.push((did, via, s["reached"].clone()));
        assert!(
            tries.len() < 3,
            "b never worked reached through the relay and then directly; (taskunits, how reached, all reached) per try: {tries:?}"
        );
    };
    let out = run(&["peers", "--control", a.control.to_str().unwrap()], b"", T);
    let listed = text(&out.stdout);
    let line = listed
        .lines()
        .find(|l| l.starts_with(&b.peer_id))
        .unwrap_or_default();
    assert!(line.contains("(relay, then direct)"), "{listed}");

    // Then the relay vanishes mid-job, and nat2 drops the hole-punched
    // connection: the job ends with the same result, nothing lost.
    let (input, want) = primes_input(1500, 200_400);
    let stats = dir.path().join("s2.json");
    let mut job = a.spawn_submit(
        &artifact("primes"),
        &["-q", "--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    std::thread::sleep(Duration::from_secs(2));
    drop(relay);
    std::thread::sleep(Duration::from_secs(1));
    sh(&format!(
        "ip netns exec {} iptables -I FORWARD 1 -j DROP",
        nat.names.iter().find(|n| n.ends_with("nat2")).unwrap()
    ))
    .unwrap();
    assert!(
        job.running(),
        "the job ended before the relay went away; make it longer"
    );
    let out = job.finish(T);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        want.to_string(),
        "the result of a local run"
    );
    let s = stats_of(&stats);
    assert_eq!(s["tasks"], 1500);
    assert_eq!(s["failed"], 0);
    assert_eq!(
        s["per_peer"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum::<u64>(),
        1500,
        "each result counted once: {s}"
    );
}

/// Behind NATs whose LANs have global-looking addresses (as a peer with a
/// public address behind a firewall sees itself), only AutoNAT can tell a
/// peer that others cannot reach it: b, which only bootstraps off the
/// relay, reserves on it once AutoNAT finds it private, and the relay
/// then lists b at its circuit address. (The namespaces have no route
/// off this machine: no packet leaves them.)
#[test]
fn a_peer_autonat_finds_private_reserves_on_a_relay_it_met() {
    let Some(nat) = Nat::for_test("AutoNAT test", "11.79.0", "11.1") else {
        return;
    };
    let dir = scratch();
    let common = ["--no-mdns", "--listen", "/ip4/0.0.0.0/tcp/0", "--no-quic"];
    let (relay, relay_addr) = nat.relay(dir.path(), &common);
    let behind: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--bootstrap", &relay_addr])
        .collect();
    let b = PeerProc::start_with(nat.cmd("b"), dir.path(), "b", &behind);
    assert!(
        b.addrs.iter().any(|a| a.starts_with("/ip4/11.1.2.2/")),
        "b listens on a global-looking address: {:?}",
        b.addrs
    );
    let listed_with_circuit = || {
        let out = run(
            &["peers", "--control", relay.control.to_str().unwrap()],
            b"",
            T,
        );
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&b.peer_id) && l.contains("p2p-circuit"))
    };
    // AutoNAT probes after 15 s, then the relay's dial-back to b fails.
    eventually(
        Duration::from_secs(120),
        "b reserved on the relay",
        listed_with_circuit,
    );
}
