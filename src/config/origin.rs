//! Where a setting came from (a flag, an environment variable, the file
//! at line and column, or a default), and the list every problem of a
//! configuration lands in, each named by where it came from. The merge
//! (`sources`) and the checks (`validate`) both speak this vocabulary.

use std::fmt;

use super::raw::FileSource;

/// "--ttl (or REGISTRAR_TTL)": a flag, and the environment variable that
/// clap reads for it as cli.rs declares it (so the name is written once).
fn flag_label(long: &str) -> String {
    use clap::CommandFactory;
    let cli = crate::cli::Cli::command();
    let env = cli
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    match env {
        Some(env) => format!("--{long} (or {env})"),
        None => format!("--{long}"),
    }
}

/// Collects problems during validation.
pub(super) struct Problems<'a> {
    pub(super) file: Option<&'a FileSource>,
    pub(super) list: Vec<String>,
}

impl Problems<'_> {
    pub(super) fn push(&mut self, origin: &Origin, field: &str, msg: impl fmt::Display) {
        let at = self.describe(origin, field);
        self.list.push(format!("{at}: {msg}"));
    }

    /// Where a value came from, as messages say it: a flag and its
    /// variable, an environment variable, file:line:col, or the default.
    pub(super) fn describe(&self, origin: &Origin, field: &str) -> String {
        match origin {
            Origin::Flag(long) => flag_label(long),
            Origin::Env(name) => name.clone(),
            Origin::File(path) => match self.file {
                Some(f) => {
                    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
                    // "[i]=label" locates by index and shows the label.
                    let shown = path
                        .iter()
                        .map(|p| match p.split_once("]=") {
                            Some((_, label)) => format!("[{label}]"),
                            None => format!(".{p}"),
                        })
                        .collect::<String>();
                    format!("{}: {}", f.locate(&parts), shown.trim_start_matches('.'))
                }
                None => field.to_string(),
            },
            Origin::Default => format!("{field} (default)"),
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    /// A flag, by its long name; its label is built only for a message.
    Flag(String),
    Env(String),
    File(Vec<String>),
    Default,
}

pub(super) fn file_origin(field: &str) -> Origin {
    Origin::File(vec![field.to_string()])
}

/// Picks the first present value by precedence, with its origin.
pub(super) fn pick<T>(candidates: Vec<(Option<T>, Origin)>) -> Option<(T, Origin)> {
    candidates.into_iter().find_map(|(v, o)| v.map(|v| (v, o)))
}
