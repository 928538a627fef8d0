//! libpq password files (`~/.pgpass` format), read the way libpq reads them: the watcher's own
//! connections and the roles it creates take their passwords from the same file the servers
//! use, so a password is written in one place only.
//!
//! Each line is `hostname:port:database:username:password`; any of the first four may be `*`;
//! `\` escapes a `:` or a `\`; lines starting with `#` are comments. The first matching line
//! wins.

/// One line of a password file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub host: String,
    pub port: String,
    pub database: String,
    pub user: String,
    pub password: String,
}

impl Entry {
    fn field_matches(pattern: &str, value: &str) -> bool {
        pattern == "*" || pattern == value
    }

    /// Whether this line answers a connection to `host:port/database` as `user`.
    pub fn matches(&self, host: &str, port: u16, database: &str, user: &str) -> bool {
        Self::field_matches(&self.host, host)
            && Self::field_matches(&self.port, &port.to_string())
            && Self::field_matches(&self.database, database)
            && Self::field_matches(&self.user, user)
    }
}

/// Splits one line on unescaped `:`; `None` for comments, blank and malformed lines (libpq
/// skips those too).
fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = Vec::with_capacity(5);
    let mut cur = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    let [host, port, database, user, password]: [String; 5] = fields.try_into().ok()?;
    Some(Entry {
        host,
        port,
        database,
        user,
        password,
    })
}

/// Every entry of a password file's text, in order.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines().filter_map(parse_line).collect()
}

/// The password libpq would use for this connection.
pub fn lookup<'a>(
    entries: &'a [Entry],
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Option<&'a str> {
    entries
        .iter()
        .find(|e| e.matches(host, port, database, user))
        .map(|e| e.password.as_str())
}

/// The password of `role` for connections between servers (the first line naming the role
/// itself: a wildcard user line is not a password for a role we create).
pub fn role_password<'a>(entries: &'a [Entry], role: &str) -> Option<&'a str> {
    entries
        .iter()
        .find(|e| e.user == role)
        .map(|e| e.password.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_match_like_libpq() {
        let e = parse(
            "# comment\n\
             10.1.0.11:5432:*:replicator:r\\:pw\n\
             *:*:*:replicator:fallback\n\
             *:*:*:rewinder:w\\\\x\n\
             bad line\n\
             \n",
        );
        assert_eq!(e.len(), 3);
        assert_eq!(
            lookup(&e, "10.1.0.11", 5432, "replication", "replicator"),
            Some("r:pw")
        );
        assert_eq!(
            lookup(&e, "10.2.0.11", 5432, "postgres", "replicator"),
            Some("fallback")
        );
        assert_eq!(
            lookup(&e, "10.2.0.11", 5432, "postgres", "rewinder"),
            Some("w\\x")
        );
        assert_eq!(lookup(&e, "10.2.0.11", 5432, "postgres", "nobody"), None);
        assert_eq!(role_password(&e, "replicator"), Some("r:pw"));
        assert_eq!(role_password(&parse("*:*:*:*:x\n"), "replicator"), None);
        // A password may contain `:` unescaped (only the first four separate fields).
        assert_eq!(parse("*:*:*:u:a:b")[0].password, "a:b");
    }

    fn escape(s: &str) -> String {
        s.replace('\\', "\\\\").replace(':', "\\:")
    }

    proptest! {
        #[test]
        fn escaped_fields_round_trip(
            host in "[a-z0-9.:\\\\]{1,12}", user in "[a-z0-9_:\\\\]{1,12}", pw in "[ -~]{0,20}"
        ) {
            let line = format!("{}:5432:*:{}:{}", escape(&host), escape(&user), escape(&pw));
            let e = parse(&line);
            prop_assert_eq!(e.len(), 1);
            prop_assert_eq!(&e[0].host, &host);
            prop_assert_eq!(&e[0].user, &user);
            prop_assert_eq!(&e[0].password, &pw);
            prop_assert_eq!(lookup(&e, &host, 5432, "db", &user), Some(pw.as_str()));
        }

        #[test]
        fn any_text_parses_without_panicking(text in "[ -~\\n]{0,200}") {
            let _ = parse(&text);
        }
    }
}
