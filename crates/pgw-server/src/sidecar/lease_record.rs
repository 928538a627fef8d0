//! Where a restarted watcher learns when its predecessor last renewed the primary lease.
//!
//! The primary's watcher must fence its postgres by `sent + lease - fence_budget`, `sent` being
//! when it sent the last renewal the leader acknowledged. A watcher restarted beside a running
//! primary (a package upgrade, `systemctl restart`, a crash and `Restart=always`) must keep that
//! promise: the leader counts from its last grant, not from the restart. So every acknowledged
//! renewal is recorded as a `CLOCK_MONOTONIC` reading with the kernel's boot id; the next
//! watcher on the same boot fences by the recorded deadline. The record is written without
//! fsync: it matters only while the machine stays up (after a reboot there is no running
//! postgres to fence, and a record from another boot is ignored).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::durable::{self, DurableError, Kind};

/// A monotonic reading that survives the process: the boot it was taken in and nanoseconds of
/// `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub boot_id: String,
    pub mono_ns: u64,
}

impl Stamp {
    fn encode(&self) -> Vec<u8> {
        format!("{} {}", self.boot_id, self.mono_ns).into_bytes()
    }

    fn decode(data: &[u8]) -> Option<Stamp> {
        let s = std::str::from_utf8(data).ok()?;
        let (boot, ns) = s.split_once(' ')?;
        if boot.is_empty() || boot.len() > 64 {
            return None;
        }
        Some(Stamp {
            boot_id: boot.to_string(),
            mono_ns: ns.parse().ok()?,
        })
    }

    /// How long ago `self` was taken, seen at `now`; `None` when it is from another boot or
    /// from the future (then nothing is known of it).
    pub fn age_at(&self, now: &Stamp) -> Option<Duration> {
        if self.boot_id != now.boot_id || self.mono_ns > now.mono_ns {
            return None;
        }
        Some(Duration::from_nanos(now.mono_ns - self.mono_ns))
    }
}

/// The current boot id and `CLOCK_MONOTONIC` (the clock tokio's `Instant` reads on Linux).
pub fn now() -> Option<Stamp> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Stamp {
        boot_id: boot_id.trim().to_string(),
        mono_ns: (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64),
    })
}

pub struct LeaseRecord {
    path: PathBuf,
    /// One writer at a time (the temporary file is shared), newest stamp wins.
    last: std::sync::Mutex<u64>,
}

impl LeaseRecord {
    /// The record of `cluster` (`None`: the first cluster, whose file keeps its old name).
    pub fn new(data_dir: &Path, cluster: Option<&str>) -> LeaseRecord {
        LeaseRecord {
            path: data_dir.join(crate::raft::store::lease_file(cluster)),
            last: std::sync::Mutex::new(0),
        }
    }

    /// Records that an acknowledged renewal was sent at `sent`.
    pub fn store(&self, sent: Instant) -> Result<(), DurableError> {
        let Some(mut stamp) = now() else {
            return Ok(());
        };
        let back = Instant::now().saturating_duration_since(sent);
        stamp.mono_ns = stamp.mono_ns.saturating_sub(back.as_nanos() as u64);
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if stamp.mono_ns <= *last {
            return Ok(());
        }
        durable::write_replace(&self.path, Kind::Lease, &stamp.encode())?;
        *last = stamp.mono_ns;
        Ok(())
    }

    /// When the last recorded renewal was sent, on this process's clock; `None` when there is
    /// no usable record (none, another boot, unreadable: then the caller assumes the worst it
    /// can prove, its own start).
    pub fn load(&self) -> Option<Instant> {
        let data = match durable::read(&self.path, Kind::Lease) {
            Ok(d) => d?,
            Err(e) => {
                tracing::warn!("lease record ignored: {e}");
                return None;
            }
        };
        let age = Stamp::decode(&data)?.age_at(&now()?)?;
        Instant::now().checked_sub(age)
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_from_another_boot_or_the_future_say_nothing() {
        let a = Stamp {
            boot_id: "b1".into(),
            mono_ns: 5_000,
        };
        let later = Stamp {
            boot_id: "b1".into(),
            mono_ns: 7_500,
        };
        assert_eq!(a.age_at(&later), Some(Duration::from_nanos(2_500)));
        assert_eq!(later.age_at(&a), None);
        let other = Stamp {
            boot_id: "b2".into(),
            mono_ns: 9_000,
        };
        assert_eq!(a.age_at(&other), None);
        assert_eq!(Stamp::decode(&a.encode()), Some(a));
        assert_eq!(Stamp::decode(b"nospace"), None);
        assert_eq!(Stamp::decode(b"b1 x"), None);
    }

    #[tokio::test]
    async fn a_record_gives_the_send_time_back_on_a_new_clock() {
        let dir = tempfile::tempdir().expect("tmp");
        let r = LeaseRecord::new(dir.path(), None);
        assert!(r.load().is_none());
        let sent = Instant::now() - Duration::from_millis(300);
        r.store(sent).expect("store");
        let back = r.load().expect("a record of this boot");
        let diff = if back > sent {
            back - sent
        } else {
            sent - back
        };
        assert!(diff < Duration::from_millis(20), "{diff:?}");
        std::fs::write(dir.path().join(crate::raft::store::LEASE_FILE), b"junk").expect("corrupt");
        assert!(r.load().is_none(), "a corrupt record is ignored");
        r.clear();
        assert!(r.load().is_none());
    }
}
