//! `registrar render`: see [`crate::render`]. Here: exit codes.

use super::{Control, Failure, etcd_failure, exit, serve_metrics};
use crate::cli::RenderArgs;
use crate::config::Config;
use crate::etcd::Etcd;
use crate::render::{Options, RenderError};

pub async fn run(config: Config, args: &RenderArgs, mut control: Control) -> Result<(), Failure> {
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    let options = Options {
        once: args.once,
        dry_run: args.dry_run,
        timeout: args.timeout,
    };
    let reloads = control.reloads();
    let metrics = crate::telemetry::RenderMetrics::new();
    // A one-shot run has nothing to serve for long.
    let listen = config
        .metrics_listen
        .filter(|_| !args.once && !args.dry_run);
    let _serving = serve_metrics(listen, &metrics, &control.cancel).await?;
    crate::render::run(config, &etcd, options, &control.cancel, reloads, &metrics)
        .await
        .map_err(|e| match e {
            RenderError::Etcd(e) => etcd_failure(e, &etcd),
            RenderError::Config(_) => Failure::new(exit::CONFIG, e),
            RenderError::Failed(_) => Failure::new(exit::RUNTIME, e),
        })
}
