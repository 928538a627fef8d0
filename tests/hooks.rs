//! The shipped hook examples in `deploy/hooks/`, run as pg-watcher runs them: argv, no shell,
//! the change in the environment. Everything stays on loopback and in a temporary directory.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn hook(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/hooks")
        .join(name)
}

fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(hook(name))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .output()
        .expect("hook runs")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

const CHANGE: [(&str, &str); 5] = [
    ("PGW_EVENT", "active_room_changed"),
    ("PGW_CLUSTER", "global"),
    ("PGW_NEW_PRIMARY", "global1b-pgserver0"),
    ("PGW_ROOM", "room-b"),
    ("PGW_ACTIVE_ROOM", "room-b"),
];

#[test]
fn active_room_is_written_to_a_file_and_to_memcached() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("active-room");
    let out = run(
        "active-room.sh",
        &[file.to_str().unwrap_or_default()],
        &CHANGE,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&file).expect("written"), "room-b\n");

    // A memcached on loopback (the text protocol's `set`, answered STORED).
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut cmd = String::new();
        r.read_line(&mut cmd).expect("command");
        let mut value = String::new();
        r.read_line(&mut value).expect("value");
        (&s).write_all(b"STORED\r\n").expect("reply");
        (cmd, value)
    });
    let out = run(
        "active-room.sh",
        &[file.to_str().unwrap_or_default(), &addr, "ks_master_zone"],
        &CHANGE,
    );
    assert!(out.status.success(), "{}", text(&out));
    let (cmd, value) = server.join().expect("server");
    assert_eq!(cmd, "set ks_master_zone 0 0 6\r\n");
    assert_eq!(value, "room-b\r\n");

    // A memcached that refuses: the hook fails (and pg-watcher records it).
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        (&s).write_all(b"SERVER_ERROR out of memory\r\n")
            .expect("reply");
        std::thread::sleep(Duration::from_millis(200));
    });
    let out = run(
        "active-room.sh",
        &[file.to_str().unwrap_or_default(), &addr],
        &CHANGE,
    );
    let _ = server.join();
    assert!(!out.status.success());
    assert!(text(&out).contains("SERVER_ERROR"), "{}", text(&out));
    // Without its environment it refuses to guess.
    let out = run("active-room.sh", &[file.to_str().unwrap_or_default()], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("PGW_ACTIVE_ROOM"), "{}", text(&out));
}

#[test]
fn hosts_entry_points_the_name_at_the_new_primary() {
    let dir = tempfile::tempdir().expect("tmp");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1\tlocalhost\n10.0.1.5\tglobal-pg-master\n10.0.9.9\tother\n",
    )
    .expect("hosts");
    let map = dir.path().join("map");
    std::fs::write(
        &map,
        "global1a-pgserver0 10.0.1.5\nglobal1b-pgserver0 10.0.2.5\n",
    )
    .expect("map");
    let args = [
        hosts.to_str().unwrap_or_default(),
        "global-pg-master",
        map.to_str().unwrap_or_default(),
    ];
    let out = run("hosts-entry.sh", &args, &CHANGE);
    assert!(out.status.success(), "{}", text(&out));
    let now = std::fs::read_to_string(&hosts).expect("hosts");
    assert_eq!(
        now,
        "127.0.0.1\tlocalhost\n10.0.9.9\tother\n10.0.2.5\tglobal-pg-master\n"
    );
    // A member missing from the map changes nothing and fails, naming it.
    let out = run("hosts-entry.sh", &args, &[("PGW_NEW_PRIMARY", "nobody")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("nobody"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&hosts).expect("hosts"), now);
}

#[test]
fn haproxy_reload_signals_the_master_process() {
    // A stand-in for HAProxy's master: a process whose pid is in the pid file and which
    // records SIGUSR2 (a graceful reload).
    let dir = tempfile::tempdir().expect("tmp");
    let got = dir.path().join("got-usr2");
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "trap 'echo reload > {}; exit 0' USR2; while :; do sleep 0.1; done",
            got.display()
        ))
        .spawn()
        .expect("stand-in");
    let pidfile = dir.path().join("haproxy.pid");
    std::fs::write(&pidfile, format!("{}\n", child.id())).expect("pid file");
    std::thread::sleep(Duration::from_millis(300));
    let out = run(
        "haproxy-reload.sh",
        &[pidfile.to_str().unwrap_or_default()],
        &CHANGE,
    );
    assert!(out.status.success(), "{}", text(&out));
    let st = child.wait().expect("stand-in exits");
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(&got).expect("signalled"),
        "reload\n"
    );
}
