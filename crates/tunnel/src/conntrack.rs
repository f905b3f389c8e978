//! Stateful packet filtering and flow accounting ("conntrack"), inside the
//! sans-IO core: time is passed in, nothing here reads a clock or does IO.
//!
//! Every IPv4 packet the tunnel carries is checked twice: on **egress**
//! (plaintext read from the TUN, before encryption, so that a denied packet
//! fails fast on the sender) and on **ingress** (a decrypted packet about to
//! be written to the TUN, whether it is for this node or for a subnet behind
//! it). A packet that belongs to a tracked connection passes, in either
//! direction, and is counted. A packet without a connection asks the
//! [`Filter`] (in its own orientation: source, destination, protocol,
//! destination port); allowed, it opens a connection, denied, it is dropped
//! and recorded.
//!
//! What opens a connection:
//! - TCP: only a SYN without ACK. Any other TCP packet without a connection
//!   is dropped ([`DropReason::NoConnection`]): otherwise the reply direction
//!   of a revoked connection could open it again as a "new" flow.
//! - UDP (and protocols other than TCP/UDP/ICMP): any packet.
//! - ICMP: an echo request opens a flow keyed by (source, destination,
//!   identifier), which its echo reply matches; an echo reply without one is
//!   dropped. Errors (destination unreachable, time exceeded) pass when the
//!   header they carry belongs to a tracked connection, and are otherwise
//!   decided like any packet (port 0) without opening a connection. Other
//!   ICMP types open a flow with identifier 0.
//! - Non-first IP fragments carry no ports: they pass when some connection
//!   between the same two addresses with the same protocol is tracked, and
//!   are otherwise decided with port 0, without opening a connection. (Kept
//!   simple: no reassembly, no per-datagram fragment tracking.)
//!
//! Connections end on a TCP RST (`reset`), two FINs plus [`CLOSE_GRACE`]
//! (`closed`), idleness (`idle`: [`TCP_IDLE`], [`UDP_IDLE`], [`ICMP_IDLE`];
//! a TCP connection that never got an answer after [`TCP_UNREPLIED_IDLE`]),
//! a policy change that denies them ([`ConnTrack::set_filter`]: `revoked`),
//! or the node stopping (`shutdown`). Each ending yields one [`FlowEnd`].
//!
//! Bounds: at most [`DEFAULT_MAX_FLOWS`] connections (settable); when full and
//! nothing expired, new connections are dropped and counted, as Linux's
//! nf_conntrack does. Denied attempts are aggregated per (source,
//! destination, protocol, port): the first is recorded at once, the next ones
//! at most every [`DENY_WINDOW`] with a count, for at most [`MAX_DENY_KEYS`]
//! keys (beyond that only a counter grows). Finished records wait for
//! [`ConnTrack::drain`] in a buffer of at most [`MAX_PENDING_RECORDS`].
//!
//! Cost per packet of a tracked connection: header parsing, one hash lookup
//! (a seeded multiply-fold hasher, no SipHash), a few counter updates; no
//! allocation, no copy. The filter runs only for packets that open flows.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::fasthash::FoldBuild;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_policy::{Filter, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use crate::{DropReason, Path};

/// Connections tracked at most, unless [`ConnTrack::set_max_flows`] says otherwise.
pub const DEFAULT_MAX_FLOWS: usize = 65_536;
pub const TCP_IDLE: Duration = Duration::from_secs(300);
/// A TCP connection whose SYN never got any answer ends sooner (SYN floods,
/// scans, dead hosts).
pub const TCP_UNREPLIED_IDLE: Duration = Duration::from_secs(60);
pub const UDP_IDLE: Duration = Duration::from_secs(30);
pub const ICMP_IDLE: Duration = Duration::from_secs(10);
/// Protocols other than TCP, UDP and ICMP.
pub const OTHER_IDLE: Duration = Duration::from_secs(30);
/// After FINs in both directions, the last ACKs pass for this long.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Denied attempts with the same key are recorded at most this often.
pub const DENY_WINDOW: Duration = Duration::from_secs(5);
/// Keys of denied attempts remembered at once.
pub const MAX_DENY_KEYS: usize = 1_000;
/// Finished records kept until drained; beyond, they are counted as lost.
pub const MAX_PENDING_RECORDS: usize = 2 * DEFAULT_MAX_FLOWS;
/// Initial capacity of the table (it grows up to the maximum).
/// How long a TCP connection that ended stays known as ended, so that its
/// late segments are dropped rather than adopted as a connection in progress.
pub const TCP_ENDED_MEMORY: Duration = Duration::from_secs(30);
/// The same for a connection the policy revoked: its endpoints keep
/// retransmitting for minutes.
pub const TCP_REVOKED_MEMORY: Duration = Duration::from_secs(300);

const INITIAL_CAPACITY: usize = 1_024;
/// Slots examined per sweep at least (the whole table every few ticks).
const SWEEP_MIN: usize = 1_024;
/// Slots examined to find an expired one when the table is full.
const SWEEP_WHEN_FULL: usize = 256;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Who opened a flow, relative to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowDirection {
    /// Opened towards this node (or a subnet it routes).
    In,
    /// Opened by this node (or its LAN).
    Out,
}

impl FlowDirection {
    pub fn as_str(&self) -> &'static str {
        match self {
            FlowDirection::In => "in",
            FlowDirection::Out => "out",
        }
    }
}

/// A finished flow record, or a (summary of) denied attempt(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowEnd {
    /// First packet.
    pub start: Instant,
    /// Last packet, or when the flow was cut (revoked, shutdown).
    pub end: Instant,
    /// IP protocol number (`trellis_policy::PROTO_*`).
    pub proto: u8,
    /// Initiator.
    pub src: Ipv4Addr,
    /// 0 for protocols without ports.
    pub src_port: u16,
    /// Responder.
    pub dst: Ipv4Addr,
    pub dst_port: u16,
    pub direction: FlowDirection,
    /// Initiator → responder.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Responder → initiator.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// The path to the peer when the flow began.
    pub path: Path,
    /// The decision that opened it (`false` for denied attempts).
    pub allow: bool,
    /// Name of the rule that decided; `None` when the filter's default did.
    pub rule: Option<Arc<str>>,
    /// Attempts this record stands for (denied attempts are aggregated); 1 for flows.
    pub count: u64,
    /// `closed`, `reset`, `idle`, `revoked`, `shutdown` or `denied`.
    pub end_reason: &'static str,
    /// The peer the flow went to or came from.
    pub peer: [u8; 32],
}

/// Counters for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Connections tracked now.
    pub entries: usize,
    pub max_entries: usize,
    /// Packets dropped because the filter denied them.
    pub dropped_by_policy: u64,
    /// Packets dropped because they belong to no connection and cannot open
    /// one (a TCP segment other than SYN, an echo reply).
    pub dropped_untracked: u64,
    /// New connections dropped because the table was full.
    pub dropped_table_full: u64,
    /// Connections ended by a policy change.
    pub revoked: u64,
    /// Denied attempts not recorded because too many keys were tracked.
    pub denies_unrecorded: u64,
    /// Finished records discarded because nobody drained them.
    pub records_lost: u64,
}

/// Which side of the tunnel a packet is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Read from the TUN, about to be encrypted.
    Egress,
    /// Decrypted, about to be written to the TUN.
    Ingress,
}

/// A connection's 5-tuple, the same whichever direction a packet goes: the
/// lower (address, port) endpoint first. ICMP echo uses the identifier as
/// both ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    lo_ip: u32,
    hi_ip: u32,
    lo_port: u16,
    hi_port: u16,
    proto: u8,
}

impl Key {
    #[inline]
    fn new(proto: u8, a: u32, a_port: u16, b: u32, b_port: u16) -> Key {
        if (a, a_port) <= (b, b_port) {
            Key {
                lo_ip: a,
                hi_ip: b,
                lo_port: a_port,
                hi_port: b_port,
                proto,
            }
        } else {
            Key {
                lo_ip: b,
                hi_ip: a,
                lo_port: b_port,
                hi_port: a_port,
                proto,
            }
        }
    }
}

impl Hash for Key {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(((self.lo_ip as u64) << 32) | self.hi_ip as u64);
        state.write_u64(
            ((self.lo_port as u64) << 24) | ((self.hi_port as u64) << 8) | self.proto as u64,
        );
    }
}

/// Two addresses and a protocol, either order: what a non-first fragment matches.
#[derive(Clone, Copy, PartialEq, Eq)]
struct HostPair {
    lo: u32,
    hi: u32,
    proto: u8,
}

impl HostPair {
    fn new(proto: u8, a: u32, b: u32) -> HostPair {
        HostPair {
            lo: a.min(b),
            hi: a.max(b),
            proto,
        }
    }
}

impl Hash for HostPair {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(((self.lo as u64) << 32) | self.hi as u64);
        state.write_u64(self.proto as u64);
    }
}

/// Key of denied attempts: in the packet's orientation.
#[derive(Clone, Copy, PartialEq, Eq)]
struct DenyKey {
    src: u32,
    dst: u32,
    dport: u16,
    proto: u8,
}

impl Hash for DenyKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(((self.src as u64) << 32) | self.dst as u64);
        state.write_u64(((self.dport as u64) << 8) | self.proto as u64);
    }
}

/// What the parser saw in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    TcpSyn,
    /// Any other TCP segment; its flags.
    Tcp(u8),
    Udp,
    IcmpEchoRequest,
    IcmpEchoReply,
    /// An ICMP error and the connection of the header it carries, if readable.
    IcmpError(Option<Key>),
    IcmpOther,
    Fragment,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Parsed {
    src: u32,
    dst: u32,
    proto: u8,
    sport: u16,
    dport: u16,
    kind: Kind,
}

#[inline]
fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

#[inline]
fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// Reads the headers of an IPv4 packet. `None`: too short or inconsistent
/// to be filtered (the caller drops it as malformed).
fn parse(p: &[u8]) -> Option<Parsed> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((p[0] & 0x0f) as usize) * 4;
    if ihl < 20 || p.len() < ihl {
        return None;
    }
    let proto = p[9];
    let src = be32(p, 12);
    let dst = be32(p, 16);
    let mut r = Parsed {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        kind: Kind::Other,
    };
    if be16(p, 6) & 0x1fff != 0 {
        r.kind = Kind::Fragment;
        return Some(r);
    }
    let t = &p[ihl..];
    match proto {
        PROTO_TCP => {
            if t.len() < 14 {
                return None;
            }
            r.sport = be16(t, 0);
            r.dport = be16(t, 2);
            let flags = t[13];
            r.kind = if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN {
                Kind::TcpSyn
            } else {
                Kind::Tcp(flags)
            };
        }
        PROTO_UDP => {
            if t.len() < 8 {
                return None;
            }
            r.sport = be16(t, 0);
            r.dport = be16(t, 2);
            r.kind = Kind::Udp;
        }
        PROTO_ICMP => {
            if t.len() < 8 {
                return None;
            }
            match t[0] {
                ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY => {
                    let id = be16(t, 4);
                    r.sport = id;
                    r.dport = id;
                    r.kind = if t[0] == ICMP_ECHO_REQUEST {
                        Kind::IcmpEchoRequest
                    } else {
                        Kind::IcmpEchoReply
                    };
                }
                ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED => {
                    r.kind = Kind::IcmpError(embedded_key(&t[8..]));
                }
                _ => r.kind = Kind::IcmpOther,
            }
        }
        _ => {}
    }
    Some(r)
}

/// The connection of the packet quoted in an ICMP error.
fn embedded_key(q: &[u8]) -> Option<Key> {
    if q.len() < 20 || q[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((q[0] & 0x0f) as usize) * 4;
    if ihl < 20 || q.len() < ihl + 8 {
        return None;
    }
    let proto = q[9];
    let (src, dst) = (be32(q, 12), be32(q, 16));
    let t = &q[ihl..];
    let (sp, dp) = match proto {
        PROTO_TCP | PROTO_UDP => (be16(t, 0), be16(t, 2)),
        PROTO_ICMP if t[0] == ICMP_ECHO_REQUEST || t[0] == ICMP_ECHO_REPLY => {
            (be16(t, 4), be16(t, 4))
        }
        _ => (0, 0),
    };
    Some(Key::new(proto, src, sp, dst, dp))
}

struct Entry {
    key: Key,
    init_ip: u32,
    init_port: u16,
    resp_ip: u32,
    resp_port: u16,
    proto: u8,
    direction: FlowDirection,
    start: Instant,
    last: Instant,
    packets_out: u64,
    bytes_out: u64,
    packets_in: u64,
    bytes_in: u64,
    path: Path,
    peer: [u8; 32],
    rule: Option<Arc<str>>,
    fin_out: bool,
    fin_in: bool,
    /// When FINs had been seen both ways.
    closing: Option<Instant>,
}

impl Entry {
    fn idle_timeout(&self) -> Duration {
        match self.proto {
            PROTO_TCP if self.packets_in == 0 => TCP_UNREPLIED_IDLE,
            PROTO_TCP => TCP_IDLE,
            PROTO_UDP => UDP_IDLE,
            PROTO_ICMP => ICMP_IDLE,
            _ => OTHER_IDLE,
        }
    }

    /// Why it ends at `now`, if it does.
    fn expired(&self, now: Instant) -> Option<&'static str> {
        if self
            .closing
            .is_some_and(|c| now.saturating_duration_since(c) >= CLOSE_GRACE)
        {
            return Some("closed");
        }
        (now.saturating_duration_since(self.last) >= self.idle_timeout()).then_some("idle")
    }

    /// The port the filter decides on (0 for protocols without ports).
    fn policy_port(&self) -> u16 {
        match self.proto {
            PROTO_TCP | PROTO_UDP => self.resp_port,
            _ => 0,
        }
    }

    fn record(self, end: Instant, end_reason: &'static str) -> FlowEnd {
        let ports = matches!(self.proto, PROTO_TCP | PROTO_UDP);
        FlowEnd {
            start: self.start,
            end,
            proto: self.proto,
            src: Ipv4Addr::from(self.init_ip),
            src_port: if ports { self.init_port } else { 0 },
            dst: Ipv4Addr::from(self.resp_ip),
            dst_port: if ports { self.resp_port } else { 0 },
            direction: self.direction,
            packets_out: self.packets_out,
            bytes_out: self.bytes_out,
            packets_in: self.packets_in,
            bytes_in: self.bytes_in,
            path: self.path,
            allow: true,
            rule: self.rule,
            count: 1,
            end_reason,
            peer: self.peer,
        }
    }
}

/// Denied attempts with one key since the last record of them.
struct DenyAgg {
    /// When the last record for this key was emitted.
    window: Instant,
    pending: u64,
    first: Instant,
    last: Instant,
    src_port: u16,
    direction: FlowDirection,
    path: Path,
    peer: [u8; 32],
    rule: Option<Arc<str>>,
}

/// The connection table, the filter and the records waiting to be drained.
pub(crate) struct ConnTrack {
    filter: Arc<Filter>,
    /// Rule names of the current filter, made once per rule (not per flow).
    rule_names: Vec<Option<Arc<str>>>,
    map: HashMap<Key, u32, FoldBuild>,
    /// The slot of the connection the last packet belonged to: consecutive
    /// packets mostly do, and then the map is not asked (checked against
    /// the slot's key, so a stale hint only costs the map lookup).
    last: u32,
    /// Entries by index; `None` slots are listed in `free`.
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// Connections per host pair and protocol, for non-first fragments.
    pairs: HashMap<HostPair, u32, FoldBuild>,
    cursor: usize,
    max: usize,
    denies: HashMap<DenyKey, DenyAgg, FoldBuild>,
    last_deny_sweep: Option<Instant>,
    pending: Vec<FlowEnd>,
    stats: FlowStats,
    /// TCP connections that ended (closed, reset, revoked), until when they
    /// are remembered. Bounded by `max`.
    ended: HashMap<Key, Instant, FoldBuild>,
    last_ended_sweep: Option<Instant>,
}

impl ConnTrack {
    pub(crate) fn new(seed: u64) -> ConnTrack {
        let build = FoldBuild::new(seed.rotate_left(17) ^ 0x6A09_E667_F3BC_C908);
        ConnTrack {
            filter: Arc::new(Filter::allow_all()),
            rule_names: Vec::new(),
            map: HashMap::with_capacity_and_hasher(INITIAL_CAPACITY, build),
            last: u32::MAX,
            slots: Vec::with_capacity(INITIAL_CAPACITY),
            free: Vec::with_capacity(INITIAL_CAPACITY),
            pairs: HashMap::with_capacity_and_hasher(INITIAL_CAPACITY, build),
            cursor: 0,
            max: DEFAULT_MAX_FLOWS,
            denies: HashMap::with_hasher(build),
            last_deny_sweep: None,
            pending: Vec::with_capacity(256),
            stats: FlowStats::default(),
            ended: HashMap::with_hasher(build),
            last_ended_sweep: None,
        }
    }

    pub(crate) fn filter(&self) -> &Arc<Filter> {
        &self.filter
    }

    /// Replaces the filter and ends, as `revoked`, every connection it denies
    /// (decided as when it opened: initiator → responder, protocol, port).
    pub(crate) fn set_filter(&mut self, now: Instant, filter: Arc<Filter>) {
        self.filter = filter;
        self.rule_names.clear();
        for i in 0..self.slots.len() {
            let Some(e) = &self.slots[i] else { continue };
            let d = self.filter.decide(
                Ipv4Addr::from(e.init_ip),
                Ipv4Addr::from(e.resp_ip),
                e.proto,
                e.policy_port(),
            );
            if !d.allow {
                self.stats.revoked += 1;
                self.end(i as u32, now, "revoked");
            }
        }
    }

    pub(crate) fn set_max_flows(&mut self, max: usize) {
        self.max = max;
    }

    pub(crate) fn stats(&self) -> FlowStats {
        FlowStats {
            entries: self.map.len(),
            max_entries: self.max,
            ..self.stats
        }
    }

    pub(crate) fn drain(&mut self, out: &mut Vec<FlowEnd>) {
        out.append(&mut self.pending);
    }

    /// Ends every connection (`shutdown`) and records pending denied attempts.
    pub(crate) fn close_all(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].is_some() {
                self.end(i as u32, now, "shutdown");
            }
        }
        self.flush_denies(now, true);
    }

    fn rule_name(&mut self, rule: Option<u32>) -> Option<Arc<str>> {
        let i = rule? as usize;
        if self.rule_names.len() <= i {
            self.rule_names.resize(i + 1, None);
        }
        let filter = &self.filter;
        Some(
            self.rule_names[i]
                .get_or_insert_with(|| Arc::from(filter.rule_name(i as u32)))
                .clone(),
        )
    }

    fn push(&mut self, rec: FlowEnd) {
        if self.pending.len() < MAX_PENDING_RECORDS {
            self.pending.push(rec);
        } else {
            self.stats.records_lost += 1;
        }
    }

    /// Removes entry `idx` and records it.
    fn end(&mut self, idx: u32, now: Instant, reason: &'static str) {
        let Some(e) = self.slots[idx as usize].take() else {
            return;
        };
        self.map.remove(&e.key);
        let pair = HostPair::new(e.proto, e.init_ip, e.resp_ip);
        if let Some(n) = self.pairs.get_mut(&pair) {
            *n -= 1;
            if *n == 0 {
                self.pairs.remove(&pair);
            }
        }
        self.free.push(idx);
        if e.proto == PROTO_TCP && matches!(reason, "closed" | "reset" | "revoked") {
            let memory = if reason == "revoked" {
                TCP_REVOKED_MEMORY
            } else {
                TCP_ENDED_MEMORY
            };
            if self.ended.len() < self.max || self.ended.contains_key(&e.key) {
                self.ended.insert(e.key, now + memory);
            }
        }
        let end = match reason {
            "idle" | "closed" => e.last,
            _ => now,
        };
        let rec = e.record(end, reason);
        self.push(rec);
    }

    /// Ends expired connections, examining up to `budget` slots from where
    /// the last sweep stopped. Returns how many ended.
    fn sweep_slots(&mut self, now: Instant, budget: usize) -> usize {
        let n = self.slots.len();
        let mut ended = 0;
        for _ in 0..budget.min(n) {
            self.cursor = (self.cursor + 1) % n;
            let reason = match &self.slots[self.cursor] {
                Some(e) => e.expired(now),
                None => None,
            };
            if let Some(reason) = reason {
                self.end(self.cursor as u32, now, reason);
                ended += 1;
            }
        }
        ended
    }

    /// Timers: an incremental pass over the table (the whole of it every
    /// few calls) and the records of denied attempts.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let budget = SWEEP_MIN.max(self.slots.len() / 8);
        self.sweep_slots(now, budget);
        if self
            .last_deny_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_millis(500))
        {
            self.last_deny_sweep = Some(now);
            self.flush_denies(now, false);
        }
        if self
            .last_ended_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.last_ended_sweep = Some(now);
            self.ended.retain(|_, until| *until > now);
        }
    }

    /// Records the denied attempts whose window passed (all of them when
    /// `all`), and forgets keys that stayed quiet for a window.
    fn flush_denies(&mut self, now: Instant, all: bool) {
        let mut out = std::mem::take(&mut self.pending);
        let mut lost = 0;
        self.denies.retain(|k, a| {
            if !all && now.saturating_duration_since(a.window) < DENY_WINDOW {
                return true;
            }
            if a.pending == 0 {
                return false;
            }
            let rec = FlowEnd {
                start: a.first,
                end: a.last,
                proto: k.proto,
                src: Ipv4Addr::from(k.src),
                src_port: a.src_port,
                dst: Ipv4Addr::from(k.dst),
                dst_port: k.dport,
                direction: a.direction,
                packets_out: 0,
                bytes_out: 0,
                packets_in: 0,
                bytes_in: 0,
                path: a.path,
                allow: false,
                rule: a.rule.clone(),
                count: a.pending,
                end_reason: "denied",
                peer: a.peer,
            };
            if out.len() < MAX_PENDING_RECORDS {
                out.push(rec);
            } else {
                lost += 1;
            }
            a.pending = 0;
            a.window = now;
            !all
        });
        self.pending = out;
        self.stats.records_lost += lost;
    }

    #[allow(clippy::too_many_arguments)]
    fn deny(
        &mut self,
        now: Instant,
        p: &Parsed,
        dport: u16,
        rule: Option<u32>,
        side: Side,
        peer: &[u8; 32],
        path: Path,
    ) -> DropReason {
        self.stats.dropped_by_policy += 1;
        let key = DenyKey {
            src: p.src,
            dst: p.dst,
            dport,
            proto: p.proto,
        };
        let sport = if matches!(p.proto, PROTO_TCP | PROTO_UDP) {
            p.sport
        } else {
            0
        };
        if let Some(a) = self.denies.get_mut(&key) {
            if a.pending == 0 {
                a.first = now;
            }
            a.pending += 1;
            a.last = now;
            a.src_port = sport;
            return DropReason::Denied;
        }
        if self.denies.len() >= MAX_DENY_KEYS {
            self.stats.denies_unrecorded += 1;
            return DropReason::Denied;
        }
        let direction = match side {
            Side::Egress => FlowDirection::Out,
            Side::Ingress => FlowDirection::In,
        };
        let rule = self.rule_name(rule);
        // The first attempt is recorded at once; later ones wait for the window.
        self.push(FlowEnd {
            start: now,
            end: now,
            proto: p.proto,
            src: Ipv4Addr::from(p.src),
            src_port: sport,
            dst: Ipv4Addr::from(p.dst),
            dst_port: dport,
            direction,
            packets_out: 0,
            bytes_out: 0,
            packets_in: 0,
            bytes_in: 0,
            path,
            allow: false,
            rule: rule.clone(),
            count: 1,
            end_reason: "denied",
            peer: *peer,
        });
        self.denies.insert(
            key,
            DenyAgg {
                window: now,
                pending: 0,
                first: now,
                last: now,
                src_port: sport,
                direction,
                path,
                peer: *peer,
                rule,
            },
        );
        DropReason::Denied
    }

    /// Decides a packet that opens no connection (a fragment, an ICMP error):
    /// pass or drop, nothing tracked.
    fn decide_stateless(
        &mut self,
        now: Instant,
        p: &Parsed,
        side: Side,
        peer: &[u8; 32],
        path: Path,
    ) -> Result<(), DropReason> {
        let d = self
            .filter
            .decide(Ipv4Addr::from(p.src), Ipv4Addr::from(p.dst), p.proto, 0);
        if d.allow {
            Ok(())
        } else {
            Err(self.deny(now, p, 0, d.rule, side, peer, path))
        }
    }

    /// Checks one IPv4 packet going through the tunnel (`side`), to or from
    /// `peer` whose path is `path`. `Ok`: let it through.
    pub(crate) fn check(
        &mut self,
        now: Instant,
        packet: &[u8],
        side: Side,
        peer: &[u8; 32],
        path: Path,
    ) -> Result<(), DropReason> {
        let Some(p) = parse(packet) else {
            return Err(DropReason::Malformed);
        };
        match p.kind {
            Kind::Fragment => {
                if self
                    .pairs
                    .contains_key(&HostPair::new(p.proto, p.src, p.dst))
                {
                    return Ok(());
                }
                return self.decide_stateless(now, &p, side, peer, path);
            }
            Kind::IcmpError(inner) => {
                if inner.is_some_and(|k| self.map.contains_key(&k)) {
                    return Ok(());
                }
                return self.decide_stateless(now, &p, side, peer, path);
            }
            _ => {}
        }
        let key = Key::new(p.proto, p.src, p.sport, p.dst, p.dport);
        let bytes = packet.len() as u64;
        let hinted = self
            .slots
            .get(self.last as usize)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.key == key);
        let found = if hinted {
            Some(self.last)
        } else {
            self.map.get(&key).copied()
        };
        if let Some(idx) = found {
            self.last = idx;
            let e = self.slots[idx as usize]
                .as_mut()
                .expect("the map points at live slots");
            if p.kind == Kind::TcpSyn && (e.fin_out || e.fin_in) {
                // The ports are reused for a new connection: the old one is over.
                self.end(idx, now, "closed");
            } else {
                let forward = p.src == e.init_ip && p.sport == e.init_port;
                if forward {
                    e.packets_out += 1;
                    e.bytes_out += bytes;
                } else {
                    e.packets_in += 1;
                    e.bytes_in += bytes;
                }
                e.last = now;
                if let Kind::Tcp(flags) = p.kind {
                    if flags & TCP_RST != 0 {
                        self.end(idx, now, "reset");
                    } else if flags & TCP_FIN != 0 {
                        if forward {
                            e.fin_out = true;
                        } else {
                            e.fin_in = true;
                        }
                        if e.fin_out && e.fin_in && e.closing.is_none() {
                            e.closing = Some(now);
                        }
                    }
                }
                return Ok(());
            }
        }
        // No connection: may this packet open one?
        if let Kind::Tcp(flags) = p.kind {
            return self.adopt(now, &p, key, flags, bytes, side, peer, path);
        }
        if p.kind == Kind::IcmpEchoReply {
            self.stats.dropped_untracked += 1;
            return Err(DropReason::NoConnection);
        }
        let dport = match p.proto {
            PROTO_TCP | PROTO_UDP => p.dport,
            _ => 0,
        };
        let d = self
            .filter
            .decide(Ipv4Addr::from(p.src), Ipv4Addr::from(p.dst), p.proto, dport);
        if !d.allow {
            return Err(self.deny(now, &p, dport, d.rule, side, peer, path));
        }
        if let Kind::TcpSyn = p.kind {
            // A new connection on ports an ended one used.
            self.ended.remove(&key);
        }
        let rule = self.rule_name(d.rule);
        self.open(
            now,
            key,
            (p.src, p.sport),
            (p.dst, p.dport),
            p.proto,
            true,
            bytes,
            side,
            peer,
            path,
            rule,
        )
    }

    /// A TCP segment of a connection this table does not know: one that was
    /// open before the node (re)started. Adopted when the policy allows it
    /// one way or the other, so that restarting the agent does not break the
    /// connections running through it; dropped when it belongs to a
    /// connection that ended here (closed, reset, or revoked by a policy
    /// change — revocation must stay a cut), or is a reset.
    #[allow(clippy::too_many_arguments)]
    fn adopt(
        &mut self,
        now: Instant,
        p: &Parsed,
        key: Key,
        flags: u8,
        bytes: u64,
        side: Side,
        peer: &[u8; 32],
        path: Path,
    ) -> Result<(), DropReason> {
        let remembered = self.ended.get(&key).is_some_and(|until| *until > now);
        if flags & TCP_RST != 0 || remembered {
            self.stats.dropped_untracked += 1;
            return Err(DropReason::NoConnection);
        }
        let (src, dst) = (Ipv4Addr::from(p.src), Ipv4Addr::from(p.dst));
        let d = self.filter.decide(src, dst, PROTO_TCP, p.dport);
        let (forward, d) = if d.allow {
            (true, d)
        } else {
            (false, self.filter.decide(dst, src, PROTO_TCP, p.sport))
        };
        if !d.allow {
            self.stats.dropped_untracked += 1;
            return Err(DropReason::NoConnection);
        }
        let rule = self.rule_name(d.rule);
        let (init, resp) = if forward {
            ((p.src, p.sport), (p.dst, p.dport))
        } else {
            ((p.dst, p.dport), (p.src, p.sport))
        };
        // Who opened it is unknown; the side that may open it is taken as
        // the initiator.
        let opener_side = if forward {
            side
        } else {
            match side {
                Side::Egress => Side::Ingress,
                Side::Ingress => Side::Egress,
            }
        };
        self.open(
            now,
            key,
            init,
            resp,
            PROTO_TCP,
            forward,
            bytes,
            opener_side,
            peer,
            path,
            rule,
        )
    }

    /// Adds a connection whose first packet (`bytes`, from the initiator
    /// when `forward`) is being let through.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        now: Instant,
        key: Key,
        init: (u32, u16),
        resp: (u32, u16),
        proto: u8,
        forward: bool,
        bytes: u64,
        opener_side: Side,
        peer: &[u8; 32],
        path: Path,
        rule: Option<Arc<str>>,
    ) -> Result<(), DropReason> {
        if self.map.len() >= self.max && self.sweep_slots(now, SWEEP_WHEN_FULL) == 0 {
            self.stats.dropped_table_full += 1;
            return Err(DropReason::TableFull);
        }
        let (out, inn) = if forward { (1, 0) } else { (0, 1) };
        let entry = Entry {
            key,
            init_ip: init.0,
            init_port: init.1,
            resp_ip: resp.0,
            resp_port: resp.1,
            proto,
            direction: match opener_side {
                Side::Egress => FlowDirection::Out,
                Side::Ingress => FlowDirection::In,
            },
            start: now,
            last: now,
            packets_out: out,
            bytes_out: out * bytes,
            packets_in: inn,
            bytes_in: inn * bytes,
            path,
            peer: *peer,
            rule,
            fin_out: false,
            fin_in: false,
            closing: None,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.map.insert(key, idx);
        self.last = idx;
        *self
            .pairs
            .entry(HostPair::new(proto, init.0, resp.0))
            .or_insert(0) += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
