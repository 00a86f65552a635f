//! Network namespaces joined by one bridge: a LAN of `n` hosts on this
//! machine, for mDNS and anything network-shaped (needs root). Shared by
//! the scale benchmark and the end-to-end tests (std only).
//!
//! A hub namespace holds the bridge; each host namespace has one veth,
//! `eth0`, plugged into it, at 10.78.x.y/16. Everything is deleted on drop
//! (deleting a namespace deletes its end of each veth, and so the link).

use std::process::{Command, Stdio};

pub(crate) struct Bridge {
    tag: u32,
    hosts: Vec<String>,
    /// The kernel's neighbour-table sizes before they were raised.
    neigh_was: Option<Vec<String>>,
}

/// The ARP table's garbage-collection thresholds. The table is one for the
/// whole kernel, namespaces included: with its default cap of 1024 entries,
/// a few dozen hosts that each talk to every other fill it, and then the
/// kernel drops their packets (multicast included: mDNS goes silent)
/// with no error but "neighbor table overflow!" in the kernel log.
const NEIGH: [&str; 3] = [
    "/proc/sys/net/ipv4/neigh/default/gc_thresh1",
    "/proc/sys/net/ipv4/neigh/default/gc_thresh2",
    "/proc/sys/net/ipv4/neigh/default/gc_thresh3",
];

/// Run `cmd` with `sh -c`; what it wrote to stderr if it failed.
pub(crate) fn sh(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A tag for names that is this bridge's alone: the process's and a count
/// of the bridges it made (two at once in one test process must not share
/// names).
fn new_tag() -> u32 {
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (std::process::id() % 10_000) * 10 + n % 10
}

impl Bridge {
    /// `n` hosts on one bridge; `None` where namespaces may not be made
    /// (not root), `Err` if made but not linked.
    pub(crate) fn create(n: usize) -> Option<Result<Bridge, String>> {
        assert!(n <= 4000, "10.78.0.0/16 numbering");
        let tag = new_tag();
        let hub = format!("anh{tag}");
        if sh(&format!("ip netns add {hub} 2>/dev/null")).is_err() {
            return None;
        }
        let mut bridge = Bridge {
            tag,
            hosts: Vec::new(),
            neigh_was: None,
        };
        // Room for every host to know every other, when the table is
        // smaller (never for a few hosts: the default is 1024, and a
        // bridge that changed nothing restores nothing, so a small bridge
        // beside a big one in the same process leaves the big one's be).
        let need = (n * n) as u64;
        let was: Vec<String> = NEIGH
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .collect();
        if was[2].parse::<u64>().is_ok_and(|t| t < need) {
            for (path, size) in NEIGH.iter().zip([need / 4, need / 2, need]) {
                let _ = std::fs::write(path, size.to_string());
            }
            bridge.neigh_was = Some(was);
        }
        if sh(&format!(
            "ip -n {hub} link add br0 type bridge && ip -n {hub} link set br0 up"
        ))
        .is_err()
        {
            return Some(Err("cannot make the bridge".into()));
        }
        for i in 0..n {
            let host = format!("an{tag}h{i}");
            if sh(&format!("ip netns add {host}")).is_err() {
                return Some(Err(format!("cannot make namespace {host}")));
            }
            bridge.hosts.push(host.clone());
            let ip = bridge.ip(i);
            let linked = sh(&format!(
                "ip link add v{tag}x{i} netns {hub} type veth peer name eth0 netns {host} \
                 && ip -n {hub} link set v{tag}x{i} master br0 up \
                 && ip -n {host} addr add {ip}/16 dev eth0 \
                 && ip -n {host} link set eth0 up && ip -n {host} link set lo up"
            ));
            if let Err(e) = linked {
                return Some(Err(format!("cannot link namespace {host}: {e}")));
            }
        }
        Some(Ok(bridge))
    }

    /// Host `i`'s address on the bridge.
    pub(crate) fn ip(&self, i: usize) -> String {
        format!("10.78.{}.{}", i / 250, i % 250 + 1)
    }

    /// `bin` to run in host `i`'s namespace.
    pub(crate) fn cmd(&self, i: usize, bin: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i]]).arg(bin);
        cmd
    }

    /// Bytes the bridge has sent to each host so far (what each host
    /// received), read in one call.
    pub(crate) fn bytes_to_hosts(&self) -> Vec<u64> {
        let script = format!(
            "for i in $(seq 0 {}); do cat /sys/class/net/v{}x$i/statistics/tx_bytes; done",
            self.hosts.len().saturating_sub(1),
            self.tag
        );
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("anh{}", self.tag),
                "sh",
                "-c",
                &script,
            ])
            .output();
        let text = out.map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&text)
            .lines()
            .map(|l| l.trim().parse().unwrap_or(0))
            .collect()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", host]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("anh{}", self.tag)])
            .status();
        if let Some(was) = &self.neigh_was {
            for (path, size) in NEIGH.iter().zip(was) {
                let _ = std::fs::write(path, size);
            }
        }
    }
}
