//! Writing a rendered file as an operator expects (design.md section 6,
//! rules 3 to 5 and 10).
//!
//! - The file written is the destination's final target: a symlinked
//!   destination stays a link, and the file it points to is replaced.
//! - The output is staged next to that file (same filesystem, so the rename
//!   is atomic), with the mode, owner and group it will have: the
//!   template's when set, else the current file's, else 0644 and ours. A
//!   current file whose owner cannot be kept (render is not root) is not
//!   replaced: that is an error, never a silent change of owner.
//! - `check` runs on the staged file; then fsync, rename, fsync the
//!   directory. Nothing is written when the bytes, mode and owner are
//!   unchanged.
//! - A current file that cannot be read is not replaced either: without its
//!   bytes a failed reload could not put it back. A restore writes the old
//!   bytes back with the old mode and owner, and never removes a file.
//! - Staged files are removed on every path; one left by a crash (SIGKILL,
//!   the OOM killer) is swept when render starts ([`sweep`]).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::child::{self, Leftovers};
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
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("check {argv:?} refused the new {path}: {why}")]
    CheckFailed {
        path: PathBuf,
        argv: Vec<String>,
        why: String,
    },
}

/// The file as it was before a write, to restore if the reload fails.
#[derive(Debug)]
pub struct Previous {
    /// The file written (the destination's final target).
    pub path: PathBuf,
    /// `None`: there was no file.
    pub file: Option<Existing>,
}

/// A file's bytes and attributes.
#[derive(Debug)]
pub struct Existing {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The file a destination names: itself, or the final target of the
/// symlinks it goes through (which need not exist yet).
pub fn target(dest: &Path) -> Result<PathBuf, WriteError> {
    super::link::target(dest).map_err(|e| match e {
        super::link::LinkError::Read { path, source } => WriteError::Io {
            path,
            what: "read the symlink",
            source,
        },
        super::link::LinkError::TooMany => WriteError::Refused {
            path: dest.to_path_buf(),
            why: format!(
                "goes through more than {} symlinks (a loop?)",
                super::link::MAX_LINKS
            ),
        },
    })
}

/// The mode a new file gets: the spec's, else the existing file's, else 0644.
fn wanted_mode(spec: &TemplateSpec, existing: Option<&std::fs::Metadata>) -> u32 {
    spec.mode
        .or_else(|| existing.map(|m| m.permissions().mode() & 0o7777))
        .unwrap_or(0o644)
}

/// Whether `bytes` would change the destination (content, mode or owner).
pub fn differs(spec: &TemplateSpec, bytes: &[u8]) -> bool {
    let Ok(path) = target(&spec.destination) else {
        return true;
    };
    let Ok(meta) = std::fs::metadata(&path) else {
        return true;
    };
    let same_bytes =
        meta.len() == bytes.len() as u64 && std::fs::read(&path).is_ok_and(|b| b == bytes);
    let same_mode = meta.permissions().mode() & 0o7777 == wanted_mode(spec, Some(&meta));
    let same_owner =
        spec.owner.is_none_or(|u| u == meta.uid()) && spec.group.is_none_or(|g| g == meta.gid());
    !(same_bytes && same_mode && same_owner)
}

/// Stages `bytes` next to the destination's target, runs `check` on it, and
/// puts it in place. Returns what was there before, for a restore.
pub async fn commit(spec: &TemplateSpec, bytes: &[u8]) -> Result<Previous, WriteError> {
    let path = target(&spec.destination)?;
    let existing = std::fs::metadata(&path).ok();
    let file = match &existing {
        None => None,
        Some(m) => Some(Existing {
            bytes: std::fs::read(&path).map_err(|source| WriteError::Io {
                path: path.clone(),
                what: "read the current file (kept to put back if the reload fails; \
                       give render read access to it, or run it as the file's owner)",
                source,
            })?,
            mode: m.permissions().mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }),
    };
    let mode = wanted_mode(spec, existing.as_ref());
    let owner = spec.owner.or(file.as_ref().map(|f| f.uid));
    let group = spec.group.or(file.as_ref().map(|f| f.gid));
    let staged = stage(&path, bytes, mode, owner, group)?;
    if let Some(check) = &spec.check {
        let argv: Vec<String> = check
            .iter()
            .map(|a| a.replace("{{src}}", &staged.path().to_string_lossy()))
            .collect();
        let run = child::run(&argv, spec.command_timeout, Leftovers::Leave).await;
        if !run.success() {
            return Err(WriteError::CheckFailed {
                path: spec.destination.clone(),
                argv: check.clone(),
                why: run.describe(),
            });
        }
    }
    place(staged, &path)?;
    Ok(Previous { path, file })
}

/// Puts a previous file back, with its mode and owner. Returns `false`
/// when there was no previous file: the new one stays (removing it would
/// leave the service nothing to reload with).
pub fn restore(previous: &Previous) -> Result<bool, WriteError> {
    let Some(file) = &previous.file else {
        return Ok(false);
    };
    let staged = stage(
        &previous.path,
        &file.bytes,
        file.mode,
        Some(file.uid),
        Some(file.gid),
    )?;
    place(staged, &previous.path)?;
    Ok(true)
}

/// The name prefix and suffix of a staged file of `path`.
fn staged_name(path: &Path) -> (String, &'static str) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    (format!(".{name}."), ".staged")
}

/// Random characters tempfile puts between the prefix and the suffix.
const STAGED_RANDOM: usize = 6;

/// Removes staged files of `dest` that a crashed render left behind.
/// Returns how many it removed.
pub fn sweep(dest: &Path) -> usize {
    let Ok(path) = target(dest) else { return 0 };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let (prefix, suffix) = staged_name(&path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.len() == prefix.len() + STAGED_RANDOM + suffix.len()
            && name.starts_with(&prefix)
            && name.ends_with(suffix);
        if ours
            && entry.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Writes `bytes` to a temp file in `path`'s directory (the same
/// filesystem, so the rename is atomic), with its mode and owner, fsynced.
fn stage(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<tempfile::NamedTempFile, WriteError> {
    let io = |what: &'static str| {
        move |source: std::io::Error| WriteError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let (prefix, suffix) = staged_name(path);
    let mut staged = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(suffix)
        .rand_bytes(STAGED_RANDOM)
        .tempfile_in(dir)
        .map_err(io("stage the new file"))?;
    staged
        .write_all(bytes)
        .map_err(io("write the staged file"))?;
    // The owner first: chown clears the setuid/setgid bits a mode may set.
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(staged.path(), owner, group).map_err(|e| WriteError::Refused {
            path: path.to_path_buf(),
            why: format!(
                "cannot give the new file owner {} and group {} ({e}); it keeps the current \
                     file's unless the template sets `owner`/`group`: run render as root or as \
                     that user, or set owner and group to ones render may give",
                owner.map_or("-".into(), |u| u.to_string()),
                group.map_or("-".into(), |g| g.to_string()),
            ),
        })?;
    }
    std::fs::set_permissions(staged.path(), std::fs::Permissions::from_mode(mode))
        .map_err(io("set the staged file's mode"))?;
    staged
        .as_file()
        .sync_all()
        .map_err(io("fsync the staged file"))?;
    Ok(staged)
}

/// Renames a staged file over `path` and fsyncs the directory.
fn place(staged: tempfile::NamedTempFile, path: &Path) -> Result<(), WriteError> {
    staged.persist(path).map_err(|e| WriteError::Io {
        path: path.to_path_buf(),
        what: "rename the staged file into place",
        source: e.error,
    })?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError::Io {
            path: path.to_path_buf(),
            what: "fsync the directory",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_followed_to_their_final_target() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real.cfg");
        std::os::unix::fs::symlink("real.cfg", d.path().join("a")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("b")).unwrap();
        assert_eq!(target(&d.path().join("b")).unwrap(), real);
        assert_eq!(target(&real).unwrap(), real);
        std::os::unix::fs::symlink("loop", d.path().join("loop")).unwrap();
        assert!(target(&d.path().join("loop")).is_err());
    }

    #[test]
    fn sweep_removes_only_staged_files_of_that_destination() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.cfg");
        for name in [".out.cfg.abc123.staged", ".out.cfg.zzzzzz.staged"] {
            std::fs::write(d.path().join(name), "x").unwrap();
        }
        for name in [".other.cfg.abc123.staged", ".out.cfg.keep", "out.cfg"] {
            std::fs::write(d.path().join(name), "x").unwrap();
        }
        assert_eq!(sweep(&dest), 2);
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".other.cfg.abc123.staged", ".out.cfg.keep", "out.cfg"]
        );
    }
}
