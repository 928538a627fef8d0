//! The deploy examples run as shipped, on the network test bed: each layout's files with only
//! addresses, ports and paths substituted, certificates from `deploy/tls/make-certs.sh`, the
//! password file as the README says (scram-sha-256 in hba, separate replication and rewind
//! roles, verify-full TLS between servers), every watcher run as the OS user postgres as the
//! unit runs it. Bootstrap, a failover (the primary's postmaster killed), the old primary
//! rewound back in; status read with the `dba` operator certificate the script made.
//!
//! Needs root (network namespaces), PostgreSQL 15 and pgpool-II, as CI has.

mod common;
mod netbed;

use std::process::Command;
use std::time::Duration;

use common::{epoch_of, node_role, primary_of};
use netbed::{Bed, Layout};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `psql` on member `i`'s own server, over its local socket as the OS user postgres (peer).
fn psql(bed: &Bed, i: usize, sql: &str) -> String {
    let h = &bed.hosts[i];
    let pg = h.cfg.postgres.first().expect("data member");
    let mut run = pg.data_dir.clone().into_os_string();
    run.push(".run");
    let port = h
        .cfg
        .me()
        .and_then(|m| m.postgres.clone())
        .unwrap_or_default();
    let port = port
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h.ns,
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(pg.bin_dir.join("psql"))
        .args(["-X", "-At", "-h"])
        .arg(&run)
        .args(["-p", &port, "-d", "postgres", "-c", sql])
        .env("HOME", "/var/lib/postgresql")
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn shipped(layout: Layout) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (bed, pki) = Bed::start_shipped(layout);
    // The operators' certificates the script made (the bed's own status calls use them).
    pgw_cli::client::set_default(
        pgw_cli::client::ClientAuth::from_files(
            Some(&pki.join("ca.crt")),
            Some(&pki.join("dba.crt")),
            Some(&pki.join("dba.key")),
            None,
        )
        .expect("dba credentials"),
    );
    let s = bed.run(|| async { bed.wait_healthy(Duration::from_secs(180)).await });
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = bed.index_of(&p);
    // Separate roles with SCRAM verifiers; the standbys stream as `replicator` over TLS.
    assert_eq!(
        psql(&bed, pi, "SELECT string_agg(rolname || ':' || left(rolpassword, 13), ',' ORDER BY rolname) FROM pg_authid WHERE rolname IN ('replicator', 'rewinder')"),
        "replicator:SCRAM-SHA-256,rewinder:SCRAM-SHA-256"
    );
    let standbys = bed.data_members().len() - 1;
    let links = psql(
        &bed,
        pi,
        "SELECT string_agg(r.usename || ':' || s.ssl::text, ',') FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
    );
    assert_eq!(
        links,
        vec!["replicator:true"; standbys].join(","),
        "{links}"
    );
    // The watchers run as postgres, as the unit runs them.
    for i in 0..bed.hosts.len() {
        let pid = bed.watcher_pid(i).expect("watcher");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default()
            .to_string();
        let pg = pgw_server::sidecar::pgctl::lookup_user("postgres").expect("postgres");
        assert!(
            uid.split_whitespace().nth(1) == Some(&pg.uid.to_string()),
            "{uid}"
        );
    }

    // A failover, and the old primary rewound back in (as `rewinder`, verify-full).
    bed.signal_postgres(pi, libc::SIGKILL);
    let s2 = bed.run(|| async {
        common::wait_until(
            &bed.endpoints(),
            Duration::from_secs(60),
            "a new primary",
            |s| primary_of(s).is_some_and(|x| x != p),
        )
        .await
    });
    assert!(epoch_of(&s2) > e0);
    let np = primary_of(&s2).expect("new primary");
    bed.run(|| async {
        common::wait_until(
            &bed.endpoints(),
            Duration::from_secs(120),
            "the old primary back",
            |s| {
                primary_of(s).as_deref() == Some(np.as_str())
                    && node_role(s, &p).as_deref() == Some("sync_replica")
            },
        )
        .await;
        bed.wait_healthy(Duration::from_secs(60)).await
    });
    let log = std::fs::read_to_string(&bed.hosts[pi].log).expect("log");
    assert!(
        log.contains("rewinding onto") && !log.contains("cloning afresh"),
        "rewound, not cloned: {log}"
    );
    for i in 0..bed.hosts.len() {
        let log = std::fs::read_to_string(&bed.hosts[i].log).expect("log");
        for pw in ["Shipped-Repl-pw", "Shipped-Rewind-pw", "Shipped-Pool-pw"] {
            assert!(!log.contains(pw), "a password in a log");
        }
    }
}

#[test]
fn the_three_rooms_example_runs_as_shipped() {
    shipped(Layout::ThreeRooms);
}

#[test]
fn the_two_rooms_and_arbiter_example_runs_as_shipped() {
    shipped(Layout::TwoRoomsArbiter);
}
