//! Durations ("500ms", "5s", "24h") and sizes ("64KiB", "10MiB") as written in
//! the config file. A few lines of our own instead of a crate: the grammar is
//! one integer and one unit, and the error message can say what is accepted.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A duration read from the config, such as `"500ms"`, `"5s"` or `"24h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

/// A byte size read from the config, such as `"64KiB"` or `"10MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSize(pub u64);

const DURATION_HELP: &str =
    "expected a duration such as \"500ms\", \"5s\", \"2m\", \"24h\" (units: ms, s, m, h, d)";
const SIZE_HELP: &str =
    "expected a size such as \"512B\", \"64KiB\", \"10MiB\" (units: B, KiB, MiB, GiB, KB, MB, GB)";

/// Splits `"123abc"` into `(123, "abc")`.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let number = text[..digits].parse().ok()?;
    Some((number, text[digits..].trim()))
}

/// Parses a duration such as `"500ms"`; returns a message on error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = split_number(text).ok_or_else(|| format!("{text:?}: {DURATION_HELP}"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?}: duration too large"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        "" => Err(format!("{text:?}: missing unit; {DURATION_HELP}")),
        _ => Err(format!("{text:?}: unknown unit {unit:?}; {DURATION_HELP}")),
    }
}

/// Parses a size such as `"64KiB"`; returns a message on error.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (n, unit) = split_number(text).ok_or_else(|| format!("{text:?}: {SIZE_HELP}"))?;
    let mult: u64 = match unit {
        "B" | "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; {SIZE_HELP}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?}: size too large"))
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(DURATION_HELP)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map(ConfigDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for ConfigSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(SIZE_HELP)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_size(v).map(ConfigSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(ConfigSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ConfigSize(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(
            parse_duration("5")
                .expect_err("error")
                .contains("missing unit")
        );
        assert!(
            parse_duration("5 parsecs")
                .expect_err("error")
                .contains("unknown unit")
        );
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(
            parse_duration("999999999999999999d")
                .expect_err("error")
                .contains("too large")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(
            parse_size("10 mb")
                .expect_err("error")
                .contains("unknown unit")
        );
        assert!(parse_size("KiB").is_err());
        assert!(
            parse_size("99999999999GiB")
                .expect_err("error")
                .contains("too large")
        );
    }
}
