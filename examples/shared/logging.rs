//! The examples' logging: `RUST_LOG` (or a default), lapin's returned-message line off, and
//! `IDEM_LOG_FORMAT=json` for one JSON object per line (what a log pipeline ingests).

/// Installs the subscriber, writing to stdout or stderr. Fails on an `IDEM_LOG_FORMAT` it does
/// not know, saying what to write.
pub fn init(default_filter: &str, to_stderr: bool) -> Result<(), String> {
    let json = match std::env::var("IDEM_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => false,
        Ok("json") => true,
        Ok(other) => {
            return Err(format!(
                "IDEM_LOG_FORMAT={other:?} is not a log format: write `json` (one JSON object per line) or `text` (the default)"
            ))
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter(default_filter));
    match (json, to_stderr) {
        (true, true) => builder.json().with_writer(std::io::stderr).init(),
        (true, false) => builder.json().init(),
        (false, true) => builder.with_writer(std::io::stderr).init(),
        (false, false) => builder.init(),
    }
    Ok(())
}

/// `RUST_LOG` (or `default`), with lapin's line about a returned message off: lapin logs a
/// message the broker returns (unroutable) whole, body bytes included, at WARN, and payment
/// details do not belong in logs. idem logs it on one line, destination and message id.
fn filter(default: &str) -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    tracing_subscriber::EnvFilter::new(format!("lapin::returned_messages=off,{spec}"))
}
