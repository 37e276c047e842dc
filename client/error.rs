//! How client-side failures are described to callers.

use std::error::Error;

/// An error and its causes on one line. Transport errors say little at the
/// top ("transport error", "connection error"); the useful part is below.
pub fn source_chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
