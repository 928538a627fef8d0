//! `pg-watcher --config FILE`: one member of a pg-watcher group.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

fn main() -> ExitCode {
    let args = <pgw_server::daemon::Args as clap::Parser>::parse();
    let force = args
        .force_new_group
        .then(|| pgw_server::recovery::ForceArgs {
            survivors: args.survivors.clone(),
            others_down: args.others_down,
        });
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
        println!("{}", cfg.timing_summary());
        for n in cfg.notes() {
            println!("note: {n}");
        }
        return ExitCode::SUCCESS;
    }
    if let Some(f) = force {
        return match force_new_group(&cfg, &f) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pg-watcher: --force-new-group refused: {e:#}");
                ExitCode::from(1)
            }
        };
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

fn force_new_group(
    cfg: &pgw_core::Config,
    f: &pgw_server::recovery::ForceArgs,
) -> anyhow::Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let lines = rt.block_on(pgw_server::recovery::force_new_group(cfg, f, |m| {
        eprintln!("pg-watcher: {m}")
    }))?;
    Ok(lines)
}
