//! The registrar binary: parse, set up logging, dispatch, map errors to exit codes.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use registrar::commands::{self, exit};
use registrar::config::ConfigError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = registrar::cli::parse();
    if let Some(out) = commands::generated(&cli) {
        return match out {
            Ok(bytes) => {
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&bytes).and_then(|_| stdout.flush());
                ExitCode::from(exit::OK)
            }
            Err(f) => {
                eprintln!("registrar: {f}");
                ExitCode::from(f.code)
            }
        };
    }
    let env: registrar::config::Env = std::env::vars().collect();
    let config = match commands::load_config(&cli, &env) {
        Ok(c) => c,
        Err(f) => {
            eprintln!("registrar: {f}");
            return ExitCode::from(f.code);
        }
    };
    registrar::process::init_logging(config.log_format, &env);
    let json_logs = config.log_format == registrar::cli::LogFormat::Json;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // One thread is plenty for one host's agent and keeps it small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("registrar: cannot start the async runtime: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let cancel = CancellationToken::new();
    let reload = Arc::new(Notify::new());
    let reload_flags = cli.clone();
    let reload_env = env.clone();
    let control = commands::Control {
        cancel: cancel.clone(),
        reload: reload.clone(),
        load: Some(Box::new(move || {
            commands::load_config(&reload_flags, &reload_env).map_err(|f| {
                match f.error.downcast::<ConfigError>() {
                    Ok(e) => e,
                    Err(other) => ConfigError {
                        problems: vec![format!("{other:#}")],
                    },
                }
            })
        })),
    };
    let result = runtime.block_on(async {
        let signals = tokio::spawn(registrar::process::handle_signals(cancel.clone(), reload));
        let result = commands::run(cli, config, control).await;
        cancel.cancel();
        match signals.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "could not listen for signals"),
            Err(e) => tracing::warn!(error = %e, "signal task failed"),
            Ok(Ok(())) => {}
        }
        result
    });
    // Dropping the runtime would wait for its blocking threads, among them
    // etcd-client's name lookups (getaddrinfo), which hang for as long as
    // the resolver does when etcd's hosts vanish (a `docker compose down`
    // stops etcd beside the agent). Their results are no longer wanted:
    // the shutdown is bounded, so the exit is too.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        // With JSON logs every line on stderr is JSON, the last one too.
        Err(f) if json_logs => {
            tracing::error!(exit_code = f.code, "{f}");
            ExitCode::from(f.code)
        }
        Err(f) => {
            eprintln!("registrar: {f}");
            ExitCode::from(f.code)
        }
    }
}
