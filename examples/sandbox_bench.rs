//! Times the sandbox alone, without the mesh: a job's `split` over a file,
//! and its `process` over each taskunit with one reused instance.
//!
//! ```sh
//! cargo run --release --example sandbox_bench -- JOB.wasm INPUT
//! ```

use std::time::Instant;

use antnest_proto::Limits;
use antnest_proto::ModuleHash;
use antnest_sandbox::{Sandbox, SplitInput, SplitOutcome, TaskRunner, run_combine, run_split};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(job), Some(input)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: sandbox_bench JOB.wasm INPUT");
    };
    let bytes = std::fs::read(&job)?;
    let hash = ModuleHash::of(&bytes);
    let env = Sandbox::new(None)?;
    let t = Instant::now();
    let component = env.component(&hash, || Some(bytes))?;
    println!("compile: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    let mut units = Vec::new();
    let t = Instant::now();
    let file = std::io::BufReader::new(std::fs::File::open(&input)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = run_split(
        &env,
        &component,
        Limits::default(),
        SplitInput::Stream(Box::new(file)),
        Box::new(move |u| tx.send(u).map_err(|e| e.to_string())),
    )?;
    units.extend(rx.try_iter());
    if outcome == SplitOutcome::Default {
        units = std::fs::read(&input)?
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.to_vec().into())
            .collect();
    }
    let bytes: usize = units.iter().map(|u| u.len()).sum();
    println!(
        "split ({outcome:?}): {} taskunits, {:.1} MB in {:.1} ms",
        units.len(),
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut runner = TaskRunner::new(env.clone(), component.clone(), Limits::default());
    let t = Instant::now();
    let mut results = Vec::with_capacity(units.len());
    for u in &units {
        results.push(runner.process(u)?);
    }
    let out: usize = results.iter().map(Vec::len).sum();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "process: {:.1} ms total, {:.2} µs per taskunit, {:.0} MB/s on one core ({out} bytes out)",
        secs * 1e3,
        secs * 1e6 / units.len() as f64,
        bytes as f64 / 1e6 / secs
    );

    let t = Instant::now();
    let combined = run_combine(
        &env,
        &component,
        Limits::default(),
        Box::new(results.into_iter()),
    )?;
    println!(
        "combine: {:.1} ms ({})",
        t.elapsed().as_secs_f64() * 1e3,
        match combined {
            Some(out) => format!("{} bytes out", out.len()),
            None => "default".into(),
        }
    );
    Ok(())
}
