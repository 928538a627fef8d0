//! The Debian package, built the documented way (deploy/deb/build.sh, cargo-deb) and installed
//! with `dpkg -i`: both binaries, the unit, the examples (each passes `pg-watcher --check` where
//! it was installed), man pages and completions; removed again afterwards.
//! Needs cargo-deb and dpkg (`.ci/deps` installs cargo-deb); runs as root.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Removes the package when the test ends, whatever happened.
struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "pg-watcher"])
            .output();
    }
}

#[test]
fn the_debian_package_installs_with_dpkg_and_its_examples_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (already, _) = run(Command::new("dpkg-query").args(["-W", "pg-watcher"]));
    assert!(
        !already,
        "a pg-watcher package is installed on this machine: not touching it"
    );
    // The test's binaries are the dev profile's; the package is the same layout as a release.
    let (ok, out) = run(Command::new("bash")
        .arg(root.join("deploy/deb/build.sh"))
        .args(["--profile", "dev", "--fast"])
        .current_dir(root));
    assert!(ok, "deploy/deb/build.sh: {out}");
    let deb = out
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".deb"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("no .deb named in: {out}"));
    let _cleanup = Installed;
    let (ok, out) = run(Command::new("dpkg").args(["-i", &deb]));
    assert!(ok, "dpkg -i {deb}: {out}");

    let (ok, out) = run(Command::new("/usr/bin/pg-watcher").arg("--version"));
    assert!(ok && out.starts_with("pg-watcher "), "{out}");
    let (ok, out) = run(Command::new("/usr/bin/pgwctl").arg("--help"));
    assert!(
        ok && out.contains("restart") && out.contains("reload"),
        "{out}"
    );
    let examples = Path::new("/usr/share/doc/pg-watcher/examples");
    let mut checked = 0;
    for layout in ["three-rooms", "two-rooms-arbiter"] {
        for e in std::fs::read_dir(examples.join(layout)).expect("installed examples") {
            let p = e.expect("entry").path();
            let (ok, out) = run(Command::new("/usr/bin/pg-watcher")
                .arg("--config")
                .arg(&p)
                .arg("--check"));
            assert!(ok && out.contains(": ok (member"), "{}: {out}", p.display());
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "every example config was installed");
    for f in [
        "/lib/systemd/system/pg-watcher.service",
        "/usr/share/man/man8/pg-watcher.8.gz",
        "/usr/share/man/man1/pgwctl.1.gz",
        "/usr/share/bash-completion/completions/pgwctl",
        "/usr/share/zsh/vendor-completions/_pgwctl",
        "/usr/share/fish/vendor_completions.d/pgwctl.fish",
        "/usr/share/doc/pg-watcher/examples/tls/make-certs.sh",
        "/usr/share/doc/pg-watcher/examples/pgpool/pgpool.conf.template",
        "/usr/share/doc/pg-watcher/README.md",
        "/usr/share/pg-watcher/hooks/active-room.sh",
        "/usr/share/pg-watcher/hooks/haproxy-reload.sh",
        "/usr/share/pg-watcher/hooks/hosts-entry.sh",
        "/usr/share/doc/pg-watcher/examples/haproxy/haproxy.cfg",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    // The installed unit as it is, pointing at the installed binary.
    let (_, out) =
        run(Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/pg-watcher.service"]));
    assert!(
        !out.lines().any(|l| l.contains("pg-watcher.service")),
        "systemd-analyze verify: {out}"
    );
    let (ok, out) = run(Command::new("dpkg").args(["-r", "pg-watcher"]));
    assert!(ok, "dpkg -r: {out}");
    assert!(!Path::new("/usr/bin/pg-watcher").exists(), "removed");
}
