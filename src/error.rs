//! Error text shared across module boundaries.
//!
//! Kept apart so that the modules that classify or report errors (etcd,
//! the http check) need not import each other.

/// The text of an error and all its sources, for classification and messages.
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}
