//! Where the Raft leader should be: away from the members that host a primary, so that losing
//! a primary's room never also costs an election (a newly elected leader knows nothing of its
//! predecessor's lease grants and waits a whole lease from its election before it may replace
//! the silent primary). Pure: the server feeds what this member hosts and how long it has
//! known no leader, and carries out the answer (openraft 0.9's `runtime_config().elect` and
//! `heartbeat`).
//!
//! Two rules:
//! - A member hosting a primary does not start elections while the others may still elect
//!   one of their own ([`may_campaign`]); after `grace_ms` without any leader it does (the
//!   others may all be lost, or all host primaries).
//! - A leader hosting a primary hands leadership over ([`should_hand_over`]) when another voter
//!   that hosts none is up to date: it stops its leader duties and heartbeats, the others'
//!   election timers run out and one of them is elected (this member does not campaign); if
//!   none is within `grace_ms`, it resumes.

/// Whether this member may start an election (its election timer is on).
pub fn may_campaign(hosts_primary: bool, leaderless_ms: u64, grace_ms: u64) -> bool {
    !hosts_primary || leaderless_ms >= grace_ms
}

/// One voter as the leader sees it for a hand-over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    /// It hosts a primary of some cluster.
    pub hosts_primary: bool,
    /// It acknowledged the leader's log up to the last committed entry.
    pub caught_up: bool,
    /// It answered the leader within the last heartbeats.
    pub recent: bool,
}

/// Whether the leader (`me`, hosting a primary when `hosts_primary`) should hand leadership
/// over now: the clusters are `settled` (no change of primary moments ago, every pgpool
/// agrees: a hand-over pauses the leader's work for a moment and must not delay a failover's
/// last steps), and some other voter hosts no primary, answers and has the whole committed log
/// (so it can win an election at once, with this member's vote). `last_handover_ms_ago`: when
/// it last tried (a failed hand-over is not retried before `retry_ms`).
pub fn should_hand_over(
    me: u64,
    hosts_primary: bool,
    settled: bool,
    peers: &[Peer],
    last_handover_ms_ago: Option<u64>,
    retry_ms: u64,
) -> bool {
    hosts_primary
        && settled
        && last_handover_ms_ago.is_none_or(|t| t >= retry_ms)
        && peers
            .iter()
            .any(|p| p.id != me && !p.hosts_primary && p.caught_up && p.recent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, hosts_primary: bool, caught_up: bool, recent: bool) -> Peer {
        Peer {
            id,
            hosts_primary,
            caught_up,
            recent,
        }
    }

    #[test]
    fn a_primary_host_campaigns_only_after_the_grace() {
        assert!(may_campaign(false, 0, 800));
        assert!(!may_campaign(true, 0, 800));
        assert!(!may_campaign(true, 799, 800));
        assert!(may_campaign(true, 800, 800));
    }

    #[test]
    fn hand_over_only_to_a_live_caught_up_voter_without_a_primary() {
        let ok = peer(2, false, true, true);
        assert!(should_hand_over(
            1,
            true,
            true,
            std::slice::from_ref(&ok),
            None,
            5000
        ));
        // Not hosting a primary: stay.
        assert!(!should_hand_over(
            1,
            false,
            true,
            std::slice::from_ref(&ok),
            None,
            5000
        ));
        // Every other voter lagging, silent or hosting a primary itself: stay.
        for p in [
            peer(2, false, false, true),
            peer(2, false, true, false),
            peer(2, true, true, true),
        ] {
            assert!(!should_hand_over(1, true, true, &[p], None, 5000));
        }
        // Not while a change is being finished.
        assert!(!should_hand_over(
            1,
            true,
            false,
            std::slice::from_ref(&ok),
            None,
            5000
        ));
        // Itself never counts.
        assert!(!should_hand_over(
            2,
            true,
            true,
            std::slice::from_ref(&ok),
            None,
            5000
        ));
        // A recent attempt is not repeated before retry_ms.
        assert!(!should_hand_over(
            1,
            true,
            true,
            std::slice::from_ref(&ok),
            Some(100),
            5000
        ));
        assert!(should_hand_over(1, true, true, &[ok], Some(5000), 5000));
    }
}
