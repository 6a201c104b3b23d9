//! The file a destination names: itself, or the final target of the
//! symlinks it goes through. render writes that file (a symlink stays a
//! symlink), and the config refuses two templates whose destinations lead
//! to the same one. Imports nothing of render or config, so both can use it.

use std::path::{Path, PathBuf};

/// How many symlinks a destination may go through (as the kernel's
/// MAXSYMLINKS).
pub const MAX_LINKS: usize = 40;

/// Why a destination's target is unknown.
#[derive(Debug)]
pub enum LinkError {
    /// A symlink on the way cannot be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// More than [`MAX_LINKS`] symlinks: a loop, most likely.
    TooMany,
}

/// The final target of `dest` (which need not exist yet).
pub fn target(dest: &Path) -> Result<PathBuf, LinkError> {
    let mut path = dest.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&path).map_err(|source| LinkError::Read {
                    path: path.clone(),
                    source,
                })?;
                path = match path.parent() {
                    Some(dir) => dir.join(link),
                    None => link,
                };
            }
            _ => return Ok(path),
        }
    }
    Err(LinkError::TooMany)
}
