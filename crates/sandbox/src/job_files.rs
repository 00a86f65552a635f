//! A job's own files carried beside an interpreter: antnest's Python
//! runner is one component for every Python job, and each job is that
//! component with the job's files appended as a custom section named
//! [`SECTION`]. A custom section changes nothing wasmtime runs, so the
//! sandbox compiles the component without it, once, whatever the files
//! (see [`split`]), and hands the files to the guest (`host.job-files`).
//! Editing a Python job therefore compiles nothing anywhere.
//!
//! Inside the section, the job's files are a list of length-prefixed
//! fields (u32 LE length, then the bytes): the main module's name, then
//! (path, label, contents) for each file; see [`Bundle`].

/// The custom section's name.
pub const SECTION: &str = "antnest:job-files";

/// The files of a job, packed for [`append`].
#[derive(Debug, Default)]
pub struct Bundle {
    bytes: Vec<u8>,
}

impl Bundle {
    /// A bundle whose job is the module `main` (imported by that name).
    pub fn new(main: &str) -> Bundle {
        let mut b = Bundle::default();
        b.field(main.as_bytes());
        b
    }

    /// Add a file: its path as the guest imports it (`pkg/mod.py`), its
    /// name as the user knows it (for tracebacks), and its contents.
    pub fn file(&mut self, path: &str, label: &str, contents: &[u8]) {
        self.field(path.as_bytes());
        self.field(label.as_bytes());
        self.field(contents);
    }

    fn field(&mut self, bytes: &[u8]) {
        let len = u32::try_from(bytes.len()).expect("a job file under 4 GiB");
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(bytes);
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Whether a job's files (a [`Bundle`]'s bytes) may define a combine: a
/// line of its main module defines, assigns or imports something named
/// `combine`. A job that only names it in a comment or a docstring, or
/// whose helper modules beside it define one, has none. Only where a
/// combine runs depends on this, never what it gives: a job that has none
/// answers so from either runtime, and a combine made some other way runs
/// in wasm.
pub fn may_combine(files: &[u8]) -> bool {
    main_source(files).is_some_and(|source| {
        source.split(|&b| b == b'\n').any(|line| {
            let line = line.trim_ascii_start();
            let has = |s: &[u8]| line.windows(s.len()).any(|w| w == s);
            line.starts_with(b"def combine")
                || line.starts_with(b"combine =")
                || line.starts_with(b"combine=")
                || ((line.starts_with(b"from ") || line.starts_with(b"import ")) && has(b"combine"))
        })
    })
}

/// The source of a bundle's main module; `None` if it is not well formed.
fn main_source(bundle: &[u8]) -> Option<&[u8]> {
    let mut rest = bundle;
    let mut field = || {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let bytes = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(bytes)
    };
    let main = field()?;
    let wanted = [[main, b".py"].concat(), [main, b"/__init__.py"].concat()];
    loop {
        let (path, _label, contents) = (field()?, field()?, field()?);
        if wanted.iter().any(|w| w == path) {
            return Some(contents);
        }
    }
}

/// `component` with `bundle` appended as its [`SECTION`].
pub fn append(component: &[u8], bundle: &Bundle) -> Vec<u8> {
    let mut payload = Vec::with_capacity(bundle.bytes.len() + 32);
    leb128(&mut payload, SECTION.len() as u64);
    payload.extend_from_slice(SECTION.as_bytes());
    payload.extend_from_slice(&bundle.bytes);
    let mut out = Vec::with_capacity(component.len() + payload.len() + 8);
    out.extend_from_slice(component);
    out.push(0); // a custom section
    leb128(&mut out, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

/// `(code, files)`: the module without its last section and that
/// section's files, if the last top-level section is a [`SECTION`].
/// `None` for any other module, or one that is not well formed (left for
/// wasmtime to reject with its own error).
pub fn split(module: &[u8]) -> Option<(&[u8], &[u8])> {
    const PREAMBLE: usize = 8; // magic and version
    if module.len() < PREAMBLE || &module[..4] != b"\0asm" {
        return None;
    }
    let mut at = PREAMBLE;
    let mut last = None;
    while at < module.len() {
        let start = at;
        let id = module[at];
        let (size, n) = read_leb128(&module[at + 1..])?;
        let body = at + 1 + n;
        let end = body.checked_add(usize::try_from(size).ok()?)?;
        if end > module.len() {
            return None;
        }
        last = Some((start, id, body, end));
        at = end;
    }
    let (start, id, body, end) = last?;
    if id != 0 {
        return None;
    }
    let section = &module[body..end];
    let (name_len, n) = read_leb128(section)?;
    let name_end = n.checked_add(usize::try_from(name_len).ok()?)?;
    (section.get(n..name_end)? == SECTION.as_bytes())
        .then(|| (&module[..start], &section[name_end..]))
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// An unsigned LEB128 (at most 5 bytes, as wasm sizes are u32) and its length.
fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().take(5).enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component: the preamble, then one (empty) custom section.
    fn component() -> Vec<u8> {
        let mut c = b"\0asm\x0d\x00\x01\x00".to_vec();
        c.extend_from_slice(&[0, 3, 2, b'h', b'i']);
        c
    }

    #[test]
    fn appended_files_split_off_again() {
        let code = component();
        let mut bundle = Bundle::new("job");
        bundle.file(
            "job.py",
            "/home/me/job.py",
            b"def processor(x):\n    return x\n",
        );
        let big = vec![7u8; 300]; // a length of two LEB128 bytes
        bundle.file("pkg/__init__.py", "pkg/__init__.py", &big);
        let module = append(&code, &bundle);
        let (c, files) = split(&module).expect("a job-files section");
        assert_eq!(c, &code[..]);
        assert_eq!(files, &bundle.bytes[..]);
    }

    #[test]
    fn other_modules_have_no_job_files() {
        assert!(split(&component()).is_none());
        assert!(split(b"not wasm").is_none());
        // A section that claims more bytes than there are.
        let mut torn = component();
        torn.extend_from_slice(&[0, 0x7f, 1]);
        assert!(split(&torn).is_none());
        // Job files not at the end: another section follows.
        let mut module = append(&component(), &Bundle::new("job"));
        module.extend_from_slice(&[0, 3, 2, b'h', b'i']);
        assert!(split(&module).is_none());
    }

    /// A bundle of the job `main.py` with `source`, and a helper beside
    /// it that defines a combine of its own.
    fn bundle(source: &str) -> Vec<u8> {
        let mut b = Bundle::new("main");
        b.file(
            "helper.py",
            "helper.py",
            b"def combine(results):\n    pass\n",
        );
        b.file("main.py", "main.py", source.as_bytes());
        b.bytes
    }

    #[test]
    fn a_combine_is_found_where_it_is_defined_or_imported_not_where_it_is_only_named() {
        for job in [
            "def combine(results):\n    return 1\n",
            "class A:\n    pass\n\n    def combine(self):\n        pass\n",
            "combine = sum\n",
            "from helpers import split, combine\n",
        ] {
            assert!(may_combine(&bundle(job)), "{job}");
        }
        for job in [
            "\"\"\"The results are joined by newlines (no combine() given).\"\"\"\n",
            "# combine is left to the host\ndef processor(x):\n    return x\n",
            "def processor(x):\n    return combined(x)\n",
        ] {
            assert!(!may_combine(&bundle(job)), "{job}");
        }
    }
}
