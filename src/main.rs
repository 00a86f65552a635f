//! The `antnest` binary: parse the command line, build validated
//! configurations, run. `anyhow` lives only here.

mod cli;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;

use antnest::client;
use antnest::config::{self, ConfigFile};
use antnest_node::config::NativeConfig;
use antnest_node::local::control as control_server;
use antnest_node::net::NetConfig;
use antnest_node::{self as peer, PeerConfig};
use antnest_proto::control::{
    self, ControlReply, ControlRequest, InputSpec, JobEvent, JobReport, JobSpec, Progress,
};
use antnest_proto::{ByteBuf, JobId, Limits, ModuleHash};
use antnest_sandbox::NativePython;
use cli::{Cli, Command, NetArgs, SubmitArgs};

fn main() -> ExitCode {
    // A compile in a child process (see antnest_sandbox::compile): no
    // runtime, no logging, nothing but the compile.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "compile-module")
    {
        return antnest_sandbox::compile::child_main();
    }
    antnest_node::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let net_threads = cli.net_threads.map_or_else(
        || {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / 4).max(1)
        },
        |n| n.get(),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(net_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("antnest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("antnest: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Peer(args) => run_peer(args).await,
        Command::Submit(args) => submit(args).await,
        Command::Peers(args) => list_peers(args).await,
        Command::Jobs(args) => list_jobs(args).await,
        Command::Cancel(args) => cancel_job(args).await,
        Command::CompileModule => Ok(antnest_sandbox::compile::child_main()),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "antnest",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The validated peer configuration for these flags; `submitter` for the
/// peer of a standalone submit (its native Python is for its own job
/// unless it trusts other masters).
fn peer_config(net: &NetArgs, submitter: bool) -> Result<PeerConfig> {
    let mut bootstrap = net.bootstrap.clone();
    let paths: Vec<(std::path::PathBuf, bool)> = match &net.config {
        Some(p) => vec![(p.clone(), true)],
        None => config::default_paths()
            .into_iter()
            .map(|p| (p, false))
            .collect(),
    };
    for (path, explicit) in paths {
        if explicit || path.exists() {
            let file = ConfigFile::load(&path)?;
            bootstrap.extend(file.bootstrap_addrs(&path)?);
        }
    }
    let psk = match &net.mesh_key {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading mesh key {}", p.display()))?;
            Some(
                text.parse()
                    .map_err(|e| anyhow::anyhow!("mesh key {}: {e}", p.display()))?,
            )
        }
        None => None,
    };
    let mut cfg = PeerConfig {
        net: NetConfig {
            listen: if net.listen.is_empty() {
                NetConfig::default().listen
            } else {
                net.listen.clone()
            },
            bootstrap,
            mdns: !net.no_mdns,
            psk,
            quic: !net.no_quic,
            relay_server: net.relay,
            relays: net.relay_via.clone(),
            keypair: net.identity.as_deref().map(load_identity).transpose()?,
            ..NetConfig::default()
        },
        lease: net.lease,
        max_jobs: net.max_jobs.max(1),
        max_memory: net
            .max_memory
            .map_or_else(antnest_node::config::default_max_memory, |mib| {
                mib.saturating_mul(1 << 20)
            }),
        cache_max: net.cache_max_mb.saturating_mul(1 << 20),
        compiler: Some(antnest_sandbox::Compiler {
            program: std::env::current_exe().context("finding this program, to compile in")?,
            args: vec!["compile-module".into()],
            time: net.compile_timeout,
            memory: net.compile_memory_mb.saturating_mul(1 << 20),
        }),
        allowed_masters: (!net.allow_master.is_empty())
            .then(|| net.allow_master.iter().copied().collect()),
        ..PeerConfig::default()
    };
    if let Some(slots) = net.slots {
        if slots == 0 {
            bail!("--slots must be at least 1");
        }
        cfg.slots = slots;
    }
    if net.cache_dir.is_some() {
        cfg.cache_dir = net.cache_dir.clone();
    }
    if net.allow_native_python {
        let trusted = cfg.net.psk.is_some() || cfg.allowed_masters.is_some();
        if !trusted && !submitter {
            bail!(
                "--allow-native-python runs other masters' Python code natively on this machine: \
                 it needs --mesh-key or --allow-master, so that only masters you trust can send it"
            );
        }
        let hidden = cfg.cache_dir.iter().cloned().collect();
        let python = NativePython::check(&net.native_python, hidden)?;
        cfg.native_python = Some(NativeConfig {
            python,
            others: trusted,
        });
    }
    Ok(cfg)
}

/// The identity in `path`, or a new one written there.
fn load_identity(path: &std::path::Path) -> Result<libp2p::identity::Keypair> {
    use libp2p::identity::Keypair;
    if path.exists() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        return Keypair::from_protobuf_encoding(&bytes)
            .with_context(|| format!("{} is not an antnest identity", path.display()));
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .context("encoding the identity")?;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&bytes))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

async fn run_peer(args: cli::PeerArgs) -> Result<ExitCode> {
    let mut cfg = peer_config(&args.net, false)?;
    if args.net.listen.is_empty() {
        cfg.net.listen = vec![default_listen()];
    }
    let socket = args.control.control.unwrap_or_else(control::default_socket);
    let listener = control_server::bind(&socket)
        .await
        .with_context(|| format!("control socket {}", socket.display()))?;
    let running = peer::start(cfg).await?;
    let id = running.peer.peer_id().to_string();
    println!("peer id: {id}");
    // TCP first: tests and scripts take the first address to bootstrap.
    let mut addrs = running.listen_addrs.clone();
    addrs.sort_by_key(|a| a.to_string().contains("/quic"));
    for addr in &addrs {
        println!("listening on: {addr}/p2p/{id}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = args.ui {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("web UI on {addr}"))?;
        println!("ui: http://{}/", listener.local_addr()?);
        servers.spawn(antnest_node::local::http::serve(
            listener,
            running.peer.clone(),
            stopped(stop_rx.clone()),
        ));
    }
    println!("control socket: {}", socket.display());
    std::io::stdout().flush()?;
    servers.spawn(control_server::serve(
        listener,
        running.peer.clone(),
        stopped(stop_rx),
    ));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    running.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(ExitCode::SUCCESS)
}

/// Where `antnest peer` listens with no `--listen`: antnest's well-known
/// port on every interface if it is free (so peers whose config names
/// this machine without a port find it), else a random port.
fn default_listen() -> libp2p::Multiaddr {
    let port = config::DEFAULT_PORT;
    let free = std::net::TcpListener::bind(("0.0.0.0", port)).is_ok();
    if !free {
        eprintln!("antnest: port {port} is in use; listening on a random port");
    }
    let port = if free { port } else { 0 };
    format!("/ip4/0.0.0.0/tcp/{port}")
        .parse()
        .expect("a valid multiaddr")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Ask the local peer one question.
async fn ask(args: &cli::ControlArgs, request: ControlRequest) -> Result<ControlReply> {
    let socket = args.control.clone().unwrap_or_else(control::default_socket);
    let mut stream = client::connect(&socket).await.with_context(|| {
        format!(
            "no peer runs on {} (start one with `antnest peer`)",
            socket.display()
        )
    })?;
    control::write_msg(&mut stream, &request).await?;
    control::read_msg::<ControlReply, _>(&mut stream)
        .await?
        .context("the peer closed the connection without answering")
}

async fn list_jobs(args: cli::ControlArgs) -> Result<ExitCode> {
    match ask(&args, ControlRequest::Jobs).await? {
        ControlReply::Jobs(jobs) => {
            for j in jobs {
                println!(
                    "{} {} {:.1}s module {}",
                    j.job_id,
                    progress_line(&j.progress, j.running_ms as f64 / 1000.0),
                    j.running_ms as f64 / 1000.0,
                    &j.module[..12]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unexpected reply from the peer: {other:?}"),
    }
}

async fn cancel_job(args: cli::CancelArgs) -> Result<ExitCode> {
    match ask(&args.control, ControlRequest::Cancel(args.job)).await? {
        ControlReply::Cancelled(true) => {
            println!("cancelled {}", args.job);
            Ok(ExitCode::SUCCESS)
        }
        ControlReply::Cancelled(false) => {
            eprintln!("antnest: no job {} runs on this peer", args.job);
            Ok(ExitCode::from(1))
        }
        other => bail!("unexpected reply from the peer: {other:?}"),
    }
}

async fn list_peers(args: cli::ControlArgs) -> Result<ExitCode> {
    match ask(&args, ControlRequest::Peers).await? {
        ControlReply::Peers { local, peers } => {
            println!("local {local}");
            for p in peers {
                let state = if p.connected { "connected" } else { "known" };
                let state = match &p.via {
                    Some(via) if p.connected => format!("{state} ({via})"),
                    _ => state.to_string(),
                };
                println!("{} {state} {}", p.peer_id, p.addresses.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unexpected reply from the peer: {other:?}"),
    }
}

async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    if args.runtime == antnest_proto::Runtime::Native && !antnest::source::is_python(&args.job) {
        bail!("--runtime native is for Python jobs (a .py file); other jobs run in wasm");
    }
    let cfg = peer_config(&args.net, true)?;
    let job_path = args.job.clone();
    let cache = cfg.cache_dir.clone();
    let python_path = args.python_path.clone();
    let (module, hash) = tokio::task::spawn_blocking(move || {
        antnest::source::load(&job_path, cache.as_deref(), &python_path).map(|m| {
            let hash = ModuleHash::of(&m);
            (m, hash)
        })
    })
    .await?
    .with_context(|| format!("loading job {}", args.job.display()))?;
    let input = match &args.input {
        Some(p) if p.as_os_str() != "-" => {
            let p = std::fs::canonicalize(p).with_context(|| format!("input {}", p.display()))?;
            InputSpec::Path(p)
        }
        Some(_) => InputSpec::Bytes(ByteBuf::from(read_stdin()?)),
        None if !std::io::stdin().is_terminal() => InputSpec::Bytes(ByteBuf::from(read_stdin()?)),
        None => InputSpec::Bytes(ByteBuf::new()),
    };
    // A running peer gets the module's hash first, and its bytes only if
    // it does not have them.
    let mut spec = JobSpec {
        module: ByteBuf::new(),
        module_hash: Some(hash),
        input,
        limits: Some(Limits {
            time: args.task_timeout,
            memory: args.memory_mb << 20,
            output: args.max_output_mb << 20,
            deterministic: args.deterministic,
        }),
        max_attempts: args.attempts,
        keep_going: args.keep_going,
        resume: args.resume,
        replicate: args.replicate,
        verify: args.verify,
        weight: args.weight,
        stream: args.stream,
        runtime: args.runtime,
    };
    let socket = args
        .control
        .control
        .clone()
        .unwrap_or_else(control::default_socket);
    let conn = if args.standalone {
        None
    } else {
        client::connect(&socket).await.ok()
    };
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel::<JobEvent>(64);
    let mut printer = ProgressPrinter::new(args.quiet, args.json);
    // A crate directory is named by its folder, a file by its name.
    let module_name = args.job.file_name().map_or_else(
        || args.job.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let stream = args.stream;
    let consumer = tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            match event {
                JobEvent::Started(job) => printer.started(job),
                JobEvent::Setup {
                    compiled,
                    peers,
                    slots,
                } => printer.setup(&module_name, &hash, compiled, peers, slots),
                JobEvent::Progress(p) => printer.update(p),
                JobEvent::Log { index, text } => printer.log(index, &text),
                JobEvent::Result { bytes, .. } if stream => {
                    printer.clear();
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&bytes).and_then(|()| out.write_all(b"\n"));
                    let _ = out.flush();
                }
                JobEvent::Result { .. } => {}
            }
        }
        printer.clear();
    });
    let reply = match conn {
        Some(conn) => {
            // Not a copy of the spec: its input may be all of stdin.
            let mut request = ControlRequest::Submit(Box::new(spec));
            match submit_over(conn, &request, &events_tx).await? {
                ControlReply::NeedModule => {
                    let ControlRequest::Submit(spec) = &mut request else {
                        unreachable!("made as a submission above")
                    };
                    spec.module = ByteBuf::from(module);
                    let conn = client::connect(&socket)
                        .await
                        .with_context(|| format!("control socket {}", socket.display()))?;
                    submit_over(conn, &request, &events_tx).await?
                }
                reply => reply,
            }
        }
        None => {
            spec.module = ByteBuf::from(module);
            let running = peer::start(cfg).await?;
            let result = running.peer.submit(spec, Some(events_tx.clone())).await;
            running.shutdown().await;
            control_server::reply_for(result)
        }
    };
    drop(events_tx);
    let _ = consumer.await;
    finish(&args, reply)
}

/// Send a submission over a control connection and pass its events on
/// until the reply that ends it.
async fn submit_over(
    mut conn: client::Connection,
    request: &ControlRequest,
    events: &tokio::sync::mpsc::Sender<JobEvent>,
) -> Result<ControlReply> {
    control::write_msg(&mut conn, request).await?;
    loop {
        match control::read_msg::<ControlReply, _>(&mut conn).await? {
            Some(ControlReply::Event(event)) => {
                let _ = events.send(event).await;
            }
            Some(reply) => return Ok(reply),
            None => bail!("the local peer closed the connection before the job ended"),
        }
    }
}

/// One line of a job's progress, `secs` into it: a bar, the percentage and
/// an ETA where it can be told (once the split has ended, or from the
/// share of an input of known size split so far), else what was read.
fn progress_line(p: &Progress, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let rate = p.done as f64 / secs;
    let Some(f) = p.fraction() else {
        // A stream of unknown size: what was read of it, and how fast.
        let mb = p.input_bytes as f64 / 1e6;
        return format!(
            "{}/? done, {} failed, {rate:.0}/s, {mb:.1} MB read ({:.1} MB/s), {} peers working",
            p.done,
            p.failed,
            mb / secs,
            p.workers
        );
    };
    const WIDTH: usize = 24;
    let filled = ((f * WIDTH as f64).round() as usize).min(WIDTH);
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled));
    let total = match (p.total, p.total_estimate()) {
        (Some(t), _) => t.to_string(),
        (None, Some(t)) => format!("~{t}"),
        (None, None) => "?".into(),
    };
    let eta = p.eta_secs(secs).map_or("?".into(), |e| format!("{e:.0}s"));
    format!(
        "{bar} {:>3.0}% {}/{total} done, {} failed, {rate:.0}/s, ETA {eta}, {} peers working",
        f * 100.0,
        p.done,
        p.failed,
        p.workers
    )
}

/// Shows a job's progress on stderr: one updating line on a terminal, a
/// plain line now and then otherwise, nothing with `--quiet`.
struct ProgressPrinter {
    quiet: bool,
    tty: bool,
    /// Progress as JSON lines (`--json`), not text.
    json: bool,
    started: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl ProgressPrinter {
    fn new(quiet: bool, json: bool) -> Self {
        ProgressPrinter {
            quiet,
            json,
            tty: std::io::stderr().is_terminal() && !json,
            started: std::time::Instant::now(),
            last: None,
        }
    }

    fn started(&mut self, job: JobId) {
        if self.json && !self.quiet {
            eprintln!(
                "{}",
                serde_json::json!({"event": "started", "job": job.to_string()})
            );
        } else if !self.quiet {
            eprintln!("antnest: job {job} (resume it after a crash with --resume {job})");
        }
    }

    fn update(&mut self, p: Progress) {
        let every = if self.tty || self.json { 100 } else { 2000 };
        if self.quiet || self.last.is_some_and(|t| t.elapsed().as_millis() < every) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let secs = self.started.elapsed().as_secs_f64();
        if self.json {
            // The figures of the text line, as a JSON line.
            let mut event = serde_json::to_value(p).unwrap_or_default();
            event["event"] = "progress".into();
            event["fraction"] = p.fraction().into();
            event["total_estimate"] = p.total_estimate().into();
            event["eta_s"] = p.eta_secs(secs).into();
            event["elapsed_s"] = secs.into();
            eprintln!("{event}");
            return;
        }
        let line = progress_line(&p, secs);
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("antnest: {line}");
        }
    }

    /// Where the job starts: its module, and the mesh it has.
    fn setup(&mut self, module: &str, hash: &ModuleHash, compiled: bool, peers: u64, slots: u64) {
        if self.quiet {
            return;
        }
        let hash = hash.to_string();
        if self.json {
            let event = serde_json::json!({"event": "setup", "module": module, "hash": hash,
                "compiled": compiled, "peers": peers, "slots": slots});
            eprintln!("{event}");
            return;
        }
        let how = if compiled {
            "compiled for it"
        } else {
            "cached"
        };
        let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        eprintln!(
            "antnest: module {module} ({}…, {how}), {} connected, {} here",
            &hash[..12],
            plural(peers, "peer"),
            plural(slots, "slot")
        );
    }

    /// Guest stderr of one taskunit, line by line.
    fn log(&mut self, index: u64, text: &str) {
        if self.quiet {
            return;
        }
        self.clear();
        if self.json {
            let event = serde_json::json!({"event": "log", "taskunit": index, "text": text});
            eprintln!("{event}");
            return;
        }
        for line in text.lines() {
            eprintln!("antnest: taskunit {index}: {line}");
        }
    }

    /// Erase the progress line (before other output, and at the end).
    fn clear(&mut self) {
        if self.tty && !self.quiet && self.last.take().is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    Ok(buf)
}

/// The `--json` form of a finished job: output as text if it is UTF-8,
/// else as base16 (`output_hex`).
fn json_report(report: &JobReport, error: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "job_id": report.stats.job_id,
        "stats": report.stats,
        "failures": report.failures.iter().map(|(i, e)| serde_json::json!({"taskunit": i, "error": e})).collect::<Vec<_>>(),
    });
    match std::str::from_utf8(&report.output) {
        Ok(text) => v["output"] = text.into(),
        Err(_) => v["output_hex"] = hex::encode(&report.output).into(),
    }
    if let Some(e) = error {
        v["error"] = e.into();
    }
    v
}

fn write_stats(args: &SubmitArgs, report: &JobReport) -> Result<()> {
    if let Some(path) = &args.stats_json {
        let json = serde_json::to_vec_pretty(&report.stats)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn finish(args: &SubmitArgs, reply: ControlReply) -> Result<ExitCode> {
    match reply {
        ControlReply::Done(report) => {
            for (index, error) in &report.failures {
                eprintln!("antnest: taskunit {index} failed: {error}");
            }
            write_stats(args, &report)?;
            match &args.output {
                Some(path) => std::fs::write(path, &report.output)
                    .with_context(|| format!("writing {}", path.display()))?,
                None if args.json => {
                    println!("{}", serde_json::to_string(&json_report(&report, None))?);
                }
                // The results were printed as they came.
                None if args.stream => {}
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&report.output)?;
                    if !report.output.ends_with(b"\n") && std::io::stdout().is_terminal() {
                        out.write_all(b"\n")?;
                    }
                    out.flush()?;
                }
            }
            Ok(if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ControlReply::Failed { error, report } => {
            if args.json {
                let json = match &report {
                    Some(r) => json_report(r, Some(&error)),
                    None => serde_json::json!({ "error": error }),
                };
                println!("{}", serde_json::to_string(&json)?);
            }
            if let Some(report) = &report {
                for (index, error) in &report.failures {
                    eprintln!("antnest: taskunit {index} failed: {error}");
                }
                write_stats(args, report)?;
            }
            eprintln!("antnest: job failed: {error}");
            Ok(ExitCode::from(1))
        }
        other => bail!("unexpected reply from the peer: {other:?}"),
    }
}
