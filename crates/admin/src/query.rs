//! Query strings: percent-encoding for the client, decoding and parameter
//! lookup for the server.

use crate::dto::KeyQuery;

/// Decodes `%XX` escapes (and `+` as a space) in a query value; invalid
/// escapes are kept as they are.
///
/// ```
/// assert_eq!(keel_admin::percent_decode("http%3A%2F%2Fa%3A1+x"), "http://a:1 x");
/// assert_eq!(keel_admin::percent_decode("100%"), "100%");
/// ```
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a query value (or a path segment): everything but unreserved
/// characters becomes `%XX`.
///
/// ```
/// assert_eq!(keel_admin::percent_encode("http://a:1/x y"), "http%3A%2F%2Fa%3A1%2Fx%20y");
/// ```
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// The decoded value of the first `name=` pair of a raw query string.
///
/// ```
/// let query = "route=pay&key=a%20b";
/// assert_eq!(keel_admin::query_param(query, "key").as_deref(), Some("a b"));
/// assert_eq!(keel_admin::query_param(query, "path"), None);
/// ```
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

/// The question of `/idempotency/keys` from its raw query string, or the
/// message for a 400 when `route=` or `key=` is missing.
pub fn key_query(query: &str) -> Result<KeyQuery, String> {
    let (Some(route), Some(key)) = (query_param(query, "route"), query_param(query, "key")) else {
        return Err(
            "give route= (an idempotent route's name) and key= (the client's Idempotency-Key)"
                .into(),
        );
    };
    Ok(KeyQuery {
        route,
        key,
        path: query_param(query, "path"),
        method: query_param(query, "method"),
        tenant: query_param(query, "tenant"),
    })
}

/// The path and query of `/idempotency/keys` asking `query`.
pub fn key_path(query: &KeyQuery) -> String {
    let mut path = format!(
        "/idempotency/keys?route={}&key={}",
        percent_encode(&query.route),
        percent_encode(&query.key)
    );
    for (name, value) in [
        ("method", &query.method),
        ("path", &query.path),
        ("tenant", &query.tenant),
    ] {
        if let Some(value) = value {
            path.push_str(&format!("&{name}={}", percent_encode(value)));
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        let url = "http://127.0.0.1:3001/a b";
        assert_eq!(percent_decode(&percent_encode(url)), url);
        assert_eq!(percent_decode("http://x:1"), "http://x:1");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a+b%2Bc"), "a b+c");
        let odd = "ключ/?&=%+ ~._-";
        assert_eq!(percent_decode(&percent_encode(odd)), odd);
        assert!(
            percent_encode(odd)
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"%-._~".contains(&b))
        );
    }

    #[test]
    fn parameters_are_found_by_exact_name_first_one_wins() {
        let q = "xkey=1&key=a%26b&key=second&flag&route=";
        assert_eq!(query_param(q, "key").as_deref(), Some("a&b"));
        assert_eq!(query_param(q, "route").as_deref(), Some(""));
        assert_eq!(query_param(q, "flag"), None);
        assert_eq!(query_param("", "key"), None);
    }

    #[test]
    fn key_queries_need_a_route_and_a_key_and_round_trip() {
        assert!(key_query("route=pay").is_err());
        assert!(key_query("key=k").is_err());
        let asked = KeyQuery {
            route: "pay ments".into(),
            key: "k&1".into(),
            path: Some("/pay/1".into()),
            method: Some("PUT".into()),
            tenant: Some("Bearer x=y".into()),
        };
        let path = key_path(&asked);
        let (_, query) = path.split_once('?').expect("query");
        assert_eq!(key_query(query), Ok(asked));
        let bare = key_query("route=r&key=k").expect("valid");
        assert_eq!((bare.path, bare.method, bare.tenant), (None, None, None));
    }
}
