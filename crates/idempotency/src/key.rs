//! Parsing the `Idempotency-Key` header.
//!
//! The IETF draft makes the key a Structured Field String (`"abc"`), but many
//! clients send the bare value (`abc`); both are accepted. The key must be 1
//! to `max_len` characters of printable ASCII; a quoted key may contain
//! spaces and the escapes `\"` and `\\`, a bare key may not contain spaces
//! or quotes.
//!
//! ```
//! use keel_idempotency::key::{parse_key, KeyError};
//!
//! assert_eq!(parse_key(br#""8e03978e-40d5""#, 255), Ok("8e03978e-40d5".to_string()));
//! assert_eq!(parse_key(b"8e03978e-40d5", 255), Ok("8e03978e-40d5".to_string()));
//! assert_eq!(parse_key(b"", 255), Err(KeyError::Empty));
//! assert_eq!(parse_key(b"abc", 2), Err(KeyError::TooLong { max: 2 }));
//! assert_eq!(parse_key("caf\u{e9}".as_bytes(), 255), Err(KeyError::NotPrintableAscii));
//! ```

/// Why a key was refused (the engine answers 400 with the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header is present but empty (or `""`).
    #[error("the idempotency key is empty; send a unique value such as a UUID")]
    Empty,
    /// Longer than the configured maximum.
    #[error("the idempotency key is longer than {max} characters")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A byte outside printable ASCII, or a space or quote in a bare key.
    #[error(
        "the idempotency key must be printable ASCII (quote it as a structured field string to include spaces)"
    )]
    NotPrintableAscii,
    /// A quoted key with a missing closing quote or a bad escape.
    #[error("the idempotency key is not a valid structured field string")]
    BadString,
    /// The header appears more than once.
    #[error("the idempotency key header appears more than once")]
    Repeated,
}

/// Parses one header value into the key, per the [module docs](self).
///
/// ```
/// # use keel_idempotency::key::parse_key;
/// assert_eq!(parse_key(br#""a \"b\"""#, 255).unwrap(), r#"a "b""#);
/// ```
pub fn parse_key(value: &[u8], max_len: usize) -> Result<String, KeyError> {
    parse_key_cow(value, max_len).map(std::borrow::Cow::into_owned)
}

/// [`parse_key`] without a copy of a bare key (the usual form): the engine
/// only hashes the key.
pub(crate) fn parse_key_cow(
    value: &[u8],
    max_len: usize,
) -> Result<std::borrow::Cow<'_, str>, KeyError> {
    use std::borrow::Cow;
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = if value[0] == b'"' {
        let mut out = String::with_capacity(value.len());
        let mut bytes = value[1..].iter();
        let mut closed = false;
        while let Some(&b) = bytes.next() {
            match b {
                b'\\' => match bytes.next() {
                    Some(&e @ (b'"' | b'\\')) => out.push(char::from(e)),
                    _ => return Err(KeyError::BadString),
                },
                b'"' => {
                    closed = true;
                    break;
                }
                0x20..=0x7e => out.push(char::from(b)),
                _ => return Err(KeyError::NotPrintableAscii),
            }
        }
        // Structured field parameters after the string (`"k";a=1`) are not
        // part of the key and no client sends them: refuse rather than guess.
        if !closed || bytes.next().is_some() {
            return Err(KeyError::BadString);
        }
        Cow::Owned(out)
    } else {
        if !value.iter().all(|&b| b.is_ascii_graphic() && b != b'"') {
            return Err(KeyError::NotPrintableAscii);
        }
        // All bytes are ASCII, so this cannot fail.
        Cow::Borrowed(std::str::from_utf8(value).map_err(|_| KeyError::NotPrintableAscii)?)
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong { max: max_len });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_errors() {
        assert_eq!(parse_key(b"  abc  ", 255).as_deref(), Ok("abc"));
        assert_eq!(parse_key(br#""""#, 255), Err(KeyError::Empty));
        assert_eq!(parse_key(br#""abc"#, 255), Err(KeyError::BadString));
        assert_eq!(parse_key(br#""a\nb""#, 255), Err(KeyError::BadString));
        assert_eq!(parse_key(br#""ab";x=1"#, 255), Err(KeyError::BadString));
        assert_eq!(parse_key(b"a b", 255), Err(KeyError::NotPrintableAscii));
        assert_eq!(parse_key(b"a\x01b", 255), Err(KeyError::NotPrintableAscii));
        assert_eq!(
            parse_key(b"\"a\x7fb\"", 255),
            Err(KeyError::NotPrintableAscii)
        );
        assert_eq!(parse_key(br#""a b""#, 255).as_deref(), Ok("a b"));
        let k255 = "k".repeat(255);
        assert_eq!(
            parse_key(k255.as_bytes(), 255).as_deref(),
            Ok(k255.as_str())
        );
        assert_eq!(
            parse_key("k".repeat(256).as_bytes(), 255),
            Err(KeyError::TooLong { max: 255 })
        );
        // The limit counts the key, not its quotes.
        assert!(parse_key(format!("\"{k255}\"").as_bytes(), 255).is_ok());
    }
}
