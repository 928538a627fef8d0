//! Man pages and shell completions of both programs, generated from their clap definitions
//! (what the Debian package installs; `pgwctl completions SHELL` prints one script).

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::CliError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// (command, man section) of each program.
fn programs() -> [(clap::Command, &'static str); 2] {
    [
        (pgw_server::daemon::Args::command(), "8"),
        (crate::Cli::command(), "1"),
    ]
}

/// A completion script of pgwctl for `shell`.
pub fn completion(shell: Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut crate::Cli::command(), "pgwctl", out);
}

/// Writes `man/<name>.<section>` and `completions/{bash,zsh,fish}/...` for both programs.
pub fn write_all(out: &Path) -> Result<Vec<String>, CliError> {
    let mut written = Vec::new();
    let man = out.join("man");
    std::fs::create_dir_all(&man).map_err(io(&man))?;
    for (cmd, section) in programs() {
        let name = cmd.get_name().to_string();
        let path = man.join(format!("{name}.{section}"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .section(section)
            .render(&mut buf)
            .map_err(io(&path))?;
        std::fs::write(&path, buf).map_err(io(&path))?;
        written.push(path.display().to_string());
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let d = out.join("completions").join(dir);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
            let path = d.join(file);
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
            std::fs::write(&path, buf).map_err(io(&path))?;
            written.push(path.display().to_string());
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_page_and_script_is_written_and_names_its_program() {
        let dir = tempfile::tempdir().expect("tmp");
        let files = super::write_all(dir.path()).expect("docs");
        assert_eq!(files.len(), 8);
        let man = std::fs::read_to_string(dir.path().join("man/pgwctl.1")).expect("pgwctl.1");
        assert!(
            man.contains(".TH pgwctl 1") && man.contains("switchover"),
            "{man}"
        );
        let man = std::fs::read_to_string(dir.path().join("man/pg-watcher.8")).expect("8");
        assert!(
            man.contains("\\-\\-config") && man.contains("\\-\\-check"),
            "{man}"
        );
        let bash =
            std::fs::read_to_string(dir.path().join("completions/bash/pgwctl")).expect("bash");
        assert!(bash.contains("restart") && bash.contains("reload"));
    }
}
