//! Each sample job gives the right answer, run on one machine.

use std::collections::BTreeMap;

use crate::common::*;

#[test]
fn reverse_strings_rust_crate_dir() {
    let out = submit_local(
        std::path::Path::new("jobs/reverse_strings"),
        &[],
        b"hello\nworld\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "olleh\ndlrow");
}

#[test]
fn reverse_strings_python_like_the_original() {
    let dir = scratch();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\nworld\nantnest\n").unwrap();
    let stats = dir.path().join("stats.json");
    let out = submit_local(
        std::path::Path::new("jobs/reverse_strings.py"),
        &[
            "--input",
            input.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "olleh\ndlrow\ntsentna");
    assert_eq!(stats_of(&stats)["tasks"], 3);
}

/// The sample job of the original antnest's README, verbatim: methods
/// with `self`, a split over the module's `input_data` yielding
/// `taskunit.TaskUnit`s, and a combine that prints `self.taskunits`.
#[test]
fn the_original_readme_job_runs_unchanged() {
    let out = submit_local(
        std::path::Path::new("jobs/original/reverse_strings.py"),
        &[],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "olleh\ndlrow\n");
}

/// An original-style job given an input uses it instead of `input_data`,
/// and plain values yielded by its split are taskunits too.
#[test]
fn an_original_style_job_takes_the_given_input() {
    let dir = scratch();
    let job = dir.path().join("shout.py");
    std::fs::write(
        &job,
        "def processor(self, s):\n    return s.upper()\n\n\
         def split(self, input_data, processor):\n    yield from input_data.split()\n\n\
         def combine(self):\n    return ','.join(f'{t.data}={t.result}' for t in self.taskunits)\n\n\
         input_data = 'not this'\n",
    )
    .unwrap();
    let out = submit_local(&job, &[], b"ab cd");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ab=AB,cd=CD");
}

#[test]
fn wordcount_matches_a_direct_count() {
    // Words of 1 to 40 bytes (the job keeps words of up to 16 bytes in its
    // own table and longer ones in a hash map), non-ASCII bytes, every kind
    // of ASCII whitespace in runs, ~20,000 distinct words so the table
    // grows, and 3 MB of input so it is cut into several taskunits.
    let dir = scratch();
    let mut text_in = Vec::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let gaps: [&[u8]; 7] = [b" ", b"\t", b"\n", b"\r\n", b"\x0c", b"  \t ", b"\n\n"];
    while text_in.len() < 3_000_000 {
        let r = next();
        let id = (r % 20_000) * (r >> 60); // skewed: low ids are common
        let len = 1 + (id % 40) as usize;
        let word: Vec<u8> = (0..len)
            .map(|k| b"abcdefghijklmnopqrstuvwxyz\x0b\xc3\xbc"[(id as usize / (k + 1) + k) % 29])
            .collect();
        text_in.extend_from_slice(&word);
        text_in.extend_from_slice(gaps[(r >> 20) as usize % gaps.len()]);
    }
    let mut expected: BTreeMap<&[u8], u64> = BTreeMap::new();
    for w in text_in
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        *expected.entry(w).or_default() += 1;
    }
    assert!(expected.len() > 5_000 && expected.keys().any(|w| w.len() > 16));
    let input = dir.path().join("words.txt");
    std::fs::write(&input, &text_in).unwrap();
    let stats = dir.path().join("s.json");
    let out = submit_local(
        &artifact("wordcount"),
        &[
            "--input",
            input.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut want = Vec::new();
    for (w, c) in &expected {
        want.extend_from_slice(w);
        want.extend_from_slice(format!("\t{c}\n").as_bytes());
    }
    assert!(out.stdout == want, "word counts differ");
    assert!(stats_of(&stats)["tasks"].as_u64().unwrap() >= 3);
}

#[test]
fn primes_sums_counts() {
    let ns: Vec<u64> = (0..40).map(|i| 2000 + 37 * i).collect();
    let input: String = ns.iter().map(|n| format!("{n}\n")).collect();
    let dir = scratch();
    let stats = dir.path().join("s.json");
    let out = submit_local(
        &artifact("primes"),
        &["--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want: u64 = count_primes_below(&ns).iter().sum();
    assert_eq!(text(&out.stdout), want.to_string());
    let s = stats_of(&stats);
    assert_eq!(s["tasks"], 40);
    assert_eq!(s["failed"], 0);
    assert!(s["wall_ms"].is_u64());
    let per_peer = s["per_peer"].as_object().unwrap();
    assert_eq!(
        per_peer.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        40
    );
}

/// Inflate a zlib stream made of stored blocks (what the job writes).
fn inflate_stored(z: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 2;
    loop {
        let last = z[i] & 1 == 1;
        assert_eq!(z[i] & 6, 0, "stored block");
        let len = u16::from_le_bytes([z[i + 1], z[i + 2]]) as usize;
        out.extend_from_slice(&z[i + 5..i + 5 + len]);
        i += 5 + len;
        if last {
            return out;
        }
    }
}

#[test]
fn mandelbrot_writes_a_png() {
    let dir = scratch();
    let png_path = dir.path().join("m.png");
    let out = submit_local(
        &artifact("mandelbrot"),
        &["--output", png_path.to_str().unwrap()],
        b"120 80 64\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let png = std::fs::read(&png_path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap()) as usize;
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap()) as usize;
    assert_eq!((w, h), (120, 80));
    let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
    assert_eq!(&png[37..41], b"IDAT");
    let raw = inflate_stored(&png[41..41 + idat_len]);
    assert_eq!(raw.len(), h * (w + 1));
    let pixel = |x: usize, y: usize| raw[y * (w + 1) + 1 + x];
    // The set's main body (c = -0.25 + 0i) is black; the far corner is not.
    let cx = (w as f64 * 0.65 - 0.25 / (3.0 / h as f64)) as usize;
    assert_eq!(pixel(cx, h / 2), 0, "inside the set");
    assert_ne!(pixel(0, 0), 0, "outside the set");
}

/// Python values travel as themselves: a streaming split yields tuples, the
/// processor returns a dict holding a Counter, a class of the job's own and
/// bytes, and combine gets them back; a helper module beside the job and a
/// package from `--python-path` are bundled.
#[test]
fn python_jobs_move_python_values_and_bring_their_modules() {
    let dir = scratch();
    let job_dir = dir.path().join("job");
    let pkgs = dir.path().join("pkgs");
    std::fs::create_dir_all(pkgs.join("scale")).unwrap();
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(pkgs.join("scale/__init__.py"), "FACTOR = 10\n").unwrap();
    std::fs::write(
        job_dir.join("helper.py"),
        "def weight(w):\n    return len(w)\n",
    )
    .unwrap();
    let job = job_dir.join("tally.py");
    std::fs::write(
        &job,
        r#"from collections import Counter
import helper
import scale

class Weight:
    def __init__(self, n):
        self.n = n

def split(lines):
    for i, line in enumerate(lines):
        yield (i, line)

def processor(unit):
    i, line = unit
    words = line.split()
    return {"i": i, "counts": Counter(words), "w": Weight(sum(map(helper.weight, words)) * scale.FACTOR), "b": b"\x80!"}

def combine(results):
    total = Counter()
    for r in results:
        total.update(r["counts"])
    return f"{sorted(total.items())} {sum(r['w'].n for r in results)} {[r['i'] for r in results]} {results[0]['b']!r}"
"#,
    )
    .unwrap();
    let out = submit_local(
        &job,
        &["--python-path", pkgs.to_str().unwrap()],
        b"a bb a\r\nccc bb\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "[('a', 2), ('bb', 2), ('ccc', 1)] 90 [0, 1] b'\\x80!'"
    );
}

/// `--stream` prints each result of a Python job with a combine as the
/// value's text, though results travel pickled for the combine; the
/// combine's output is still made (here into `--output`). Original-style
/// jobs (a `combine(self)`) print each taskunit's result too.
#[test]
fn a_streamed_python_job_prints_values_as_text() {
    let dir = scratch();
    let job = dir.path().join("tally.py");
    std::fs::write(
        &job,
        "def processor(line):\n    return {'line': line, 'words': len(line.split())}\n\n\
         def combine(results):\n    return sum(r['words'] for r in results)\n",
    )
    .unwrap();
    let combined = dir.path().join("combined.txt");
    let out = submit_local(
        &job,
        &["--stream", "--output", combined.to_str().unwrap()],
        b"a b\nc d e\nf\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "{'line': 'a b', 'words': 2}",
            "{'line': 'c d e', 'words': 3}",
            "{'line': 'f', 'words': 1}",
        ]
    );
    assert_eq!(std::fs::read_to_string(&combined).unwrap(), "6");

    let out = submit_local(
        std::path::Path::new("jobs/original/reverse_strings.py"),
        &["--stream"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["dlrow", "olleh"]);
}

/// A job that cannot be loaded says why, naming its file and line; a
/// result that cannot be pickled fails its taskunit, with the reason.
#[test]
fn python_job_errors_are_clear() {
    let dir = scratch();
    let syntax = dir.path().join("broken.py");
    std::fs::write(&syntax, "def processor(x):\n    return x[::-1\n").unwrap();
    let out = submit_local(&syntax, &[], b"a\n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("File \"{}\", line 2", syntax.display()))
            && err.contains("SyntaxError"),
        "{err}"
    );
    let nothing = dir.path().join("nothing.py");
    std::fs::write(&nothing, "def process(x):\n    return x\n").unwrap();
    let out = submit_local(&nothing, &[], b"a\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("defines no processor()"),
        "{}",
        text(&out.stderr)
    );
    let unpicklable = dir.path().join("lambdas.py");
    std::fs::write(
        &unpicklable,
        "def processor(x):\n    return lambda: x\n\ndef combine(results):\n    return 'no'\n",
    )
    .unwrap();
    let out = submit_local(&unpicklable, &[], b"a\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("taskunit 0") && text(&out.stderr).contains("cannot be pickled"),
        "{}",
        text(&out.stderr)
    );
}

/// Editing a Python job builds and compiles nothing: the job rides on the
/// runner, compiled once, and the edit is what runs.
#[test]
fn an_edited_python_job_compiles_nothing() {
    let dir = scratch();
    let job = dir.path().join("edited.py");
    for round in 0..2 {
        std::fs::write(
            &job,
            format!("import json\n\ndef processor(x):\n    return json.dumps([x, {round}])\n"),
        )
        .unwrap();
        let stats = dir.path().join("s.json");
        let out = submit_local(&job, &["--stats-json", stats.to_str().unwrap()], b"a\nb\n");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("[\"a\", {round}]\n[\"b\", {round}]")
        );
        if round == 1 {
            assert_eq!(
                stats_of(&stats)["compiled"],
                0,
                "nothing compiled for the edit"
            );
        }
    }
}

/// A worker that has antnest's Python runner gets a new Python job's files
/// alone (a few KB), not the whole 36 MB module again, and works on it;
/// a worker without the runner gets the whole module.
#[test]
fn a_worker_with_the_runner_fetches_only_a_new_jobs_files() {
    let dir = scratch();
    let m = PeerProc::loopback(dir.path(), "m", &["--ui", "127.0.0.1:0"]);
    let ui = m.ui.clone().expect("the peer prints its UI address");
    // A cache of its own: w fetches what it runs from m.
    let (w, w_cache) = PeerProc::own_cache_worker(dir.path(), "w", &m, &["--ui", "127.0.0.1:0"]);
    let job = dir.path().join("edited.py");
    let served = || {
        let metrics = http_get(&ui, "/metrics");
        let sample = |what| {
            let name = format!("antnest_module_bytes_served_total{{what=\"{what}\"}}");
            metric_value(&metrics, &name).unwrap_or_else(|| panic!("{name} in {metrics}"))
        };
        (sample("module"), sample("files"))
    };
    for (round, units) in [(0, 100), (1, 120)] {
        std::fs::write(
            &job,
            format!(
                "import time\n\ndef processor(x):\n    time.sleep(0.05)\n    return x + '{round}'\n"
            ),
        )
        .unwrap();
        let stats = dir.path().join("s.json");
        let input = "x\n".repeat(units);
        let out = m.submit(
            &job,
            &["-q", "--stats-json", stats.to_str().unwrap()],
            input.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).lines().count(), units);
        assert!(text(&out.stdout).lines().all(|l| l == format!("x{round}")));
        let (module, files) = served();
        if round == 0 {
            // w fetched the job's module when it was announced; it may
            // still be compiling the runner (slow in a debug build).
            assert!(module > 30e6, "the whole module went to w: {module} bytes");
            assert_eq!(files, 0.0);
            // The job was announced, and w got the announcements each
            // once: no more than m published.
            let sent = metric_value(
                &http_get(&ui, "/metrics"),
                "antnest_announcement_bytes_sent_total",
            );
            let w_ui = w.ui.clone().expect("w prints its UI address");
            let got = metric_value(
                &http_get(&w_ui, "/metrics"),
                "antnest_announcement_bytes_received_total",
            );
            let (sent, got) = (sent.unwrap_or(0.0), got.unwrap_or(0.0));
            assert!(
                got > 0.0 && got <= sent,
                "announcement bytes: m sent {sent}, w got {got}"
            );
            eventually(
                std::time::Duration::from_secs(300),
                "w compiled the runner",
                || {
                    std::fs::read_dir(&w_cache).is_ok_and(|d| {
                        d.filter_map(Result::ok)
                            .any(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
                    })
                },
            );
        } else {
            assert!(
                stats_of(&stats)["per_peer"].get(&w.peer_id).is_some(),
                "w worked on job {round}: {}",
                std::fs::read_to_string(&stats).unwrap()
            );
            assert!(module < 40e6, "no second module: {module} bytes");
            assert!(
                files > 0.0 && files < 64e3,
                "only the job's files: {files} bytes"
            );
        }
    }

    // The same job again, submitted by hash (m reads its files from its
    // cache), to a new worker that has the runner but no job of it.
    drop(w);
    let w2_cache = dir.path().join("w2-cache");
    std::fs::create_dir_all(&w2_cache).unwrap();
    for entry in std::fs::read_dir(&w_cache).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.extension().is_some_and(|e| e != "files") {
            std::fs::copy(&path, w2_cache.join(path.file_name().unwrap())).unwrap();
        }
    }
    let (w2, _) = PeerProc::own_cache_worker(dir.path(), "w2", &m, &[]);
    eventually(
        std::time::Duration::from_secs(60),
        "w2 connected to m",
        || connected(&m, &w2),
    );
    let (module_before, files_before) = served();
    let stats = dir.path().join("s2.json");
    let out = m.submit(
        &job,
        &["-q", "--stats-json", stats.to_str().unwrap()],
        "x\n".repeat(120).as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).lines().all(|l| l == "x1"));
    assert!(stats_of(&stats)["per_peer"].get(&w2.peer_id).is_some());
    let (module, files) = served();
    assert_eq!(module, module_before, "no module sent to w2");
    assert!(files > files_before, "w2 got the job's files");
}
