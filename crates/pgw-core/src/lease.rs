//! Primary lease arithmetic. Pure: every time is a local monotonic reading in milliseconds.
//!
//! # The timing rule
//!
//! The primary's watcher renews its lease by sending a report to the Raft leader; the leader
//! answers only after confirming with a majority that it still leads (so a deposed leader cannot
//! renew anyone). Let
//!
//! - `L`   = lease duration,
//! - `F`   = fence budget: time the watcher allows itself to stop its postgres,
//! - `rho` = the largest rate error of any member's monotonic clock against real time
//!   (`drift_ppm` / 1e6), and
//! - `d`   = a scheduling margin.
//!
//! The primary starts fencing at `sent + L - F` on its own clock, where `sent` is when it *sent*
//! the last renewal that was acknowledged; it has finished by `sent + L` on its clock, i.e. at
//! most `L / (1 - rho)` of real time after `sent`.
//!
//! The leader records `granted`, the moment it acknowledged that renewal (after `sent` in real
//! time). It may hand the primary role to someone else only at `granted + W` on its own clock,
//! which is at least `W / (1 + rho)` of real time after `granted`. Choosing
//! `W >= L * (1 + rho) / (1 - rho) + d` makes the replacement strictly later in real time than
//! the end of fencing. A leader that has just been elected does not know when its predecessor
//! last granted; it uses the moment it became leader as `granted`.

use serde::{Deserialize, Serialize};

/// Lease settings (milliseconds, parts per million).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct LeaseTiming {
    pub lease_ms: u64,
    pub fence_budget_ms: u64,
    pub drift_ppm: u64,
    pub margin_ms: u64,
}

impl LeaseTiming {
    /// When the primary must start fencing, given when it sent its last acknowledged renewal.
    pub fn fence_at(&self, renewal_sent_at: u64) -> u64 {
        renewal_sent_at + self.lease_ms.saturating_sub(self.fence_budget_ms)
    }

    /// How long after its last grant the leader must wait before replacing the primary:
    /// `ceil(L * (1 + rho) / (1 - rho)) + d`.
    pub fn leader_wait_ms(&self) -> u64 {
        let rho_num = self.drift_ppm.min(500_000) as u128; // rho <= 0.5 keeps 1 - rho positive
        let l = self.lease_ms as u128;
        let num = l * (1_000_000 + rho_num);
        let den = 1_000_000 - rho_num;
        (num.div_ceil(den)) as u64 + self.margin_ms
    }

    /// The earliest leader-clock time at which the primary may be replaced.
    pub fn replace_after(&self, granted_at: u64) -> u64 {
        granted_at + self.leader_wait_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_like_numbers() {
        let t = LeaseTiming {
            lease_ms: 1000,
            fence_budget_ms: 300,
            drift_ppm: 10_000,
            margin_ms: 50,
        };
        assert_eq!(t.fence_at(5000), 5700);
        // 1000 * 1.01 / 0.99 = 1020.2 -> 1021, + 50
        assert_eq!(t.leader_wait_ms(), 1071);
    }

    proptest! {
        /// Whatever the clock rates (within rho), the real time at which the old primary has
        /// finished fencing is before the real time at which the leader may replace it.
        #[test]
        fn fencing_ends_before_replacement(
            lease_ms in 100u64..10_000,
            fence_budget_frac in 0u64..90,
            drift_ppm in 0u64..100_000,
            margin_ms in 0u64..200,
            // Real time (in microseconds) between the send and the grant.
            grant_delay_us in 0u64..5_000_000,
            // Clock rate errors of primary and leader, as fractions of rho in [-1, 1].
            p_rate in -1000i64..=1000,
            l_rate in -1000i64..=1000,
        ) {
            let t = LeaseTiming {
                lease_ms,
                fence_budget_ms: lease_ms * fence_budget_frac / 100,
                drift_ppm,
                margin_ms,
            };
            let rho = drift_ppm as f64 / 1e6;
            let p = 1.0 + rho * p_rate as f64 / 1000.0; // primary clock ticks per real second
            let l = 1.0 + rho * l_rate as f64 / 1000.0;
            // Primary finishes fencing at local `sent + L`; real time since `sent`:
            let fenced_real = lease_ms as f64 / p;
            // Leader replaces at local `granted + W`; real time since `sent`:
            let replaced_real = grant_delay_us as f64 / 1000.0 + t.leader_wait_ms() as f64 / l;
            prop_assert!(fenced_real < replaced_real + 1e-9,
                "fenced at {fenced_real} ms, replaced at {replaced_real} ms");
            prop_assert!(t.fence_at(0) <= lease_ms);
        }
    }
}
