//! The sans-IO tunnel core: peers, WireGuard sessions, allowed-IP routing and
//! path choice, driven by packets, datagrams and a `now` passed in.
//!
//! The IO shell (`trellis-io`) reads the TUN device and the UDP socket, hands
//! each packet to [`Tunnel::handle_tun_packet`] or [`Tunnel::handle_datagram`],
//! and carries out the returned [`Action`]. Nothing here opens a socket, spawns
//! a task or reads the wall clock; the callers own the buffers, so nothing
//! allocates per packet.
//!
//! Seams for later work: [`Path`] is where relayed paths join direct ones, and
//! the shell's packet filter hook sits between this core and the TUN device.

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

use routes::RouteTable;
use session::{Session, SessionError, SessionOutput, SessionStats};

/// Bytes WireGuard adds to every data packet (header, counter, tag).
pub const DATA_OVERHEAD: usize = 32;
/// The smallest output buffer the core accepts: a handshake initiation.
pub const MIN_BUFFER: usize = 148;
/// Handshakes per second per peer before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// A candidate endpoint that brought no authenticated packet for this long is
/// given up for the next candidate of the peer.
pub const CANDIDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive sent on idle sessions so that NAT and firewall state stays open.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

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
}

impl Path {
    pub fn kind(&self) -> &'static str {
        match self {
            Path::Direct(_) => "direct",
        }
    }

    pub fn endpoint(&self) -> SocketAddr {
        match self {
            Path::Direct(a) => *a,
        }
    }
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
    #[error("the peer has no known endpoint")]
    NoEndpoint,
    #[error("datagram from an unknown peer or session")]
    UnknownPeer,
    #[error("source address not allowed for this peer")]
    SpoofedSource,
    #[error("malformed datagram")]
    Malformed,
    #[error("rejected by the session: {0}")]
    Rejected(SessionError),
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

struct Peer {
    config: PeerConfig,
    session: Session,
    /// Where packets go now; learned from the control plane, then from where
    /// authenticated packets of the peer really come from (roaming).
    endpoint: Option<SocketAddr>,
    candidate: usize,
    endpoint_since: Instant,
    last_authenticated_rx: Option<Instant>,
}

pub struct Tunnel {
    private: StaticSecret,
    public: PublicKey,
    peers: HashMap<PeerId, Peer>,
    by_key: HashMap<[u8; 32], PeerId>,
    routes: RouteTable<PeerId>,
    next_index: PeerId,
    rate_limiter: Arc<RateLimiter>,
    last_limiter_reset: Option<Instant>,
    /// The peer whose queued packets must be flushed after a handshake completed.
    pending_flush: Option<PeerId>,
}

fn ipv4_addr(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

impl Tunnel {
    pub fn new(private: StaticSecret) -> Tunnel {
        let public = PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Tunnel {
            private,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            routes: RouteTable::default(),
            next_index: 1,
            rate_limiter,
            last_limiter_reset: None,
            pending_flush: None,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
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

    /// Adds a peer or updates one with the same key. Sessions of an existing
    /// peer survive; its endpoint changes only when the candidates changed.
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
                // Keep a roamed endpoint that is still in the list; else start over.
                let keep = peer.endpoint.is_some_and(|e| {
                    config.endpoints.contains(&e)
                        || peer
                            .last_authenticated_rx
                            .is_some_and(|t| now.duration_since(t) < CANDIDATE_TIMEOUT)
                });
                if !keep {
                    peer.candidate = 0;
                    peer.endpoint = config.endpoints.first().copied();
                    peer.endpoint_since = now;
                }
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
        self.peers.insert(
            id,
            Peer {
                endpoint: config.endpoints.first().copied(),
                config,
                session,
                candidate: 0,
                endpoint_since: now,
                last_authenticated_rx: None,
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

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// An IP packet read from the tunnel interface: encrypt it for the peer
    /// that owns its destination.
    pub fn handle_tun_packet(&mut self, _now: Instant, packet: &[u8], out: &mut [u8]) -> Action {
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return Action::Drop(DropReason::NotIpv4);
        }
        let dst = ipv4_addr(&packet[16..20]);
        let Some(id) = self.routes.lookup(dst) else {
            return Action::Drop(DropReason::NoRoute);
        };
        let peer = self.peers.get_mut(&id).expect("routes point at live peers");
        match peer.session.encapsulate(packet, out) {
            SessionOutput::ToNetwork { offset, len } => match peer.endpoint {
                Some(to) => Action::Send { to, offset, len },
                None => Action::Drop(DropReason::NoEndpoint),
            },
            SessionOutput::Rejected(e) => Action::Drop(DropReason::Rejected(e)),
            SessionOutput::Done | SessionOutput::ToTunnel { .. } => Action::None,
        }
    }

    /// A UDP datagram from `from`. After an [`Action::Send`], call
    /// [`Tunnel::poll_flush`] until it returns [`Action::None`]: a completed
    /// handshake releases the packets that waited for it.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        let id = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(ref init)) => {
                // Check MAC1 and load (cookie) before spending a DH on the sender's identity.
                if let Err(r) = self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), datagram, out)
                {
                    return match r {
                        TunnResult::WriteToNetwork(cookie) => Action::Send {
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
        let Some(peer) = self.peers.get_mut(&id) else {
            return Action::Drop(DropReason::UnknownPeer);
        };
        let result = peer.session.decapsulate(Some(from.ip()), datagram, out);
        let action = match result {
            SessionOutput::Rejected(e) => return Action::Drop(DropReason::Rejected(e)),
            SessionOutput::Done => Action::None,
            SessionOutput::ToNetwork { offset, len } => {
                self.pending_flush = Some(id);
                Action::Send {
                    to: from,
                    offset,
                    len,
                }
            }
            SessionOutput::ToTunnel { offset, len, src } => {
                // Cryptokey routing: a peer may only send from its own addresses.
                let allowed = match src {
                    IpAddr::V4(v4) => self.routes.lookup(v4) == Some(id),
                    IpAddr::V6(_) => false,
                };
                if !allowed {
                    return Action::Drop(DropReason::SpoofedSource);
                }
                Action::Deliver { offset, len }
            }
        };
        // The packet authenticated: this is where the peer is now (roaming).
        let peer = self.peers.get_mut(&id).expect("looked up above");
        peer.last_authenticated_rx = Some(now);
        if peer.endpoint != Some(from) {
            peer.endpoint = Some(from);
            peer.endpoint_since = now;
        }
        action
    }

    /// Releases packets queued during a handshake; call until [`Action::None`].
    pub fn poll_flush(&mut self, out: &mut [u8]) -> Action {
        let Some(id) = self.pending_flush else {
            return Action::None;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            self.pending_flush = None;
            return Action::None;
        };
        match peer.session.decapsulate(None, &[], out) {
            SessionOutput::ToNetwork { offset, len } => match peer.endpoint {
                Some(to) => Action::Send { to, offset, len },
                None => Action::Drop(DropReason::NoEndpoint),
            },
            _ => {
                self.pending_flush = None;
                Action::None
            }
        }
    }

    /// Drives timers (handshake retries, rekeys, keepalives, candidate
    /// rotation). Call every 100–250 ms; `send` gets each datagram to send.
    pub fn poll_timers(
        &mut self,
        now: Instant,
        out: &mut [u8],
        mut send: impl FnMut(SocketAddr, &[u8]),
    ) {
        if self
            .last_limiter_reset
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.rate_limiter.reset_count();
            self.last_limiter_reset = Some(now);
        }
        for peer in self.peers.values_mut() {
            // Try the next candidate when the current one never answered.
            let answered = peer
                .last_authenticated_rx
                .is_some_and(|t| t >= peer.endpoint_since);
            if !answered
                && peer.config.endpoints.len() > 1
                && now.duration_since(peer.endpoint_since) >= CANDIDATE_TIMEOUT
            {
                peer.candidate = (peer.candidate + 1) % peer.config.endpoints.len();
                peer.endpoint = Some(peer.config.endpoints[peer.candidate]);
                peer.endpoint_since = now;
            }
            if let SessionOutput::ToNetwork { offset, len } = peer.session.update_timers(out) {
                if let Some(to) = peer.endpoint {
                    send(to, &out[offset..offset + len]);
                }
            }
        }
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                public_key: p.config.public_key,
                name: p.config.name.clone(),
                allowed_ips: p.config.allowed_ips.clone(),
                path: p.endpoint.map(Path::Direct),
                stats: p.session.stats(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests;
