//! Deterministic ids.
//!
//! Every id mtx assigns is a hash of the upstream ids it derives from (never
//! random), so a re-sent signal, a redelivered message or a replayed stream maps
//! to the same id, the same `Nats-Msg-Id` and the same Mongo natural key.

use sha2::{Digest, Sha256};

/// Derive a stable id `<prefix>_<24 hex chars>` from ordered parts.
///
/// Parts are length-prefixed before hashing so `("ab","c")` and `("a","bc")`
/// never collide. 96 bits keeps accidental collisions out of reach for any
/// realistic signal volume while staying readable in logs.
pub fn derive_id(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(prefix.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    format!("{prefix}_{}", hex::encode(&digest[..12]))
}

/// Id of a standardized signal: from (source, strategy, sender signal id).
pub fn signal_id(source: &str, strategy: &str, sender_signal_id: &str) -> String {
    derive_id("sig", &[source, strategy, sender_signal_id])
}

/// Id of the order for one leg of a signal.
pub fn order_id(signal_id: &str, leg: usize) -> String {
    derive_id("ord", &[signal_id, &leg.to_string()])
}

/// Id of one execution (fill / partial fill / reject) of an order.
pub fn execution_id(order_id: &str, fill_seq: u64) -> String {
    derive_id("exe", &[order_id, &fill_seq.to_string()])
}

/// Append `id` to `out` as a NATS KV key token: KV keys allow only
/// `[-/_=.A-Za-z0-9]`, so ASCII letters, digits, `_` and `-` pass through and
/// every other byte of the UTF-8 id becomes `=XX` (uppercase hex). Injective:
/// two ids never share a token, so keys built from ids (strategy configs,
/// finished orders) never collide. The one encoding every KV key of an id uses.
pub fn push_kv_token(out: &mut String, id: &str) {
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_distinct() {
        let a = signal_id("api", "SPX_1-D_Opt", "GC_ENTRY_001");
        assert_eq!(a, signal_id("api", "SPX_1-D_Opt", "GC_ENTRY_001"));
        assert!(a.starts_with("sig_") && a.len() == 4 + 24);
        assert_ne!(a, signal_id("api", "SPX_1-D_Opt", "GC_ENTRY_002"));
        assert_ne!(derive_id("x", &["ab", "c"]), derive_id("x", &["a", "bc"]));
        assert_ne!(order_id(&a, 0), order_id(&a, 1));
    }
}
