//! The relay hub: forwards opaque frames between nodes of the same account
//! that cannot reach each other directly.
//!
//! Nodes register over UDP (`FRAME_REGISTER` with a relay token, repeated every
//! few seconds) or attach over a WebSocket (authenticated by the control
//! plane). A `FRAME_RELAY_SEND [destination][payload]` from a registered node
//! goes out as `FRAME_RELAY_RECV [source][payload]` to the destination's UDP
//! address while its UDP registration is fresh, else over its WebSocket, else
//! nowhere. Nothing ever crosses accounts, and the payload is never looked at.
//!
//! The hub is pure logic behind one mutex: the time is passed in, the UDP
//! socket belongs to [`crate::EdgeUdp`], and WebSocket clients get a bounded
//! channel each. Nothing here blocks: a full channel drops the frame.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use trellis_proto::frames::{
    encode_registered, FRAME_REFUSED, FRAME_REGISTER, FRAME_RELAY_RECV, FRAME_RELAY_SEND,
    REGISTRATION_TTL_SECS, RELAY_HEADER,
};

use crate::stun;
use crate::token::{self, TokenError};

/// A node's WireGuard public key, raw.
pub type Key = [u8; 32];

/// Frames queued for one WebSocket client before further ones are dropped.
pub const WS_QUEUE: usize = 1024;
/// Datagrams from WebSocket clients queued for the UDP socket before further ones are dropped.
pub const UDP_OUTBOX: usize = 4096;

/// The queue of `(destination, datagram)` the UDP loop sends for WebSocket clients.
pub type UdpOutbox = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

const TTL: Duration = Duration::from_secs(REGISTRATION_TTL_SECS);

/// Reasons sent in `FRAME_REFUSED`.
pub const REFUSED_MALFORMED: &str = "malformed relay token";
pub const REFUSED_BAD_MAC: &str = "relay token not issued by this server";
pub const REFUSED_EXPIRED: &str = "relay token expired; get a fresh one from the control plane";
pub const REFUSED_REVOKED: &str = "this node was removed from the network";

/// What the hub did with one incoming frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the bytes the hub wrote into `out` to this address over UDP
    /// (a STUN answer, `REGISTERED`, `REFUSED`, or a `RELAY_RECV` to a UDP destination).
    Send(SocketAddr),
    /// The frame was queued: on the destination's WebSocket, or (from a
    /// WebSocket client to a UDP destination) for the edge's UDP socket.
    Queued,
    /// The frame was dropped.
    Dropped(DropReason),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short, or not a frame the edge accepts.
    Malformed,
    /// The sender is not registered (or its registration went stale).
    Unregistered,
    /// The destination is not registered.
    UnknownDestination,
    /// The destination belongs to another account.
    CrossAccount,
    /// The destination has neither a fresh UDP registration nor a WebSocket.
    NoPath,
    /// The destination's queue is full.
    QueueFull,
    /// The account's policy lets neither node reach the other.
    Policy,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Unregistered => "unregistered_sender",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::CrossAccount => "cross_account",
            DropReason::NoPath => "no_path",
            DropReason::QueueFull => "queue_full",
            DropReason::Policy => "policy",
        }
    }
}

/// A revoked key tried to attach a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this node was removed from the network and may not use the relay")]
pub struct Revoked;

/// Counters since the hub started (for flow logs and diagnostics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Frames forwarded (to UDP or WebSocket destinations).
    pub relayed_packets: u64,
    /// Payload bytes forwarded.
    pub relayed_bytes: u64,
    /// Of those frames, how many went out over UDP.
    pub relayed_to_udp: u64,
    /// Of those frames, how many went out over a WebSocket.
    pub relayed_to_ws: u64,
    pub stun_answers: u64,
    pub registrations: u64,
    pub refusals: u64,
    pub dropped_malformed: u64,
    pub dropped_unregistered: u64,
    pub dropped_unknown_destination: u64,
    pub dropped_cross_account: u64,
    pub dropped_no_path: u64,
    pub dropped_queue_full: u64,
    /// Frames between two nodes the account's policy keeps apart.
    pub dropped_policy: u64,
}

#[derive(Default)]
struct Counters {
    relayed_packets: AtomicU64,
    relayed_bytes: AtomicU64,
    relayed_to_udp: AtomicU64,
    relayed_to_ws: AtomicU64,
    stun_answers: AtomicU64,
    registrations: AtomicU64,
    refusals: AtomicU64,
    dropped: [AtomicU64; 7],
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn drop_index(r: DropReason) -> usize {
    match r {
        DropReason::Malformed => 0,
        DropReason::Unregistered => 1,
        DropReason::UnknownDestination => 2,
        DropReason::CrossAccount => 3,
        DropReason::NoPath => 4,
        DropReason::QueueFull => 5,
        DropReason::Policy => 6,
    }
}

struct UdpReg {
    addr: SocketAddr,
    refreshed: Instant,
}

struct WsReg {
    conn_id: u64,
    tx: mpsc::Sender<Vec<u8>>,
}

struct Registration {
    account_id: i64,
    udp: Option<UdpReg>,
    ws: Option<WsReg>,
}

impl Registration {
    fn fresh_udp(&self, now: Instant) -> Option<SocketAddr> {
        self.udp
            .as_ref()
            .filter(|u| now.saturating_duration_since(u.refreshed) < TTL)
            .map(|u| u.addr)
    }
}

#[derive(Default)]
struct Inner {
    regs: HashMap<Key, Registration>,
    by_addr: HashMap<SocketAddr, Key>,
    revoked: HashSet<Key>,
    /// Per account, the ordered pairs (src, dst) its policy keeps apart.
    blocked: HashMap<i64, HashSet<(Key, Key)>>,
}

impl Inner {
    /// Forgets the UDP registration of `key`, and the whole entry if nothing is left.
    fn clear_udp(&mut self, key: &Key) {
        let Some(reg) = self.regs.get_mut(key) else {
            return;
        };
        if let Some(u) = reg.udp.take() {
            if self.by_addr.get(&u.addr) == Some(key) {
                self.by_addr.remove(&u.addr);
            }
        }
        if reg.ws.is_none() {
            self.regs.remove(key);
        }
    }

    /// The entry of `key` for `account_id`, created if missing. An entry of
    /// another account (impossible while keys are unique) is started afresh.
    fn entry(&mut self, key: Key, account_id: i64) -> &mut Registration {
        if self
            .regs
            .get(&key)
            .is_some_and(|r| r.account_id != account_id)
        {
            if let Some(old) = self.regs.remove(&key) {
                if let Some(u) = old.udp {
                    self.by_addr.remove(&u.addr);
                }
            }
        }
        self.regs.entry(key).or_insert_with(|| Registration {
            account_id,
            udp: None,
            ws: None,
        })
    }

    fn register_udp(&mut self, key: Key, account_id: i64, from: SocketAddr, now: Instant) {
        // Another node registered from this address before (a NAT reused the
        // mapping): that registration is no longer reachable there.
        if let Some(prev) = self.by_addr.get(&from).copied() {
            if prev != key {
                self.clear_udp(&prev);
            }
        }
        let reg = self.entry(key, account_id);
        let old = reg.udp.replace(UdpReg {
            addr: from,
            refreshed: now,
        });
        if let Some(old) = old {
            if old.addr != from {
                tracing::debug!(old = %old.addr, new = %from, "relay registration moved");
                self.by_addr.remove(&old.addr);
            }
        }
        self.by_addr.insert(from, key);
    }

    /// Where a frame from `src` of `account_id` to `dst` goes.
    fn route(
        &self,
        now: Instant,
        account_id: i64,
        src: &Key,
        dst: &Key,
    ) -> Result<Route, DropReason> {
        let reg = self.regs.get(dst).ok_or(DropReason::UnknownDestination)?;
        if reg.account_id != account_id {
            return Err(DropReason::CrossAccount);
        }
        if self
            .blocked
            .get(&account_id)
            .is_some_and(|b| b.contains(&(*src, *dst)))
        {
            return Err(DropReason::Policy);
        }
        if let Some(addr) = reg.fresh_udp(now) {
            return Ok(Route::Udp(addr));
        }
        match &reg.ws {
            Some(ws) => Ok(Route::Ws(ws.tx.clone(), ws.conn_id)),
            None => Err(DropReason::NoPath),
        }
    }
}

enum Route {
    Udp(SocketAddr),
    Ws(mpsc::Sender<Vec<u8>>, u64),
}

/// Writes `[RELAY_RECV][src][payload]` into `out`.
fn write_recv(out: &mut Vec<u8>, src: &Key, payload: &[u8]) {
    out.clear();
    out.reserve(RELAY_HEADER + payload.len());
    out.push(FRAME_RELAY_RECV);
    out.extend_from_slice(src);
    out.extend_from_slice(payload);
}

fn refusal_reason(e: TokenError) -> &'static str {
    match e {
        TokenError::Malformed => REFUSED_MALFORMED,
        TokenError::BadMac => REFUSED_BAD_MAC,
        TokenError::Expired => REFUSED_EXPIRED,
    }
}

/// Registrations, revocations and forwarding of the relay. Share it in an `Arc`.
pub struct RelayHub {
    secret: [u8; 32],
    epoch: Instant,
    epoch_unix: i64,
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    outbox_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    outbox_rx: Mutex<Option<UdpOutbox>>,
    counters: Counters,
}

impl RelayHub {
    /// A hub checking relay tokens signed with `secret`, reading the wall
    /// clock once now: later times are derived from the `Instant`s passed in.
    pub fn new(secret: [u8; 32]) -> RelayHub {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        RelayHub::with_clock(secret, Instant::now(), unix)
    }

    /// A hub for which the instant `epoch` is the unix time `epoch_unix` (tests).
    pub fn with_clock(secret: [u8; 32], epoch: Instant, epoch_unix: i64) -> RelayHub {
        let (outbox_tx, outbox_rx) = mpsc::channel(UDP_OUTBOX);
        RelayHub {
            secret,
            epoch,
            epoch_unix,
            inner: Mutex::new(Inner::default()),
            next_conn: AtomicU64::new(1),
            outbox_tx,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps stay consistent between statements; keep going after a panic elsewhere.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unix seconds at `now`.
    pub fn unix_at(&self, now: Instant) -> i64 {
        match now.checked_duration_since(self.epoch) {
            Some(d) => self
                .epoch_unix
                .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            None => {
                let back = self.epoch.saturating_duration_since(now).as_secs();
                self.epoch_unix
                    .saturating_sub(i64::try_from(back).unwrap_or(i64::MAX))
            }
        }
    }

    /// A relay token for `key` of `account_id`, valid until `expires_at` (unix seconds).
    pub fn issue_token(&self, account_id: i64, key: &Key, expires_at: i64) -> String {
        token::sign(&self.secret, account_id, key, expires_at)
    }

    /// The queue of datagrams that WebSocket clients send to UDP destinations;
    /// taken once, by the UDP loop that drives this hub.
    pub fn take_udp_outbox(&self) -> Option<UdpOutbox> {
        self.outbox_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn dropped(&self, reason: DropReason) -> Outcome {
        bump(&self.counters.dropped[drop_index(reason)]);
        Outcome::Dropped(reason)
    }

    fn relayed(&self, payload_len: usize, to_udp: bool) {
        bump(&self.counters.relayed_packets);
        self.counters
            .relayed_bytes
            .fetch_add(payload_len as u64, Ordering::Relaxed);
        bump(if to_udp {
            &self.counters.relayed_to_udp
        } else {
            &self.counters.relayed_to_ws
        });
    }

    /// Handles one datagram that arrived on the edge's UDP port from `from`.
    /// `out` is overwritten with the datagram to send when the outcome is
    /// [`Outcome::Send`]; reuse it between calls to avoid allocating.
    pub fn handle_udp(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        match datagram.first() {
            Some(0x00) | Some(0x01) => {
                out.resize(64, 0);
                match stun::respond(datagram, from, out) {
                    Some(n) => {
                        out.truncate(n);
                        bump(&self.counters.stun_answers);
                        Outcome::Send(from)
                    }
                    None => {
                        out.clear();
                        self.dropped(DropReason::Malformed)
                    }
                }
            }
            Some(&FRAME_REGISTER) => self.register(now, from, &datagram[1..], out),
            Some(&FRAME_RELAY_SEND) => self.relay_from_udp(now, from, datagram, out),
            _ => {
                tracing::trace!(%from, "edge dropped a datagram it does not handle");
                self.dropped(DropReason::Malformed)
            }
        }
    }

    fn refuse(&self, from: SocketAddr, reason: &str, out: &mut Vec<u8>) -> Outcome {
        tracing::debug!(%from, reason, "relay registration refused");
        bump(&self.counters.refusals);
        out.clear();
        out.push(FRAME_REFUSED);
        out.extend_from_slice(reason.as_bytes());
        Outcome::Send(from)
    }

    fn register(
        &self,
        now: Instant,
        from: SocketAddr,
        token_bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        let checked = std::str::from_utf8(token_bytes)
            .map_err(|_| TokenError::Malformed)
            .and_then(|t| token::verify(&self.secret, t, self.unix_at(now)));
        let (account_id, key) = match checked {
            Ok(x) => x,
            Err(e) => return self.refuse(from, refusal_reason(e), out),
        };
        {
            let mut inner = self.lock();
            if inner.revoked.contains(&key) {
                drop(inner);
                return self.refuse(from, REFUSED_REVOKED, out);
            }
            inner.register_udp(key, account_id, from, now);
        }
        bump(&self.counters.registrations);
        out.resize(20, 0);
        let n = encode_registered(from, out);
        out.truncate(n);
        Outcome::Send(from)
    }

    fn relay_from_udp(
        &self,
        now: Instant,
        from: SocketAddr,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        let Some((dst, payload)) = split_send(frame) else {
            return self.dropped(DropReason::Malformed);
        };
        let (src, route) = {
            let inner = self.lock();
            let Some(src) = inner.by_addr.get(&from).copied() else {
                return self.dropped(DropReason::Unregistered);
            };
            let Some(reg) = inner.regs.get(&src) else {
                return self.dropped(DropReason::Unregistered);
            };
            if reg.fresh_udp(now) != Some(from) {
                return self.dropped(DropReason::Unregistered);
            }
            (src, inner.route(now, reg.account_id, &src, &dst))
        };
        match route {
            Err(reason) => self.dropped(reason),
            Ok(Route::Udp(to)) => {
                write_recv(out, &src, payload);
                self.relayed(payload.len(), true);
                Outcome::Send(to)
            }
            Ok(Route::Ws(tx, conn_id)) => self.to_ws(&dst, tx, conn_id, &src, payload),
        }
    }

    fn to_ws(
        &self,
        dst: &Key,
        tx: mpsc::Sender<Vec<u8>>,
        conn_id: u64,
        src: &Key,
        payload: &[u8],
    ) -> Outcome {
        let mut frame = Vec::new();
        write_recv(&mut frame, src, payload);
        // Counted before the frame is handed over: once queued, its receiver
        // may deliver it before this thread runs again.
        self.relayed(payload.len(), false);
        match tx.try_send(frame) {
            Ok(()) => Outcome::Queued,
            Err(e) => {
                self.unrelayed(payload.len(), false);
                self.ws_send_failed(dst, conn_id, e)
            }
        }
    }

    /// Takes back a [`RelayHub::relayed`] count whose frame could not be queued.
    fn unrelayed(&self, payload_len: usize, to_udp: bool) {
        let c = &self.counters;
        c.relayed_packets.fetch_sub(1, Ordering::Relaxed);
        c.relayed_bytes
            .fetch_sub(payload_len as u64, Ordering::Relaxed);
        if to_udp {
            c.relayed_to_udp.fetch_sub(1, Ordering::Relaxed);
        } else {
            c.relayed_to_ws.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn ws_send_failed(
        &self,
        dst: &Key,
        conn_id: u64,
        e: mpsc::error::TrySendError<Vec<u8>>,
    ) -> Outcome {
        match e {
            mpsc::error::TrySendError::Full(_) => self.dropped(DropReason::QueueFull),
            mpsc::error::TrySendError::Closed(_) => {
                // Its WebSocket task is gone without detaching yet.
                self.detach_ws(dst, conn_id);
                self.dropped(DropReason::NoPath)
            }
        }
    }

    /// Attaches a WebSocket client of `key` in `account_id` (authenticated by
    /// the caller). Frames for it arrive on the returned receiver, which ends
    /// when a newer attachment of the same key replaces this one or the key is
    /// revoked. Returns the connection id for [`RelayHub::detach_ws`].
    pub fn attach_ws(
        &self,
        account_id: i64,
        key: &Key,
    ) -> Result<(u64, mpsc::Receiver<Vec<u8>>), Revoked> {
        let mut inner = self.lock();
        if inner.revoked.contains(key) {
            return Err(Revoked);
        }
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(WS_QUEUE);
        // Replacing the old sender ends the older connection's receiver.
        inner.entry(*key, account_id).ws = Some(WsReg { conn_id, tx });
        Ok((conn_id, rx))
    }

    /// Detaches WebSocket connection `conn_id` of `key`, unless a newer one replaced it.
    pub fn detach_ws(&self, key: &Key, conn_id: u64) {
        let mut inner = self.lock();
        let Some(reg) = inner.regs.get_mut(key) else {
            return;
        };
        if reg.ws.as_ref().map(|w| w.conn_id) != Some(conn_id) {
            return;
        }
        reg.ws = None;
        if reg.udp.is_none() {
            inner.regs.remove(key);
        }
    }

    /// Handles one binary message from the WebSocket client of `from_key`.
    pub fn handle_ws_frame(&self, now: Instant, from_key: &Key, frame: &[u8]) -> Outcome {
        let Some((dst, payload)) = split_send(frame) else {
            return self.dropped(DropReason::Malformed);
        };
        let route = {
            let inner = self.lock();
            match inner.regs.get(from_key) {
                Some(reg) if reg.ws.is_some() => inner.route(now, reg.account_id, from_key, &dst),
                _ => return self.dropped(DropReason::Unregistered),
            }
        };
        match route {
            Err(reason) => self.dropped(reason),
            Ok(Route::Udp(to)) => {
                let mut datagram = Vec::new();
                write_recv(&mut datagram, from_key, payload);
                // Counted first: the UDP loop may send it at once.
                self.relayed(payload.len(), true);
                match self.outbox_tx.try_send((to, datagram)) {
                    Ok(()) => Outcome::Queued,
                    Err(e) => {
                        self.unrelayed(payload.len(), true);
                        match e {
                            mpsc::error::TrySendError::Full(_) => {
                                self.dropped(DropReason::QueueFull)
                            }
                            // No UDP loop drives this hub.
                            mpsc::error::TrySendError::Closed(_) => {
                                self.dropped(DropReason::NoPath)
                            }
                        }
                    }
                }
            }
            Ok(Route::Ws(tx, conn_id)) => self.to_ws(&dst, tx, conn_id, from_key, payload),
        }
    }

    /// Forgets `key` at once (closing its WebSocket) and refuses it from now on.
    pub fn revoke(&self, key: &Key) {
        let mut inner = self.lock();
        inner.revoked.insert(*key);
        if let Some(reg) = inner.regs.remove(key) {
            if let Some(u) = reg.udp {
                if inner.by_addr.get(&u.addr) == Some(key) {
                    inner.by_addr.remove(&u.addr);
                }
            }
            // Dropping `reg` drops the WebSocket's sender: its receiver ends.
        }
    }

    pub fn is_revoked(&self, key: &Key) -> bool {
        self.lock().revoked.contains(key)
    }

    /// Drops UDP registrations not refreshed within `REGISTRATION_TTL_SECS`;
    /// returns how many. Call it about once a second.
    pub fn expire(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let stale: Vec<Key> = inner
            .regs
            .iter()
            .filter(|(_, r)| r.udp.is_some() && r.fresh_udp(now).is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in &stale {
            inner.clear_udp(key);
        }
        if !stale.is_empty() {
            tracing::debug!(count = stale.len(), "relay registrations expired");
        }
        stale.len()
    }

    /// The UDP address `key` is registered from, fresh or not yet expired.
    pub fn udp_registration(&self, key: &Key) -> Option<SocketAddr> {
        self.lock()
            .regs
            .get(key)
            .and_then(|r| r.udp.as_ref().map(|u| u.addr))
    }

    /// Replaces the pairs of `account_id` that the relay must keep apart:
    /// frames from the first key of a pair to the second are dropped. The
    /// control plane sets them from the account's policy (pairs of nodes
    /// neither of which may reach the other on any port); the nodes enforce
    /// the finer rules themselves, since the relay only sees ciphertext.
    pub fn set_blocked_pairs(&self, account_id: i64, pairs: HashSet<(Key, Key)>) {
        let mut inner = self.lock();
        if pairs.is_empty() {
            inner.blocked.remove(&account_id);
        } else {
            inner.blocked.insert(account_id, pairs);
        }
    }

    /// Whether `key` has a WebSocket attached.
    pub fn has_ws(&self, key: &Key) -> bool {
        self.lock().regs.get(key).is_some_and(|r| r.ws.is_some())
    }

    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let d = |r: DropReason| get(&c.dropped[drop_index(r)]);
        RelayStats {
            relayed_packets: get(&c.relayed_packets),
            relayed_bytes: get(&c.relayed_bytes),
            relayed_to_udp: get(&c.relayed_to_udp),
            relayed_to_ws: get(&c.relayed_to_ws),
            stun_answers: get(&c.stun_answers),
            registrations: get(&c.registrations),
            refusals: get(&c.refusals),
            dropped_malformed: d(DropReason::Malformed),
            dropped_unregistered: d(DropReason::Unregistered),
            dropped_unknown_destination: d(DropReason::UnknownDestination),
            dropped_cross_account: d(DropReason::CrossAccount),
            dropped_no_path: d(DropReason::NoPath),
            dropped_queue_full: d(DropReason::QueueFull),
            dropped_policy: d(DropReason::Policy),
        }
    }
}

/// Destination key and payload of a `RELAY_SEND` frame.
fn split_send(frame: &[u8]) -> Option<(Key, &[u8])> {
    if frame.first() != Some(&FRAME_RELAY_SEND) || frame.len() < RELAY_HEADER {
        return None;
    }
    let dst: Key = frame[1..RELAY_HEADER].try_into().ok()?;
    Some((dst, &frame[RELAY_HEADER..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::frames::{decode_registered, FRAME_REGISTERED};

    const SECRET: [u8; 32] = [5; 32];
    const T0: i64 = 1_700_000_000;
    const A: Key = [1; 32];
    const B: Key = [2; 32];
    const C: Key = [3; 32];

    fn hub() -> (RelayHub, Instant) {
        let now = Instant::now();
        (RelayHub::with_clock(SECRET, now, T0), now)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn register_frame(token: &str) -> Vec<u8> {
        let mut f = vec![FRAME_REGISTER];
        f.extend_from_slice(token.as_bytes());
        f
    }

    fn send_frame(dst: &Key, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![FRAME_RELAY_SEND];
        f.extend_from_slice(dst);
        f.extend_from_slice(payload);
        f
    }

    fn recv_frame(src: &Key, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![FRAME_RELAY_RECV];
        f.extend_from_slice(src);
        f.extend_from_slice(payload);
        f
    }

    /// Registers `key` of `account` from `from`, asserting success.
    fn register(hub: &RelayHub, now: Instant, account: i64, key: &Key, from: &str) {
        let token = hub.issue_token(account, key, T0 + 3600);
        let mut out = Vec::new();
        let got = hub.handle_udp(now, addr(from), &register_frame(&token), &mut out);
        assert_eq!(got, Outcome::Send(addr(from)));
        assert_eq!(out[0], FRAME_REGISTERED);
        assert_eq!(decode_registered(&out), Some(addr(from)));
    }

    fn refused(hub: &RelayHub, now: Instant, frame: &[u8]) -> String {
        let mut out = Vec::new();
        let from = addr("198.18.0.50:1000");
        assert_eq!(
            hub.handle_udp(now, from, frame, &mut out),
            Outcome::Send(from)
        );
        assert_eq!(out[0], FRAME_REFUSED);
        String::from_utf8(out[1..].to_vec()).unwrap()
    }

    #[test]
    fn register_answers_with_the_observed_address() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "[fd00::2]:5");
        assert_eq!(hub.udp_registration(&A), Some(addr("198.18.0.1:4000")));
        assert_eq!(hub.stats().registrations, 2);
    }

    #[test]
    fn refuses_bad_expired_and_malformed_tokens() {
        let (hub, now) = hub();
        let expired = hub.issue_token(1, &A, T0 - 1);
        assert_eq!(
            refused(&hub, now, &register_frame(&expired)),
            REFUSED_EXPIRED
        );
        // Valid now, expired an hour later.
        let short = hub.issue_token(1, &A, T0 + 60);
        let mut out = Vec::new();
        let later = now + Duration::from_secs(3600);
        hub.handle_udp(
            later,
            addr("198.18.0.1:1"),
            &register_frame(&short),
            &mut out,
        );
        assert_eq!(out[0], FRAME_REFUSED);
        let forged = token::sign(&[6; 32], 1, &A, T0 + 60);
        assert_eq!(
            refused(&hub, now, &register_frame(&forged)),
            REFUSED_BAD_MAC
        );
        assert_eq!(
            refused(&hub, now, &register_frame("v1.garbage")),
            REFUSED_MALFORMED
        );
        assert_eq!(
            refused(&hub, now, &[FRAME_REGISTER, 0xff, 0xfe]),
            REFUSED_MALFORMED
        );
        assert_eq!(hub.udp_registration(&A), None);
        assert_eq!(hub.stats().refusals, 5);
        assert_eq!(hub.stats().registrations, 0);
    }

    #[test]
    fn forwards_within_an_account_opaquely() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let mut out = Vec::new();
        let payload = [4u8, 0, 0, 0, 9, 9, 9];
        let got = hub.handle_udp(
            now,
            addr("198.18.0.1:4000"),
            &send_frame(&B, &payload),
            &mut out,
        );
        assert_eq!(got, Outcome::Send(addr("198.18.0.2:4000")));
        assert_eq!(out, recv_frame(&A, &payload));
        // And back, with an empty payload too.
        let got = hub.handle_udp(now, addr("198.18.0.2:4000"), &send_frame(&A, &[]), &mut out);
        assert_eq!(got, Outcome::Send(addr("198.18.0.1:4000")));
        assert_eq!(out, recv_frame(&B, &[]));
        let s = hub.stats();
        assert_eq!(
            (s.relayed_packets, s.relayed_bytes, s.relayed_to_udp),
            (2, 7, 2)
        );
    }

    #[test]
    fn never_crosses_accounts() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 2, &B, "198.18.0.2:4000");
        let (_, mut b_ws) = hub.attach_ws(2, &B).unwrap();
        let mut out = Vec::new();
        let got = hub.handle_udp(
            now,
            addr("198.18.0.1:4000"),
            &send_frame(&B, b"x"),
            &mut out,
        );
        assert_eq!(got, Outcome::Dropped(DropReason::CrossAccount));
        assert!(out.is_empty());
        // Nor from a WebSocket client of another account.
        let (_, _a_ws) = hub.attach_ws(1, &C).unwrap();
        assert_eq!(
            hub.handle_ws_frame(now, &C, &send_frame(&B, b"x")),
            Outcome::Dropped(DropReason::CrossAccount)
        );
        assert!(b_ws.try_recv().is_err());
        assert_eq!(hub.stats().dropped_cross_account, 2);
        assert_eq!(hub.stats().relayed_packets, 0);
    }

    #[test]
    fn blocked_pairs_are_not_relayed_until_unblocked() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let (_, _c_ws) = hub.attach_ws(1, &C).unwrap();
        hub.set_blocked_pairs(1, [(A, B), (B, A), (C, B)].into_iter().collect());
        // Another account's blocks do not matter here.
        hub.set_blocked_pairs(2, [(A, C)].into_iter().collect());
        let mut out = Vec::new();
        let a = addr("198.18.0.1:4000");
        assert_eq!(
            hub.handle_udp(now, a, &send_frame(&B, b"x"), &mut out),
            Outcome::Dropped(DropReason::Policy)
        );
        assert_eq!(
            hub.handle_ws_frame(now, &C, &send_frame(&B, b"x")),
            Outcome::Dropped(DropReason::Policy)
        );
        assert_eq!(hub.stats().dropped_policy, 2);
        // A to C is not blocked in account 1.
        assert!(matches!(
            hub.handle_udp(now, a, &send_frame(&C, b"x"), &mut out),
            Outcome::Queued | Outcome::Send(_)
        ));
        hub.set_blocked_pairs(1, HashSet::new());
        assert_eq!(
            hub.handle_udp(now, a, &send_frame(&B, b"y"), &mut out),
            Outcome::Send(addr("198.18.0.2:4000"))
        );
    }

    #[test]
    fn unregistered_senders_and_junk_are_dropped_silently() {
        let (hub, now) = hub();
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let mut out = Vec::new();
        for (from, frame, reason) in [
            (
                "198.18.0.9:1",
                send_frame(&B, b"x"),
                DropReason::Unregistered,
            ),
            (
                "198.18.0.2:4000",
                send_frame(&C, b"x"),
                DropReason::UnknownDestination,
            ),
            (
                "198.18.0.2:4000",
                vec![FRAME_RELAY_SEND, 1, 2],
                DropReason::Malformed,
            ),
            (
                "198.18.0.2:4000",
                vec![FRAME_RELAY_RECV; 40],
                DropReason::Malformed,
            ),
            ("198.18.0.2:4000", vec![4u8; 40], DropReason::Malformed),
            ("198.18.0.2:4000", vec![], DropReason::Malformed),
        ] {
            assert_eq!(
                hub.handle_udp(now, addr(from), &frame, &mut out),
                Outcome::Dropped(reason)
            );
            assert!(out.is_empty());
        }
        // A WebSocket frame from a key with no WebSocket attached.
        assert_eq!(
            hub.handle_ws_frame(now, &B, &send_frame(&B, b"x")),
            Outcome::Dropped(DropReason::Unregistered)
        );
        // A sender whose registration went stale.
        let late = now + Duration::from_secs(REGISTRATION_TTL_SECS);
        assert_eq!(
            hub.handle_udp(
                late,
                addr("198.18.0.2:4000"),
                &send_frame(&B, b"x"),
                &mut out
            ),
            Outcome::Dropped(DropReason::Unregistered)
        );
    }

    #[test]
    fn stun_is_answered_too() {
        let (hub, now) = hub();
        let mut out = Vec::new();
        let from = addr("198.18.0.7:999");
        let txid = [8u8; 12];
        assert_eq!(
            hub.handle_udp(now, from, &stun::request(&txid), &mut out),
            Outcome::Send(from)
        );
        assert_eq!(stun::parse_response(&out, &txid), Some(from));
    }

    #[test]
    fn udp_preferred_then_websocket_fallback() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let (b_conn, mut b_ws) = hub.attach_ws(1, &B).unwrap();
        let mut out = Vec::new();
        let a = addr("198.18.0.1:4000");
        assert_eq!(
            hub.handle_udp(now, a, &send_frame(&B, b"1"), &mut out),
            Outcome::Send(addr("198.18.0.2:4000")),
            "fresh UDP registration wins"
        );
        assert!(b_ws.try_recv().is_err());

        // B stops refreshing; A keeps registering: B's frames go over its WebSocket.
        let later = now + Duration::from_secs(REGISTRATION_TTL_SECS + 1);
        register(&hub, later, 1, &A, "198.18.0.1:4000");
        assert_eq!(
            hub.handle_udp(later, a, &send_frame(&B, b"2"), &mut out),
            Outcome::Queued
        );
        assert_eq!(b_ws.try_recv().unwrap(), recv_frame(&A, b"2"));
        assert_eq!(hub.stats().relayed_to_ws, 1);

        // WebSocket → UDP goes through the outbox of the UDP loop.
        let mut outbox = hub.take_udp_outbox().unwrap();
        assert!(hub.take_udp_outbox().is_none(), "taken once");
        assert_eq!(
            hub.handle_ws_frame(later, &B, &send_frame(&A, b"3")),
            Outcome::Queued
        );
        assert_eq!(outbox.try_recv().unwrap(), (a, recv_frame(&B, b"3")));

        // WebSocket → WebSocket.
        let (_, mut c_ws) = hub.attach_ws(1, &C).unwrap();
        assert_eq!(
            hub.handle_ws_frame(later, &C, &send_frame(&B, b"4")),
            Outcome::Queued
        );
        assert_eq!(b_ws.try_recv().unwrap(), recv_frame(&C, b"4"));
        assert!(c_ws.try_recv().is_err());

        // Without the WebSocket, nowhere to go.
        hub.detach_ws(&B, b_conn);
        assert!(!hub.has_ws(&B));
        assert_eq!(
            hub.handle_udp(later, a, &send_frame(&B, b"5"), &mut out),
            Outcome::Dropped(DropReason::NoPath)
        );
    }

    #[test]
    fn websocket_queue_full_drops_instead_of_blocking() {
        let (hub, now) = hub();
        let (_, _a_ws) = hub.attach_ws(1, &A).unwrap();
        let (_, mut b_ws) = hub.attach_ws(1, &B).unwrap();
        for _ in 0..WS_QUEUE {
            assert_eq!(
                hub.handle_ws_frame(now, &A, &send_frame(&B, b"x")),
                Outcome::Queued
            );
        }
        assert_eq!(
            hub.handle_ws_frame(now, &A, &send_frame(&B, b"x")),
            Outcome::Dropped(DropReason::QueueFull)
        );
        assert!(b_ws.try_recv().is_ok());
        assert_eq!(hub.stats().dropped_queue_full, 1);
    }

    #[test]
    fn newer_websocket_replaces_older() {
        let (hub, now) = hub();
        let (old_id, mut old) = hub.attach_ws(1, &A).unwrap();
        let (new_id, mut new) = hub.attach_ws(1, &A).unwrap();
        assert_ne!(old_id, new_id);
        assert!(matches!(
            old.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        hub.detach_ws(&A, old_id);
        assert!(
            hub.has_ws(&A),
            "the old connection must not detach the new one"
        );
        let (_, _b) = hub.attach_ws(1, &B).unwrap();
        assert_eq!(
            hub.handle_ws_frame(now, &B, &send_frame(&A, b"x")),
            Outcome::Queued
        );
        assert_eq!(new.try_recv().unwrap(), recv_frame(&B, b"x"));
        hub.detach_ws(&A, new_id);
        assert!(!hub.has_ws(&A));
    }

    #[test]
    fn revoke_forgets_closes_and_refuses() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let (_, mut b_ws) = hub.attach_ws(1, &B).unwrap();
        hub.revoke(&B);
        assert!(hub.is_revoked(&B));
        assert!(matches!(
            b_ws.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(hub.udp_registration(&B), None);
        let mut out = Vec::new();
        assert_eq!(
            hub.handle_udp(
                now,
                addr("198.18.0.1:4000"),
                &send_frame(&B, b"x"),
                &mut out
            ),
            Outcome::Dropped(DropReason::UnknownDestination)
        );
        assert_eq!(
            hub.handle_udp(
                now,
                addr("198.18.0.2:4000"),
                &send_frame(&A, b"x"),
                &mut out
            ),
            Outcome::Dropped(DropReason::Unregistered)
        );
        // Its still-valid token no longer works, nor a new WebSocket.
        let token = hub.issue_token(1, &B, T0 + 3600);
        assert_eq!(refused(&hub, now, &register_frame(&token)), REFUSED_REVOKED);
        assert_eq!(hub.attach_ws(1, &B).err(), Some(Revoked));
    }

    #[test]
    fn reregistering_from_a_new_address_moves_the_registration() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let t1 = now + Duration::from_secs(5);
        register(&hub, t1, 1, &B, "198.18.0.3:5000");
        assert_eq!(hub.udp_registration(&B), Some(addr("198.18.0.3:5000")));
        let mut out = Vec::new();
        assert_eq!(
            hub.handle_udp(t1, addr("198.18.0.1:4000"), &send_frame(&B, b"x"), &mut out),
            Outcome::Send(addr("198.18.0.3:5000"))
        );
        assert_eq!(
            hub.handle_udp(t1, addr("198.18.0.2:4000"), &send_frame(&A, b"x"), &mut out),
            Outcome::Dropped(DropReason::Unregistered),
            "the old address no longer speaks for B"
        );
        // Another node taking over an address (NAT mapping reuse) evicts the old owner.
        register(&hub, t1, 1, &C, "198.18.0.1:4000");
        assert_eq!(hub.udp_registration(&A), None);
        assert_eq!(
            hub.handle_udp(t1, addr("198.18.0.1:4000"), &send_frame(&B, b"y"), &mut out),
            Outcome::Send(addr("198.18.0.3:5000"))
        );
        assert_eq!(out, recv_frame(&C, b"y"));
    }

    #[test]
    fn stale_registrations_expire() {
        let (hub, now) = hub();
        register(&hub, now, 1, &A, "198.18.0.1:4000");
        register(&hub, now, 1, &B, "198.18.0.2:4000");
        let (_, _b_ws) = hub.attach_ws(1, &B).unwrap();
        let t20 = now + Duration::from_secs(20);
        register(&hub, t20, 1, &A, "198.18.0.1:4000");
        assert_eq!(
            hub.expire(now + Duration::from_secs(REGISTRATION_TTL_SECS - 1)),
            0
        );
        assert_eq!(
            hub.expire(now + Duration::from_secs(REGISTRATION_TTL_SECS)),
            1
        );
        assert_eq!(hub.udp_registration(&B), None);
        assert!(
            hub.has_ws(&B),
            "the WebSocket outlives the UDP registration"
        );
        assert_eq!(hub.udp_registration(&A), Some(addr("198.18.0.1:4000")));
        let t60 = now + Duration::from_secs(60);
        assert_eq!(hub.expire(t60), 1);
        assert_eq!(hub.udp_registration(&A), None);
        let mut out = Vec::new();
        assert_eq!(
            hub.handle_udp(
                t60,
                addr("198.18.0.1:4000"),
                &send_frame(&B, b"x"),
                &mut out
            ),
            Outcome::Dropped(DropReason::Unregistered)
        );
    }

    #[test]
    fn unix_time_follows_the_instants() {
        let (hub, now) = hub();
        assert_eq!(hub.unix_at(now), T0);
        assert_eq!(hub.unix_at(now + Duration::from_secs(90)), T0 + 90);
    }
}
