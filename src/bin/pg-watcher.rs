//! `pg-watcher --config FILE`: one member of a pg-watcher group.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

fn main() -> ExitCode {
    let args = <pgw_server::daemon::Args as clap::Parser>::parse();
    let (path, check, join) = (args.config, args.check, args.join);
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
        for n in cfg.notes() {
            println!("note: {n}");
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) =
        pgw_server::telemetry::init_logging(&cfg.cluster_id, &cfg.member, &cfg.log.level)
    {
        eprintln!("pg-watcher: {e}");
        return ExitCode::from(2);
    }
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    match run(cfg, path, &join) {
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

fn run(cfg: pgw_core::Config, path: PathBuf, join: &[String]) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let r = rt.block_on(pgw_server::daemon::run(cfg, path, join));
    // Do not wait for stuck blocking work (a full disk): a stopping member exits promptly.
    rt.shutdown_timeout(std::time::Duration::from_millis(300));
    r.context("pg-watcher stopped")?;
    Ok(())
}
