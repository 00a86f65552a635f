//! The live web page (checked in headless Chromium, screenshot included),
//! the JSON status and the Prometheus metrics of a running peer.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// A screenshot of the page at `url`, kept as `target/ui-screenshots/NAME`:
/// checks that the page rendered, and gives how many pixels have the
/// progress bar's colour.
fn screenshot(browser: &str, profile: &Path, url: &str, name: &str) -> usize {
    let shots = repo().join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join(name);
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        browser,
        profile,
        &[&format!("--screenshot={}", shot.display())],
        url,
    );
    assert!(shot.exists(), "no screenshot: {}", text(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1000, 700));
    let channels = info.line_size / info.width as usize;
    let px: Vec<&[u8]> = pixels[..info.buffer_size()].chunks(channels).collect();
    // The page background, and the progress bar's colour, are on screen.
    let near = |p: &[u8], c: [u8; 3]| p.iter().zip(c).all(|(a, b)| a.abs_diff(b) <= 8);
    let background = px.iter().filter(|p| near(p, [0xfa, 0xf7, 0xf2])).count();
    assert!(
        background > px.len() / 3,
        "the page rendered ({background} background pixels)"
    );
    px.iter().filter(|p| near(p, [0xc0, 0x66, 0x2b])).count()
}

/// The browser for a test's browser part, or `None` (said on stderr) to
/// skip that part.
fn browser_or_skip() -> Option<&'static str> {
    let browser = chromium();
    if browser.is_none() {
        skipped(
            "the browser part",
            "it needs Chromium (`apt-get install chromium`; .ci/run installs it)",
        );
    }
    browser
}

fn headless(browser: &str, profile: &Path, extra: &[&str], url: &str) -> std::process::Output {
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1000,700",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url);
    run_cmd(&mut cmd, b"", Duration::from_secs(120))
}

#[test]
fn the_live_page_metrics_and_status_show_a_running_job() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &["--ui", "127.0.0.1:0"]);
    let ui = peer.ui.clone().expect("the peer prints its UI address");
    // A second peer, so that libp2p has connections to count.
    let _other = PeerProc::loopback(dir.path(), "q", &["--bootstrap", peer.addr()]);
    let input: String = (0..600).map(|i| format!("{}\n", 300_000 + i)).collect();
    let _job = spawn_antnest(
        &[
            "submit",
            "-q",
            "--control",
            peer.control.to_str().unwrap(),
            artifact("primes").to_str().unwrap(),
        ],
        input.as_bytes(),
    );
    let mut job_id = String::new();
    eventually(
        Duration::from_secs(30),
        "the job shows in /api/status",
        || {
            let status: serde_json::Value =
                serde_json::from_str(&http_get(&ui, "/api/status")).unwrap();
            assert_eq!(status["peer_id"], peer.peer_id.as_str());
            match status["jobs"][0]["job_id"].as_str() {
                Some(id) if status["jobs"][0]["progress"]["done"].as_u64() > Some(0) => {
                    job_id = id.to_string();
                    true
                }
                _ => false,
            }
        },
    );
    let metrics = http_get(&ui, "/metrics");
    assert!(
        metrics.contains("# TYPE antnest_tasks_completed_total counter"),
        "{metrics}"
    );
    assert!(metrics.contains("antnest_jobs_running 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("antnest_job_taskunits_done{{job=\"{job_id}\"}}")),
        "{metrics}"
    );
    // libp2p's own metrics beside ours, and every metric the example
    // Grafana dashboard charts is one the peer exposes.
    for family in [
        "libp2p_swarm_",
        "libp2p_identify_",
        "libp2p_kad_",
        "libp2p_gossipsub_",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family}")),
            "{family}: {metrics}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let expr = panel["targets"][0]["expr"].as_str().unwrap();
        let names = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("antnest_") || w.starts_with("libp2p_"));
        for name in names {
            let base = ["_total", "_sum", "_count", "_bucket"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                metrics.contains(&format!("# TYPE {name} "))
                    || metrics.contains(&format!("# TYPE {base} ")),
                "the dashboard charts {name}, which /metrics lacks"
            );
        }
    }

    let Some(browser) = browser_or_skip() else {
        return;
    };
    let dom = headless(browser, &dir.path().join("profile1"), &["--dump-dom"], &ui);
    let dom = text(&dom.stdout);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page's script ran: {dom}"
    );
    assert!(dom.contains(&job_id), "the running job is listed: {dom}");
    assert!(dom.contains(&peer.peer_id), "{dom}");
    assert!(dom.contains("class=\"bar\""), "with a progress bar: {dom}");
    // The chart of taskunits per second has a line for the working peer,
    // and the workers' table says it works.
    assert!(
        dom.contains(&format!("class=\"rate\" data-peer=\"{}\"", peer.peer_id)),
        "the chart has a line for the peer: {dom}"
    );
    assert!(dom.contains(">working<"), "{dom}");

    // Two screenshots a few seconds apart: the page rendered, and its
    // progress bar grew between them. Kept under target/ as artifacts.
    let bar_pixels =
        |name: &str, profile: &str| screenshot(browser, &dir.path().join(profile), &ui, name);
    let first = bar_pixels("running-1.png", "profile2");
    assert!(first > 20, "a progress bar is drawn ({first} bar pixels)");
    std::thread::sleep(Duration::from_secs(2));
    let second = bar_pixels("running-2.png", "profile3");
    assert!(
        second > first,
        "the progress bar moved: {first} then {second} bar pixels"
    );
}

/// Jobs that ended stay listed on the page (newest first): how each
/// ended, its wall time, taskunits, failures with their errors and the
/// per-peer split.
#[test]
fn finished_jobs_stay_on_the_page() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &["--ui", "127.0.0.1:0"]);
    let ui = peer.ui.clone().expect("the peer prints its UI address");
    let control = peer.control.to_str().unwrap();
    let submit = |job: &str, input: &[u8]| {
        let job = artifact(job);
        run(
            &["submit", "-q", "--control", control, job.to_str().unwrap()],
            input,
            Duration::from_secs(120),
        )
    };
    let done = submit("reverse_strings", b"abc\nxyz\nuvw\n");
    assert!(done.status.success(), "{}", text(&done.stderr));
    let failed = submit("faulty", b"say\ntrap\n");
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    let status: serde_json::Value = serde_json::from_str(&http_get(&ui, "/api/status")).unwrap();
    let finished = status["finished"].as_array().expect("finished jobs listed");
    assert_eq!(finished.len(), 2, "{status}");
    let (last, first) = (&finished[0], &finished[1]);
    assert_eq!(first["outcome"], "done", "{first}");
    assert_eq!(first["tasks"], 3);
    assert_eq!(first["per_peer"][&peer.peer_id], 3, "{first}");
    assert!(first["wall_ms"].as_u64().is_some());
    assert_eq!(last["outcome"], "failed", "{last}");
    assert_eq!(last["failed"], 1, "{last}");
    assert_eq!(last["failures"][0][0], 1, "{last}");
    assert!(
        last["failures"][0][1]
            .as_str()
            .unwrap()
            .contains("asked to trap"),
        "{last}"
    );
    assert!(
        last["stderr"]
            .as_str()
            .unwrap()
            .contains("taskunit 0: hello from the guest"),
        "its guest stderr is kept: {last}"
    );
    // Each peer's results over the finished jobs, as a Prometheus counter
    // (three of the first job, one of the second).
    let metrics = http_get(&ui, "/metrics");
    assert!(
        metrics.contains(&format!(
            "antnest_peer_results_total{{peer=\"{}\"}} 4",
            peer.peer_id
        )),
        "{metrics}"
    );
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let dom = headless(browser, &dir.path().join("profile"), &["--dump-dom"], &ui);
    let dom = text(&dom.stdout);
    let id = first["job_id"].as_str().unwrap();
    assert!(dom.contains(id) && dom.contains("asked to trap"), "{dom}");
    assert!(dom.contains("hello from the guest"), "{dom}");
    // After the jobs: no running job, so no progress bar on screen.
    let bar = screenshot(browser, &dir.path().join("profile2"), &ui, "finished.png");
    assert_eq!(bar, 0, "no job runs, yet a progress bar is drawn");
}

/// A worker that asked for a running job's module and has taken no
/// taskunit since (it is fetching or compiling it: here a Python job, whose
/// runner takes a while to compile) is shown as getting the module.
#[test]
fn a_worker_getting_the_module_is_shown_so() {
    let dir = scratch();
    let m = PeerProc::loopback(dir.path(), "m", &["--ui", "127.0.0.1:0"]);
    let ui = m.ui.clone().expect("the peer prints its UI address");
    // A cache of its own: w has to fetch and compile the job's module.
    let (w, _) = PeerProc::own_cache_worker(dir.path(), "w", &m, &[]);
    let job = dir.path().join("slow.py");
    std::fs::write(
        &job,
        "import time\n\ndef processor(x):\n    time.sleep(0.2)\n    return x\n",
    )
    .unwrap();
    let input = "x\n".repeat(300);
    let _running = m.spawn_submit(&job, &["-q"], input.as_bytes());
    eventually(
        Duration::from_secs(300),
        "w shown as getting the module",
        || {
            let status: serde_json::Value =
                serde_json::from_str(&http_get(&ui, "/api/status")).unwrap();
            status["jobs"][0]["workers"][&w.peer_id]["state"] == "getting the module"
        },
    );
}
