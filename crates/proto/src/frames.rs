//! Frames that share the node's WireGuard UDP socket with WireGuard itself.
//!
//! The first byte tells them apart: WireGuard messages start with 1–4, STUN
//! with 0x00/0x01, and ours with 0x81–0x88. Keeping everything on one socket
//! means one NAT mapping serves discovery, relaying and direct traffic.
//!
//! Between a node and the edge:
//! - `REGISTER`    node → edge, UDP: `[0x81][token, UTF-8]` (token from `RelayInfo`).
//!   Sent on start and every [`REGISTER_INTERVAL_SECS`]; keeps the NAT mapping open.
//! - `REGISTERED`  edge → node, UDP: `[0x82][family 4|6][port u16 BE][ip 4|16 bytes]`:
//!   the acknowledgement, carrying the address the edge saw (like STUN).
//! - `REFUSED`     edge → node, UDP: `[0x88][reason, UTF-8]` (bad or expired token, revoked key).
//! - `RELAY_SEND`  node → edge, UDP or WebSocket binary message: `[0x83][destination key 32][payload]`.
//! - `RELAY_RECV`  edge → node, UDP or WebSocket binary message: `[0x84][source key 32][payload]`.
//!   The payload is WireGuard ciphertext or one of the peer frames below; the
//!   edge forwards only between nodes of the same account and never looks inside.
//!
//! Between two nodes (directly, or inside a relay payload):
//! - `PROBE`       `[0x85][sender key 32][txid 8][mac 16]` — "can you hear me on this path?"
//! - `PONG`        `[0x86][sender key 32][txid 8][mac 16]` — the answer, same txid.
//! - `CALL_ME`     `[0x87][sender key 32][txid 8][mac 16]` — sent over the relay: "probe my
//!   candidates now", so that both sides punch holes at the same moment.
//!
//! The mac is the first 16 bytes of HMAC-SHA256 keyed by the two nodes' static
//! X25519 shared secret over the preceding bytes: only the two peers can make one.

pub const FRAME_REGISTER: u8 = 0x81;
pub const FRAME_REGISTERED: u8 = 0x82;
pub const FRAME_RELAY_SEND: u8 = 0x83;
pub const FRAME_RELAY_RECV: u8 = 0x84;
pub const FRAME_PROBE: u8 = 0x85;
pub const FRAME_PONG: u8 = 0x86;
pub const FRAME_CALL_ME: u8 = 0x87;
pub const FRAME_REFUSED: u8 = 0x88;

/// Bytes before the payload of `RELAY_SEND` / `RELAY_RECV`.
pub const RELAY_HEADER: usize = 33;
/// Length of `PROBE`, `PONG` and `CALL_ME`.
pub const PEER_FRAME_LEN: usize = 1 + 32 + 8 + 16;
/// A node re-registers with the edge this often.
pub const REGISTER_INTERVAL_SECS: u64 = 10;
/// The edge forgets a UDP registration not refreshed for this long.
pub const REGISTRATION_TTL_SECS: u64 = 35;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Encodes `REGISTERED` for `addr` into `out`; returns the length.
pub fn encode_registered(addr: SocketAddr, out: &mut [u8]) -> usize {
    out[0] = FRAME_REGISTERED;
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(v4) => {
            out[1] = 4;
            out[4..8].copy_from_slice(&v4.octets());
            8
        }
        IpAddr::V6(v6) => {
            out[1] = 6;
            out[4..20].copy_from_slice(&v6.octets());
            20
        }
    }
}

pub fn decode_registered(frame: &[u8]) -> Option<SocketAddr> {
    if frame.first() != Some(&FRAME_REGISTERED) || frame.len() < 8 {
        return None;
    }
    let port = u16::from_be_bytes([frame[2], frame[3]]);
    match (frame[1], frame.len()) {
        (4, 8) => Some(SocketAddr::from((
            Ipv4Addr::new(frame[4], frame[5], frame[6], frame[7]),
            port,
        ))),
        (6, 20) => {
            let o: [u8; 16] = frame[4..20].try_into().ok()?;
            Some(SocketAddr::from((Ipv6Addr::from(o), port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_round_trips() {
        let mut out = [0u8; 32];
        for a in ["198.18.0.9:4000", "[fd00::9]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            let n = encode_registered(a, &mut out);
            assert_eq!(decode_registered(&out[..n]), Some(a));
            assert_eq!(decode_registered(&out[..n - 1]), None);
        }
        assert_eq!(decode_registered(&[FRAME_REGISTERED]), None);
    }
}
