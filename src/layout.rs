//! The key layout of the registry (design.md section 1): building a host's keys
//! and parsing keys back into (dc, role, host, leaf).
//!
//! Invariant: every `dc`, `role` and `host` that reaches this module has passed
//! [`validate_segment`], so a key can always be split back unambiguously on `/`.

use std::fmt;

/// The longest segment design.md section 1 allows.
pub const MAX_SEGMENT_LEN: usize = 128;

/// Why a path segment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("is empty")]
    Empty,
    #[error("is {0} characters long; the limit is {MAX_SEGMENT_LEN}")]
    TooLong(usize),
    #[error("may not be '.' or '..'")]
    Dots,
    #[error("contains {0:?}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar(char),
}

/// Checks a machine id, the value of `owner`: 1 to 256 printable ASCII
/// characters.
pub fn validate_machine_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 256 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "{id:?} is not a machine id: use 1 to 256 printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// Checks one path segment (`dc`, `role`, `host`, service or meta name):
/// 1 to 128 characters from `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_segment(s: &str) -> Result<(), SegmentError> {
    if s.is_empty() {
        return Err(SegmentError::Empty);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(SegmentError::BadChar(c));
    }
    if s.len() > MAX_SEGMENT_LEN {
        return Err(SegmentError::TooLong(s.len()));
    }
    if s == "." || s == ".." {
        return Err(SegmentError::Dots);
    }
    Ok(())
}

/// Checks the registry prefix: `/` followed by one or more valid segments,
/// with no trailing slash (e.g. `/infrastructure`).
pub fn validate_prefix(p: &str) -> Result<(), String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err("must start with '/'".into());
    };
    for seg in rest.split('/') {
        validate_segment(seg).map_err(|e| format!("segment {seg:?} {e}"))?;
    }
    Ok(())
}

/// One host's directory under one role: `<prefix>/<dc>/<role>/<host>/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostDir {
    pub prefix: String,
    pub dc: String,
    pub role: String,
    pub host: String,
}

impl HostDir {
    /// The directory, with its trailing slash, for prefix reads and watches.
    pub fn dir(&self) -> String {
        format!("{}/{}/{}/{}/", self.prefix, self.dc, self.role, self.host)
    }

    /// The full key of one leaf, e.g. `ip` or `services/http`.
    pub fn key(&self, leaf: &Leaf) -> String {
        format!("{}{}", self.dir(), leaf)
    }
}

impl fmt::Display for HostDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.dc, self.role, self.host)
    }
}

/// A leaf under a host directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Leaf {
    Ip,
    Health,
    Owner,
    Maintenance,
    Check(String),
    Service(String),
    Meta(String),
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Ip => f.write_str("ip"),
            Leaf::Health => f.write_str("health"),
            Leaf::Owner => f.write_str("owner"),
            Leaf::Maintenance => f.write_str("maintenance"),
            Leaf::Check(n) => write!(f, "checks/{n}"),
            Leaf::Service(n) => write!(f, "services/{n}"),
            Leaf::Meta(n) => write!(f, "meta/{n}"),
        }
    }
}

impl Leaf {
    fn parse(s: &str) -> Option<Leaf> {
        let leaf = match s.split_once('/') {
            None => match s {
                "ip" => Leaf::Ip,
                "health" => Leaf::Health,
                "owner" => Leaf::Owner,
                "maintenance" => Leaf::Maintenance,
                _ => return None,
            },
            Some((dir, name)) => {
                validate_segment(name).ok()?;
                match dir {
                    "checks" => Leaf::Check(name.into()),
                    "services" => Leaf::Service(name.into()),
                    "meta" => Leaf::Meta(name.into()),
                    _ => return None,
                }
            }
        };
        Some(leaf)
    }
}

/// Parses a full key back into its host directory and leaf. Returns `None`
/// for anything that is not a well-formed registry key under `prefix`.
pub fn parse_key(prefix: &str, key: &str) -> Option<(HostDir, Leaf)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let mut parts = rest.splitn(4, '/');
    let dc = parts.next()?;
    let role = parts.next()?;
    let host = parts.next()?;
    let leaf = Leaf::parse(parts.next()?)?;
    for seg in [dc, role, host] {
        validate_segment(seg).ok()?;
    }
    Some((
        HostDir {
            prefix: prefix.into(),
            dc: dc.into(),
            role: role.into(),
            host: host.into(),
        },
        leaf,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> HostDir {
        HostDir {
            prefix: "/infrastructure".into(),
            dc: "dc1".into(),
            role: "web".into(),
            host: "h-1.a_b".into(),
        }
    }

    #[test]
    fn keys_round_trip() {
        let d = dir();
        for leaf in [
            Leaf::Ip,
            Leaf::Health,
            Leaf::Owner,
            Leaf::Maintenance,
            Leaf::Check("disk".into()),
            Leaf::Service("http".into()),
            Leaf::Meta("rack".into()),
        ] {
            let key = d.key(&leaf);
            assert_eq!(parse_key("/infrastructure", &key), Some((d.clone(), leaf)));
        }
        assert_eq!(d.key(&Leaf::Ip), "/infrastructure/dc1/web/h-1.a_b/ip");
    }

    #[test]
    fn foreign_keys_do_not_parse() {
        for key in [
            "/infrastructure/dc1/web/h/unknown",
            "/infrastructure/dc1/web/h",
            "/infrastructure/dc1/web/h/services/a/b",
            "/other/dc1/web/h/ip",
            "/infrastructure/../web/h/ip",
            "/infrastructurex/dc1/web/h/ip",
        ] {
            assert_eq!(parse_key("/infrastructure", key), None, "{key}");
        }
    }

    #[test]
    fn segment_rules() {
        assert!(validate_segment("a-b_c.d9").is_ok());
        assert_eq!(validate_segment(""), Err(SegmentError::Empty));
        assert_eq!(validate_segment(".."), Err(SegmentError::Dots));
        assert_eq!(validate_segment("."), Err(SegmentError::Dots));
        assert_eq!(validate_segment("a/b"), Err(SegmentError::BadChar('/')));
        assert_eq!(validate_segment("a b"), Err(SegmentError::BadChar(' ')));
        assert_eq!(
            validate_segment(&"x".repeat(129)),
            Err(SegmentError::TooLong(129))
        );
        assert!(validate_segment(&"x".repeat(128)).is_ok());
        assert!(validate_prefix("/infrastructure").is_ok());
        assert!(validate_prefix("/a/b").is_ok());
        assert!(validate_prefix("infrastructure").is_err());
        assert!(validate_prefix("/a/").is_err());
        assert!(validate_prefix("/").is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = String> {
            "[A-Za-z0-9._-]{1,128}".prop_filter("not . or ..", |s| s != "." && s != "..")
        }

        fn leaf() -> impl Strategy<Value = Leaf> {
            prop_oneof![
                Just(Leaf::Ip),
                Just(Leaf::Health),
                Just(Leaf::Owner),
                Just(Leaf::Maintenance),
                segment().prop_map(Leaf::Check),
                segment().prop_map(Leaf::Service),
                segment().prop_map(Leaf::Meta),
            ]
        }

        proptest! {
            #[test]
            fn keys_parse_back_to_what_built_them(
                prefix in proptest::collection::vec(segment(), 1..3),
                dc in segment(), role in segment(), host in segment(), leaf in leaf(),
            ) {
                let prefix = format!("/{}", prefix.join("/"));
                prop_assert!(validate_prefix(&prefix).is_ok());
                let dir = HostDir { prefix: prefix.clone(), dc, role, host };
                let key = dir.key(&leaf);
                prop_assert_eq!(parse_key(&prefix, &key), Some((dir, leaf)));
            }

            #[test]
            fn parsing_any_key_never_panics(key in ".{0,300}") {
                let _ = parse_key("/infrastructure", &key);
                let _ = validate_segment(&key);
                let _ = validate_prefix(&key);
            }
        }
    }
}
