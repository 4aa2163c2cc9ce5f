//! Scenario 5: the client side, summarised from the protocol crate's criterion
//! run (`cargo bench -p haven-protocol --bench protocol`), which measures Haven
//! and vodozemac (Matrix's Olm) in the same run: handshake, 1 KiB encrypt +
//! decrypt, sealed sender. This reads criterion's `estimates.json` files and
//! prints the medians side by side with their ratio.

use std::path::Path;

use anyhow::Context as _;

/// (group, Haven's bench, vodozemac's bench if any, what it measures)
const PAIRS: [(&str, &str, Option<&str>, &str); 3] = [
    (
        "handshake",
        "haven_pqxdh",
        Some("vodozemac_olm"),
        "full handshake, both sides, first message",
    ),
    (
        "encrypt_decrypt_1KiB",
        "haven_double_ratchet",
        Some("vodozemac_olm"),
        "1 KiB encrypt + decrypt, established session",
    ),
    (
        "seal_open_1KiB",
        "haven_sealed_sender",
        None,
        "1 KiB seal + open (sealed sender)",
    ),
];

/// The median point estimate in nanoseconds from a criterion `estimates.json`.
/// (A small search rather than a JSON parser: the file's shape is fixed.)
fn median_ns(path: &Path) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (run the criterion bench first)",
            path.display()
        )
    })?;
    let median = text
        .find("\"median\"")
        .with_context(|| format!("no median in {}", path.display()))?;
    let rest = &text[median..];
    let start = rest
        .find("\"point_estimate\":")
        .with_context(|| format!("no point estimate in {}", path.display()))?
        + "\"point_estimate\":".len();
    let number: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    number
        .parse()
        .with_context(|| format!("a malformed estimate in {}", path.display()))
}

fn human(ns: f64) -> String {
    if ns >= 1_000_000.0 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Prints the table from the criterion results under `dir`.
pub fn summary(dir: &Path) -> anyhow::Result<()> {
    println!(
        "{:<46} {:>12} {:>14} {:>8}",
        "operation", "Haven", "vodozemac", "ratio"
    );
    for (group, haven, peer, what) in PAIRS {
        let ours = median_ns(&dir.join(group).join(haven).join("new/estimates.json"))?;
        match peer {
            Some(peer) => {
                let theirs = median_ns(&dir.join(group).join(peer).join("new/estimates.json"))?;
                println!(
                    "{what:<46} {:>12} {:>14} {:>8.2}",
                    human(ours),
                    human(theirs),
                    ours / theirs
                );
            }
            None => println!("{what:<46} {:>12} {:>14} {:>8}", human(ours), "-", "-"),
        }
    }
    println!(
        "(medians of one `cargo bench -p haven-protocol --bench protocol` run; ratio < 1: Haven is faster)"
    );
    Ok(())
}
