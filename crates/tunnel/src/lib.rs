//! The sans-IO tunnel core: peers, WireGuard sessions, allowed-IP routing,
//! path choice (direct or relayed through the edge), hole punching and
//! roaming, driven by packets, datagrams and a `now` passed in.
//!
//! The IO shell (`trellis-io`) reads the TUN device and the UDP socket, hands
//! each packet to [`Tunnel::handle_tun_packet`] or [`Tunnel::handle_datagram`]
//! (frames that came over the TCP relay to [`Tunnel::handle_relay_tcp_frame`]),
//! and carries out the returned [`Action`]. Nothing here opens a socket,
//! spawns a task or reads the clock; the callers own the buffers, so nothing
//! allocates per packet.
//!
//! Paths. A peer is reached over the first of these that works:
//! 1. `direct`: a UDP endpoint of the peer that answered within
//!    [`DIRECT_TIMEOUT`] (an authenticated WireGuard packet or a `PONG`);
//! 2. `relay-udp`: through the edge over UDP, when the edge acknowledged our
//!    registration recently;
//! 3. `relay-tcp`: through the edge over the shell's WebSocket, when it is up;
//! 4. without any relay, the peer's candidates one after the other (the
//!    foundation's behaviour on a flat network).
//!
//! While a pair talks over the relay, both sides probe each other's candidates
//! (backing off from [`PROBE_MIN`] to [`PROBE_MAX`]) and ask the other side to
//! probe at the same moment (`CALL_ME` over the relay), which opens
//! endpoint-independent NATs; the first `PONG` moves the pair to the direct
//! path. A direct path in use is heart-beaten every [`HEARTBEAT_INTERVAL`];
//! when it stays silent for [`DIRECT_TIMEOUT`], traffic goes back to the relay.

pub mod conntrack;
pub mod disco;
mod fasthash;
pub mod routes;
pub mod session;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
pub use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::Ipv4Net;
use trellis_proto::frames::{
    self, FRAME_REFUSED, FRAME_REGISTER, FRAME_REGISTERED, FRAME_RELAY_RECV, FRAME_RELAY_SEND,
    PEER_FRAME_LEN, RELAY_HEADER,
};

use conntrack::{ConnTrack, Side};
pub use conntrack::{
    FlowDirection, FlowEnd, FlowStats, CLOSE_GRACE, DEFAULT_MAX_FLOWS, ICMP_IDLE, TCP_IDLE,
    UDP_IDLE,
};
use disco::{Kind, PairKey};
use fasthash::FoldBuild;
use routes::RouteTable;
use session::{Session, SessionError, SessionOutput, SessionStats};

/// Bytes WireGuard adds to every data packet (header, counter, tag).
pub const DATA_OVERHEAD: usize = 32;
/// The smallest output buffer the core accepts: a handshake initiation with a relay header.
pub const MIN_BUFFER: usize = 256;
/// Handshakes per second per peer before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Without a relay, a candidate that brought no authenticated packet for this
/// long is given up for the next one.
pub const CANDIDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive sent on idle sessions so that NAT and firewall state stays open.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
/// A direct path with nothing heard on it for this long is abandoned for the relay.
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(4000);
/// Probe a direct path in use this often, so that its death is noticed.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1200);
/// First and longest interval between probe rounds towards a peer's candidates.
pub const PROBE_MIN: Duration = Duration::from_millis(400);
pub const PROBE_MAX: Duration = Duration::from_secs(8);
/// A peer that sent or received data this recently is worth probing and heart-beating.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(30);
/// The UDP relay counts as working while the edge acknowledged a registration this recently.
pub const RELAY_UDP_HEALTHY: Duration = Duration::from_secs(25);
/// Data arriving over the relay while our direct path heard nothing for this
/// long means the peer gave the direct path up.
const FOLLOW_TO_RELAY: Duration = Duration::from_millis(1000);
/// A first handshake is sent again this soon after the path changed...
const HANDSHAKE_REPATH: Duration = Duration::from_millis(50);
/// ...or after this long without an answer, at most this many times.
const HANDSHAKE_QUICK_RETRY: Duration = Duration::from_secs(1);
/// At most one handshake per peer this often for data of an unknown session.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);
const HANDSHAKE_QUICK_RETRIES: u32 = 4;
/// Candidates probed per round, at most.
const MAX_CANDIDATES: usize = 8;
/// Peer-reflexive candidates (addresses probes came from) kept per peer.
const MAX_LEARNED: usize = 4;
const MAX_OUTSTANDING: usize = 32;
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Local identifier of a peer; also the WireGuard receiver index (upper 24 bits).
pub type PeerId = u32;

/// What the control plane says about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub name: String,
    /// Overlay addresses this peer may send from and is routed to.
    pub allowed_ips: Vec<Ipv4Net>,
    /// Underlay candidates, best first.
    pub endpoints: Vec<SocketAddr>,
}

/// The way packets reach a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer's underlay address over UDP.
    Direct(SocketAddr),
    /// Through the edge's UDP relay at this address.
    RelayUdp(SocketAddr),
    /// Through the edge over the shell's TCP (WebSocket) connection.
    RelayTcp,
}

impl Path {
    pub fn kind(&self) -> &'static str {
        match self {
            Path::Direct(_) => "direct",
            Path::RelayUdp(_) => "relay-udp",
            Path::RelayTcp => "relay-tcp",
        }
    }

    /// The underlay address datagrams go to (the peer's, or the edge's).
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            Path::Direct(a) | Path::RelayUdp(a) => Some(*a),
            Path::RelayTcp => None,
        }
    }
}

/// Where a datagram produced by the timers goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Udp(SocketAddr),
    /// Over the TCP relay: the bytes are a whole `RELAY_SEND` frame.
    RelayTcp,
}

/// What the shell must do after a call into the core. Bytes named by
/// `offset`/`len` are in the output buffer the caller passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do.
    None,
    /// Send `out[offset..offset + len]` as one UDP datagram to `to`.
    Send {
        to: SocketAddr,
        offset: usize,
        len: usize,
    },
    /// Send `out[offset..offset + len]`, a `RELAY_SEND` frame, over the TCP relay.
    SendRelayTcp { offset: usize, len: usize },
    /// Write `out[offset..offset + len]`, a decrypted IP packet, to the tunnel interface.
    Deliver { offset: usize, len: usize },
    /// The input was dropped, for this reason.
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("not an IPv4 packet")]
    NotIpv4,
    #[error("no peer owns the destination address")]
    NoRoute,
    #[error("no path to the peer (no endpoint and no relay)")]
    NoPath,
    #[error("datagram from an unknown peer or session")]
    UnknownPeer,
    #[error("source address not allowed for this peer")]
    SpoofedSource,
    #[error("malformed datagram")]
    Malformed,
    #[error("probe failed authentication")]
    BadProbe,
    #[error("rejected by the session: {0}")]
    Rejected(SessionError),
    #[error("denied by policy")]
    Denied,
    #[error("not part of a tracked connection (and cannot open one)")]
    NoConnection,
    #[error("connection table full")]
    TableFull,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PingError {
    #[error("no such peer")]
    UnknownPeer,
    #[error("no path to the peer yet (no endpoint, no relay)")]
    NoPath,
}

/// The answer to one [`Tunnel::ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingResult {
    pub rtt: Duration,
    /// The path the reply came back on.
    pub path: Path,
}

/// A peer as `trellis status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub public_key: [u8; 32],
    pub name: String,
    pub allowed_ips: Vec<Ipv4Net>,
    pub path: Option<Path>,
    pub stats: SessionStats,
}

/// The edge relay as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayStatus {
    /// No relay configured.
    None,
    /// Registered over UDP (the edge answered recently).
    Udp,
    /// UDP registration not answered; the TCP relay is up.
    Tcp,
    /// Neither works (yet).
    Down,
    /// The edge refused our credential.
    Refused(String),
}

/// Where an input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Udp(SocketAddr),
    /// Relayed by the edge, claimed to be from this key.
    Relay([u8; 32]),
}

struct Peer {
    config: PeerConfig,
    session: Session,
    pair: PairKey,
    /// The peer's endpoint that last proved itself (WireGuard or `PONG`).
    direct: Option<SocketAddr>,
    direct_rx: Option<Instant>,
    direct_was_alive: bool,
    /// Without a relay: which candidate we are trying, since when.
    fallback: usize,
    fallback_since: Instant,
    /// Addresses this peer's probes came from (peer-reflexive candidates).
    learned: Vec<SocketAddr>,
    probe_next: Instant,
    probe_interval: Duration,
    heartbeat_next: Instant,
    outstanding: Vec<(u64, Instant)>,
    last_activity: Option<Instant>,
    /// The path the last handshake initiation went out on, and when: if the
    /// path changes before the session is up, the initiation is sent again at
    /// once instead of after WireGuard's 5 s retry.
    handshake_via: Option<(Path, Instant, u32)>,
    /// When this peer last sent data for a session this node does not have
    /// and got a fresh handshake for it (this node restarted).
    resynced: Option<Instant>,
}

impl Peer {
    fn direct_alive(&self, now: Instant) -> bool {
        self.direct.is_some()
            && self
                .direct_rx
                .is_some_and(|t| now.saturating_duration_since(t) < DIRECT_TIMEOUT)
    }

    fn path(&self, now: Instant, relay: Option<Path>) -> Option<Path> {
        if self.direct_alive(now) {
            return self.direct.map(Path::Direct);
        }
        if relay.is_some() {
            return relay;
        }
        self.direct
            .or_else(|| self.config.endpoints.get(self.fallback).copied())
            .map(Path::Direct)
    }

    fn active(&self, now: Instant) -> bool {
        self.last_activity
            .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW)
    }

    fn candidates(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let mut seen: Vec<SocketAddr> = Vec::with_capacity(MAX_CANDIDATES);
        self.config
            .endpoints
            .iter()
            .chain(self.learned.iter())
            .copied()
            .filter(move |a| {
                if seen.contains(a) || seen.len() >= MAX_CANDIDATES {
                    false
                } else {
                    seen.push(*a);
                    true
                }
            })
    }

    fn reset_probing(&mut self, now: Instant) {
        self.probe_interval = PROBE_MIN;
        self.probe_next = now;
    }

    fn confirm_direct(&mut self, now: Instant, at: SocketAddr) {
        if self.direct != Some(at) {
            tracing::debug!(peer = %self.config.name, "direct path confirmed");
        }
        self.direct = Some(at);
        self.direct_rx = Some(now);
    }
}

/// WireGuard message type of a handshake initiation (first byte, little endian u32).
const HANDSHAKE_INIT: u8 = 1;
/// WireGuard message type of transport data.
const DATA_MESSAGE: u8 = 4;

/// Remembers that `bytes` (about to go out over `path`) is a handshake initiation.
fn note_handshake(peer: &mut Peer, path: Path, bytes: &[u8], now: Instant) {
    if bytes.first() == Some(&HANDSHAKE_INIT) && bytes.len() == 148 {
        let attempts = peer.handshake_via.map_or(0, |h| h.2);
        peer.handshake_via = Some((path, now, attempts));
    }
}

struct Relay {
    edge: SocketAddr,
    token: String,
    acked_at: Option<Instant>,
    last_register: Option<Instant>,
    refused: Option<String>,
}

pub struct Tunnel {
    private: StaticSecret,
    public: PublicKey,
    peers: HashMap<PeerId, Peer, FoldBuild>,
    by_key: HashMap<[u8; 32], PeerId, FoldBuild>,
    routes: RouteTable<PeerId>,
    next_index: PeerId,
    rate_limiter: Arc<RateLimiter>,
    last_limiter_reset: Option<Instant>,
    /// The peer whose queued packets must be flushed after a handshake completed.
    pending_flush: Option<PeerId>,
    relay: Option<Relay>,
    tcp_relay_up: bool,
    reflexive: Option<SocketAddr>,
    txid_state: u64,
    pings: HashMap<u64, ([u8; 32], Instant, Option<PingResult>), FoldBuild>,
    /// Packet filter and flow accounting.
    conntrack: ConnTrack,
}

fn ipv4_addr(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// Puts the relay header in front of a payload already at `out[RELAY_HEADER..]`
/// and says where it goes.
fn relay_action(path: Path, dst: &[u8; 32], out: &mut [u8], payload_len: usize) -> Action {
    out[0] = FRAME_RELAY_SEND;
    out[1..RELAY_HEADER].copy_from_slice(dst);
    let len = payload_len + RELAY_HEADER;
    match path {
        Path::RelayUdp(edge) => Action::Send {
            to: edge,
            offset: 0,
            len,
        },
        Path::RelayTcp => Action::SendRelayTcp { offset: 0, len },
        Path::Direct(to) => Action::Send {
            to,
            offset: RELAY_HEADER,
            len: payload_len,
        },
    }
}

/// Sends a payload at `out[RELAY_HEADER..RELAY_HEADER + len]` over `path`.
fn emit(path: Path, dst: &[u8; 32], out: &mut [u8], len: usize) -> Action {
    match path {
        Path::Direct(to) => Action::Send {
            to,
            offset: RELAY_HEADER,
            len,
        },
        relayed => relay_action(relayed, dst, out, len),
    }
}

/// Hands an [`Action::Send`]/[`Action::SendRelayTcp`] to a timer callback.
fn deliver_to(action: Action, out: &[u8], send: &mut impl FnMut(Via, &[u8])) {
    match action {
        Action::Send { to, offset, len } => send(Via::Udp(to), &out[offset..offset + len]),
        Action::SendRelayTcp { offset, len } => send(Via::RelayTcp, &out[offset..offset + len]),
        _ => {}
    }
}

impl Tunnel {
    /// `seed` makes probe transaction ids unpredictable without reading a clock or RNG here.
    pub fn new(private: StaticSecret, seed: u64) -> Tunnel {
        let public = PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Tunnel {
            private,
            public,
            peers: HashMap::default(),
            by_key: HashMap::default(),
            routes: RouteTable::default(),
            next_index: 1,
            rate_limiter,
            last_limiter_reset: None,
            pending_flush: None,
            relay: None,
            tcp_relay_up: false,
            reflexive: None,
            txid_state: seed | 1,
            pings: HashMap::default(),
            conntrack: ConnTrack::new(seed),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    fn next_txid(&mut self) -> u64 {
        // xorshift64*: cheap, never zero, good enough for transaction ids (the MAC protects them).
        let mut x = self.txid_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.txid_state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn alloc_index(&mut self) -> PeerId {
        loop {
            let id = self.next_index;
            self.next_index = if self.next_index >= (1 << 24) - 1 {
                1
            } else {
                self.next_index + 1
            };
            if !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    /// Sets (or clears) the edge relay: its UDP address and our credential.
    pub fn set_relay(&mut self, relay: Option<(SocketAddr, String)>) {
        match (relay, self.relay.as_mut()) {
            (None, _) => self.relay = None,
            (Some((edge, token)), Some(r)) if r.edge == edge => {
                if r.token != token {
                    r.token = token;
                    r.last_register = None;
                    r.refused = None;
                }
            }
            (Some((edge, token)), _) => {
                self.relay = Some(Relay {
                    edge,
                    token,
                    acked_at: None,
                    last_register: None,
                    refused: None,
                });
            }
        }
    }

    /// The shell tells the core whether its TCP relay connection is up.
    pub fn set_tcp_relay(&mut self, up: bool) {
        self.tcp_relay_up = up;
    }

    /// Registers with the edge at the next tick (after a change of network).
    /// Also re-probes every peer and heart-beats direct paths at once: a
    /// path may have died with the old address.
    pub fn reregister_now(&mut self, now: Instant) {
        if let Some(r) = self.relay.as_mut() {
            r.last_register = None;
        }
        for p in self.peers.values_mut() {
            // Our old address's NAT mappings are gone: use the relay until a
            // probe from the new address confirms a direct path again.
            p.direct_rx = None;
            p.direct_was_alive = false;
            p.reset_probing(now);
            p.heartbeat_next = now;
        }
    }

    /// The address the edge saw us come from (for the control plane).
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    pub fn relay_status(&self, now: Instant) -> RelayStatus {
        let Some(r) = &self.relay else {
            return RelayStatus::None;
        };
        if let Some(reason) = &r.refused {
            return RelayStatus::Refused(reason.clone());
        }
        match self.relay_path(now) {
            Some(Path::RelayUdp(_)) => RelayStatus::Udp,
            Some(Path::RelayTcp) => RelayStatus::Tcp,
            _ => RelayStatus::Down,
        }
    }

    /// The relay path: UDP while the edge answers registrations, else the
    /// TCP relay if the shell has it up (the edge's own gateway member has
    /// only that one, and no UDP relay at all).
    fn relay_path(&self, now: Instant) -> Option<Path> {
        if let Some(r) = self.relay.as_ref() {
            if r.refused.is_none()
                && r.acked_at
                    .is_some_and(|t| now.saturating_duration_since(t) < RELAY_UDP_HEALTHY)
            {
                return Some(Path::RelayUdp(r.edge));
            }
        }
        self.tcp_relay_up.then_some(Path::RelayTcp)
    }

    /// Adds a peer or updates one with the same key. Sessions of an existing
    /// peer survive, and so does a direct path that still works.
    pub fn upsert_peer(&mut self, now: Instant, config: PeerConfig) {
        if let Some(&id) = self.by_key.get(&config.public_key) {
            let peer = self.peers.get_mut(&id).expect("by_key and peers agree");
            if peer.config.allowed_ips != config.allowed_ips {
                self.routes.remove_target(id);
                for net in &config.allowed_ips {
                    self.routes.insert(*net, id);
                }
            }
            if peer.config.endpoints != config.endpoints {
                peer.fallback = 0;
                peer.fallback_since = now;
                peer.reset_probing(now);
            }
            peer.config = config;
            return;
        }
        let id = self.alloc_index();
        let session = Session::new(
            self.private.clone(),
            config.public_key,
            id,
            Some(PERSISTENT_KEEPALIVE_SECS),
            self.rate_limiter.clone(),
        );
        for net in &config.allowed_ips {
            self.routes.insert(*net, id);
        }
        self.by_key.insert(config.public_key, id);
        let pair = PairKey::derive(&self.private, &config.public_key);
        self.peers.insert(
            id,
            Peer {
                config,
                session,
                pair,
                direct: None,
                direct_rx: None,
                direct_was_alive: false,
                fallback: 0,
                fallback_since: now,
                learned: Vec::new(),
                probe_next: now,
                probe_interval: PROBE_MIN,
                heartbeat_next: now,
                outstanding: Vec::new(),
                last_activity: None,
                handshake_via: None,
                resynced: None,
            },
        );
    }

    /// Forgets a peer: its sessions end and its packets are refused from now on.
    pub fn remove_peer(&mut self, public_key: &[u8; 32]) -> bool {
        let Some(id) = self.by_key.remove(public_key) else {
            return false;
        };
        self.peers.remove(&id);
        self.routes.remove_target(id);
        if self.pending_flush == Some(id) {
            self.pending_flush = None;
        }
        true
    }

    /// Makes the peer set exactly `configs`.
    pub fn set_peers(&mut self, now: Instant, configs: Vec<PeerConfig>) {
        let wanted: std::collections::HashSet<[u8; 32]> =
            configs.iter().map(|c| c.public_key).collect();
        let gone: Vec<[u8; 32]> = self
            .by_key
            .keys()
            .filter(|k| !wanted.contains(*k))
            .copied()
            .collect();
        for k in gone {
            self.remove_peer(&k);
        }
        for c in configs {
            self.upsert_peer(now, c);
        }
    }

    /// Replaces the packet filter (before any call: allow everything).
    /// Every open connection is decided again with `filter`, as it was when
    /// it opened (initiator → responder, protocol, destination port); those
    /// now denied end at once (`revoked`, their records are emitted) and
    /// their later packets are dropped.
    pub fn set_filter(&mut self, now: Instant, filter: Arc<trellis_policy::Filter>) {
        self.conntrack.set_filter(now, filter);
    }

    /// The filter in force.
    pub fn filter(&self) -> &Arc<trellis_policy::Filter> {
        self.conntrack.filter()
    }

    /// At most this many connections are tracked (default
    /// [`DEFAULT_MAX_FLOWS`]); when full, new ones are dropped and counted.
    pub fn set_max_flows(&mut self, max: usize) {
        self.conntrack.set_max_flows(max);
    }

    /// Moves the finished flow records (and records of denied attempts) into `out`.
    pub fn drain_flows(&mut self, out: &mut Vec<FlowEnd>) {
        self.conntrack.drain(out);
    }

    /// Ends every open connection (`shutdown`) and records pending denied
    /// attempts; call when the node stops, then [`Tunnel::drain_flows`].
    pub fn close_all_flows(&mut self, now: Instant) {
        self.conntrack.close_all(now);
    }

    /// Counters of the connection table and the filter, for status.
    pub fn flow_stats(&self) -> FlowStats {
        self.conntrack.stats()
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// An IP packet read from the tunnel interface: encrypt it for the peer
    /// that owns its destination, and send it over that peer's path.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8], out: &mut [u8]) -> Action {
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return Action::Drop(DropReason::NotIpv4);
        }
        let dst = ipv4_addr(&packet[16..20]);
        let Some(id) = self.routes.lookup(dst) else {
            return Action::Drop(DropReason::NoRoute);
        };
        let relay = self.relay_path(now);
        let peer = self.peers.get_mut(&id).expect("routes point at live peers");
        let Some(path) = peer.path(now, relay) else {
            peer.last_activity = Some(now);
            return Action::Drop(DropReason::NoPath);
        };
        // The filter, on the plaintext: a denied packet fails fast here.
        if let Err(r) =
            self.conntrack
                .check(now, packet, Side::Egress, &peer.config.public_key, path)
        {
            return Action::Drop(r);
        }
        peer.last_activity = Some(now);
        // Direct datagrams start at offset 0 so that a batch lies end to end (GSO);
        // relayed ones leave room for the relay header.
        let head = match path {
            Path::Direct(_) => 0,
            _ => RELAY_HEADER,
        };
        match peer.session.encapsulate(packet, &mut out[head..]) {
            SessionOutput::ToNetwork { offset, len } => {
                if offset != 0 {
                    out.copy_within(head + offset..head + offset + len, head);
                }
                note_handshake(peer, path, &out[head..head + len], now);
                match path {
                    Path::Direct(to) => Action::Send { to, offset: 0, len },
                    relayed => relay_action(relayed, &peer.config.public_key, out, len),
                }
            }
            SessionOutput::Rejected(e) => Action::Drop(DropReason::Rejected(e)),
            SessionOutput::Done | SessionOutput::ToTunnel { .. } => Action::None,
        }
    }

    /// A UDP datagram from `from`: WireGuard from a peer, a probe, or a frame
    /// from the edge. After an [`Action::Send`] or [`Action::SendRelayTcp`],
    /// call [`Tunnel::poll_flush`] until it returns [`Action::None`]: a
    /// completed handshake releases the packets that waited for it.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        match datagram.first() {
            Some(&b) if b >= 0x80 => self.handle_frame(now, from, datagram, out),
            _ => self.handle_wireguard(now, Source::Udp(from), datagram, out),
        }
    }

    /// A frame that arrived over the TCP relay (a `RELAY_RECV`).
    pub fn handle_relay_tcp_frame(&mut self, now: Instant, frame: &[u8], out: &mut [u8]) -> Action {
        if frame.len() <= RELAY_HEADER || frame[0] != FRAME_RELAY_RECV {
            return Action::Drop(DropReason::Malformed);
        }
        let src: [u8; 32] = frame[1..RELAY_HEADER].try_into().expect("32 bytes");
        self.handle_inner(now, Source::Relay(src), &frame[RELAY_HEADER..], out)
    }

    fn handle_frame(
        &mut self,
        now: Instant,
        from: SocketAddr,
        frame: &[u8],
        out: &mut [u8],
    ) -> Action {
        let from_edge = self.relay.as_ref().is_some_and(|r| r.edge == from);
        match frame[0] {
            FRAME_REGISTERED if from_edge => {
                let Some(observed) = frames::decode_registered(frame) else {
                    return Action::Drop(DropReason::Malformed);
                };
                let r = self.relay.as_mut().expect("from_edge");
                if r.acked_at.is_none() {
                    tracing::debug!("registered with the edge relay");
                }
                r.acked_at = Some(now);
                r.refused = None;
                self.reflexive = Some(observed);
                Action::None
            }
            FRAME_REFUSED if from_edge => {
                let reason = String::from_utf8_lossy(&frame[1..]).into_owned();
                let r = self.relay.as_mut().expect("from_edge");
                if r.refused.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(%reason, "the edge refused this node's relay credential");
                }
                r.refused = Some(reason);
                r.acked_at = None;
                Action::None
            }
            FRAME_RELAY_RECV if from_edge && frame.len() > RELAY_HEADER => {
                let src: [u8; 32] = frame[1..RELAY_HEADER].try_into().expect("32 bytes");
                self.handle_inner(now, Source::Relay(src), &frame[RELAY_HEADER..], out)
            }
            _ if frame.len() == PEER_FRAME_LEN => {
                self.handle_disco(now, Source::Udp(from), frame, out)
            }
            _ => Action::Drop(DropReason::Malformed),
        }
    }

    fn handle_inner(&mut self, now: Instant, src: Source, data: &[u8], out: &mut [u8]) -> Action {
        match data.first() {
            Some(&b) if b >= 0x80 => self.handle_disco(now, src, data, out),
            _ => self.handle_wireguard(now, src, data, out),
        }
    }

    fn handle_disco(&mut self, now: Instant, src: Source, frame: &[u8], out: &mut [u8]) -> Action {
        let Some((kind, sender, txid)) = disco::peek(frame) else {
            return Action::Drop(DropReason::Malformed);
        };
        if let Source::Relay(claimed) = src {
            if claimed != sender {
                return Action::Drop(DropReason::BadProbe);
            }
        }
        let Some(&id) = self.by_key.get(&sender) else {
            return Action::Drop(DropReason::UnknownPeer);
        };
        let relay = self.relay_path(now);
        let me = *self.public.as_bytes();
        let peer = self.peers.get_mut(&id).expect("by_key and peers agree");
        if !disco::verify(frame, &peer.pair) {
            return Action::Drop(DropReason::BadProbe);
        }
        match kind {
            Kind::Probe => {
                let len =
                    disco::encode(Kind::Pong, &me, txid, &peer.pair, &mut out[RELAY_HEADER..]);
                match src {
                    Source::Udp(from) => {
                        if peer.direct != Some(from) && !peer.learned.contains(&from) {
                            // A peer-reflexive candidate: probe it back soon.
                            if peer.learned.len() >= MAX_LEARNED {
                                peer.learned.remove(0);
                            }
                            peer.learned.push(from);
                            peer.reset_probing(now);
                        }
                        Action::Send {
                            to: from,
                            offset: RELAY_HEADER,
                            len,
                        }
                    }
                    Source::Relay(_) => match relay {
                        Some(path) => relay_action(path, &sender, out, len),
                        None => Action::Drop(DropReason::NoPath),
                    },
                }
            }
            Kind::Pong => {
                let sent = peer
                    .outstanding
                    .iter()
                    .position(|(t, _)| *t == txid)
                    .map(|i| peer.outstanding.swap_remove(i).1);
                let path = match src {
                    Source::Udp(from) => {
                        if sent.is_some() || self.pings.contains_key(&txid) {
                            peer.confirm_direct(now, from);
                        }
                        Path::Direct(from)
                    }
                    Source::Relay(_) => relay.unwrap_or(Path::RelayTcp),
                };
                if let Some(p) = self.pings.get_mut(&txid) {
                    if p.0 == sender && p.2.is_none() {
                        p.2 = Some(PingResult {
                            rtt: now.saturating_duration_since(p.1),
                            path,
                        });
                    }
                }
                Action::None
            }
            Kind::CallMe => {
                peer.last_activity = Some(now);
                peer.reset_probing(now);
                Action::None
            }
        }
    }

    fn handle_wireguard(
        &mut self,
        now: Instant,
        src: Source,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        let src_ip = match src {
            Source::Udp(a) => a.ip(),
            Source::Relay(_) => self
                .relay
                .as_ref()
                .map(|r| r.edge.ip())
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        };
        let id = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(ref init)) => {
                // Check MAC1 and load (cookie) before spending a DH on the sender's identity.
                if let Err(r) = self.rate_limiter.verify_packet(Some(src_ip), datagram, out) {
                    return match (r, src) {
                        (TunnResult::WriteToNetwork(cookie), Source::Udp(from)) => Action::Send {
                            to: from,
                            offset: 0,
                            len: cookie.len(),
                        },
                        _ => Action::Drop(DropReason::Malformed),
                    };
                }
                let Ok(half) = parse_handshake_anon(&self.private, &self.public, init) else {
                    return Action::Drop(DropReason::UnknownPeer);
                };
                match self.by_key.get(&half.peer_static_public) {
                    Some(id) => *id,
                    None => return Action::Drop(DropReason::UnknownPeer),
                }
            }
            Ok(Packet::HandshakeResponse(r)) => r.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(c)) => c.receiver_idx >> 8,
            Ok(Packet::PacketData(d)) => d.receiver_idx >> 8,
            Err(_) => return Action::Drop(DropReason::Malformed),
        };
        let is_data = datagram.first() == Some(&DATA_MESSAGE);
        let relay = self.relay_path(now);
        let Some(peer) = self.peers.get_mut(&id) else {
            if is_data {
                return self.resync(now, src, out, DropReason::UnknownPeer);
            }
            return Action::Drop(DropReason::UnknownPeer);
        };
        if let Source::Relay(claimed) = src {
            // The edge says who sent it; the session must agree.
            if claimed != peer.config.public_key {
                return Action::Drop(DropReason::UnknownPeer);
            }
        }
        let relayed_while_direct = matches!(src, Source::Relay(_))
            && peer.direct_alive(now)
            && peer
                .direct_rx
                .is_some_and(|t| now.saturating_duration_since(t) >= FOLLOW_TO_RELAY);
        let result = peer.session.decapsulate(Some(src_ip), datagram, out);
        let action = match result {
            SessionOutput::Rejected(
                e
                @ (SessionError::NoSession | SessionError::UnknownSession | SessionError::Expired),
            ) if is_data => return self.resync(now, src, out, DropReason::Rejected(e)),
            SessionOutput::Rejected(e) => return Action::Drop(DropReason::Rejected(e)),
            SessionOutput::Done => Action::None,
            SessionOutput::ToNetwork { offset, len } => {
                self.pending_flush = Some(id);
                match src {
                    Source::Udp(from) => Action::Send {
                        to: from,
                        offset,
                        len,
                    },
                    Source::Relay(key) => match relay {
                        Some(path) => {
                            out.copy_within(offset..offset + len, RELAY_HEADER);
                            relay_action(path, &key, out, len)
                        }
                        None => Action::Drop(DropReason::NoPath),
                    },
                }
            }
            SessionOutput::ToTunnel {
                offset,
                len,
                src: inner,
            } => {
                // Cryptokey routing: a peer may only send from its own addresses.
                let allowed = match inner {
                    IpAddr::V4(v4) => self.routes.lookup(v4) == Some(id),
                    IpAddr::V6(_) => false,
                };
                if !allowed {
                    return Action::Drop(DropReason::SpoofedSource);
                }
                Action::Deliver { offset, len }
            }
        };
        let peer = self.peers.get_mut(&id).expect("looked up above");
        if matches!(action, Action::Deliver { .. }) {
            peer.last_activity = Some(now);
            if relayed_while_direct {
                // The peer sends through the edge although our direct path
                // looked fine: it lost the path (it roamed). Follow it to the
                // relay now rather than after the direct timeout.
                tracing::debug!(peer = %peer.config.name, "peer switched to the relay; following");
                peer.direct_rx = None;
                peer.reset_probing(now);
            }
        }
        // The packet authenticated: a direct source is where the peer is now (roaming).
        if let Source::Udp(from) = src {
            peer.confirm_direct(now, from);
        }
        if let Action::Deliver { offset, len } = action {
            // The filter, on the decrypted packet, whether it is for this
            // node or for a subnet behind it.
            let path = peer.path(now, relay).unwrap_or(match src {
                Source::Udp(from) => Path::Direct(from),
                Source::Relay(_) => Path::RelayTcp,
            });
            if let Err(r) = self.conntrack.check(
                now,
                &out[offset..offset + len],
                Side::Ingress,
                &peer.config.public_key,
                path,
            ) {
                return Action::Drop(r);
            }
        }
        action
    }

    /// Data for a session this node does not know: the sender still uses a
    /// session from before this node restarted (or lost it). WireGuard would
    /// leave it sending into the void until its own timers give up (15 s
    /// and more); instead, a handshake goes to the sender at once (at most
    /// once a second per peer), so its connections resume within a round
    /// trip.
    fn resync(&mut self, now: Instant, src: Source, out: &mut [u8], why: DropReason) -> Action {
        let id = match src {
            Source::Relay(key) => self.by_key.get(&key).copied(),
            Source::Udp(from) => self
                .peers
                .iter()
                .find(|(_, p)| p.direct == Some(from) || p.candidates().any(|c| c == from))
                .map(|(id, _)| *id),
        };
        let relay = self.relay_path(now);
        let Some(peer) = id.and_then(|id| self.peers.get_mut(&id)) else {
            return Action::Drop(why);
        };
        if peer
            .resynced
            .is_some_and(|t| now.saturating_duration_since(t) < RESYNC_INTERVAL)
        {
            return Action::Drop(why);
        }
        let path = match src {
            Source::Udp(from) => Path::Direct(from),
            Source::Relay(_) => match relay {
                Some(p) => p,
                None => return Action::Drop(why),
            },
        };
        peer.resynced = Some(now);
        let SessionOutput::ToNetwork { offset, len } =
            peer.session.force_handshake(&mut out[RELAY_HEADER..])
        else {
            return Action::Drop(why);
        };
        if offset != 0 {
            out.copy_within(
                RELAY_HEADER + offset..RELAY_HEADER + offset + len,
                RELAY_HEADER,
            );
        }
        tracing::debug!(peer = %peer.config.name, "data for an unknown session; handshaking again");
        note_handshake(peer, path, &out[RELAY_HEADER..RELAY_HEADER + len], now);
        match path {
            Path::Direct(to) => {
                out.copy_within(RELAY_HEADER..RELAY_HEADER + len, 0);
                Action::Send { to, offset: 0, len }
            }
            relayed => {
                let key = peer.config.public_key;
                relay_action(relayed, &key, out, len)
            }
        }
    }

    /// Releases packets queued during a handshake; call until [`Action::None`].
    pub fn poll_flush(&mut self, now: Instant, out: &mut [u8]) -> Action {
        let Some(id) = self.pending_flush else {
            return Action::None;
        };
        let relay = self.relay_path(now);
        let Some(peer) = self.peers.get_mut(&id) else {
            self.pending_flush = None;
            return Action::None;
        };
        let Some(path) = peer.path(now, relay) else {
            self.pending_flush = None;
            return Action::None;
        };
        match peer
            .session
            .decapsulate(None, &[], &mut out[RELAY_HEADER..])
        {
            SessionOutput::ToNetwork { offset, len } => {
                if offset != 0 {
                    out.copy_within(
                        RELAY_HEADER + offset..RELAY_HEADER + offset + len,
                        RELAY_HEADER,
                    );
                }
                emit(path, &peer.config.public_key, out, len)
            }
            _ => {
                self.pending_flush = None;
                Action::None
            }
        }
    }

    /// Sends one probe to `peer` over its current path, for `trellis ping`.
    /// The answer shows up in [`Tunnel::ping_result`] under the returned id.
    pub fn ping(
        &mut self,
        now: Instant,
        peer_key: &[u8; 32],
        out: &mut [u8],
    ) -> Result<(u64, Action), PingError> {
        let id = *self.by_key.get(peer_key).ok_or(PingError::UnknownPeer)?;
        let txid = self.next_txid();
        let relay = self.relay_path(now);
        let me = *self.public.as_bytes();
        let peer = self.peers.get_mut(&id).expect("by_key and peers agree");
        // A ping counts as activity, like traffic: an idle peer's direct
        // path is looked for (at once), so that a connection test finds
        // the path real traffic would take.
        if !peer.active(now) && !peer.direct_alive(now) {
            peer.reset_probing(now);
        }
        peer.last_activity = Some(now);
        let path = peer.path(now, relay).ok_or(PingError::NoPath)?;
        let len = disco::encode(Kind::Probe, &me, txid, &peer.pair, &mut out[RELAY_HEADER..]);
        if let Path::Direct(_) = path {
            peer.outstanding.push((txid, now));
        }
        self.pings.insert(txid, (*peer_key, now, None));
        Ok((txid, emit(path, peer_key, out, len)))
    }

    /// The answer to a ping, once it came; the id is forgotten after that.
    pub fn ping_result(&mut self, txid: u64) -> Option<PingResult> {
        let r = self.pings.get(&txid)?.2;
        if r.is_some() {
            self.pings.remove(&txid);
        }
        r
    }

    /// Drives timers: relay registration, probes and heartbeats, handshake
    /// retries, rekeys, keepalives. Call every 100–250 ms; `send` gets each
    /// datagram to send.
    pub fn poll_timers(&mut self, now: Instant, out: &mut [u8], mut send: impl FnMut(Via, &[u8])) {
        if self
            .last_limiter_reset
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.rate_limiter.reset_count();
            self.last_limiter_reset = Some(now);
        }
        self.pings
            .retain(|_, p| now.saturating_duration_since(p.1) < PING_TIMEOUT);
        self.conntrack.sweep(now);

        // Register with the edge: often until it answers, then to keep the NAT mapping.
        if let Some(r) = self.relay.as_mut() {
            let interval = if r.acked_at.is_some() {
                Duration::from_secs(frames::REGISTER_INTERVAL_SECS)
            } else {
                Duration::from_secs(1)
            };
            if r.last_register
                .is_none_or(|t| now.saturating_duration_since(t) >= interval)
            {
                r.last_register = Some(now);
                let n = 1 + r.token.len();
                if n <= out.len() {
                    out[0] = FRAME_REGISTER;
                    out[1..n].copy_from_slice(r.token.as_bytes());
                    send(Via::Udp(r.edge), &out[..n]);
                }
            }
        }

        let relay = self.relay_path(now);
        let me = *self.public.as_bytes();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            let txid_round = self.next_txid();
            let peer = self.peers.get_mut(&id).expect("listed above");
            let alive = peer.direct_alive(now);
            if peer.direct_was_alive && !alive {
                tracing::debug!(peer = %peer.config.name, "direct path went silent; using the relay");
                peer.reset_probing(now);
            }
            peer.direct_was_alive = alive;

            if relay.is_none() && peer.direct.is_none() && peer.config.endpoints.len() > 1 {
                // No relay to fall back on: walk the candidates until one answers.
                if now.saturating_duration_since(peer.fallback_since) >= CANDIDATE_TIMEOUT {
                    peer.fallback = (peer.fallback + 1) % peer.config.endpoints.len();
                    peer.fallback_since = now;
                }
            }

            if peer.active(now) {
                if alive {
                    if now >= peer.heartbeat_next {
                        let to = peer.direct.expect("alive implies direct");
                        let len = disco::encode(Kind::Probe, &me, txid_round, &peer.pair, out);
                        peer.outstanding.push((txid_round, now));
                        send(Via::Udp(to), &out[..len]);
                        peer.heartbeat_next = now + HEARTBEAT_INTERVAL;
                    }
                } else if relay.is_some() && now >= peer.probe_next {
                    let first_round = peer.probe_interval == PROBE_MIN;
                    let candidates: Vec<SocketAddr> = peer.candidates().collect();
                    let len = disco::encode(Kind::Probe, &me, txid_round, &peer.pair, out);
                    for c in &candidates {
                        send(Via::Udp(*c), &out[..len]);
                    }
                    if !candidates.is_empty() {
                        peer.outstanding.push((txid_round, now));
                    }
                    if first_round {
                        if let Some(path) = relay {
                            let len = disco::encode(
                                Kind::CallMe,
                                &me,
                                txid_round,
                                &peer.pair,
                                &mut out[RELAY_HEADER..],
                            );
                            let a = relay_action(path, &peer.config.public_key, out, len);
                            deliver_to(a, out, &mut send);
                        }
                    }
                    peer.probe_next = now + peer.probe_interval;
                    peer.probe_interval = (peer.probe_interval * 2).min(PROBE_MAX);
                }
            }
            if peer.outstanding.len() > MAX_OUTSTANDING {
                let excess = peer.outstanding.len() - MAX_OUTSTANDING;
                peer.outstanding.drain(..excess);
            }

            if let SessionOutput::ToNetwork { offset, len } =
                peer.session.update_timers(&mut out[RELAY_HEADER..])
            {
                if let Some(path) = peer.path(now, relay) {
                    if offset != 0 {
                        out.copy_within(
                            RELAY_HEADER + offset..RELAY_HEADER + offset + len,
                            RELAY_HEADER,
                        );
                    }
                    note_handshake(peer, path, &out[RELAY_HEADER..RELAY_HEADER + len], now);
                    let a = emit(path, &peer.config.public_key, out, len);
                    deliver_to(a, out, &mut send);
                }
            }

            // A first handshake that went out on a path we no longer use, or
            // got no answer for a second: send it again now rather than after
            // WireGuard's 5 s retry (the far end's relay may just have come up).
            if let Some((via, at, attempts)) = peer.handshake_via {
                let since = now.saturating_duration_since(at);
                if peer.session.stats().since_last_handshake.is_some() {
                    peer.handshake_via = None;
                } else if let Some(path) = peer.path(now, relay).filter(|p| {
                    (*p != via && since >= HANDSHAKE_REPATH)
                        || (since >= HANDSHAKE_QUICK_RETRY && attempts < HANDSHAKE_QUICK_RETRIES)
                }) {
                    if let SessionOutput::ToNetwork { offset, len } =
                        peer.session.force_handshake(&mut out[RELAY_HEADER..])
                    {
                        if offset != 0 {
                            out.copy_within(
                                RELAY_HEADER + offset..RELAY_HEADER + offset + len,
                                RELAY_HEADER,
                            );
                        }
                        tracing::debug!(peer = %peer.config.name, path = path.kind(), "sending the handshake again");
                        peer.handshake_via = Some((path, now, attempts + 1));
                        let a = emit(path, &peer.config.public_key, out, len);
                        deliver_to(a, out, &mut send);
                    }
                }
            }
        }
    }

    /// The direct endpoints of the peers in use (active, with a direct path
    /// that answered within [`ACTIVE_WINDOW`]), the most recently heard first,
    /// at most `max`: the IO shell keeps a socket connected to each (the
    /// kernel then skips a route lookup per datagram on both sides).
    pub fn direct_endpoints(&self, now: Instant, max: usize, out: &mut Vec<SocketAddr>) {
        let mut heard: Vec<(Instant, SocketAddr)> = self
            .peers
            .values()
            .filter(|p| p.active(now))
            .filter_map(|p| Some((p.direct_rx?, p.direct?)))
            .filter(|(t, _)| now.saturating_duration_since(*t) < ACTIVE_WINDOW)
            .collect();
        heard.sort_by_key(|h| std::cmp::Reverse(h.0));
        out.clear();
        for (_, to) in heard {
            if out.len() >= max {
                break;
            }
            if !out.contains(&to) {
                out.push(to);
            }
        }
    }

    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        let relay = self.relay_path(now);
        let mut v: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                public_key: p.config.public_key,
                name: p.config.name.clone(),
                allowed_ips: p.config.allowed_ips.clone(),
                path: p.path(now, relay),
                stats: p.session.stats(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod testpkt;
#[cfg(test)]
mod tests;
