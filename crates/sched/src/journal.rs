//! The master's journal: every completed result is appended to disk as it
//! arrives, so `antnest submit --resume JOB_ID` after a master crash
//! recomputes nothing already done.
//!
//! Layout: `<dir>/<job_id>/meta.json` (`{"module": "<sha256>", "input":
//! "<identity>", "version": 2}`, written atomically) and
//! `<dir>/<job_id>/results`: records of index u64 LE, length u32 LE,
//! CRC-32 u32 LE of the index, length and bytes, then the bytes; a later
//! record of the same index replaces it, and one of length `u32::MAX`
//! (no bytes) takes it back (a result of a worker caught lying). A record
//! cut short or damaged is dropped with all after it, and overwritten on
//! resume. A journal of version 1 (records without a checksum, no input
//! recorded) is read and rewritten as version 2.
//!
//! In memory, and as the book hands them over ([`encode`]), records have
//! no checksum: it is computed only for what goes to disk.
//!
//! A job's journal reaches the disk only once the job has run for
//! [`JOURNAL_AFTER`]: a shorter job loses at most that much work to a crash,
//! and skips the files it would create and remove (a quarter of a
//! millisecond of the master's CPU, which a short job shares with its
//! taskunits).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use antnest_proto::{JobId, ModuleHash};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no journal for job {0} here (it finished, ran on another machine, \
         or stopped within its first {JOURNAL_AFTER:?})"
    )]
    NotFound(JobId),
    #[error("job {job} ran module {journal}, not this one ({given}); resume with the same job")]
    OtherModule {
        job: JobId,
        journal: String,
        given: String,
    },
    #[error(
        "job {job} ran on another input ({journal}), not this one ({given}); resume with the same input"
    )]
    OtherInput {
        job: JobId,
        journal: String,
        given: String,
    },
}

/// The journal format written now (see the module doc).
const VERSION: u64 = 2;

/// How long a job runs before its journal is written to disk.
pub const JOURNAL_AFTER: Duration = Duration::from_millis(500);

pub struct Journal {
    dir: PathBuf,
    out: Output,
}

enum Output {
    /// Not on disk yet: the module's hash and the records so far.
    Held {
        module: ModuleHash,
        input: String,
        since: Instant,
        records: Vec<u8>,
    },
    File(BufWriter<File>),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Journal {
    /// Start a new journal for `job` of `module` over the input `input`
    /// names (an identity that changes when the input does), held in
    /// memory for [`JOURNAL_AFTER`].
    pub fn create(root: &Path, job: JobId, module: &ModuleHash, input: &str) -> Journal {
        Journal {
            dir: root.join(job.to_string()),
            out: Output::Held {
                module: *module,
                input: input.to_owned(),
                since: Instant::now(),
                records: Vec::new(),
            },
        }
    }

    /// Write the held journal (`records` as [`encode`] makes them) to disk.
    fn open(
        dir: &Path,
        module: &ModuleHash,
        input: &str,
        records: &[u8],
    ) -> Result<File, JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let meta = serde_json::json!({
            "module": module.to_string(),
            "input": input,
            "version": VERSION,
        });
        antnest_proto::write_atomic(&dir.join("meta.json"), meta.to_string().as_bytes())
            .map_err(io_err(dir))?;
        let path = dir.join("results");
        let mut file = File::create(&path).map_err(io_err(&path))?;
        file.write_all(&checked(records)).map_err(io_err(&path))?;
        Ok(file)
    }

    /// Reopen the journal of `job` and read the results it holds.
    /// Refuses a journal of another module, or (from version 2 on) of
    /// another input.
    pub fn resume(
        root: &Path,
        job: JobId,
        module: &ModuleHash,
        input: &str,
    ) -> Result<(Journal, BTreeMap<u64, Vec<u8>>), JournalError> {
        let dir = root.join(job.to_string());
        let meta_path = dir.join("meta.json");
        let meta = match std::fs::read(&meta_path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(JournalError::NotFound(job));
            }
            Err(e) => return Err(io_err(&meta_path)(e)),
        };
        let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap_or_default();
        let journal_module = meta["module"].as_str().unwrap_or_default().to_string();
        if journal_module != module.to_string() {
            return Err(JournalError::OtherModule {
                job,
                journal: journal_module,
                given: module.to_string(),
            });
        }
        let version = meta["version"].as_u64().unwrap_or(1);
        let journal_input = meta["input"].as_str().unwrap_or_default();
        if version >= 2 && journal_input != input {
            return Err(JournalError::OtherInput {
                job,
                journal: journal_input.to_string(),
                given: input.to_string(),
            });
        }
        let path = dir.join("results");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let (results, valid) = parse(&bytes, version >= 2);
        if version < 2 {
            // Rewritten in this version's format (the input is taken as
            // the one given: version 1 did not record it).
            let mut records = Vec::new();
            for (index, result) in &results {
                encode(&mut records, *index, result);
            }
            drop(file);
            let file = Self::open(&dir, module, input, &records)?;
            let journal = Journal {
                dir,
                out: Output::File(BufWriter::new(file)),
            };
            return Ok((journal, results));
        }
        // Drop a torn or damaged tail, then append after the good records.
        file.set_len(valid as u64).map_err(io_err(&path))?;
        file.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
        Ok((
            Journal {
                dir,
                out: Output::File(BufWriter::new(file)),
            },
            results,
        ))
    }

    /// Append `records` (made by [`encode`]) to the journal, in memory or
    /// on disk.
    pub fn append(&mut self, records: &[u8]) -> Result<(), JournalError> {
        match &mut self.out {
            Output::Held { records: held, .. } => {
                held.extend_from_slice(records);
                Ok(())
            }
            Output::File(out) => out.write_all(&checked(records)).map_err(io_err(&self.dir)),
        }
    }

    /// Push what was appended to disk (once the job has run for
    /// [`JOURNAL_AFTER`]; before that it stays in memory).
    pub fn flush(&mut self) -> Result<(), JournalError> {
        match &mut self.out {
            Output::Held {
                module,
                input,
                since,
                records,
            } => {
                if since.elapsed() >= JOURNAL_AFTER {
                    let file = Self::open(&self.dir, module, input, records)?;
                    self.out = Output::File(BufWriter::new(file));
                }
                Ok(())
            }
            Output::File(out) => out.flush().map_err(io_err(&self.dir)),
        }
    }

    /// Whether the journal is on disk yet.
    pub fn on_disk(&self) -> bool {
        matches!(self.out, Output::File(_))
    }

    /// The job finished: the journal is no longer needed.
    pub fn remove(self) {
        if self.on_disk() {
            let dir = self.dir.clone();
            drop(self);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Append the record of taskunit `index`'s `result` to `records`.
pub fn encode(records: &mut Vec<u8>, index: u64, result: &[u8]) {
    records.extend_from_slice(&index.to_le_bytes());
    records.extend_from_slice(&(result.len() as u32).to_le_bytes());
    records.extend_from_slice(result);
}

/// Append a record that takes back taskunit `index`'s result (one from a
/// worker caught with a wrong result): on resume it is not done.
pub fn retract(records: &mut Vec<u8>, index: u64) {
    records.extend_from_slice(&index.to_le_bytes());
    records.extend_from_slice(&RETRACTED.to_le_bytes());
}

/// The length of a record that takes back its taskunit's result (it has
/// no bytes; no result is this long: results are far under 4 GiB).
const RETRACTED: u32 = u32::MAX;

/// The bytes that follow a record's head of length field `len`.
fn body_len(len: u32) -> usize {
    if len == RETRACTED { 0 } else { len as usize }
}

/// The checksum of a record: CRC-32 of its index, length and bytes.
fn crc(head: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(body);
    h.finalize()
}

/// In-memory `records` (from [`encode`]) as they go to disk, checksummed.
fn checked(records: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() + records.len() / 8 + 4);
    let mut at = 0;
    while records.len() - at >= 12 {
        let head = &records[at..at + 12];
        let len = body_len(u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")));
        let Some(body) = records.get(at + 12..at + 12 + len) else {
            break;
        };
        out.extend_from_slice(head);
        out.extend_from_slice(&crc(head, body).to_le_bytes());
        out.extend_from_slice(body);
        at += 12 + len;
    }
    out
}

/// The good records in `bytes` (checksummed, or not: version 1), and how
/// many bytes they span: reading stops at the first record cut short or,
/// with checksums, damaged.
fn parse(bytes: &[u8], checksums: bool) -> (BTreeMap<u64, Vec<u8>>, usize) {
    let head_len = if checksums { 16 } else { 12 };
    let mut results = BTreeMap::new();
    let mut at = 0;
    while bytes.len() - at >= head_len {
        let index = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let field = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        let len = body_len(field);
        let Some(body) = bytes.get(at + head_len..at + head_len + len) else {
            break;
        };
        if checksums {
            let want = u32::from_le_bytes(bytes[at + 12..at + 16].try_into().expect("4 bytes"));
            if crc(&bytes[at..at + 12], body) != want {
                break;
            }
        }
        if field == RETRACTED {
            results.remove(&index);
        } else {
            results.insert(index, body.to_vec());
        }
        at += head_len + len;
    }
    (results, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_reads_what_was_written_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId(42);
        let module = ModuleHash::of(b"m");
        let mut j = Journal::create(dir.path(), job, &module, "input-1");
        let mut records = Vec::new();
        encode(&mut records, 3, b"three");
        encode(&mut records, 0, b"");
        j.append(&records).unwrap();
        j.flush().unwrap();
        assert!(!j.on_disk(), "a young journal stays in memory");
        assert!(!dir.path().join(job.to_string()).exists());
        std::thread::sleep(JOURNAL_AFTER);
        j.flush().unwrap();
        assert!(j.on_disk());
        drop(j);
        // A crash mid-record.
        let path = dir.path().join(job.to_string()).join("results");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 0, 0, 0, 0, 50, 0]).unwrap();
        drop(f);
        let (mut j, got) = Journal::resume(dir.path(), job, &module, "input-1").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&3], b"three");
        assert_eq!(got[&0], b"");
        let mut records = Vec::new();
        encode(&mut records, 7, b"seven");
        j.append(&records).unwrap();
        j.flush().unwrap();
        drop(j);
        let (_, got) = Journal::resume(dir.path(), job, &module, "input-1").unwrap();
        assert_eq!(got[&7], b"seven", "appends after the torn tail was cut");
        let other = Journal::resume(dir.path(), job, &ModuleHash::of(b"other"), "input-1");
        assert!(matches!(other, Err(JournalError::OtherModule { .. })));
        assert!(matches!(
            Journal::resume(dir.path(), JobId(1), &module, "input-1"),
            Err(JournalError::NotFound(_))
        ));
    }

    #[test]
    fn a_retracted_result_is_not_done_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (job, module) = (JobId(45), ModuleHash::of(b"m"));
        let mut j = Journal::create(dir.path(), job, &module, "in");
        let mut records = Vec::new();
        encode(&mut records, 1, b"forged");
        encode(&mut records, 2, b"two");
        retract(&mut records, 1);
        encode(&mut records, 3, b"three");
        std::thread::sleep(JOURNAL_AFTER);
        j.append(&records).unwrap();
        j.flush().unwrap();
        drop(j);
        let (mut j, got) = Journal::resume(dir.path(), job, &module, "in").unwrap();
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), [2, 3]);
        let mut records = Vec::new();
        encode(&mut records, 1, b"one");
        j.append(&records).unwrap();
        j.flush().unwrap();
        drop(j);
        let (_, got) = Journal::resume(dir.path(), job, &module, "in").unwrap();
        assert_eq!(got[&1], b"one", "run again, it is done");
    }

    #[test]
    fn damaged_records_are_dropped_and_another_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (job, module) = (JobId(43), ModuleHash::of(b"m"));
        let mut j = Journal::create(dir.path(), job, &module, "file:/in:10:1");
        let mut records = Vec::new();
        encode(&mut records, 1, b"one");
        j.append(&records).unwrap();
        std::thread::sleep(JOURNAL_AFTER);
        j.flush().unwrap();
        drop(j);
        // Zeros where a record would be: index 0, length 0, a checksum that
        // does not match. Read without checksums it would be taskunit 0's.
        let path = dir.path().join(job.to_string()).join("results");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0; 16]).unwrap();
        drop(f);
        let (_, got) = Journal::resume(dir.path(), job, &module, "file:/in:10:1").unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), [&1]);
        let other = Journal::resume(dir.path(), job, &module, "file:/in:11:2");
        assert!(
            matches!(other, Err(JournalError::OtherInput { .. })),
            "{:?}",
            other.err()
        );
    }

    #[test]
    fn a_version_1_journal_is_read_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (job, module) = (JobId(44), ModuleHash::of(b"m"));
        let jdir = dir.path().join(job.to_string());
        std::fs::create_dir_all(&jdir).unwrap();
        let meta = serde_json::json!({ "module": module.to_string() });
        std::fs::write(jdir.join("meta.json"), meta.to_string()).unwrap();
        let mut v1 = Vec::new();
        encode(&mut v1, 5, b"five");
        std::fs::write(jdir.join("results"), &v1).unwrap();
        let (mut j, got) = Journal::resume(dir.path(), job, &module, "any").unwrap();
        assert_eq!(got[&5], b"five");
        let mut records = Vec::new();
        encode(&mut records, 6, b"six");
        j.append(&records).unwrap();
        j.flush().unwrap();
        drop(j);
        let (_, got) = Journal::resume(dir.path(), job, &module, "any").unwrap();
        assert_eq!(
            (got[&5].as_slice(), got[&6].as_slice()),
            (&b"five"[..], &b"six"[..])
        );
        let other = Journal::resume(dir.path(), job, &module, "another");
        assert!(matches!(other, Err(JournalError::OtherInput { .. })));
    }
}
