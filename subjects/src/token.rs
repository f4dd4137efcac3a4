//! Reversible subject-token encoding.
//!
//! NATS subject tokens may not contain `.`, `*`, `>` or whitespace, and some
//! tools choke on anything outside printable ASCII. Ids are therefore encoded:
//! ASCII letters, digits, `_` and `-` pass through; every other byte of the
//! UTF-8 form (including the escape character `~` itself) becomes `~XX` (two
//! uppercase hex digits). Encoding is injective, so decoding gives the id back.

use thiserror::Error;

/// Why an id cannot be used as, or recovered from, a subject token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Empty ids would produce an empty token (`a..b`), which NATS rejects.
    #[error("an empty id cannot be used as a subject token")]
    Empty,
    /// A token that was not produced by [`encode`].
    #[error("`{0}` is not a valid encoded subject token")]
    Malformed(String),
}

fn passes(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Encode an id into a subject token.
pub fn encode(id: &str) -> Result<String, TokenError> {
    if id.is_empty() {
        return Err(TokenError::Empty);
    }
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if passes(b) {
            out.push(b as char);
        } else {
            out.push('~');
            out.push_str(&format!("{b:02X}"));
        }
    }
    Ok(out)
}

/// Decode a token produced by [`encode`].
pub fn decode(token: &str) -> Result<String, TokenError> {
    let bad = || TokenError::Malformed(token.to_string());
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'~' {
            let hex = token.get(i + 1..i + 3).ok_or_else(bad)?;
            if !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
            {
                return Err(bad());
            }
            let v = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
            if passes(v) {
                // encode() never escapes a pass-through byte: not canonical.
                return Err(bad());
            }
            out.push(v);
            i += 3;
        } else if passes(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(bad());
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(encode("My Strategy").unwrap(), "My~20Strategy");
        assert_eq!(encode("SPX_1-D_Opt").unwrap(), "SPX_1-D_Opt");
        assert_eq!(encode("a.b*>~").unwrap(), "a~2Eb~2A~3E~7E");
        assert_eq!(decode("My~20Strategy").unwrap(), "My Strategy");
        assert_eq!(encode(""), Err(TokenError::Empty));
        assert!(decode("a~2").is_err());
        assert!(
            decode("a~41").is_err(),
            "escaped pass-through byte is not canonical"
        );
        assert!(decode("a.b").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(id in "\\PC{1,40}") {
            let t = encode(&id).unwrap();
            prop_assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'~'));
            prop_assert_eq!(decode(&t).unwrap(), id);
        }

        #[test]
        fn decode_never_panics(s in ".{0,40}") {
            let _ = decode(&s);
        }
    }
}
