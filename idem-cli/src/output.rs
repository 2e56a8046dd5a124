//! How answers are written: tables for people, JSON for scripts, times in UTC.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;
use std::time::{Duration, SystemTime};

/// Prints `headers` and `rows` as a table on standard output.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.to_vec());
    for row in rows {
        table.add_row(row);
    }
    println!("{table}");
}

/// Prints `value` as pretty JSON on standard output.
pub(crate) fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `2026-12-01T17:53:58Z`.
pub(crate) fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Seconds since the epoch (an AMQP timestamp) as [`time`].
pub(crate) fn unix_time(seconds: u64) -> String {
    time(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// `3h 12m` (whole seconds; a time in the future is `0s`).
pub(crate) fn age(since: SystemTime) -> String {
    let elapsed = SystemTime::now().duration_since(since).unwrap_or_default();
    duration(elapsed)
}

/// `3h 12m 5s`, whole seconds.
pub(crate) fn duration(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

/// `1.2 GiB`.
pub(crate) fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `error` and its causes on one line, each cause once: idem's errors already quote their
/// source in their own text, so a cause already said is left out.
pub(crate) fn error(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}
