//! Entry point of the grpc_kafka service: read settings, start logging, run until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use grpc_kafka::{Application, Cli, Command};
use tokio_util::sync::CancellationToken;

/// Every call allocates a little (HTTP/2 frames, headers, the reply); mimalloc's per-thread
/// free lists make that cheaper than the system allocator (BENCHMARKS.md, reads).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match service_kit::args_with_secret_files(&[("REDIS_URL", "--redis-url")]) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("grpc_kafka: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let _telemetry = service_kit::init_telemetry("grpc_kafka", cli.settings.log_format);
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
        Command::Healthcheck => match grpc_kafka::healthcheck(cli.settings.grpc_addr).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("unhealthy: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
