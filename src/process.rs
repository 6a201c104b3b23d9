//! Process set-up shared by every command: logging on stderr, and the
//! signals that stop the agent (SIGTERM, SIGINT) or reload it (SIGHUP).

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::LogFormat;
use crate::config::Env;

/// Sets up logging on stderr in the configured format. `REGISTRAR_LOG`
/// takes comma-separated `level` or `target=level` directives (default
/// `info`); a value that does not parse is reported and `info` is used.
pub fn init_logging(format: LogFormat, env: &Env) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};

    let default = Targets::new().with_default(LevelFilter::INFO);
    let (filter, bad) = match env.get("REGISTRAR_LOG") {
        Some(text) => match text.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (default, Some((text.to_string(), e))),
        },
        None => (default, None),
    };
    // The DNS library logs every query at info: warnings only, unless
    // REGISTRAR_LOG names it.
    let quiet = env
        .get("REGISTRAR_LOG")
        .is_none_or(|text| !text.contains("hickory"));
    let filter = if quiet {
        ["hickory_server", "hickory_proto", "hickory_net"]
            .into_iter()
            .fold(filter, |f, target| f.with_target(target, LevelFilter::WARN))
    } else {
        filter
    };
    let layer = fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    };
    // A second initialisation (tests running commands in-process) is harmless.
    let _ = tracing_subscriber::registry().with(layer).try_init();
    if let Some((text, e)) = bad {
        tracing::warn!(
            "REGISTRAR_LOG={text:?} is not a log filter ({e}); logging at info. \
             Use a level (error, warn, info, debug, trace) or target=level \
             directives, e.g. REGISTRAR_LOG=info,registrar=debug"
        );
    }
}

/// Waits for SIGTERM or SIGINT and fires `cancel`; SIGHUP notifies
/// `reload` (systemd's ExecReload) and never stops the process.
pub async fn handle_signals(cancel: CancellationToken, reload: Arc<Notify>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading the configuration");
                reload.notify_one();
                continue;
            }
            _ = cancel.cancelled() => return Ok(()),
        }
        cancel.cancel();
        return Ok(());
    }
}
