//! Peer processes for the examples: an `antnest peer` on loopback with a
//! control socket and a cache of its own, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

pub(crate) struct PeerProc {
    pub(crate) child: Child,
    pub(crate) control: PathBuf,
    pub(crate) addr: String,
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start peer `i` of a mesh in `dir`, with `slots` worker slots, joining
/// `bootstrap` if given, with `extra` arguments; its log goes to
/// `logs/peer<i>.log` if given.
pub(crate) fn start_peer(
    bin: &Path,
    dir: &Path,
    i: usize,
    slots: usize,
    bootstrap: Option<&str>,
    extra: &[String],
    logs: Option<&Path>,
) -> Result<PeerProc> {
    let control = dir.join(format!("p{i}.sock"));
    let mut cmd = Command::new(bin);
    cmd.args([
        "peer",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--slots",
    ])
    .arg(slots.to_string())
    .arg("--control")
    .arg(&control)
    .arg("--cache-dir")
    .arg(dir.join(format!("cache{i}")));
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    cmd.args(extra);
    let stderr = match logs {
        Some(d) => Stdio::from(std::fs::File::create(d.join(format!("peer{i}.log")))?),
        None => Stdio::null(),
    };
    let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn()?;
    let mut addr = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        if let Some(a) = line.strip_prefix("listening on: ") {
            addr.get_or_insert(a.to_string());
        }
        if line.starts_with("control socket:") {
            break;
        }
    }
    Ok(PeerProc {
        child,
        control,
        addr: addr.context("peer printed no address")?,
    })
}

/// The antnest binary: `given`, or the one beside the examples' directory
/// (`target/<profile>/antnest`).
pub(crate) fn antnest_bin(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(b) = given {
        return Ok(b.to_owned());
    }
    Ok(std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .context("no exe dir")?
        .join("antnest"))
}
