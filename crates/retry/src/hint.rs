//! Server hints: `Retry-After` (delay-seconds or an HTTP date, RFC 9110
//! section 10.2.3) and `X-RateLimit-Reset`. A small parser of our own:
//! the three HTTP date formats are fixed-width enough that a crate would
//! be more code to audit than this.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a hint could not be read.
///
/// ```
/// use keel_retry::{parse_retry_after, HintError};
/// let err = parse_retry_after("tomorrow", std::time::SystemTime::now()).unwrap_err();
/// assert!(matches!(err, HintError::Malformed(_)));
/// assert!(err.to_string().contains("expected seconds"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    /// Neither a number of seconds nor an HTTP date.
    #[error(
        "not a Retry-After value: {0:?} (expected seconds such as \"120\" or a date such as \"Sun, 06 Nov 1994 08:49:37 GMT\")"
    )]
    Malformed(String),
}

/// Parses a `Retry-After` value into how long to wait from `now`. A date
/// in the past means "now" (zero).
///
/// ```
/// use keel_retry::parse_retry_after;
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// let now = UNIX_EPOCH + Duration::from_secs(784111777); // Sun, 06 Nov 1994 08:49:37 GMT
/// assert_eq!(parse_retry_after("120", now), Ok(Duration::from_secs(120)));
/// assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now), Ok(Duration::from_secs(120)));
/// assert!(parse_retry_after("soon", now).is_err());
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Result<Duration, HintError> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long numbers saturate rather than fail: the caller
        // bounds the hint anyway.
        return Ok(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(v)?;
    Ok(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `X-RateLimit-Reset`: either seconds to wait, or (for values that
/// look like one, above 10^9) a Unix timestamp in seconds.
///
/// ```
/// use keel_retry::parse_rate_limit_reset;
/// use std::time::{Duration, UNIX_EPOCH};
/// let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
/// assert_eq!(parse_rate_limit_reset("30", now), Ok(Duration::from_secs(30)));
/// assert_eq!(parse_rate_limit_reset("1700000060", now), Ok(Duration::from_secs(60)));
/// ```
pub fn parse_rate_limit_reset(value: &str, now: SystemTime) -> Result<Duration, HintError> {
    let v = value.trim();
    let n: u64 = v
        .parse()
        .map_err(|_| HintError::Malformed(value.to_string()))?;
    if n >= 1_000_000_000 {
        let at = UNIX_EPOCH + Duration::from_secs(n);
        Ok(at.duration_since(now).unwrap_or(Duration::ZERO))
    } else {
        Ok(Duration::from_secs(n))
    }
}

/// Parses an HTTP date in any of the three formats HTTP recipients must
/// accept: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), RFC 850
/// (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`).
///
/// ```
/// use keel_retry::parse_http_date;
/// use std::time::{Duration, UNIX_EPOCH};
/// let t = UNIX_EPOCH + Duration::from_secs(784111777);
/// assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Ok(t));
/// assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Ok(t));
/// assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Ok(t));
/// ```
pub fn parse_http_date(value: &str) -> Result<SystemTime, HintError> {
    let bad = || HintError::Malformed(value.to_string());
    let v = value.trim();
    let parts: Vec<&str> = v.split_ascii_whitespace().collect();
    let (day, month, year, time) = match parts.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [wd, d, m, y, t, "GMT"] if wd.ends_with(',') && wd.len() == 4 => {
            (number(d)?, month_of(m)?, number(y)?, *t)
        }
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
        [wd, dmy, t, "GMT"] if wd.ends_with(',') => {
            let f: Vec<&str> = dmy.split('-').collect();
            let [d, m, y] = f.as_slice() else {
                return Err(bad());
            };
            if y.len() != 2 {
                return Err(bad());
            }
            let yy = number(y)?;
            // RFC 9110: a two-digit year more than 50 years ahead is in
            // the past century; good enough with a fixed pivot.
            let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
            (number(d)?, month_of(m)?, year, *t)
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_wd, m, d, t, y] => (number(d)?, month_of(m)?, number(y)?, *t),
        _ => return Err(bad()),
    };
    let hms: Vec<&str> = time.split(':').collect();
    let [h, mi, s] = hms.as_slice() else {
        return Err(bad());
    };
    let (h, mi, s) = (number(h)?, number(mi)?, number(s)?);
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 || !(1970..=9999).contains(&year) {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    if day > days_in_month(year, month) {
        return Err(bad());
    }
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

fn number(s: &str) -> Result<u64, HintError> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HintError::Malformed(s.to_string()));
    }
    s.parse().map_err(|_| HintError::Malformed(s.to_string()))
}

fn month_of(s: &str) -> Result<u64, HintError> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS
        .iter()
        .position(|m| *m == s)
        .map(|i| i as u64 + 1)
        .ok_or_else(|| HintError::Malformed(s.to_string()))
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year >= 1970),
/// counting whole years and months: plain and obviously right.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let years: u64 = (1970..y)
        .map(|yy| if is_leap(yy) { 366 } else { 365 })
        .sum();
    let months: u64 = (1..m).map(|mm| days_in_month(y, mm)).sum();
    years + months + d - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        let t = |s| {
            parse_http_date(s)
                .expect("date")
                .duration_since(UNIX_EPOCH)
                .expect("after epoch")
                .as_secs()
        };
        assert_eq!(t("Thu, 01 Jan 1970 00:00:00 GMT"), 0);
        assert_eq!(t("Tue, 29 Feb 2000 12:00:00 GMT"), 951_825_600);
        assert_eq!(t("Fri, 31 Dec 1999 23:59:59 GMT"), 946_684_799);
        assert_eq!(t("Tue, 14 Nov 2023 22:13:20 GMT"), 1_700_000_000);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for s in [
            "",
            "GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 1900 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "-5",
            "1.5",
            "Sun, 06 Nov 99999 08:49:37 GMT",
        ] {
            assert!(parse_retry_after(s, UNIX_EPOCH).is_err(), "{s:?}");
        }
    }

    #[test]
    fn past_dates_mean_now() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Ok(Duration::ZERO)
        );
    }
}
