//! `pgwctl`: operator CLI for a pg-watcher group.

fn main() -> std::process::ExitCode {
    let cli = pgw_cli::parse_args();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgwctl: cannot start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(pgw_cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgwctl: {e}");
            std::process::ExitCode::from(match e {
                pgw_cli::CliError::Usage(_) | pgw_cli::CliError::Config(_) => 2,
                _ => 1,
            })
        }
    }
}
