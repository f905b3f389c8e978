//! The discovery half of the edge: a STUN (RFC 8489) Binding responder, pure.
//! A node sends a Binding request to the edge's UDP port and learns the
//! address and port the edge saw it from (its server-reflexive candidate).

use std::net::{IpAddr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const HEADER_LEN: usize = 20;

/// Answers a Binding request from `from`, writing the response into `out`
/// and returning its length. Anything else (including malformed input) gets
/// no answer.
pub fn respond(datagram: &[u8], from: SocketAddr, out: &mut [u8]) -> Option<usize> {
    if datagram.len() < HEADER_LEN || datagram[0] & 0xC0 != 0 {
        return None;
    }
    let msg_type = u16::from_be_bytes([datagram[0], datagram[1]]);
    let msg_len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let cookie = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
    if msg_type != BINDING_REQUEST
        || cookie != MAGIC_COOKIE
        || !msg_len.is_multiple_of(4)
        || HEADER_LEN + msg_len != datagram.len()
    {
        return None;
    }
    let txid = &datagram[8..20];
    let (family, addr_bytes): (u8, Vec<u8>) = match from.ip() {
        IpAddr::V4(v4) => {
            let x = u32::from(v4) ^ MAGIC_COOKIE;
            (0x01, x.to_be_bytes().to_vec())
        }
        IpAddr::V6(v6) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(txid);
            let o = v6.octets();
            (0x02, (0..16).map(|i| o[i] ^ key[i]).collect())
        }
    };
    let attr_len = 4 + addr_bytes.len();
    let total = HEADER_LEN + 4 + attr_len;
    if out.len() < total {
        return None;
    }
    out[0..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out[2..4].copy_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(txid);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(attr_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let xport = from.port() ^ (MAGIC_COOKIE >> 16) as u16;
    out[26..28].copy_from_slice(&xport.to_be_bytes());
    out[28..28 + addr_bytes.len()].copy_from_slice(&addr_bytes);
    Some(total)
}

/// Reads the XOR-MAPPED-ADDRESS of a Binding success response (what a
/// client does with the answer); `None` for anything else.
pub fn parse_response(datagram: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if datagram.len() < HEADER_LEN
        || u16::from_be_bytes([datagram[0], datagram[1]]) != BINDING_SUCCESS
        || datagram[4..8] != MAGIC_COOKIE.to_be_bytes()
        || &datagram[8..20] != txid
    {
        return None;
    }
    let mut i = HEADER_LEN;
    while i + 4 <= datagram.len() {
        let t = u16::from_be_bytes([datagram[i], datagram[i + 1]]);
        let l = u16::from_be_bytes([datagram[i + 2], datagram[i + 3]]) as usize;
        let v = datagram.get(i + 4..i + 4 + l)?;
        if t == ATTR_XOR_MAPPED_ADDRESS && l >= 8 {
            let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
            if v[1] == 0x01 {
                let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
                return Some(SocketAddr::from((std::net::Ipv4Addr::from(ip), port)));
            }
            if v[1] == 0x02 && l >= 20 {
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                key[4..].copy_from_slice(txid);
                let mut o = [0u8; 16];
                for k in 0..16 {
                    o[k] = v[4 + k] ^ key[k];
                }
                return Some(SocketAddr::from((std::net::Ipv6Addr::from(o), port)));
            }
        }
        i += 4 + l.div_ceil(4) * 4;
    }
    None
}

/// A Binding request with transaction id `txid`.
pub fn request(txid: &[u8; 12]) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    r[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    r[8..20].copy_from_slice(txid);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_the_observed_address_v4_and_v6() {
        let txid = [7u8; 12];
        for from in ["198.18.3.4:40000", "[fd00::1234]:5"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut out = [0u8; 128];
            let n = respond(&request(&txid), from, &mut out).expect("answered");
            assert_eq!(parse_response(&out[..n], &txid), Some(from));
            assert_eq!(parse_response(&out[..n], &[0u8; 12]), None, "wrong txid");
        }
    }

    #[test]
    fn ignores_everything_else() {
        let from: SocketAddr = "198.18.3.4:1".parse().unwrap();
        let mut out = [0u8; 128];
        let mut wrong_cookie = request(&[1; 12]);
        wrong_cookie[4] ^= 1;
        let mut bad_len = request(&[1; 12]).to_vec();
        bad_len[3] = 4;
        for junk in [
            &[][..],
            &[1u8, 0, 0, 0][..],
            &wrong_cookie[..],
            &bad_len[..],
            &[0x01u8; 20][..],
            // A WireGuard handshake initiation type byte.
            &[1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        ] {
            assert_eq!(respond(junk, from, &mut out), None, "{junk:?}");
        }
    }
}
