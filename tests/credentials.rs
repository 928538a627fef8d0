//! PostgreSQL as a deployment runs it: scram-sha-256 everywhere, passwords in a libpq password
//! file only, separate superuser, replication and rewind roles, TLS between the servers
//! (verify-full against a CA). Bootstrap, clone, stream, fail over, rewind and rejoin must all
//! work that way, and a rotated password must not kill a healthy primary.
//! Needs the PostgreSQL 15 server binaries (`.ci/run` installs them).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use pgw_core::Role;

const THREE: [Role; 3] = [Role::Data, Role::Data, Role::Data];
const SUPER_PW: &str = "Super-S3cret-pw";
const REPL_PW: &str = "Repl-S3cret-pw";
const REWIND_PW: &str = "Rewind-S3cret-pw";

fn chown_postgres(p: &Path) {
    let u = pgw_server::sidecar::pgctl::lookup_user("postgres").expect("OS user postgres");
    std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid)).expect("chown");
}

/// Writes `text` as a file only the postgres OS user can read.
fn secret(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    chown_postgres(&p);
    p
}

fn passfile(dir: &Path, super_pw: &str) -> PathBuf {
    secret(
        dir,
        "pgpass",
        format!(
            "# host:port:database:user:password\n\
             *:*:*:postgres:{super_pw}\n\
             *:*:*:replicator:{REPL_PW}\n\
             *:*:*:rewinder:{REWIND_PW}\n"
        )
        .as_bytes(),
    )
}

async fn query_strings(addr: &str, sql: &str) -> Vec<String> {
    let c = pgw_cli::writer::try_connect(addr)
        .await
        .expect("test client");
    c.query(sql, &[])
        .await
        .expect(sql)
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_roles_passfile_and_tls_between_servers_through_a_failover_and_a_rotation() {
    let mut g = Group::with_postgres(&THREE);
    let secrets = g.dir.path().join("secrets");
    std::fs::create_dir(&secrets).expect("mkdir");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    chown_postgres(&secrets);
    let pass = passfile(&secrets, SUPER_PW);
    let ca = secret(
        &secrets,
        "ca.crt",
        &std::fs::read(&pki().ca).expect("test CA"),
    );
    for m in &mut g.members {
        let name = m.name().to_string();
        let (crt, key) = pki().member(&name);
        let crt = secret(
            &secrets,
            &format!("{name}.crt"),
            &std::fs::read(crt).expect("crt"),
        );
        let key = secret(
            &secrets,
            &format!("{name}.key"),
            &std::fs::read(key).expect("key"),
        );
        let pg = m.cfg.postgres.first_mut().expect("[postgres]");
        pg.replication_user = Some("replicator".into());
        pg.rewind_user = Some("rewinder".into());
        pg.passfile = Some(pass.clone());
        pg.sslmode = "verify-full".into();
        pg.sslrootcert = Some(ca.clone());
        // The test's own client logs in as postgres over TCP without TLS (trust); everything
        // the servers and the watcher do needs a password, and the servers' links need TLS.
        pg.hba = vec![
            "local all all scram-sha-256".into(),
            "hostssl replication replicator 127.0.0.0/8 scram-sha-256".into(),
            "hostssl postgres rewinder 127.0.0.0/8 scram-sha-256".into(),
            "host postgres postgres 127.0.0.0/8 trust".into(),
        ];
        pg.settings.extend([
            "ssl = on".to_string(),
            format!("ssl_cert_file = '{}'", crt.display()),
            format!("ssl_key_file = '{}'", key.display()),
            "password_encryption = 'scram-sha-256'".to_string(),
        ]);
    }
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    let paddr = g.pg_addr(pi);

    // The roles exist with SCRAM verifiers; the replicas stream as `replicator` over TLS.
    let roles = query_strings(
        &paddr,
        "SELECT rolname || ':' || left(coalesce(rolpassword, ''), 13) FROM pg_authid \
         WHERE rolname IN ('postgres', 'replicator', 'rewinder') ORDER BY 1",
    )
    .await;
    assert_eq!(
        roles,
        vec![
            "postgres:SCRAM-SHA-256",
            "replicator:SCRAM-SHA-256",
            "rewinder:SCRAM-SHA-256"
        ]
    );
    let links = query_strings(
        &paddr,
        "SELECT r.usename || ':' || s.ssl::text FROM pg_stat_replication r \
         JOIN pg_stat_ssl s USING (pid) ORDER BY 1",
    )
    .await;
    assert_eq!(
        links,
        vec!["replicator:true", "replicator:true"],
        "{links:?}"
    );

    // A failover: the old primary is rewound (as `rewinder`, over TLS) and rejoins.
    pgw_cli::writer::create_table(&paddr).await.expect("table");
    let pm = g.postmaster_pid(pi).expect("postmaster");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pm, libc::SIGKILL);
    }
    let s2 = wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "a new primary",
        |s| primary_of(s).is_some_and(|x| x != p),
    )
    .await;
    assert!(epoch_of(&s2) > e0);
    let np = primary_of(&s2).expect("new primary");
    wait_until(
        &g.endpoints(),
        Duration::from_secs(120),
        "the old primary rejoined",
        |s| {
            primary_of(s).as_deref() == Some(np.as_str())
                && node_role(s, &p).as_deref() == Some("sync_replica")
        },
    )
    .await;
    let s3 = wait_in_sync(&g, Duration::from_secs(60)).await;
    let ni = g.index_of(&np);
    let log = g.log_text(pi);
    assert!(
        log.contains("rewinding onto") && !log.contains("cloning afresh"),
        "the old primary was rewound, not cloned: {log}"
    );

    // Nothing secret in the logs, the rendered settings or the processes' command lines.
    for i in 0..3 {
        let pgw_conf = std::fs::read_to_string(
            g.members[i]
                .cfg
                .postgres
                .first()
                .expect("pg")
                .data_dir
                .join("pgw.conf"),
        )
        .unwrap_or_default();
        for text in [g.log_text(i), pgw_conf] {
            for pw in [SUPER_PW, REPL_PW, REWIND_PW] {
                assert!(!text.contains(pw), "a password in member {i}'s files");
            }
        }
    }
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            for pw in [SUPER_PW, REPL_PW, REWIND_PW] {
                assert!(!cmd.contains(pw), "a password on a command line: {cmd}");
            }
        }
    }

    // A rotated password the watcher does not have yet: its login is refused (28P01), the
    // primary keeps running and keeps its role; status says why. Fixing the passfile heals it.
    let naddr = g.pg_addr(ni);
    let e1 = epoch_of(&s3);
    let npm = g.postmaster_pid(ni).expect("postmaster");
    let c = pgw_cli::writer::try_connect(&naddr).await.expect("client");
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD 'Rotated-pw-2'",
    )
    .await
    .expect("rotate");
    let t0 = Instant::now();
    let mut shown = None;
    while shown.is_none() && t0.elapsed() < Duration::from_secs(20) {
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg-watcher'",
            &[],
        )
        .await
        .expect("end the watcher's session");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(st) = pgw_cli::status::gather(&g.endpoints(), Duration::from_secs(2)).await {
            if st.clusters[0]
                .nodes
                .iter()
                .any(|n| n.member == np && n.error.as_deref().is_some_and(|e| e.contains("28P01")))
            {
                shown = Some(st);
            }
        }
    }
    let shown = shown.expect("the refused login (28P01) in status");
    eprintln!("{}", pgw_cli::status::render_table(&shown));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s4 = wait_until(&g.endpoints(), Duration::from_secs(5), "status", |_| true).await;
    assert_eq!(primary_of(&s4).as_deref(), Some(np.as_str()), "{s4:?}");
    assert_eq!(epoch_of(&s4), e1, "a refused login is no failover");
    assert_eq!(g.postmaster_pid(ni), Some(npm), "the primary kept running");
    passfile(&secrets, "Rotated-pw-2");
    let s5 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert!(
        s5.clusters[0].nodes.iter().all(|n| n.error.is_none()),
        "{s5:?}"
    );
    assert_eq!(epoch_of(&s5), e1);
}
