//! Input files mapped into memory, and what happens when one shrinks.
//!
//! The line split cuts taskunits out of a mapped input file instead of
//! reading the file into buffers first, which saves a copy of the whole
//! input. But a mapped file that another process truncates while the job
//! runs would kill the peer with SIGBUS at the next access past the new end.
//! So a SIGBUS handler looks for the faulting address among the mappings
//! made here; if it is one of them, it puts zero pages in place of the part
//! that vanished (the access then completes) and marks the mapping damaged.
//! The job checks the mark and fails with a clear error instead of using
//! results computed from zeros. Faults anywhere else go to the handler that
//! was there before (on Linux wasmtime installs none for SIGBUS, so that is
//! Rust's stack-overflow handler or the default; both end the process).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use antnest_proto::SharedBytes;

/// How many files can be mapped at once; past that, inputs are read.
const REGIONS: usize = 64;

/// A mapping the SIGBUS handler knows about. `start` is 0 when the entry is
/// free; `damaged` points at the mapping's flag (kept alive by the mapping).
struct Region {
    start: AtomicUsize,
    len: AtomicUsize,
    damaged: AtomicPtr<AtomicBool>,
}

static TABLE: [Region; REGIONS] = [const {
    Region {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        damaged: AtomicPtr::new(std::ptr::null_mut()),
    }
}; REGIONS];

/// The page size, read once outside the handler.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action in place before ours.
static PREVIOUS: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

/// A mapped input file. Whoever holds its [`Damage`] learns whether the
/// file changed while it was mapped.
struct Mapped {
    /// `None` only while dropping.
    map: Option<memmap2::Mmap>,
    entry: usize,
    /// The flag the handler sets, kept alive while the region is known.
    _damaged: Arc<AtomicBool>,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Forget the region before `map` is unmapped (fields drop after this).
        let r = &TABLE[self.entry];
        r.len.store(0, Ordering::SeqCst);
        r.damaged.store(std::ptr::null_mut(), Ordering::SeqCst);
        r.start.store(0, Ordering::SeqCst);
        // Unmapping a big file takes milliseconds (a page table entry per
        // 4 KiB), and the last reference usually goes with the job's last
        // result: unmap on a thread of its own, off the job's critical path.
        // Should the thread not start, the closure drops and unmaps here.
        if let Some(map) = self.map.take().filter(|m| m.len() >= UNMAP_ASIDE) {
            let _ = std::thread::Builder::new()
                .name("antnest-unmap".into())
                .spawn(move || drop(map));
        }
    }
}

/// Mappings at least this big are unmapped on a thread of their own.
const UNMAP_ASIDE: usize = 8 << 20;

/// Tells whether a mapped input file changed since it was mapped: it
/// shrank under the mapping (the SIGBUS handler saw it), or its size or
/// modification time differ now (a write in place, a truncation within the
/// last page, which zeroes bytes without a fault, or an append). An append
/// alone leaves the mapped bytes intact, but metadata cannot tell it from a
/// rewrite, so it counts too: the job's result must come from one version
/// of the file.
#[derive(Clone, Debug)]
pub struct Damage {
    faulted: Arc<AtomicBool>,
    file: Arc<std::fs::File>,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Damage {
    pub fn happened(&self) -> bool {
        self.faulted.load(Ordering::SeqCst)
            || self.file.metadata().map_or(true, |m| {
                m.len() != self.len || m.modified().ok() != self.modified
            })
    }
}

/// Map a regular, non-empty file read-only. `None` if it is not one, or
/// cannot be mapped (the caller reads it instead).
pub fn map_file(file: &std::fs::File) -> Option<(SharedBytes, Damage)> {
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() == 0 || usize::try_from(meta.len()).is_err() {
        return None;
    }
    install_handler()?;
    let file = Arc::new(file.try_clone().ok()?);
    // Not populated up front: a big file is paged in as the split reaches it.
    // SAFETY: a read-only private mapping; if the file shrinks meanwhile,
    // the SIGBUS handler below keeps the accesses past its end valid.
    let map = unsafe { memmap2::MmapOptions::new().map(&*file) }.ok()?;
    let damaged = Arc::new(AtomicBool::new(false));
    let start = map.as_ptr() as usize;
    let entry = TABLE.iter().position(|r| {
        r.start
            .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })?;
    let r = &TABLE[entry];
    r.damaged
        .store(Arc::as_ptr(&damaged).cast_mut(), Ordering::SeqCst);
    r.len.store(map.len(), Ordering::SeqCst);
    let flag = Damage {
        faulted: damaged.clone(),
        file,
        len: meta.len(),
        modified: meta.modified().ok(),
    };
    Some((
        SharedBytes::from_owner(Mapped {
            map: Some(map),
            entry,
            _damaged: damaged,
        }),
        flag,
    ))
}

/// Install the SIGBUS handler once; `None` if that failed.
fn install_handler() -> Option<()> {
    PREVIOUS
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction is valid; `on_sigbus` has the
            // SA_SIGINFO signature.
            unsafe {
                PAGE.store(libc::sysconf(libc::_SC_PAGESIZE) as usize, Ordering::SeqCst);
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                    previous.sa_sigaction = usize::MAX; // marks the failure
                }
                previous
            }
        })
        .sa_sigaction
        .ne(&usize::MAX)
        .then_some(())
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for r in &TABLE {
        let start = r.start.load(Ordering::SeqCst);
        let len = r.len.load(Ordering::SeqCst);
        if start == 0 || addr < start || addr >= start + len {
            continue;
        }
        // SAFETY: mmap is a plain system call; the replaced range lies
        // inside a mapping this module made and still owns.
        unsafe {
            let page = PAGE.load(Ordering::SeqCst);
            let from = addr & !(page - 1);
            let to = (start + len).div_ceil(page) * page;
            let zeros = libc::mmap(
                from as *mut libc::c_void,
                to - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            if zeros != libc::MAP_FAILED {
                let flag = r.damaged.load(Ordering::SeqCst);
                if !flag.is_null() {
                    (*flag).store(true, Ordering::SeqCst);
                }
                return; // the access is retried and now reads zeros
            }
        }
        break;
    }
    // Not ours: hand over to the previous handler, or die as SIGBUS would.
    // SAFETY: calling the handler that was installed before ours, the way
    // it asked to be called; or restoring the default action.
    unsafe {
        match PREVIOUS.get() {
            Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
                if p.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(p.sa_sigaction);
                    f(signal, info, context);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                    f(signal);
                }
            }
            _ => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_written_in_place_counts_as_changed() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"one\ntwo\n").unwrap();
        let (data, damage) = map_file(file.as_file()).unwrap();
        assert_eq!(&data[..], b"one\ntwo\n");
        assert!(!damage.happened());
        // Same size, other bytes: no fault, but the time stamp moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(file.path(), b"ONE\nTWO\n").unwrap();
        assert!(damage.happened());
    }

    #[test]
    fn an_append_counts_as_changed_and_leaves_the_mapped_bytes_alone() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"one\n").unwrap();
        let (data, damage) = map_file(&file).unwrap();
        file.write_all(b"two\n").unwrap();
        assert_eq!(&data[..], b"one\n");
        assert!(damage.happened());
    }

    #[test]
    fn a_mapped_file_that_shrinks_reads_as_zeros_and_is_marked_damaged() {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![b'a'; 3 * page]).unwrap();
        let (data, damage) = map_file(&file).unwrap();
        assert_eq!(data[2 * page], b'a');
        assert!(!damage.happened());
        file.set_len(page as u64).unwrap();
        // Past the new end: SIGBUS without the handler.
        let tail: Vec<u8> = data[page..].to_vec();
        assert!(
            tail.iter().all(|&b| b == 0),
            "the vanished part reads as zeros"
        );
        assert!(
            damage.faulted.load(Ordering::SeqCst),
            "the handler saw the fault"
        );
        assert!(damage.happened());
        assert_eq!(data[0], b'a', "what is still in the file is unchanged");
        drop(data);
        // The entry is free again and a new mapping is clean.
        let (again, damage) = map_file(&file).unwrap();
        assert_eq!(again.len(), page);
        assert!(!damage.happened());
    }
}
