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
