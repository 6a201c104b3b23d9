//! Lays out the release binary's code so that an idle agent touches few
//! pages of it.
//!
//! The kernel maps a binary's pages 64 KiB at a time around each fault, so
//! an agent that runs 1.1 MB of scattered code ends up with nearly all of
//! the 3.6 MB of code resident (docs/PERFORMANCE.md, "Agent memory").
//! `link/agent.order` names the functions an idle agent runs, in the order
//! the linker is to put them first; `scripts/order-text` writes it from a
//! traced agent. Names the binary no longer has are skipped: a stale list
//! costs memory, never correctness, and `scripts/bench` says how stale it
//! is.
//!
//! Only for release builds for x86_64 Linux with Rust's own LLD, the
//! default linker there since Rust 1.90: other linkers do not know
//! `--symbol-ordering-file`. `REGISTRAR_NO_TEXT_ORDER=1` turns it off.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link/agent.order");
    println!("cargo:rerun-if-env-changed=REGISTRAR_NO_TEXT_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let order = Path::new("link/agent.order");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let own_linker = std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_none();
    let wanted = std::env::var_os("REGISTRAR_NO_TEXT_ORDER").is_none();
    if !(release
        && wanted
        && own_linker
        && target == "x86_64-unknown-linux-gnu"
        && rust_lld_is_default()
        && order.exists())
    {
        return;
    }
    let Ok(path) = std::fs::canonicalize(order) else {
        return;
    };
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
        path.display()
    );
}

/// Rust 1.90 and later link x86_64 Linux binaries with their own LLD.
fn rust_lld_is_default() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
