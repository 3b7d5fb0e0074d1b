//! Entry point of the websocket service: read settings, start logging, run until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use websocket::{Application, Cli, Command};

/// Every purchase allocates a little (frames, JSON, the reply); mimalloc's per-thread free lists
/// make that cheaper than the system allocator (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match service_kit::args_with_secret_files(&[("DATABASE_URL", "--database-url")]) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("websocket: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let _telemetry = service_kit::init_telemetry("websocket", cli.settings.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = match Application::build(cli.settings).await {
                Ok(app) => app,
                Err(error) => return service_kit::exit_code("cannot start", Err(error)),
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(service_kit::cancel_on_signal(shutdown.clone()));
            let stopped = app.run_until_stopped(shutdown).await;
            service_kit::exit_code("stopped with an error", stopped)
        }
        Command::Migrate => {
            let settings = cli.settings;
            let pool =
                websocket::db::pool(settings.database_url.clone(), 2, settings.database_timeout);
            match websocket::db::migrate(&pool, settings.database_wait).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "migration failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck => match websocket::healthcheck(cli.settings.websocket_addr).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("unhealthy: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
