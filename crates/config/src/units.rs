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

/// What a duration looks like; serde puts "expected " before it.
const DURATION_HELP: &str =
    "a duration such as \"30s\" (an integer, then one of the units ms, s, m, h, d, with no space)";
/// What a size looks like; serde puts "expected " before it.
const SIZE_HELP: &str = "a size such as \"64KiB\" (an integer, then one of the units B, KiB, MiB, GiB, KB, MB, GB, with no space)";

/// The longest duration the config accepts: a year. Longer ones are
/// almost certainly a typo, and they would overflow the millisecond counts
/// the stores and timers take.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Splits `"123abc"` into `(123, "abc")`, strictly: digits first, then the
/// unit, nothing around or between. `Err` holds the message; `parse` is the
/// caller's parser, used to suggest the text without its spaces.
fn split_number<'t, T>(
    text: &'t str,
    help: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<(u64, &'t str), String> {
    if text.contains(char::is_whitespace) {
        let compact: String = text.split_whitespace().collect();
        return Err(if !compact.is_empty() && parse(&compact).is_ok() {
            format!("{text:?}: no spaces allowed; write {compact:?}")
        } else {
            format!("{text:?}: no spaces allowed; expected {help}")
        });
    }
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("{text:?}: expected {help}"));
    }
    let number = text[..digits]
        .parse()
        .map_err(|_| format!("{text:?}: the number is too large"))?;
    Ok((number, &text[digits..]))
}

/// Parses a duration such as `"500ms"` (at most [`MAX_DURATION`]); returns
/// a message on error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = split_number(text, DURATION_HELP, parse_duration)?;
    let too_large = || format!("{text:?}: too large; a duration is at most 365d");
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(too_large)
    };
    let duration = match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        "" => Err(format!(
            "{text:?}: missing unit; write \"{n}s\" for seconds (expected {DURATION_HELP})"
        )),
        _ => Err(format!(
            "{text:?}: unknown unit {unit:?}; expected {DURATION_HELP}"
        )),
    }?;
    if duration > MAX_DURATION {
        return Err(too_large());
    }
    Ok(duration)
}

/// Parses a size such as `"64KiB"`; returns a message on error.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (n, unit) = split_number(text, SIZE_HELP, parse_size)?;
    let mult: u64 = match unit {
        "B" | "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; expected {SIZE_HELP}"
            ));
        }
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
            // A bare number: say which unit to add rather than only that
            // the type is wrong.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "expected a duration such as \"30s\", found the number {v}; write it as a string with a unit, such as \"{v}s\" or \"{v}ms\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "expected a duration such as \"30s\", found the number {v}; write it as a string with a unit, such as \"{v}s\" or \"{v}ms\""
                )))
            }
        }
        d.deserialize_any(V)
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

    fn err(result: Result<impl fmt::Debug, String>) -> String {
        result.expect_err("an error")
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("365d"), Ok(MAX_DURATION));
        assert!(err(parse_duration("5")).starts_with("\"5\": missing unit; write \"5s\""));
        assert!(err(parse_duration("5parsecs")).contains("unknown unit \"parsecs\""));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("+5s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("5S").is_err());
        assert!(err(parse_duration("99999999999999999999h")).contains("too large"));
        assert!(err(parse_duration("999999999999999999d")).contains("too large"));
        assert!(err(parse_duration("366d")).contains("at most 365d"));
        assert!(err(parse_duration("9000h")).contains("at most 365d"));
    }

    #[test]
    fn durations_take_no_spaces() {
        for text in ["30 s", " 30s", "30s ", "3 0s", "30\ts"] {
            assert_eq!(
                err(parse_duration(text)),
                format!("{text:?}: no spaces allowed; write \"30s\""),
            );
        }
        assert!(
            err(parse_duration("5 parsecs")).starts_with(
                "\"5 parsecs\": no spaces allowed; expected a duration such as \"30s\""
            )
        );
        assert!(err(parse_duration(" ")).contains("no spaces allowed; expected"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("7"), Ok(7));
        assert_eq!(
            err(parse_size("10 MiB")),
            "\"10 MiB\": no spaces allowed; write \"10MiB\""
        );
        assert!(err(parse_size("10 mb")).contains("no spaces allowed; expected a size"));
        assert!(err(parse_size("10mb")).contains("unknown unit \"mb\""));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("-1B").is_err());
        assert!(err(parse_size("99999999999GiB")).contains("too large"));
        assert!(err(parse_size("99999999999999999999")).contains("too large"));
    }
}
