//! Hand-built IPv4 packets for tests.

use std::net::Ipv4Addr;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// An IPv4 packet (20-byte header, valid checksum) around `payload`.
pub fn ipv4(src: &str, dst: &str, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&ip(src).octets());
    p[16..20].copy_from_slice(&ip(dst).octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u16::from_be_bytes([p[i], p[i + 1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

/// A TCP segment with `flags` and `data` bytes of payload (40 + data bytes).
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8, data: usize) -> Vec<u8> {
    let mut t = vec![0u8; 20 + data];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

/// A UDP datagram with `data` bytes of payload (28 + data bytes).
pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, data: usize) -> Vec<u8> {
    let mut t = vec![0u8; 8 + data];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..6].copy_from_slice(&((8 + data) as u16).to_be_bytes());
    ipv4(src, dst, 17, &t)
}

/// An ICMP echo request (`ty` 8) or reply (`ty` 0) with identifier `id`.
pub fn icmp_echo(src: &str, dst: &str, ty: u8, id: u16) -> Vec<u8> {
    let mut t = vec![0u8; 16];
    t[0] = ty;
    t[4..6].copy_from_slice(&id.to_be_bytes());
    t[6..8].copy_from_slice(&1u16.to_be_bytes());
    ipv4(src, dst, 1, &t)
}

/// An ICMP error of type `ty` quoting (the start of) `original`.
pub fn icmp_error(src: &str, dst: &str, ty: u8, original: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 8];
    t[0] = ty;
    t.extend_from_slice(&original[..original.len().min(28)]);
    ipv4(src, dst, 1, &t)
}

/// A non-first fragment (offset 185 × 8 bytes) of protocol `proto`.
pub fn fragment(src: &str, dst: &str, proto: u8, data: usize) -> Vec<u8> {
    let mut p = ipv4(src, dst, proto, &vec![0xab; data]);
    p[6..8].copy_from_slice(&185u16.to_be_bytes());
    p
}
