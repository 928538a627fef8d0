//! Reading secrets from files, checked the way the programs that share them check them.

use std::path::Path;

/// A secret file that cannot be used, naming the setting and the file.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct SecretError {
    pub what: String,
    pub message: String,
}

/// Reads a libpq password file, refusing one libpq itself would ignore (group or world
/// access) so that a mistake shows at start, naming the file, rather than as a refused login.
pub fn read_passfile(path: &Path) -> Result<Vec<pgw_core::pgpass::Entry>, SecretError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |m: String| SecretError {
        what: format!("postgres.passfile {}", path.display()),
        message: m,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o}: libpq ignores a password file others can read; chmod 600 it",
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    Ok(pgw_core::pgpass::parse(&text))
}
