//! Writing a rendered file safely (contract section 6, rules 3 to 5).
//!
//! The output is staged next to the destination (same filesystem, so the
//! rename is atomic), with the mode and owner it will have; `check` runs on
//! the staged file; then fsync, rename, fsync the directory. Nothing is
//! written when the bytes, mode and owner are unchanged. A `reload` that
//! fails puts the previous file back and reloads again.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::config::TemplateSpec;

/// Why a file was not written, or a reload failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("check {argv:?} refused the new {path}: {why}")]
    CheckFailed {
        path: PathBuf,
        argv: Vec<String>,
        why: String,
    },
}

/// What a finished command said.
#[derive(Debug)]
pub struct CommandOutcome {
    pub ok: bool,
    pub text: String,
}

/// Runs an argv with `{{src}}` replaced, bounded by `timeout`; never a shell
/// unless the argv names one.
pub async fn run_command(argv: &[String], src: Option<&Path>, timeout: Duration) -> CommandOutcome {
    let argv: Vec<String> = argv
        .iter()
        .map(|a| match src {
            Some(src) => a.replace("{{src}}", &src.to_string_lossy()),
            None => a.clone(),
        })
        .collect();
    let Some((program, args)) = argv.split_first() else {
        return CommandOutcome {
            ok: false,
            text: "empty command".into(),
        };
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            return CommandOutcome {
                ok: false,
                text: format!("cannot start {program:?}: {e}"),
            };
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            text.truncate(4096);
            if !out.status.success() {
                text = format!("{} ({})", text.trim_end(), out.status);
            }
            CommandOutcome {
                ok: out.status.success(),
                text,
            }
        }
        Ok(Err(e)) => CommandOutcome {
            ok: false,
            text: format!("cannot wait for {program:?}: {e}"),
        },
        Err(_) => CommandOutcome {
            ok: false,
            text: format!(
                "{program:?} did not finish within {}",
                humantime::format_duration(timeout)
            ),
        },
    }
}

/// The file as it was before a write, to restore if the reload fails.
#[derive(Debug)]
pub struct Previous {
    pub path: PathBuf,
    /// `None`: there was no file.
    pub bytes: Option<Vec<u8>>,
    pub mode: u32,
}

/// The mode a new file gets: the spec's, else the existing file's, else 0644.
fn wanted_mode(spec: &TemplateSpec, existing: Option<&std::fs::Metadata>) -> u32 {
    spec.mode
        .or_else(|| existing.map(|m| m.permissions().mode() & 0o7777))
        .unwrap_or(0o644)
}

/// Whether `bytes` would change the destination (content, mode or owner).
pub fn differs(spec: &TemplateSpec, bytes: &[u8]) -> bool {
    let meta = std::fs::metadata(&spec.destination).ok();
    let Some(meta) = meta else { return true };
    let same_bytes = std::fs::read(&spec.destination).is_ok_and(|b| b == bytes);
    let same_mode = meta.permissions().mode() & 0o7777 == wanted_mode(spec, Some(&meta));
    let same_owner =
        spec.owner.is_none_or(|u| u == meta.uid()) && spec.group.is_none_or(|g| g == meta.gid());
    !(same_bytes && same_mode && same_owner)
}

/// Stages `bytes` next to the destination, runs `check` on it, and puts it
/// in place. Returns what was there before, for a restore.
pub async fn commit(spec: &TemplateSpec, bytes: &[u8]) -> Result<Previous, WriteError> {
    let dest = &spec.destination;
    let existing = std::fs::metadata(dest).ok();
    let previous = Previous {
        path: dest.clone(),
        bytes: existing.as_ref().and_then(|_| std::fs::read(dest).ok()),
        mode: existing
            .as_ref()
            .map_or(0o644, |m| m.permissions().mode() & 0o7777),
    };
    let mode = wanted_mode(spec, existing.as_ref());
    let staged = stage(dest, bytes, mode, spec.owner, spec.group)?;
    if let Some(check) = &spec.check {
        let outcome = run_command(check, Some(staged.path()), spec.command_timeout).await;
        if !outcome.ok {
            return Err(WriteError::CheckFailed {
                path: dest.clone(),
                argv: check.clone(),
                why: outcome.text.trim().to_string(),
            });
        }
    }
    place(staged, dest)?;
    Ok(previous)
}

/// Puts a previous file back (or removes the new one when there was none).
pub fn restore(previous: &Previous) -> Result<(), WriteError> {
    let io = |what: &'static str| {
        move |source: std::io::Error| WriteError::Io {
            path: previous.path.clone(),
            what,
            source,
        }
    };
    match &previous.bytes {
        None => {
            std::fs::remove_file(&previous.path).map_err(io("remove the new file"))?;
            let dir = previous.path.parent().unwrap_or(Path::new("/"));
            sync_dir(dir).map_err(io("fsync the directory"))
        }
        Some(bytes) => place(
            stage(&previous.path, bytes, previous.mode, None, None)?,
            &previous.path,
        ),
    }
}

/// Writes `bytes` to a temp file in `dest`'s directory (the same
/// filesystem, so the rename is atomic), with its mode and owner, fsynced.
fn stage(
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<tempfile::NamedTempFile, WriteError> {
    let io = |what: &'static str| {
        move |source: std::io::Error| WriteError::Io {
            path: dest.to_path_buf(),
            what,
            source,
        }
    };
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let mut staged = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ))
        .suffix(".staged")
        .tempfile_in(dir)
        .map_err(io("stage the new file"))?;
    staged
        .write_all(bytes)
        .map_err(io("write the staged file"))?;
    std::fs::set_permissions(staged.path(), std::fs::Permissions::from_mode(mode))
        .map_err(io("set the staged file's mode"))?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(staged.path(), owner, group)
            .map_err(io("set the staged file's owner"))?;
    }
    staged
        .as_file()
        .sync_all()
        .map_err(io("fsync the staged file"))?;
    Ok(staged)
}

/// Renames a staged file over `dest` and fsyncs the directory.
fn place(staged: tempfile::NamedTempFile, dest: &Path) -> Result<(), WriteError> {
    staged.persist(dest).map_err(|e| WriteError::Io {
        path: dest.to_path_buf(),
        what: "rename the staged file into place",
        source: e.error,
    })?;
    let dir = dest.parent().unwrap_or(Path::new("/"));
    sync_dir(dir).map_err(|source| WriteError::Io {
        path: dest.to_path_buf(),
        what: "fsync the directory",
        source,
    })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
