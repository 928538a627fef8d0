//! The example configs in deploy/ must stay valid and describe one group per layout.

use pgw_core::{Config, Role};

fn load_dir(dir: &str) -> Vec<Config> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(dir);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&root).expect("deploy dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "toml") {
            out.push(Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
        }
    }
    out.sort_by(|a, b| a.member.cmp(&b.member));
    out
}

fn same_group(cfgs: &[Config]) {
    let fp = cfgs[0].members_fingerprint();
    for c in cfgs {
        assert_eq!(
            c.members_fingerprint(),
            fp,
            "{} has another member list",
            c.member
        );
        assert_eq!(c.cluster_id, cfgs[0].cluster_id);
    }
}

#[test]
fn three_rooms_layout_is_valid() {
    let c = load_dir("three-rooms");
    assert_eq!(c.len(), 3);
    same_group(&c);
    assert!(c[0].members.iter().all(|m| m.role == Role::Data));
}

#[test]
fn two_rooms_plus_arbiter_layout_is_valid() {
    let c = load_dir("two-rooms-arbiter");
    assert_eq!(c.len(), 3);
    same_group(&c);
    assert_eq!(
        c[0].members
            .iter()
            .filter(|m| m.role == Role::Arbiter)
            .count(),
        1
    );
}

#[test]
fn two_rooms_active_standby_layout_is_valid_and_says_automatic_failover_is_off() {
    let c = load_dir("two-rooms");
    assert_eq!(c.len(), 2);
    same_group(&c);
    assert!(c[0].members.iter().all(|m| m.role == Role::Data));
    for x in &c {
        assert!(x.clusters.iter().all(|cl| cl.allow_degraded));
        let notes = x.notes().join("\n");
        assert!(
            notes.contains("automatic failover is off") && notes.contains("--force-new-group"),
            "{notes}"
        );
    }
}

#[test]
fn three_two_one_layout_is_valid_with_five_voters_and_a_spare() {
    let c = load_dir("three-two-one");
    assert_eq!(c.len(), 6);
    same_group(&c);
    let m = &c[0].members;
    assert_eq!(c[0].voters().count(), 5);
    let spares: Vec<&str> = m
        .iter()
        .filter(|m| m.spare)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(spares, vec!["saz-spare"]);
    let votes_in = |room: &str| m.iter().filter(|x| x.votes() && x.room() == room).count();
    assert_eq!((votes_in("maz"), votes_in("saz")), (3, 2));
    assert!(c[0].notes().is_empty(), "automatic failover works in 3+2+1");
}

#[test]
fn two_regions_standby_group_replicates_from_the_shipped_main_group() {
    let dr = load_dir("two-regions");
    let main = load_dir("two-rooms-arbiter");
    assert_eq!(dr.len(), 3);
    same_group(&dr);
    assert_ne!(dr[0].cluster_id, main[0].cluster_id, "a group of its own");
    let main_eps: Vec<String> = main[0].members.iter().map(|m| m.grpc.clone()).collect();
    for c in &dr {
        let so = c.clusters[0]
            .standby_of
            .as_ref()
            .expect("the standby group's cluster is standby_of the main group's");
        assert_eq!(so.endpoints, main_eps, "{}", c.member);
        assert_eq!(so.cluster_of(&c.clusters[0].name), main[0].clusters[0].name);
    }
}

#[test]
fn every_data_member_has_a_pgpool_and_the_rendered_config_disables_pgpool_failover() {
    for layout in [
        "three-rooms",
        "two-rooms-arbiter",
        "two-rooms",
        "three-two-one",
    ] {
        for c in load_dir(layout) {
            assert_eq!(
                c.members,
                load_dir(layout)[0].members,
                "{layout}: same [[members]]"
            );
            assert!(c.pgpool.is_some(), "{layout}/{}: [pgpool]", c.member);
            for m in c.data_members() {
                assert!(
                    m.pgpool.is_some() && m.pcp.is_some(),
                    "{layout}: {} has no pgpool",
                    m.name
                );
            }
            if !c.manages_pgpool() {
                continue;
            }
            let wd = c.pgpool_work_dir("global").expect("work dir");
            let conf =
                pgw_server::pgpool::managed::render_conf(&c, "global", &wd, "pw").expect("render");
            for line in [
                "backend_clustering_mode = 'streaming_replication'",
                "failover_on_backend_error = off",
                "failover_command = ''",
                "health_check_period = 0",
                "auto_failback = off",
                "backend_flag0 = 'ALLOW_TO_FAILOVER'",
                "backend_application_name1 = 'room-",
            ] {
                assert!(
                    conf.contains(line),
                    "{layout}/{}: missing `{line}`",
                    c.member
                );
            }
            assert!(
                conf.contains("sr_check_password = 'pw'"),
                "{layout}/{}",
                c.member
            );
            for ph in [
                "sr_check_user",
                "sr_check_password",
                "listen_host",
                "port",
                "pcp_host",
                "pcp_port",
                "work_dir",
            ] {
                assert!(!conf.contains(&format!("{{{{{ph}}}}}")), "unrendered {ph}");
            }
        }
    }
}

/// deploy/tls/make-certs.sh, run as documented, makes certificates every member of each layout
/// loads with its [tls] section as shipped (only the directory substituted), and the operator
/// names in [auth] get client certificates that pgwctl loads.
#[test]
fn the_documented_certificate_script_makes_what_the_configs_need() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for layout in [
        "three-rooms",
        "two-rooms-arbiter",
        "two-rooms",
        "three-two-one",
    ] {
        let cfgs = load_dir(layout);
        let dir = tempfile::tempdir().expect("tmp");
        let pki = dir.path().join("pki");
        let mut args: Vec<String> = vec![pki.display().to_string()];
        for m in &cfgs[0].members {
            let host = m.grpc.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
            args.push(format!("{}={host}", m.name));
        }
        args.push("--".into());
        let a = &cfgs[0].auth;
        args.extend(a.read.iter().chain(&a.operate).chain(&a.admin).cloned());
        let out = std::process::Command::new(root.join("deploy/tls/make-certs.sh"))
            .args(&args)
            .env("PGWCTL", env!("CARGO_BIN_EXE_pgwctl"))
            .output()
            .expect("run make-certs.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for c in &cfgs {
            let sub = |p: &std::path::Path| pki.join(p.file_name().expect("file name"));
            let mut tls = c.tls.clone();
            assert_eq!(tls.ca, std::path::Path::new("/etc/pg-watcher/tls/ca.crt"));
            tls.ca = sub(&tls.ca);
            tls.cert = sub(&tls.cert);
            tls.key = sub(&tls.key);
            pgw_server::tls::Tls::load(&tls, &c.member, c.auth.has_tokens())
                .unwrap_or_else(|e| panic!("{layout}/{}: {e}", c.member));
        }
        for op in a.read.iter().chain(&a.operate).chain(&a.admin) {
            pgw_cli::client::ClientAuth::from_files(
                Some(&pki.join("ca.crt")),
                Some(&pki.join(format!("{op}.crt"))),
                Some(&pki.join(format!("{op}.key"))),
                None,
            )
            .unwrap_or_else(|e| panic!("{op}: {e}"));
        }
        // A certificate of another member is refused, naming the field.
        let mut tls = cfgs[0].tls.clone();
        tls.ca = pki.join("ca.crt");
        tls.cert = pki.join(format!("{}.crt", cfgs[1].member));
        tls.key = pki.join(format!("{}.key", cfgs[1].member));
        let e = pgw_server::tls::Tls::load(&tls, &cfgs[0].member, false)
            .err()
            .expect("another member's certificate is refused");
        assert!(e.to_string().contains("tls.cert"), "{e}");
    }
}

/// A shipped config with a setting the watcher owns added is refused by `pg-watcher --check`,
/// naming the line: such a line would otherwise silently give up zero-loss failover.
#[test]
fn an_owned_postgres_setting_is_refused_by_the_daemon() {
    let mut c = load_dir("three-rooms").remove(0);
    if let Some(pg) = c.postgres.first_mut() {
        pg.settings = vec![
            "shared_buffers = '1GB'".into(),
            "synchronous_commit = local".into(),
        ];
    }
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("room-a.toml");
    std::fs::write(&path, c.to_toml().expect("toml")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pg-watcher"))
        .args(["--config", &path.display().to_string(), "--check"])
        .output()
        .expect("pg-watcher --check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("postgres.settings[1]") && err.contains("synchronous_commit"),
        "{err}"
    );
}

/// The systemd unit as shipped: every directory an example config writes (the Raft data
/// directory, PostgreSQL's data directory, the pgpool work directory) is writable under
/// `ProtectSystem=strict`, the member is reloadable (SIGHUP re-reads certificates), the config
/// is checked before start, and stopping the daemon leaves postgres and pgpool running.
#[test]
fn the_systemd_unit_lets_every_example_config_write_where_it_writes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/pg-watcher.service")).expect("unit");
    let key = |k: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{k}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_string))
            .collect()
    };
    assert_eq!(key("ProtectSystem"), vec!["strict"]);
    let writable: Vec<String> = key("ReadWritePaths")
        .into_iter()
        .chain(
            key("StateDirectory")
                .into_iter()
                .map(|d| format!("/var/lib/{d}")),
        )
        .collect();
    let ok = |p: &std::path::Path| {
        writable
            .iter()
            .any(|w| p.starts_with(std::path::Path::new(w)))
    };
    for layout in [
        "three-rooms",
        "two-rooms-arbiter",
        "two-rooms",
        "three-two-one",
    ] {
        for c in load_dir(layout) {
            let mut dirs = vec![c.data_dir.clone()];
            dirs.extend(c.postgres.first().map(|p| p.data_dir.clone()));
            if c.manages_pgpool() {
                dirs.extend(c.pgpool_work_dir("global"));
            }
            for d in dirs {
                assert!(
                    ok(&d),
                    "{layout}/{}: {} is not writable under the unit ({writable:?})",
                    c.member,
                    d.display()
                );
            }
        }
    }
    assert!(key("ExecReload").iter().any(|x| x.contains("-HUP")));
    // A restart or upgrade of the daemon must not take postgres and pgpool down with it.
    assert_eq!(key("KillMode"), vec!["process"]);
    assert!(key("ExecStartPre").iter().any(|x| x == "--check"));
}

/// `systemd-analyze verify` accepts the unit as shipped (only the binary's path substituted).
#[test]
fn the_systemd_unit_verifies() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/pg-watcher.service")).expect("unit");
    let bin = env!("CARGO_BIN_EXE_pg-watcher");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("pg-watcher.service");
    std::fs::write(&path, unit.replace("/usr/bin/pg-watcher", bin)).expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd; .ci/deps installs it)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Complaints about other units installed on the machine are not ours.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("pg-watcher.service"))
        .collect();
    assert!(ours.is_empty() && out.status.success(), "{text}");
}
