//! Relay tokens: what a node presents in `FRAME_REGISTER` to prove that the
//! control plane let it use the relay, for which account, and until when.
//!
//! Format: `v1.<account_id>.<node key, base64url without padding>.<expires_at>.<mac>`
//! where mac is the hex HMAC-SHA256, keyed by the relay secret shared by the
//! control plane and the edge, of
//! `trellis-relay-v1|<account_id>|<node key base64url>|<expires_at>`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";
const DOMAIN: &str = "trellis-relay-v1";

/// Why a relay token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed relay token")]
    Malformed,
    #[error("relay token was not issued by this server")]
    BadMac,
    #[error("relay token expired")]
    Expired,
}

fn mac_over(secret: &[u8; 32], account_id: &str, key_b64: &str, expires_at: &str) -> HmacSha256 {
    // HMAC pads a short key with zeros to the block size (64 bytes for SHA-256),
    // so the padded key gives the same MAC as the 32-byte one, without a fallible call.
    let mut key = hmac::digest::Key::<HmacSha256>::default();
    key[..32].copy_from_slice(secret);
    let mut mac = <HmacSha256 as KeyInit>::new(&key);
    mac.update(DOMAIN.as_bytes());
    for part in [account_id, key_b64, expires_at] {
        mac.update(b"|");
        mac.update(part.as_bytes());
    }
    mac
}

/// A token for node `node_key` of account `account_id`, valid until `expires_at` (unix seconds).
pub fn sign(secret: &[u8; 32], account_id: i64, node_key: &[u8; 32], expires_at: i64) -> String {
    let account = account_id.to_string();
    let key = URL_SAFE_NO_PAD.encode(node_key);
    let expires = expires_at.to_string();
    let tag = mac_over(secret, &account, &key, &expires)
        .finalize()
        .into_bytes();
    format!("{VERSION}.{account}.{key}.{expires}.{}", hex::encode(tag))
}

/// Checks `token` at unix time `now_unix`: its account id and node key if it is valid.
/// The MAC is compared in constant time.
pub fn verify(
    secret: &[u8; 32],
    token: &str,
    now_unix: i64,
) -> Result<(i64, [u8; 32]), TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(version), Some(account), Some(key), Some(expires), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    if version != VERSION {
        return Err(TokenError::Malformed);
    }
    let account_id: i64 = account.parse().map_err(|_| TokenError::Malformed)?;
    let expires_at: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    let node_key: [u8; 32] = URL_SAFE_NO_PAD
        .decode(key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or(TokenError::Malformed)?;
    let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
    if tag.len() != 32 {
        return Err(TokenError::Malformed);
    }
    // Over the text as given: a non-canonical spelling of a number fails the MAC.
    mac_over(secret, account, key, expires)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadMac)?;
    if now_unix >= expires_at {
        return Err(TokenError::Expired);
    }
    Ok((account_id, node_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [9; 32];

    #[test]
    fn round_trips_and_has_the_documented_shape() {
        let t = sign(&SECRET, 42, &[7; 32], 1_000);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 5);
        assert_eq!(parts[0], "v1");
        assert_eq!(parts[1], "42");
        assert_eq!(parts[2], URL_SAFE_NO_PAD.encode([7u8; 32]));
        assert_eq!(parts[3], "1000");
        assert_eq!(parts[4].len(), 64);
        assert_eq!(verify(&SECRET, &t, 999), Ok((42, [7; 32])));
        // Independent check of the MAC input.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&SECRET).unwrap();
        mac.update(format!("trellis-relay-v1|42|{}|1000", parts[2]).as_bytes());
        assert_eq!(hex::encode(mac.finalize().into_bytes()), parts[4]);
    }

    #[test]
    fn refuses_expired_forged_and_garbage() {
        let t = sign(&SECRET, 1, &[1; 32], 1_000);
        assert_eq!(verify(&SECRET, &t, 1_000), Err(TokenError::Expired));
        assert_eq!(verify(&[8; 32], &t, 0), Err(TokenError::BadMac));
        // Another account, key or expiry with the same MAC.
        let mac = t.rsplit('.').next().unwrap();
        let key = URL_SAFE_NO_PAD.encode([1u8; 32]);
        for forged in [
            format!("v1.2.{key}.1000.{mac}"),
            format!("v1.1.{key}.2000.{mac}"),
            format!("v1.01.{key}.1000.{mac}"),
            format!("v1.1.{}.1000.{mac}", URL_SAFE_NO_PAD.encode([2u8; 32])),
        ] {
            assert_eq!(
                verify(&SECRET, &forged, 0),
                Err(TokenError::BadMac),
                "{forged}"
            );
        }
        for junk in [
            "",
            "v1",
            "v2.1.AAAA.1000.00",
            &format!("v1.x.{key}.1000.{mac}"),
            &format!("v1.1.{key}.soon.{mac}"),
            &format!("v1.1.short.1000.{mac}"),
            &format!("v1.1.{key}.1000.zz"),
            &format!("v1.1.{key}.1000.{}", &mac[..62]),
            &format!("{t}.extra"),
        ] {
            assert_eq!(
                verify(&SECRET, junk, 0),
                Err(TokenError::Malformed),
                "{junk}"
            );
        }
    }
}
