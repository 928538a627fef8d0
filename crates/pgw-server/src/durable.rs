//! Crash-safe small files: write to a temporary file, fsync it, rename over the target, fsync
//! the directory. Every file carries a magic, a format version, its length and a CRC32, so a
//! torn, truncated or foreign file is detected and reported by name instead of being trusted.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Current on-disk format version of framed files.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"PGWATCH\0";
const HEADER: usize = 8 + 4 + 4 + 8 + 4;

/// What a framed file holds; a file of one kind is never accepted as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Identity = 1,
    Snapshot = 2,
    /// When the primary's last acknowledged lease renewal was sent (see `sidecar::lease_record`).
    Lease = 3,
    /// The group's member list as this member last applied it (`pgw_core::roster`).
    Roster = 4,
    /// A new generation's state, written once by `--force-new-group` before it is carried
    /// into the other files (`raft::store::commit_forced`).
    Forced = 5,
    /// A peer named a newer group generation: this member was left out of a forced recovery.
    Superseded = 6,
}

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is corrupt or not a pg-watcher file: {reason}")]
    Corrupt { file: PathBuf, reason: String },
}

fn io(file: &Path) -> impl FnOnce(std::io::Error) -> DurableError + '_ {
    move |source| DurableError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// Frames `payload` (magic, version, kind, length, crc32).
pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a frame and returns its payload.
pub fn unframe(file: &Path, kind: Kind, data: &[u8]) -> Result<Vec<u8>, DurableError> {
    let corrupt = |reason: String| DurableError::Corrupt {
        file: file.to_path_buf(),
        reason,
    };
    if data.len() < HEADER {
        return Err(corrupt(format!(
            "only {} bytes, shorter than the header",
            data.len()
        )));
    }
    if &data[0..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let u32_at = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let k = u32_at(12);
    if k != kind as u32 {
        return Err(corrupt(format!("holds kind {k}, expected {}", kind as u32)));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&data[16..24]);
    let len = u64::from_le_bytes(len8);
    let crc = u32_at(24);
    let payload = &data[HEADER..];
    if payload.len() as u64 != len {
        return Err(corrupt(format!(
            "length {} but header says {len} (torn write?)",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(payload.to_vec())
}

/// fsyncs a directory so a rename or a new file in it survives a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Atomically replaces `path` with a framed `payload`; returns only once it is durable.
pub fn write_atomic(path: &Path, kind: Kind, payload: &[u8]) -> Result<(), DurableError> {
    let tmp = tmp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&frame(kind, payload)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_dir(dir)
}

/// Replaces `path` with a framed `payload` by rename, without fsync: for records that only
/// matter while this machine stays up (a reader never sees a torn file, a crash of the process
/// loses nothing the page cache holds, a power loss may lose the file, which its reader allows).
pub fn write_replace(path: &Path, kind: Kind, payload: &[u8]) -> Result<(), DurableError> {
    let tmp = tmp_path(path);
    fs::write(&tmp, frame(kind, payload)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Reads and checks a framed file. `Ok(None)` when it does not exist.
pub fn read(path: &Path, kind: Kind) -> Result<Option<Vec<u8>>, DurableError> {
    match fs::read(path) {
        Ok(data) => unframe(path, kind, &data).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.pgw");
        write_atomic(&p, Kind::Snapshot, b"hello").expect("write");
        assert_eq!(
            read(&p, Kind::Snapshot).expect("read"),
            Some(b"hello".to_vec())
        );
        assert!(read(&p, Kind::Identity).is_err(), "kind is checked");
        let mut data = fs::read(&p).expect("raw");
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&p, &data).expect("corrupt it");
        let e = read(&p, Kind::Snapshot).expect_err("crc catches it");
        assert!(e.to_string().contains("x.pgw"), "{e}");
        fs::write(&p, &data[..10]).expect("truncate");
        assert!(read(&p, Kind::Snapshot).is_err());
        assert_eq!(
            read(&dir.path().join("none"), Kind::Snapshot).expect("ok"),
            None
        );
    }
}
