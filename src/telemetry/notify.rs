//! systemd notifications (sd_notify). Without `NOTIFY_SOCKET` each is a
//! no-op.

use super::*;

/// Sends one notification to `$NOTIFY_SOCKET` (a no-op without it), as
/// sd-notify formats it, on a non-blocking socket. sd-notify's own `notify`
/// sends on a blocking socket: when the receiver's queue is full (a service
/// manager slow to read), the send blocks the agent's one thread, and with
/// it every keep-alive. Here such a notification is dropped instead.
pub(super) fn send(states: &[NotifyState<'_>]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let sent = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?
        }
        None => sock.send_to(msg.as_bytes(), &path)?,
    };
    if sent == msg.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
    }
}

/// READY=1 with a STATUS= line, for a service other than the agent
/// (`render`, `dns`). A no-op without `NOTIFY_SOCKET`.
pub fn notify_ready(status: &str) {
    if let Err(e) = send(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// STATUS= alone, for a service other than the agent (`render`).
pub fn notify_status(status: &str) {
    if let Err(e) = send(&[NotifyState::Status(status)]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// WATCHDOG=1, for a service other than the agent (`render`, `dns`).
pub fn notify_watchdog() {
    if let Err(e) = send(&[NotifyState::Watchdog]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
