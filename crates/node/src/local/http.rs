//! The peer's small web server (`antnest peer --ui ADDR`): a live page of
//! the mesh and its jobs (`/`), the same data as JSON (`/api/status`), and
//! Prometheus metrics (`/metrics`). Hand-written HTTP/1.1 with one request
//! per connection; it only ever answers GETs.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::state::Peer;

/// The live page. It polls `/api/status` every second.
const PAGE: &str = include_str!("ui.html");

/// Largest request head we read.
const MAX_HEAD: usize = 8 * 1024;

/// Serve until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    peer: Peer,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handle_one = move |stream| {
        let peer = peer.clone();
        async move {
            let r = tokio::time::timeout(Duration::from_secs(10), handle(stream, peer)).await;
            if let Ok(Err(e)) = r {
                debug!("http connection: {e}");
            }
        }
    };
    crate::net::accept::serve("http", listener, handle_one, shutdown).await;
}

async fn handle(mut stream: TcpStream, peer: Peer) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path) {
        ("GET", "/") => (
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
        ),
        ("GET", "/api/status") => (
            "200 OK",
            "application/json",
            serde_json::to_vec(&status(&peer).await).unwrap_or_default(),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics(&peer).await.into_bytes(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            b"only GET\n".to_vec(),
        ),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// Everything the page shows.
pub async fn status(peer: &Peer) -> serde_json::Value {
    serde_json::json!({
        "peer_id": peer.peer_id().to_string(),
        "peers": peer.peers().await,
        "jobs": peer.jobs(),
        "finished": peer.finished_jobs(),
        "tasks_done": peer.tasks_done(),
        "cache": peer.env().cache_stats(),
    })
}

/// Prometheus text exposition.
pub async fn metrics(peer: &Peer) -> String {
    let peers = peer.peers().await;
    let jobs = peer.jobs();
    let cache = peer.env().cache_stats();
    let mut m = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(m, "{name}{labels} {value}");
        }
    };
    metric(
        "antnest_tasks_completed_total",
        "counter",
        "Taskunits run by this peer's worker slots.",
        &[(String::new(), peer.tasks_done())],
    );
    metric(
        "antnest_peers_connected",
        "gauge",
        "Peers with an open connection.",
        &[(
            String::new(),
            peers.iter().filter(|p| p.connected).count() as u64,
        )],
    );
    metric(
        "antnest_jobs_running",
        "gauge",
        "Jobs this peer is master of.",
        &[(String::new(), jobs.len() as u64)],
    );
    let per_job = |f: fn(&antnest_proto::control::Progress) -> u64| {
        jobs.iter()
            .map(|j| (format!("{{job=\"{}\"}}", j.job_id), f(&j.progress)))
            .collect::<Vec<_>>()
    };
    metric(
        "antnest_job_taskunits_done",
        "gauge",
        "Taskunits completed, per job this peer is master of.",
        &per_job(|p| p.done),
    );
    metric(
        "antnest_job_taskunits_failed",
        "gauge",
        "Taskunits failed for good, per job this peer is master of.",
        &per_job(|p| p.failed),
    );
    metric(
        "antnest_peer_results_total",
        "counter",
        "Results of this peer's finished jobs, by the peer that computed them.",
        &peer
            .results_per_peer()
            .into_iter()
            .map(|(p, n)| (format!("{{peer=\"{p}\"}}"), n))
            .collect::<Vec<_>>(),
    );
    metric(
        "antnest_outcomes_unleased_total",
        "counter",
        "Results and errors dropped because the peer that handed them in had not been given those taskunits.",
        &[(String::new(), peer.unleased())],
    );
    metric(
        "antnest_module_failures_total",
        "counter",
        "Job modules this peer could not fetch or compile (e.g. a compile past --compile-timeout).",
        &[(String::new(), peer.module_failures())],
    );
    let [module_bytes, file_bytes] = peer.served();
    metric(
        "antnest_module_bytes_served_total",
        "counter",
        "Bytes of job modules sent to other peers: whole, or only a Python job's files (the worker had the runner).",
        &[
            ("{what=\"module\"}".into(), module_bytes),
            ("{what=\"files\"}".into(), file_bytes),
        ],
    );
    metric(
        "antnest_instance_memory_bytes",
        "gauge",
        "Memory all wasm instances of this peer hold (memories and tables).",
        &[(String::new(), peer.env().memory_used() as u64)],
    );
    metric(
        "antnest_instance_memory_max_bytes",
        "gauge",
        "The bound on antnest_instance_memory_bytes (--max-memory).",
        &[(String::new(), peer.env().max_memory() as u64)],
    );
    metric(
        "antnest_modules_compiled_total",
        "counter",
        "Job modules compiled from wasm.",
        &[(String::new(), cache.compiled)],
    );
    metric(
        "antnest_module_cache_hits_total",
        "counter",
        "Compiled modules found in the cache.",
        &[
            ("{kind=\"disk\"}".into(), cache.disk_hits),
            ("{kind=\"memory\"}".into(), cache.memory_hits),
        ],
    );
    // libp2p's own (connections, identify, Kademlia, gossipsub, ping).
    m.push_str(&peer.state.client.libp2p_metrics());
    m
}
