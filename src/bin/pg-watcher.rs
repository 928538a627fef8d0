//! `pg-watcher --config FILE`: one member of a pg-watcher group.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

fn usage() -> &'static str {
    "usage: pg-watcher --config FILE [--check]\n  --check   validate the config and exit"
}

fn main() -> ExitCode {
    let mut config: Option<PathBuf> = None;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => config = args.next().map(PathBuf::from),
            "--check" => check = true,
            "--version" | "-V" => {
                println!("pg-watcher {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("pg-watcher: unknown argument `{other}`\n{}", usage());
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = config else {
        eprintln!("pg-watcher: --config FILE is required\n{}", usage());
        return ExitCode::from(2);
    };
    let cfg = match pgw_core::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-watcher: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!(
            "{}: ok (member `{}` of cluster `{}`)",
            path.display(),
            cfg.member,
            cfg.cluster_id
        );
        return ExitCode::SUCCESS;
    }
    if let Err(e) =
        pgw_server::telemetry::init_logging(&cfg.cluster_id, &cfg.member, &cfg.log.level)
    {
        eprintln!("pg-watcher: {e}");
        return ExitCode::from(2);
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing_error(&format!("{e:#}"));
            eprintln!("pg-watcher: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn tracing_error(msg: &str) {
    // Also goes through the structured log so it carries the member name.
    pgw_server::telemetry::log_fatal(msg);
}

fn run(cfg: pgw_core::Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let r = rt.block_on(pgw_server::daemon::run(cfg));
    // Do not wait for stuck blocking work (a full disk): a stopping member exits promptly.
    rt.shutdown_timeout(std::time::Duration::from_millis(300));
    r.context("pg-watcher stopped")?;
    Ok(())
}
