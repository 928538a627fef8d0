//! `pgwctl certs ca|member|client`: the group's certificates, made without OpenSSL.
//!
//! A member's certificate names the member twice: subject CN (who it is when it calls) and a
//! DNS subject alternative name (what peers verify when they call it), plus every host name or
//! IP address operators reach it by (`--host`, verified by `pgwctl`). An operator's certificate
//! has only a CN, which the members' `[auth]` lists map to a role. The demo and the tests use
//! the same code.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::CliError;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create the group's CA in DIR (ca.crt, ca.key; refuses to overwrite one).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "pg-watcher CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a member certificate (DIR/NAME.crt, DIR/NAME.key) from the CA in DIR.
    Member {
        name: String,
        /// A host name or IP address the member is reached at (repeat for several).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Issue an operator's client certificate (DIR/NAME.crt, DIR/NAME.key); list NAME in the
    /// members' auth.read, auth.operate or auth.admin.
    Client {
        name: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

fn err(path: &Path, e: impl ToString) -> CliError {
    CliError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn gen_err(e: rcgen::Error) -> CliError {
    CliError::Usage(format!("certificate generation: {e}"))
}

/// Writes a file readable by its owner only (keys), or world-readable (certificates).
fn write(path: &Path, text: &str, private: bool) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| err(&tmp, e))?;
    f.write_all(text.as_bytes()).map_err(|e| err(&tmp, e))?;
    f.sync_all().map_err(|e| err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| err(path, e))
}

/// (year, month, day) of a Unix day number (inverse of the x509 module's days_from_civil).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 / 86_400)
        .unwrap_or(0);
    let (y, m, d) = civil(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + i64::from(days));
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// The group's CA, as files in one directory.
pub struct Authority {
    dir: PathBuf,
    key: KeyPair,
    params: CertificateParams,
}

impl Authority {
    /// Creates a CA in `dir`; refuses when one is there.
    pub fn create(dir: &Path, name: &str, days: u32) -> Result<Authority, CliError> {
        fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let cert = dir.join(CA_CERT);
        if cert.exists() {
            return Err(CliError::Usage(format!(
                "{} exists: a CA is already there (issue certificates with it, or choose another --dir)",
                cert.display()
            )));
        }
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = ca_params(name);
        validity(&mut params, days);
        let c = params.self_signed(&key).map_err(gen_err)?;
        write(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
        write(&cert, &c.pem(), false)?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            key,
            params,
        })
    }

    /// Opens the CA in `dir` (its key is needed to issue).
    pub fn open(dir: &Path) -> Result<Authority, CliError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let key_pem = fs::read_to_string(&key_path).map_err(|e| err(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| err(&key_path, e))?;
        let certs =
            pgw_server::tls::load_certs("ca", &cert_path).map_err(|e| err(&cert_path, e))?;
        let name = certs
            .first()
            .and_then(|c| pgw_server::x509::parse(c.as_ref()))
            .and_then(|i| i.common_name)
            .ok_or_else(|| err(&cert_path, "the CA certificate has no common name"))?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            key,
            params: ca_params(&name),
        })
    }

    /// Opens the CA in `dir`, creating it first when there is none.
    pub fn open_or_create(dir: &Path, name: &str) -> Result<Authority, CliError> {
        if dir.join(CA_CERT).exists() {
            Authority::open(dir)
        } else {
            Authority::create(dir, name, 3650)
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    fn issue_into(
        &self,
        dir: &Path,
        name: &str,
        sans: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        days: u32,
    ) -> Result<(PathBuf, PathBuf), CliError> {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(CliError::Usage(format!(
                "`{name}` cannot name a certificate file"
            )));
        }
        let mut p = CertificateParams::new(sans).map_err(gen_err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usages;
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, days);
        let key = KeyPair::generate().map_err(gen_err)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        write(&k, &key.serialize_pem(), true)?;
        write(&c, &cert.pem(), false)?;
        Ok((c, k))
    }

    /// A member certificate: CN and DNS name `name`, and every host in `hosts`.
    pub fn member(
        &self,
        name: &str,
        hosts: &[String],
        days: u32,
    ) -> Result<(PathBuf, PathBuf), CliError> {
        self.member_into(&self.dir, name, hosts, days)
    }

    /// [`Self::member`], written to `dir` instead of the CA's directory (each file replaced
    /// atomically: a member reloading them sees the old or the new one).
    pub fn member_into(
        &self,
        dir: &Path,
        name: &str,
        hosts: &[String],
        days: u32,
    ) -> Result<(PathBuf, PathBuf), CliError> {
        let mut sans = vec![name.to_string()];
        sans.extend(hosts.iter().filter(|h| *h != name).cloned());
        self.issue_into(
            dir,
            name,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            days,
        )
    }

    /// An operator's client certificate (CN `name`).
    pub fn client(&self, name: &str, days: u32) -> Result<(PathBuf, PathBuf), CliError> {
        self.issue_into(
            &self.dir,
            name,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            days,
        )
    }
}

/// Everything a group needs: a CA, a certificate per member and one client certificate per
/// operator role (`<prefix>-read`, `-operate`, `-admin`), listed in [`GroupCerts::auth`].
/// Used by the demo and the tests.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupCerts {
    pub ca: PathBuf,
    pub members: std::collections::BTreeMap<String, (PathBuf, PathBuf)>,
    /// Role name -> (common name, certificate, key).
    pub clients: std::collections::BTreeMap<String, (String, PathBuf, PathBuf)>,
}

pub const ROLES: [&str; 3] = ["read", "operate", "admin"];

impl GroupCerts {
    /// Makes (or reuses) the CA in `dir` and issues the certificates. `members` are
    /// (name, hosts it is reached at).
    pub fn make(
        dir: &Path,
        members: &[(String, Vec<String>)],
        prefix: &str,
    ) -> Result<GroupCerts, CliError> {
        let a = Authority::open_or_create(dir, "pg-watcher CA")?;
        let mut g = GroupCerts {
            ca: a.ca_path(),
            members: Default::default(),
            clients: Default::default(),
        };
        for (name, hosts) in members {
            g.members.insert(name.clone(), a.member(name, hosts, 825)?);
        }
        for role in ROLES {
            let cn = format!("{prefix}-{role}");
            let (c, k) = a.client(&cn, 825)?;
            g.clients.insert(role.to_string(), (cn, c, k));
        }
        Ok(g)
    }

    /// The `[tls]` section of `member`'s config.
    pub fn tls(&self, member: &str) -> pgw_core::config::TlsConfig {
        let (cert, key) = self.members.get(member).cloned().unwrap_or_default();
        pgw_core::config::TlsConfig::new(self.ca.clone(), cert, key)
    }

    /// The `[auth]` section listing the role certificates.
    pub fn auth(&self) -> pgw_core::config::AuthConfig {
        let names = |r: &str| {
            self.clients
                .get(r)
                .map(|(cn, _, _)| vec![cn.clone()])
                .unwrap_or_default()
        };
        pgw_core::config::AuthConfig {
            read: names("read"),
            operate: names("operate"),
            admin: names("admin"),
            ..Default::default()
        }
    }

    /// Client credentials of one role.
    pub fn client_auth(&self, role: &str) -> Result<crate::client::ClientAuth, CliError> {
        let (_, c, k) = self
            .clients
            .get(role)
            .ok_or_else(|| CliError::Usage(format!("no `{role}` client certificate")))?;
        crate::client::ClientAuth::from_files(Some(&self.ca), Some(c), Some(k), None)
    }
}

/// Runs `pgwctl certs ...`.
pub fn run(cmd: CertsCmd) -> Result<(), CliError> {
    match cmd {
        CertsCmd::Ca { dir, name, days } => {
            let a = Authority::create(&dir, &name, days)?;
            println!(
                "CA `{name}`: {} (key {}; keep the key offline once the certificates are issued)",
                a.ca_path().display(),
                dir.join(CA_KEY).display()
            );
        }
        CertsCmd::Member {
            name,
            hosts,
            dir,
            days,
        } => {
            let (c, k) = Authority::open(&dir)?.member(&name, &hosts, days)?;
            println!("member `{name}`: {} {}", c.display(), k.display());
        }
        CertsCmd::Client { name, dir, days } => {
            let (c, k) = Authority::open(&dir)?.client(&name, days)?;
            println!("client `{name}`: {} {}", c.display(), k.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_017), (2000, 3, 1));
        assert_eq!(civil(20_787), (2026, 11, 30));
    }

    #[test]
    fn issued_certificates_name_their_holder_and_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Authority::create(dir.path(), "test CA", 30).expect("ca");
        assert!(Authority::create(dir.path(), "again", 30).is_err());
        let (c, _) = a
            .member("room-a", &["127.0.0.1".into(), "db1.example".into()], 30)
            .expect("member");
        let certs = pgw_server::tls::load_certs("c", &c).expect("load");
        let info = pgw_server::x509::parse(certs[0].as_ref()).expect("parse");
        assert_eq!(info.common_name.as_deref(), Some("room-a"));
        assert_eq!(info.dns_names, vec!["room-a", "db1.example"]);
        assert!(info.not_after.unwrap_or(0) > 1_700_000_000);
        let b = Authority::open(dir.path()).expect("reopen");
        let (c2, _) = b.client("alice", 30).expect("client");
        let certs = pgw_server::tls::load_certs("c", &c2).expect("load");
        let info = pgw_server::x509::parse(certs[0].as_ref()).expect("parse");
        assert_eq!(info.common_name.as_deref(), Some("alice"));
        assert!(info.dns_names.is_empty());
        assert!(b.client("../x", 30).is_err());
    }
}
