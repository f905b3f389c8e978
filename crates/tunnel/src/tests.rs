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

/// A datagram on the simulated wire; `tcp` marks a frame on the TCP relay.
struct Wire {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
    tcp: bool,
}

/// The address of the simulated edge.
const EDGE: &str = "198.18.0.100:3478";

struct Node {
    tunnel: Tunnel,
    addr: SocketAddr,
    delivered: Vec<Vec<u8>>,
    drops: Vec<DropReason>,
}

fn push(wire: &mut Vec<Wire>, from: SocketAddr, action: Action, out: &[u8]) -> Option<DropReason> {
    match action {
        Action::Send { to, offset, len } => wire.push(Wire {
            from,
            to,
            bytes: out[offset..offset + len].to_vec(),
            tcp: false,
        }),
        Action::SendRelayTcp { offset, len } => wire.push(Wire {
            from,
            to: EDGE.parse().unwrap(),
            bytes: out[offset..offset + len].to_vec(),
            tcp: true,
        }),
        Action::Drop(r) => return Some(r),
        Action::None => {}
        Action::Deliver { .. } => panic!("unexpected delivery"),
    }
    None
}

impl Node {
    fn new(seed: u8, addr: &str) -> Node {
        Node {
            tunnel: Tunnel::new(key(seed), seed as u64),
            addr: addr.parse().unwrap(),
            delivered: vec![],
            drops: vec![],
        }
    }

    fn send_ip(&mut self, now: Instant, packet: &[u8], wire: &mut Vec<Wire>) {
        let mut out = vec![0u8; 2048];
        let a = self.tunnel.handle_tun_packet(now, packet, &mut out);
        if let Some(r) = push(wire, self.addr, a, &out) {
            self.drops.push(r);
        }
    }

    fn receive(&mut self, now: Instant, w: &Wire, wire: &mut Vec<Wire>) {
        let mut out = vec![0u8; 2048];
        let a = if w.tcp {
            self.tunnel.handle_relay_tcp_frame(now, &w.bytes, &mut out)
        } else {
            self.tunnel.handle_datagram(now, w.from, &w.bytes, &mut out)
        };
        match a {
            Action::Deliver { offset, len } => {
                self.delivered.push(out[offset..offset + len].to_vec())
            }
            Action::Drop(r) => self.drops.push(r),
            other => {
                push(wire, self.addr, other, &out);
                loop {
                    match self.tunnel.poll_flush(now, &mut out) {
                        Action::None => break,
                        a => {
                            push(wire, self.addr, a, &out);
                        }
                    }
                }
            }
        }
    }

    fn tick(&mut self, now: Instant, wire: &mut Vec<Wire>) {
        let mut out = vec![0u8; 2048];
        let from = self.addr;
        self.tunnel.poll_timers(now, &mut out, |via, bytes| {
            let (to, tcp) = match via {
                Via::Udp(a) => (a, false),
                Via::RelayTcp => (EDGE.parse().unwrap(), true),
            };
            wire.push(Wire {
                from,
                to,
                bytes: bytes.to_vec(),
                tcp,
            });
        });
    }
}

/// A tiny edge: answers registrations (the token is the node's address) and
/// relays `RELAY_SEND` to the destination key over UDP, or over "TCP" to nodes
/// listed in `tcp_keys`.
#[derive(Default)]
struct Edge {
    udp: Vec<([u8; 32], SocketAddr)>,
    tcp_keys: Vec<([u8; 32], SocketAddr)>,
    relayed: usize,
}

impl Edge {
    fn handle(&mut self, w: &Wire, keys: &[([u8; 32], SocketAddr)], wire: &mut Vec<Wire>) {
        let edge: SocketAddr = EDGE.parse().unwrap();
        let sender_key = |from: SocketAddr| keys.iter().find(|(_, a)| *a == from).map(|(k, _)| *k);
        match w.bytes[0] {
            trellis_proto::frames::FRAME_REGISTER if !w.tcp => {
                let k = sender_key(w.from).expect("known node");
                self.udp.retain(|(x, _)| *x != k);
                self.udp.push((k, w.from));
                let mut out = [0u8; 32];
                let n = trellis_proto::frames::encode_registered(w.from, &mut out);
                wire.push(Wire {
                    from: edge,
                    to: w.from,
                    bytes: out[..n].to_vec(),
                    tcp: false,
                });
            }
            FRAME_RELAY_SEND => {
                let src = sender_key(w.from).expect("known node");
                let dst: [u8; 32] = w.bytes[1..33].try_into().unwrap();
                let mut frame = vec![FRAME_RELAY_RECV];
                frame.extend_from_slice(&src);
                frame.extend_from_slice(&w.bytes[33..]);
                self.relayed += 1;
                if let Some((_, a)) = self.udp.iter().find(|(k, _)| *k == dst) {
                    wire.push(Wire {
                        from: edge,
                        to: *a,
                        bytes: frame,
                        tcp: false,
                    });
                } else if let Some((_, a)) = self.tcp_keys.iter().find(|(k, _)| *k == dst) {
                    wire.push(Wire {
                        from: edge,
                        to: *a,
                        bytes: frame,
                        tcp: true,
                    });
                }
            }
            _ => {}
        }
    }
}

/// Delivers everything on the wire until it is quiet. Datagrams to unknown
/// addresses, and direct datagrams between blocked pairs, are lost.
fn run_sim(
    now: Instant,
    nodes: &mut [&mut Node],
    edge: &mut Edge,
    blocked: &[(SocketAddr, SocketAddr)],
    wire: &mut Vec<Wire>,
) {
    let keys: Vec<([u8; 32], SocketAddr)> = nodes
        .iter()
        .map(|n| (n.tunnel.public_key(), n.addr))
        .collect();
    let edge_addr: SocketAddr = EDGE.parse().unwrap();
    let mut steps = 0;
    while !wire.is_empty() {
        let w = wire.remove(0);
        steps += 1;
        assert!(steps < 5000, "packet storm");
        if w.to == edge_addr {
            edge.handle(&w, &keys, wire);
            continue;
        }
        if !w.tcp
            && blocked
                .iter()
                .any(|&(x, y)| (x, y) == (w.from, w.to) || (y, x) == (w.from, w.to))
        {
            continue;
        }
        if let Some(n) = nodes.iter_mut().find(|n| n.addr == w.to) {
            n.receive(now, &w, wire);
        }
    }
}

fn run(now: Instant, nodes: &mut [&mut Node], wire: &mut Vec<Wire>) {
    run_sim(now, nodes, &mut Edge::default(), &[], wire);
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
    let st = a.tunnel.status(now);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].name, "b");
    assert_eq!(st[0].path, Some(Path::Direct(B_UL.parse().unwrap())));
    assert!(st[0].stats.since_last_handshake.is_some());
    assert!(st[0].stats.rx_bytes > 0 && st[0].stats.tx_bytes > 0);
}

#[test]
fn direct_endpoints_name_the_peers_in_use_until_they_fall_silent() {
    let (mut a, mut b, now) = pair();
    let mut eps = vec![SocketAddr::from(([198, 18, 9, 9], 1))];
    a.tunnel.direct_endpoints(now, 16, &mut eps);
    assert!(eps.is_empty(), "no peer has answered yet: {eps:?}");
    let mut wire = vec![];
    a.send_ip(
        now,
        &ip_packet("100.64.0.2", "100.64.0.3", b"hi"),
        &mut wire,
    );
    run(now, &mut [&mut a, &mut b], &mut wire);
    a.tunnel.direct_endpoints(now, 16, &mut eps);
    assert_eq!(eps, vec![B_UL.parse::<SocketAddr>().unwrap()]);
    a.tunnel.direct_endpoints(now, 0, &mut eps);
    assert!(eps.is_empty(), "at most `max`");
    // Silent for the activity window: no longer in use.
    let later = now + ACTIVE_WINDOW + Duration::from_secs(1);
    a.tunnel.direct_endpoints(later, 16, &mut eps);
    assert!(eps.is_empty(), "a silent peer is dropped: {eps:?}");
}

#[test]
fn a_restarted_node_handshakes_with_a_sender_of_old_sessions_at_once() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    let first = ip_packet("100.64.0.2", "100.64.0.3", b"before the restart");
    a.send_ip(now, &first, &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(b.delivered, vec![first]);

    // b's agent restarts: same key, no sessions. a still has its session.
    let t1 = now + Duration::from_millis(500);
    b = Node::new(2, B_UL);
    b.tunnel.upsert_peer(t1, peer(1, "a", "100.64.0.2", A_UL));
    let lost = ip_packet("100.64.0.2", "100.64.0.3", b"sent on the old session");
    a.send_ip(t1, &lost, &mut wire);
    assert_eq!(wire.len(), 1);
    assert_eq!(
        wire[0].bytes.len(),
        lost.len() + DATA_OVERHEAD,
        "data, not a handshake"
    );
    run(t1, &mut [&mut a, &mut b], &mut wire);
    assert!(b.delivered.is_empty());
    // b answered the unknown session with a handshake, so a's next packet
    // arrives at once, not after WireGuard's own timeouts (15 s or more).
    let next = ip_packet("100.64.0.2", "100.64.0.3", b"after the restart");
    a.send_ip(t1, &next, &mut wire);
    run(t1, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(b.delivered, vec![next]);

    // Garbage from a's address cannot make b handshake more than once a second.
    let t2 = t1 + Duration::from_millis(100);
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[0xEE; 28]);
    let mut out = vec![0u8; 2048];
    let act = b
        .tunnel
        .handle_datagram(t2, A_UL.parse().unwrap(), &junk, &mut out);
    assert!(matches!(act, Action::Drop(_)), "{act:?}");
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
    let st = b.tunnel.status(now);
    assert_eq!(st[0].path, Some(Path::Direct(new_addr)));
    // A forged packet from elsewhere does not move it.
    let mut out = vec![0u8; 2048];
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[0u8; 60]);
    let r = b
        .tunnel
        .handle_datagram(now, "198.18.9.9:1".parse().unwrap(), &junk, &mut out);
    assert!(matches!(r, Action::Drop(_)));
    assert_eq!(b.tunnel.status(now)[0].path, Some(Path::Direct(new_addr)));
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
        a.tunnel.status(now)[0].path,
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
        t.status(now)
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

/// Two nodes that know each other and the edge. `token` is irrelevant to the sim edge.
fn relayed_pair() -> (Node, Node, Instant) {
    let (mut a, mut b, now) = pair();
    let edge: SocketAddr = EDGE.parse().unwrap();
    a.tunnel.set_relay(Some((edge, "tok-a".into())));
    b.tunnel.set_relay(Some((edge, "tok-b".into())));
    (a, b, now)
}

fn tick_all(
    now: Instant,
    a: &mut Node,
    b: &mut Node,
    edge: &mut Edge,
    blocked: &[(SocketAddr, SocketAddr)],
) {
    let mut wire = vec![];
    a.tick(now, &mut wire);
    b.tick(now, &mut wire);
    run_sim(now, &mut [a, b], edge, blocked, &mut wire);
}

fn path_of(n: &Node, now: Instant) -> &'static str {
    n.tunnel.status(now)[0]
        .path
        .map(|p| p.kind())
        .unwrap_or("none")
}

#[test]
fn blocked_direct_path_uses_the_udp_relay() {
    let (mut a, mut b, mut now) = relayed_pair();
    let mut edge = Edge::default();
    let blocked = [(a.addr, b.addr)];
    tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    assert_eq!(a.tunnel.relay_status(now), RelayStatus::Udp);
    assert_eq!(
        a.tunnel.reflexive(),
        Some(a.addr),
        "the edge's answer is our reflexive address"
    );
    let pkt = ip_packet("100.64.0.2", "100.64.0.3", b"via the edge");
    let mut wire = vec![];
    a.send_ip(now, &pkt, &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(b.delivered, vec![pkt]);
    assert!(
        edge.relayed >= 3,
        "handshake and data went through the edge"
    );
    assert_eq!(path_of(&a, now), "relay-udp");
    // Probing goes on, bounded and backing off: it never confirms a direct path.
    for _ in 0..100 {
        now += Duration::from_millis(100);
        tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    }
    assert_eq!(path_of(&a, now), "relay-udp");
    assert_eq!(path_of(&b, now), "relay-udp");
}

#[test]
fn relay_upgrades_to_direct_and_falls_back_when_direct_dies() {
    let (mut a, mut b, mut now) = relayed_pair();
    let mut edge = Edge::default();
    let blocked = [(a.addr, b.addr)];
    tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    let mut wire = vec![];
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"1"), &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(path_of(&a, now), "relay-udp");

    // The way opens: within a few probe rounds both sides go direct.
    let mut upgraded_after = None;
    for i in 0..50 {
        now += Duration::from_millis(100);
        tick_all(now, &mut a, &mut b, &mut edge, &[]);
        b.send_ip(now, &ip_packet("100.64.0.3", "100.64.0.2", b"x"), &mut wire);
        run_sim(now, &mut [&mut a, &mut b], &mut edge, &[], &mut wire);
        if path_of(&a, now) == "direct" && path_of(&b, now) == "direct" {
            upgraded_after = Some(i);
            break;
        }
    }
    assert!(upgraded_after.is_some(), "no upgrade to direct");
    let relayed_before = edge.relayed;
    let pkt = ip_packet("100.64.0.2", "100.64.0.3", b"direct now");
    a.send_ip(now, &pkt, &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &[], &mut wire);
    assert_eq!(b.delivered.last(), Some(&pkt));
    assert_eq!(
        edge.relayed, relayed_before,
        "direct traffic bypasses the edge"
    );

    // The direct path dies: within DIRECT_TIMEOUT (+ a tick) traffic is back on the relay.
    let died = now;
    while path_of(&a, now) == "direct" {
        now += Duration::from_millis(100);
        tick_all(now, &mut a, &mut b, &mut edge, &blocked);
        a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"y"), &mut wire);
        run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
        assert!(
            now - died <= DIRECT_TIMEOUT + Duration::from_millis(200),
            "fallback too slow"
        );
    }
    assert_eq!(path_of(&a, now), "relay-udp");
    let pkt = ip_packet("100.64.0.2", "100.64.0.3", b"relayed again");
    a.send_ip(now, &pkt, &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(b.delivered.last(), Some(&pkt));
}

#[test]
fn udp_blocked_node_uses_the_tcp_relay() {
    let (mut a, mut b, now) = relayed_pair();
    let mut edge = Edge::default();
    // a's UDP goes nowhere (not even to the edge); its TCP relay is up.
    let edge_addr: SocketAddr = EDGE.parse().unwrap();
    let blocked = [(a.addr, b.addr), (a.addr, edge_addr)];
    a.tunnel.set_tcp_relay(true);
    edge.tcp_keys.push((a.tunnel.public_key(), a.addr));
    // Drop a's UDP registrations by ticking a alone into the void.
    let mut void = vec![];
    a.tick(now, &mut void);
    let mut wire = vec![];
    b.tick(now, &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(a.tunnel.relay_status(now), RelayStatus::Tcp);
    let pkt = ip_packet("100.64.0.2", "100.64.0.3", b"over tcp");
    a.send_ip(now, &pkt, &mut wire);
    assert!(wire[0].tcp, "a sends over the TCP relay");
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(b.delivered, vec![pkt]);
    assert_eq!(path_of(&a, now), "relay-tcp");
    assert_eq!(path_of(&b, now), "relay-udp");
    let back = ip_packet("100.64.0.3", "100.64.0.2", b"and back");
    b.send_ip(now, &back, &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(a.delivered, vec![back]);
}

#[test]
fn ping_reports_rtt_and_path() {
    let (mut a, mut b, now) = relayed_pair();
    let mut edge = Edge::default();
    let blocked = [(a.addr, b.addr)];
    tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    let mut out = vec![0u8; 2048];
    let (txid, act) = a.tunnel.ping(now, &pubkey(2), &mut out).unwrap();
    let mut wire = vec![];
    push(&mut wire, a.addr, act, &out);
    let later = now + Duration::from_millis(3);
    run_sim(later, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    let r = a.tunnel.ping_result(txid).expect("answered");
    assert_eq!(r.path.kind(), "relay-udp");
    assert_eq!(r.rtt, Duration::from_millis(3));
    assert_eq!(
        a.tunnel.ping_result(txid),
        None,
        "a result is handed out once"
    );
    assert_eq!(
        a.tunnel.ping(now, &[9u8; 32], &mut out).unwrap_err(),
        PingError::UnknownPeer
    );
}

#[test]
fn a_ping_looks_for_the_direct_path_like_traffic_does() {
    let (mut a, mut b, mut now) = relayed_pair();
    let mut edge = Edge::default();
    // Idle peers: nothing looks for a direct path, the relay is the way.
    for _ in 0..5 {
        tick_all(now, &mut a, &mut b, &mut edge, &[]);
        now += Duration::from_millis(100);
    }
    assert_eq!(path_of(&a, now), "relay-udp");

    // A ping (a connection test) counts as activity: probing starts and a
    // later ping finds the direct path, without any traffic.
    let mut out = vec![0u8; 2048];
    let mut wire = vec![];
    let (first, act) = a.tunnel.ping(now, &pubkey(2), &mut out).unwrap();
    push(&mut wire, a.addr, act, &out);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &[], &mut wire);
    assert_eq!(
        a.tunnel.ping_result(first).unwrap().path.kind(),
        "relay-udp"
    );
    let mut direct_after = None;
    for i in 0..20 {
        now += Duration::from_millis(100);
        tick_all(now, &mut a, &mut b, &mut edge, &[]);
        let (txid, act) = a.tunnel.ping(now, &pubkey(2), &mut out).unwrap();
        push(&mut wire, a.addr, act, &out);
        run_sim(now, &mut [&mut a, &mut b], &mut edge, &[], &mut wire);
        if a.tunnel.ping_result(txid).map(|r| r.path.kind()) == Some("direct") {
            direct_after = Some(i);
            break;
        }
    }
    assert!(direct_after.is_some(), "pings never went direct");
}

#[test]
fn forged_probes_and_relay_claims_are_refused() {
    let (mut a, mut b, now) = relayed_pair();
    let mut out = vec![0u8; 2048];
    // A probe claiming to be from a, made with a key that is not a's.
    let mallory = StaticSecret::from([7u8; 32]);
    let k = disco::PairKey::derive(&mallory, &pubkey(2));
    let mut f = [0u8; PEER_FRAME_LEN];
    disco::encode(disco::Kind::Probe, &pubkey(1), 5, &k, &mut f);
    let r = b
        .tunnel
        .handle_datagram(now, "198.18.9.9:9".parse().unwrap(), &f, &mut out);
    assert_eq!(r, Action::Drop(DropReason::BadProbe));
    // A relayed WireGuard packet whose claimed sender is not the session's peer.
    let mut wire = vec![];
    let mut edge = Edge::default();
    tick_all(now, &mut a, &mut b, &mut edge, &[]);
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"1"), &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &[], &mut wire);
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"2"), &mut wire);
    let sent = wire.remove(0).bytes;
    let data = if sent[0] == FRAME_RELAY_SEND {
        &sent[RELAY_HEADER..]
    } else {
        &sent[..]
    };
    assert_eq!(data[0], 4, "a WireGuard data packet");
    let mut frame = vec![FRAME_RELAY_RECV];
    frame.extend_from_slice(&[7u8; 32]);
    frame.extend_from_slice(data);
    let r = b.tunnel.handle_relay_tcp_frame(now, &frame, &mut out);
    assert_eq!(r, Action::Drop(DropReason::UnknownPeer));
    // Frames from anyone but the edge are not relay frames.
    let mut fake_ack = [0u8; 32];
    let n =
        trellis_proto::frames::encode_registered("198.18.7.7:7".parse().unwrap(), &mut fake_ack);
    let r = b.tunnel.handle_datagram(
        now,
        "198.18.7.7:7".parse().unwrap(),
        &fake_ack[..n],
        &mut out,
    );
    assert_eq!(r, Action::Drop(DropReason::Malformed));
    assert_eq!(b.tunnel.reflexive(), Some(b.addr));
}

#[test]
fn handshake_lost_on_a_dead_path_is_resent_when_the_relay_comes_up() {
    let (mut a, mut b, mut now) = relayed_pair();
    let mut edge = Edge::default();
    let blocked = [(a.addr, b.addr)];
    // a sends before the edge answered its registration: the initiation goes
    // to b's (blocked) direct candidate and is lost.
    let pkt = ip_packet("100.64.0.2", "100.64.0.3", b"first");
    let mut wire = vec![];
    a.send_ip(now, &pkt, &mut wire);
    assert_eq!(wire.len(), 1);
    assert!(
        !wire[0].tcp && wire[0].to == b.addr,
        "initiation went direct"
    );
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert!(b.delivered.is_empty());
    // The relay comes up; within a few ticks (not WireGuard's 5 s retry) the
    // handshake completes over it and the queued packet arrives.
    for _ in 0..5 {
        now += Duration::from_millis(100);
        tick_all(now, &mut a, &mut b, &mut edge, &blocked);
        if !b.delivered.is_empty() {
            break;
        }
    }
    assert_eq!(b.delivered, vec![pkt]);
}

#[test]
fn roaming_falls_back_to_the_relay_at_once_and_the_peer_follows() {
    let (mut a, mut b, mut now) = relayed_pair();
    let mut edge = Edge::default();
    tick_all(now, &mut a, &mut b, &mut edge, &[]);
    let mut wire = vec![];
    // Go direct.
    for _ in 0..30 {
        a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"x"), &mut wire);
        b.send_ip(now, &ip_packet("100.64.0.3", "100.64.0.2", b"y"), &mut wire);
        run_sim(now, &mut [&mut a, &mut b], &mut edge, &[], &mut wire);
        now += Duration::from_millis(100);
        tick_all(now, &mut a, &mut b, &mut edge, &[]);
    }
    assert_eq!(path_of(&a, now), "direct");
    assert_eq!(path_of(&b, now), "direct");
    // a roams: its old address is dead for b.
    let old = a.addr;
    a.addr = "198.18.1.50:51820".parse().unwrap();
    a.tunnel.reregister_now(now);
    assert_eq!(path_of(&a, now), "relay-udp", "a uses the relay at once");
    let blocked = [(old, b.addr)];
    now += Duration::from_millis(1100);
    // a's traffic now comes through the relay: b follows within one packet.
    tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    a.send_ip(now, &ip_packet("100.64.0.2", "100.64.0.3", b"z"), &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    let pkt = ip_packet("100.64.0.3", "100.64.0.2", b"to the new place");
    b.send_ip(now, &pkt, &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert_eq!(
        a.delivered.last(),
        Some(&pkt),
        "b reached a at its new address"
    );
}

// ---- Packet filter and flow records through the whole core ----

use crate::testpkt::{tcp, udp, ACK, FIN, PSH, RST, SYN};
use trellis_policy::{Filter, FilterRule, FilterSpec, PortRange, PROTO_TCP};

const A_IP: &str = "100.64.0.2";
const B_IP: &str = "100.64.0.3";

fn filter(default_allow: bool, rules: Vec<FilterRule>) -> Arc<Filter> {
    Arc::new(Filter::compile(&FilterSpec {
        default_allow,
        rules,
    }))
}

/// `name`: a → b on TCP `port`, allowed or denied.
fn a_to_b_tcp(name: &str, allow: bool, port: u16) -> FilterRule {
    FilterRule {
        name: name.into(),
        allow,
        src: vec![net("100.64.0.2/32")],
        dst: vec![net("100.64.0.3/32")],
        ports: vec![PortRange {
            proto: Some(PROTO_TCP),
            lo: port,
            hi: port,
        }],
    }
}

fn flows(n: &mut Node) -> Vec<FlowEnd> {
    let mut v = vec![];
    n.tunnel.drain_flows(&mut v);
    v
}

#[test]
fn denied_syn_fails_fast_at_the_sender() {
    let (mut a, mut b, now) = pair();
    a.tunnel
        .set_filter(now, filter(true, vec![a_to_b_tcp("no-ssh", false, 22)]));
    let mut wire = vec![];
    a.send_ip(now, &tcp(A_IP, 40000, B_IP, 22, SYN, 0), &mut wire);
    assert_eq!(a.drops, vec![DropReason::Denied]);
    assert!(wire.is_empty(), "not even a handshake goes out");
    let recs = flows(&mut a);
    assert_eq!(recs.len(), 1);
    assert!(!recs[0].allow);
    assert_eq!(recs[0].rule.as_deref(), Some("no-ssh"));
    assert_eq!(recs[0].direction, FlowDirection::Out);
    assert_eq!(recs[0].peer, pubkey(2));
    assert_eq!(a.tunnel.flow_stats().dropped_by_policy, 1);
    // Other traffic still flows.
    let web = tcp(A_IP, 40001, B_IP, 80, SYN, 0);
    a.send_ip(now, &web, &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert_eq!(b.delivered, vec![web]);
}

#[test]
fn denied_syn_is_dropped_at_the_receiver_when_the_sender_allows_it() {
    let (mut a, mut b, now) = pair();
    b.tunnel
        .set_filter(now, filter(true, vec![a_to_b_tcp("no-ssh", false, 22)]));
    let mut wire = vec![];
    a.send_ip(now, &tcp(A_IP, 40000, B_IP, 22, SYN, 0), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    assert!(b.delivered.is_empty());
    assert_eq!(b.drops, vec![DropReason::Denied]);
    let recs = flows(&mut b);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].direction, FlowDirection::In);
    assert_eq!(recs[0].end_reason, "denied");
    assert_eq!(recs[0].path, Path::Direct(A_UL.parse().unwrap()));
    assert_eq!(recs[0].peer, pubkey(1));
    assert_eq!(a.tunnel.flow_stats().entries, 1, "a let it out");
}

#[test]
fn allowed_flow_and_its_reply_pass_until_a_policy_change_revokes_it() {
    let (mut a, mut b, now) = pair();
    // b: only a → b:22. The reverse direction alone would be denied.
    b.tunnel
        .set_filter(now, filter(false, vec![a_to_b_tcp("ssh", true, 22)]));
    let mut wire = vec![];
    let exchange = |a: &mut Node, b: &mut Node, t: Instant, from_a: &[u8], from_b: &[u8]| {
        let mut wire = vec![];
        a.send_ip(t, from_a, &mut wire);
        run(t, &mut [&mut *a, &mut *b], &mut wire);
        b.send_ip(t, from_b, &mut wire);
        run(t, &mut [&mut *a, &mut *b], &mut wire);
    };
    let syn = tcp(A_IP, 40000, B_IP, 22, SYN, 0);
    let synack = tcp(B_IP, 22, A_IP, 40000, SYN | ACK, 0);
    exchange(&mut a, &mut b, now, &syn, &synack);
    let data_a = tcp(A_IP, 40000, B_IP, 22, PSH | ACK, 50);
    let data_b = tcp(B_IP, 22, A_IP, 40000, PSH | ACK, 70);
    exchange(&mut a, &mut b, now, &data_a, &data_b);
    assert_eq!(b.delivered, vec![syn, data_a.clone()]);
    assert_eq!(a.delivered, vec![synack, data_b.clone()]);
    assert!(b.drops.is_empty() && a.drops.is_empty());
    // b opening its own connection to a is denied.
    b.send_ip(now, &tcp(B_IP, 22, A_IP, 40001, SYN, 0), &mut wire);
    assert_eq!(b.drops, vec![DropReason::Denied]);
    let _ = flows(&mut b);

    // The policy changes: the open connection is cut at once.
    let t1 = now + Duration::from_millis(200);
    b.tunnel.set_filter(t1, filter(false, vec![]));
    let recs = flows(&mut b);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].end_reason, "revoked");
    assert_eq!(recs[0].end, t1);
    assert_eq!((recs[0].packets_out, recs[0].packets_in), (2, 2));
    assert_eq!(recs[0].rule.as_deref(), Some("ssh"));
    exchange(&mut a, &mut b, t1, &data_a, &data_b);
    assert_eq!(b.delivered.len(), 2, "a's next packet is dropped at b");
    assert_eq!(a.delivered.len(), 2, "b's next packet never leaves b");
    assert_eq!(
        &b.drops[1..],
        &[DropReason::NoConnection, DropReason::NoConnection]
    );
}

#[test]
fn tcp_close_and_reset_over_the_relay_give_one_record_each_on_both_nodes() {
    let (mut a, mut b, mut now) = relayed_pair();
    let mut edge = Edge::default();
    let blocked = [(a.addr, b.addr)];
    tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    let mut wire = vec![];
    let (ap, bp) = (40000, 8080);
    let script: [(bool, u8, usize); 8] = [
        (true, SYN, 0),
        (false, SYN | ACK, 0),
        (true, ACK, 0),
        (true, PSH | ACK, 500),
        (false, PSH | ACK, 1200),
        (true, FIN | ACK, 0),
        (false, FIN | ACK, 0),
        (true, ACK, 0),
    ];
    for (from_a, flags, data) in script {
        if from_a {
            a.send_ip(now, &tcp(A_IP, ap, B_IP, bp, flags, data), &mut wire);
        } else {
            b.send_ip(now, &tcp(B_IP, bp, A_IP, ap, flags, data), &mut wire);
        }
        run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    }
    assert_eq!(b.delivered.len(), 5);
    assert_eq!(a.delivered.len(), 3);
    // A second connection, reset by b.
    a.send_ip(now, &tcp(A_IP, ap + 1, B_IP, bp, SYN, 0), &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    b.send_ip(now, &tcp(B_IP, bp, A_IP, ap + 1, RST | ACK, 0), &mut wire);
    run_sim(now, &mut [&mut a, &mut b], &mut edge, &blocked, &mut wire);
    assert!(a.drops.is_empty() && b.drops.is_empty());

    now += Duration::from_millis(1100);
    tick_all(now, &mut a, &mut b, &mut edge, &blocked);
    for (node, dir) in [(&mut a, FlowDirection::Out), (&mut b, FlowDirection::In)] {
        let mut recs = flows(node);
        recs.sort_by_key(|r| r.src_port);
        assert_eq!(recs.len(), 2, "{recs:?}");
        let (closed, reset) = (&recs[0], &recs[1]);
        assert_eq!(closed.end_reason, "closed");
        assert_eq!(closed.direction, dir);
        assert_eq!(closed.path.kind(), "relay-udp");
        assert_eq!((closed.src_port, closed.dst_port), (ap, bp));
        assert_eq!((closed.packets_out, closed.bytes_out), (5, 40 * 4 + 540));
        assert_eq!((closed.packets_in, closed.bytes_in), (3, 40 * 2 + 1240));
        assert_eq!(reset.end_reason, "reset");
        assert_eq!((reset.packets_out, reset.packets_in), (1, 1));
        assert_eq!(reset.path.kind(), "relay-udp");
    }
    assert_eq!(a.tunnel.flow_stats().entries, 0);
    assert_eq!(b.tunnel.flow_stats().entries, 0);
}

#[test]
fn udp_flow_idles_out_from_the_timers_and_shutdown_ends_the_rest() {
    let (mut a, mut b, now) = pair();
    let mut wire = vec![];
    a.send_ip(now, &udp(A_IP, 5353, B_IP, 53, 10), &mut wire);
    run(now, &mut [&mut a, &mut b], &mut wire);
    let t1 = now + Duration::from_secs(20);
    a.send_ip(t1, &tcp(A_IP, 1, B_IP, 22, SYN, 0), &mut wire);
    run(t1, &mut [&mut a, &mut b], &mut wire);
    let t2 = now + UDP_IDLE;
    a.tick(t2, &mut wire);
    wire.clear();
    let recs = flows(&mut a);
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].end_reason, recs[0].proto), ("idle", 17));
    a.tunnel.close_all_flows(t2);
    let recs = flows(&mut a);
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].end_reason, recs[0].end), ("shutdown", t2));
}
