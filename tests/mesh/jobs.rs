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

#[test]
fn wordcount_matches_a_direct_count() {
    let dir = scratch();
    let words = ["ant", "nest", "peer", "mesh", "wasm", "x", "Ünï"];
    let mut text_in = String::new();
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..60_000u64 {
        let w = words[(i * i % 7) as usize];
        *expected.entry(w).or_default() += 1;
        text_in.push_str(w);
        text_in.push(if i % 13 == 0 {
            '\n'
        } else if i % 5 == 0 {
            '\t'
        } else {
            ' '
        });
    }
    let input = dir.path().join("words.txt");
    std::fs::write(&input, &text_in).unwrap();
    let out = submit_local(
        &artifact("wordcount"),
        &["--input", input.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want: String = expected
        .iter()
        .map(|(w, c)| format!("{w}\t{c}\n"))
        .collect();
    assert_eq!(text(&out.stdout), want);
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
