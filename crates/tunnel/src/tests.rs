//! Deterministic tests of the core: two (or three) tunnels wired together in
//! memory, no sockets, time passed in.

use super::*;

const A_UL: &str = "198.18.0.1:51820";
const B_UL: &str = "198.18.0.2:51820";
const C_UL: &str = "198.18.0.3:51820";

fn key(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

fn pubkey(seed: u8) -> [u8; 32] {
    *PublicKey::from(&key(seed)).as_bytes()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn peer(seed: u8, name: &str, ip: &str, ul: &str) -> PeerConfig {
    PeerConfig {
        public_key: pubkey(seed),
        name: name.into(),
        allowed_ips: vec![net(&format!("{ip}/32"))],
        endpoints: vec![ul.parse().unwrap()],
    }
}

/// A minimal IPv4/UDP packet from `src` to `dst` with `payload`.
fn ip_packet(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u16::from_be_bytes([p[i], p[i + 1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&1000u16.to_be_bytes());
    p[22..24].copy_from_slice(&2000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// A datagram on the simulated wire.
struct Wire {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

struct Node {
    tunnel: Tunnel,
    addr: SocketAddr,
    delivered: Vec<Vec<u8>>,
    drops: Vec<DropReason>,
}

impl Node {
    fn new(seed: u8, addr: &str) -> Node {
        Node {
            tunnel: Tunnel::new(key(seed)),
            addr: addr.parse().unwrap(),
            delivered: vec![],
            drops: vec![],
        }
    }

    fn send_ip(&mut self, now: Instant, packet: &[u8], wire: &mut Vec<Wire>) {
        let mut out = vec![0u8; 2048];
        match self.tunnel.handle_tun_packet(now, packet, &mut out) {
            Action::Send { to, offset, len } => wire.push(Wire {
                from: self.addr,
                to,
                bytes: out[offset..offset + len].to_vec(),
            }),
            Action::Drop(r) => self.drops.push(r),
            Action::None => {}
            Action::Deliver { .. } => panic!("tun packet delivered to tun"),
        }
    }

    fn receive(&mut self, now: Instant, from: SocketAddr, bytes: &[u8], wire: &mut Vec<Wire>) {
        let mut out = vec![0u8; 2048];
        match self.tunnel.handle_datagram(now, from, bytes, &mut out) {
            Action::Send { to, offset, len } => {
                wire.push(Wire {
                    from: self.addr,
                    to,
                    bytes: out[offset..offset + len].to_vec(),
                });
                loop {
                    match self.tunnel.poll_flush(&mut out) {
                        Action::Send { to, offset, len } => wire.push(Wire {
                            from: self.addr,
                            to,
                            bytes: out[offset..offset + len].to_vec(),
                        }),
                        Action::None => break,
                        other => panic!("unexpected flush action {other:?}"),
                    }
                }
            }
            Action::Deliver { offset, len } => {
                self.delivered.push(out[offset..offset + len].to_vec())
            }
            Action::Drop(r) => self.drops.push(r),
            Action::None => {}
        }
    }
}

/// Delivers everything on the wire until it is quiet. Datagrams to unknown
/// addresses are lost.
fn run(now: Instant, nodes: &mut [&mut Node], wire: &mut Vec<Wire>) {
    let mut steps = 0;
    while let Some(w) = (!wire.is_empty()).then(|| wire.remove(0)) {
        steps += 1;
        assert!(steps < 1000, "packet storm");
        if let Some(n) = nodes.iter_mut().find(|n| n.addr == w.to) {
            n.receive(now, w.from, &w.bytes, wire);
        }
    }
}

fn pair() -> (Node, Node, Instant) {
    let now = Instant::now();
    let mut a = Node::new(1, A_UL);
    let mut b = Node::new(2, B_UL);
    a.tunnel.upsert_peer(now, peer(2, "b", "100.64.0.3", B_UL));
    b.tunnel.upsert_peer(now, peer(1, "a", "100.64.0.2", A_UL));
    (a, b, now)
}

#[test]
fn first_packet_triggers_handshake_then_arrives_intact() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    let pkt = ip_packet("100.64.0.2", "100.64.0.3", b"hello over the mesh");
    a.send_ip(now, &pkt, &mut wire);
    assert_eq!(wire.len(), 1, "a handshake initiation goes out");
    assert_eq!(wire[0].bytes.len(), 148);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(
        b.delivered,
        vec![pkt.clone()],
        "queued packet released after handshake"
    );

    // And the other way, on the established session, with no new handshake.
    let back = ip_packet("100.64.0.3", "100.64.0.2", b"and back");
    b.send_ip(now, &back, &mut wire);
    assert_eq!(wire.len(), 1);
    assert_eq!(wire[0].bytes.len(), back.len() + DATA_OVERHEAD);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(a.delivered, vec![back]);
    let st = a.tunnel.status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].name, "b");
    assert_eq!(st[0].path, Some(Path::Direct(B_UL.parse().unwrap())));
    assert!(st[0].stats.since_last_handshake.is_some());
    assert!(st[0].stats.rx_bytes > 0 && st[0].stats.tx_bytes > 0);
}

#[test]
fn packet_without_route_is_dropped() {
    let (mut a, _b, now) = pair();
    let mut wire = vec![];
    a.send_ip(
        now,
        &ip_packet("100.64.0.2", "100.64.0.99", b"x"),
        &mut wire,
    );
    assert!(wire.is_empty());
    assert_eq!(a.drops, vec![DropReason::NoRoute]);
    a.send_ip(now, &[0x60; 40], &mut wire);
    assert_eq!(a.drops[1], DropReason::NotIpv4);
}

#[test]
fn unknown_key_cannot_handshake() {
    let now = Instant::now();
    let mut a = Node::new(1, A_UL);
    let mut b = Node::new(2, B_UL);
    // a knows b, but b does not know a.
    a.tunnel.upsert_peer(now, peer(2, "b", "100.64.0.3", B_UL));
    let mut wire = vec![];
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"x"), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert!(b.delivered.is_empty());
    assert_eq!(b.drops, vec![DropReason::UnknownPeer]);
}

#[test]
fn removed_peer_is_refused_at_once() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"1"), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(b.delivered.len(), 1);

    assert!(b.tunnel.remove_peer(&pubkey(1)));
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"2"), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(
        b.delivered.len(),
        1,
        "nothing from a removed peer is delivered"
    );
    assert_eq!(b.drops, vec![DropReason::UnknownPeer]);
    // And b no longer routes to a.
    b.send_ip(now, &ip_packet("100.64.0.3", "100.64.0.2", b"3"), &mut wire);
    assert_eq!(b.drops[1], DropReason::NoRoute);
}

#[test]
fn spoofed_inner_source_is_dropped() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    // a claims to be 100.64.0.9, which b does not allow for a.
    a.send_ip(
        now,
        &ip_packet("100.64.0.9", "100.64.0.3", b"evil"),
        &mut wire,
    );
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert!(b.delivered.is_empty());
    assert_eq!(b.drops, vec![DropReason::SpoofedSource]);
}

#[test]
fn three_peers_route_by_allowed_ips() {
    let now = Instant::now();
    let mut a = Node::new(1, A_UL);
    let mut b = Node::new(2, B_UL);
    let mut c = Node::new(3, C_UL);
    a.tunnel.set_peers(
        now,
        vec![
            peer(2, "b", "100.64.0.3", B_UL),
            peer(3, "c", "100.64.0.4", C_UL),
        ],
    );
    b.tunnel
        .set_peers(now, vec![peer(1, "a", "100.64.0.2", A_UL)]);
    c.tunnel
        .set_peers(now, vec![peer(1, "a", "100.64.0.2", A_UL)]);
    let mut wire = vec![];
    let to_b = ip_packet("100.64.0.2", "100.64.0.3", b"to b");
    let to_c = ip_packet("100.64.0.2", "100.64.0.4", b"to c");
    a.send_ip(now, &to_b, &mut wire);
    a.send_ip(now, &to_c, &mut wire);
    run(now, &mut [&mut a, &mut b, &mut c], &mut wire);
    assert_eq!(b.delivered, vec![to_b]);
    assert_eq!(c.delivered, vec![to_c]);
    // set_peers removes what is no longer listed.
    a.tunnel
        .set_peers(now, vec![peer(3, "c", "100.64.0.4", C_UL)]);
    assert_eq!(a.tunnel.peer_count(), 1);
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"x"), &mut wire);
    assert_eq!(a.drops, vec![DropReason::NoRoute]);
}

#[test]
fn endpoint_follows_authenticated_packets() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"1"), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    // a moves to a new underlay address; its next packet comes from there.
    let new_addr: SocketAddr = "198.18.1.7:40000".parse().unwrap();
    a.addr = new_addr;
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"2"), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(b.delivered.len(), 2);
    let st = b.tunnel.status();
    assert_eq!(st[0].path, Some(Path::Direct(new_addr)));
    // A forged packet from elsewhere does not move it.
    let mut out = vec![0u8; 2048];
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[0u8; 60]);
    let r = b
        .tunnel
        .handle_datagram(now, "198.18.9.9:1".parse().unwrap(), &junk, &mut out);
    assert!(matches!(r, Action::Drop(_)));
    assert_eq!(b.tunnel.status()[0].path, Some(Path::Direct(new_addr)));
}

#[test]
fn silent_candidate_is_rotated_after_timeout() {
    let now = Instant::now();
    let mut a = Node::new(1, A_UL);
    let mut b = Node::new(2, B_UL);
    let dead: SocketAddr = "198.18.5.5:1".parse().unwrap();
    let mut cfg = peer(2, "b", "100.64.0.3", B_UL);
    cfg.endpoints = vec![dead, B_UL.parse().unwrap()];
    a.tunnel.upsert_peer(now, cfg);
    b.tunnel.upsert_peer(now, peer(1, "a", "100.64.0.2", A_UL));
    let mut wire = vec![];
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"x"), &mut wire);
    assert_eq!(wire[0].to, dead);
    run(now, &mut [&mut a, &mut b], &mut wire); // lost
    let mut out = vec![0u8; 2048];
    let later = now + CANDIDATE_TIMEOUT + Duration::from_millis(1);
    a.tunnel.poll_timers(later, &mut out, |_, _| {});
    assert_eq!(
        a.tunnel.status()[0].path,
        Some(Path::Direct(B_UL.parse().unwrap()))
    );
}

#[test]
fn malformed_datagrams_change_nothing() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"1"), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    let snapshot = |t: &Tunnel| -> Vec<_> {
        t.status()
            .into_iter()
            .map(|s| (s.path, s.stats.rx_bytes, s.stats.tx_bytes))
            .collect()
    };
    let before = snapshot(&b.tunnel);
    let mut out = vec![0u8; 2048];
    for junk in [
        &[][..],
        &[1u8][..],
        &[1, 0, 0, 0, 9, 9][..],
        &[7u8; 200][..],
    ] {
        let r = b
            .tunnel
            .handle_datagram(now, A_UL.parse().unwrap(), junk, &mut out);
        assert!(matches!(r, Action::Drop(_)), "{junk:?} → {r:?}");
    }
    assert_eq!(snapshot(&b.tunnel), before);
}
