//! Errors on one line, causes included: what every log line, status
//! message and CLI error of switchboard shows, on the client, the registry
//! and every registered server alike.

use std::error::Error as StdError;

/// An error and its causes on one line. Transport errors say little at the
/// top ("transport error", "connection error"); the useful part is below.
pub fn source_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    append_causes(&mut text, err.source());
    text
}

/// A status's message and the causes behind it on one line. For a
/// connection that failed (refused TLS, a reset), tonic's message says only
/// "transport error"; the cause is in the status's source.
pub fn status_chain(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    append_causes(&mut text, status.source());
    text
}

/// Appends `source` and its causes to `text`, skipping what it already says.
fn append_causes(text: &mut String, mut source: Option<&(dyn StdError + 'static)>) {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
}
