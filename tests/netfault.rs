//! Room faults on real networks: every room, the arbiter and the clients are network namespaces
//! joined by a bridge (see `tests/netbed/`), with real PostgreSQL 15, pgpool-II and watchers.
//! Each scenario runs the consistency checker (writers through every pgpool and straight to every
//! server, split-brain probe, no acknowledged write lost, every node back after healing).
//!
//! Needs root (network namespaces, nftables), as CI runs; the tests fail, not skip, without it.
//! They run one at a time (each bed runs 2-3 postgres, pgpools and watchers on 2 cores).

mod common;
mod netbed;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{epoch_of, primary_of};
use netbed::checker::Checker;
use netbed::{Bed, Layout};
use pgw_cli::writer::is_primary;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The primary room is cut off from the other members while its own clients still reach it:
/// its postgres must be fenced (no longer a writable primary), the others elect a new primary,
/// writes through the surviving rooms' pgpools resume on it, and nothing acknowledged is lost.
#[test]
fn primary_room_cut_off_is_fenced_and_replaced() {
    let _s = serial();
    let bed = Bed::start(Layout::ThreeRooms);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(60)).await;
        let old = primary_of(&s).expect("primary");
        let oi = bed.index_of(&old);
        let old_addr = bed.hosts[oi].pg_addr();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        bed.cut_off(oi, true);
        let others: Vec<String> = bed
            .data_members()
            .into_iter()
            .filter(|i| *i != oi)
            .map(|i| bed.name(i).to_string())
            .collect();
        let first = chk
            .wait_write_via(&others, Some(&old_addr), t0, Duration::from_secs(30))
            .await;
        eprintln!(
            "room {old} cut off: first write through a surviving pgpool on {} after {} ms",
            first.backend,
            (first.at - t0).as_millis()
        );
        // Fenced: the cut-off server no longer accepts writes (its clients still reach it).
        let tf = Instant::now();
        loop {
            if is_primary(&old_addr).await != Some(true) {
                break;
            }
            assert!(
                tf.elapsed() < Duration::from_secs(10),
                "{old}'s postgres is still a writable primary while its room is cut off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        bed.heal();
        let r = chk.finish(&bed).await;
        eprintln!(
            "acknowledged {} writes; final primary {}; periods {:?}",
            r.acked, r.final_primary, r.periods
        );
        for e in netbed::checker::history(&bed).await {
            eprintln!("{} {} {}", e.log_index, e.at_ms, e.event);
        }
        r.assert_safe();
        assert_ne!(r.final_primary, old);
    });
}

#[allow(dead_code)]
fn unused(s: &pgw_cli::status::GroupStatus) -> u64 {
    epoch_of(s)
}
