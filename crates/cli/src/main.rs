//! `retrain`: parse → load settings → build adapters → run the engine →
//! render → exit code. Nothing else.

mod args;
mod commands;
mod output;
mod progress;
mod signals;
mod telemetry;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `--version`/`--help`/usage errors are answered here, before any runtime
    // or config work (clap exits 2 on usage errors).
    telemetry::mark_process_start();
    let cli = args::Cli::parse();
    let terminal =
        telemetry::Terminal::detect(cli.log_format, cli.output == args::OutputFormat::Text);
    telemetry::init(
        cli.log_format,
        cli.log.as_deref(),
        cli.log_dir.clone(),
        terminal,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(commands::exit::LABEL_FAILED);
        }
    };
    let code = runtime.block_on(async {
        let interrupt = signals::Interrupt::install();
        match commands::dispatch(cli, interrupt).await {
            Ok(code) => code,
            Err(failure) => {
                eprintln!("error: {:#}", failure.error);
                failure.code
            }
        }
    });
    ExitCode::from(code)
}
