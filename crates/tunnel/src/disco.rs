//! Path probes between two peers (`PROBE`, `PONG`, `CALL_ME`; formats in
//! `trellis_proto::frames`). Authenticated with a key only the two peers can
//! derive (their static X25519 shared secret), so nobody else can make a node
//! believe a path works.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use trellis_proto::frames::{FRAME_CALL_ME, FRAME_PONG, FRAME_PROBE, PEER_FRAME_LEN};

use crate::{PublicKey, StaticSecret};

type HmacSha256 = Hmac<Sha256>;

/// The per-pair key for probe MACs.
#[derive(Clone)]
pub struct PairKey([u8; 32]);

impl PairKey {
    pub fn derive(private: &StaticSecret, peer_public: &[u8; 32]) -> PairKey {
        let shared = private.diffie_hellman(&PublicKey::from(*peer_public));
        // Domain-separate from anything else the shared secret could be used for.
        let mut mac = HmacSha256::new_from_slice(shared.as_bytes()).expect("any key length");
        mac.update(b"trellis-disco-v1");
        PairKey(mac.finalize().into_bytes().into())
    }

    fn tag(&self, body: &[u8]) -> [u8; 16] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("any key length");
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; 16];
        t.copy_from_slice(&full[..16]);
        t
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Probe,
    Pong,
    CallMe,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Probe => FRAME_PROBE,
            Kind::Pong => FRAME_PONG,
            Kind::CallMe => FRAME_CALL_ME,
        }
    }
}

/// Writes a frame into `out` (at least [`PEER_FRAME_LEN`] bytes); returns its length.
pub fn encode(kind: Kind, sender: &[u8; 32], txid: u64, key: &PairKey, out: &mut [u8]) -> usize {
    out[0] = kind.byte();
    out[1..33].copy_from_slice(sender);
    out[33..41].copy_from_slice(&txid.to_be_bytes());
    let tag = key.tag(&out[..41]);
    out[41..57].copy_from_slice(&tag);
    PEER_FRAME_LEN
}

/// The kind, sender and txid of a well-formed frame (not yet authenticated).
pub fn peek(frame: &[u8]) -> Option<(Kind, [u8; 32], u64)> {
    if frame.len() != PEER_FRAME_LEN {
        return None;
    }
    let kind = match frame[0] {
        FRAME_PROBE => Kind::Probe,
        FRAME_PONG => Kind::Pong,
        FRAME_CALL_ME => Kind::CallMe,
        _ => return None,
    };
    let sender: [u8; 32] = frame[1..33].try_into().ok()?;
    let txid = u64::from_be_bytes(frame[33..41].try_into().ok()?);
    Some((kind, sender, txid))
}

/// Checks the MAC in constant time.
pub fn verify(frame: &[u8], key: &PairKey) -> bool {
    if frame.len() != PEER_FRAME_LEN {
        return false;
    }
    let mut mac = HmacSha256::new_from_slice(&key.0).expect("any key length");
    mac.update(&frame[..41]);
    mac.verify_truncated_left(&frame[41..57]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_key_and_forgeries_fail() {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let pa = *PublicKey::from(&a).as_bytes();
        let pb = *PublicKey::from(&b).as_bytes();
        let kab = PairKey::derive(&a, &pb);
        let kba = PairKey::derive(&b, &pa);
        let mut f = [0u8; PEER_FRAME_LEN];
        encode(Kind::Probe, &pa, 42, &kab, &mut f);
        assert!(verify(&f, &kba));
        assert_eq!(peek(&f), Some((Kind::Probe, pa, 42)));
        let c = StaticSecret::from([3u8; 32]);
        let kca = PairKey::derive(&c, &pa);
        assert!(!verify(&f, &kca), "a third party's key does not verify");
        f[35] ^= 1;
        assert!(!verify(&f, &kba), "tampered txid");
        assert_eq!(peek(&f[..10]), None);
    }
}
