//! A userspace TCP/IP stack (smoltcp) that dials TCP connections from given
//! overlay addresses and exchanges raw IPv4 packets with the member's tunnel.
//!
//! One task owns the smoltcp interface and its sockets. Packets the stack
//! emits go to the `outbound` channel given to [`NetStack::spawn`] (the
//! member encrypts them for the right peer); packets from the tunnel come in
//! through [`NetStack::deliver`]. Each [`TcpStream`] is an ordinary tokio
//! `AsyncRead + AsyncWrite`, with bounded buffers: a slow reader closes the
//! TCP window instead of growing memory.
//!
//! Inside: the interface, the socket set and the bookkeeping live behind one
//! mutex. The stack's task is the only one that polls the interface (it runs
//! when a packet arrives, when a stream reads, writes or closes, and when
//! smoltcp's next timer is due); streams only move bytes in and out of their
//! socket's buffers under the lock, and smoltcp's wakers tell them when there
//! is data or room. smoltcp holds at most a handful of interface addresses,
//! while one stack owns every binding address of an account, so the owned
//! addresses are kept here: the task drops packets for other addresses before
//! smoltcp sees them, and the interface itself runs in "any IP" mode with one
//! owned address as its anchor and a default route through it (so every
//! destination is routable, also subnets outside 100.64.0.0/10).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// How long [`NetStack::connect`] waits for the SYN-ACK.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Receive and send buffer of each connection. The receive buffer is the
/// largest window the stack advertises (window scaling makes it usable).
const SOCKET_BUFFER: usize = 256 * 1024;
/// Packets handed to [`NetStack::deliver`] that the task has not taken yet.
const INBOUND_QUEUE: usize = 4096;
/// Packets the task takes from the inbound queue per interface poll.
const INBOUND_BATCH: usize = 512;
/// Interface polls per hold of the lock before the task yields.
const POLL_ROUNDS: usize = 64;
/// Ephemeral source ports.
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u32 = 65536 - EPHEMERAL_FIRST as u32;
/// Keep-alive probes on idle connections, and how long a connection may hear
/// nothing from its peer (probes unanswered) before it is reset.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a dropped stream's socket may take to finish closing gracefully
/// (send what is left, exchange FINs) before it is reset.
const ORPHAN_LINGER: Duration = Duration::from_secs(30);
/// How long a dropped stream's socket stays in TIME-WAIT: longer than
/// smoltcp's delayed ACK (10 ms), so the peer's FIN gets its ACK.
const TIME_WAIT_LINGER: Duration = Duration::from_millis(100);
/// How long an aborted socket may wait for its reset to go out.
const CLOSED_LINGER: Duration = Duration::from_secs(5);
/// Sockets a listener keeps in LISTEN / SYN-RECEIVED, and established
/// connections it holds for `accept`.
const LISTEN_BACKLOG: usize = 8;
const ACCEPT_QUEUE: usize = 64;

/// Handle to a running stack; clones share it. The task ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct NetStack {
    inner: Arc<Handle>,
}

/// What the [`NetStack`] handles share. Streams and listeners hold only
/// `shared`, so they do not keep the task alive: dropping the last handle
/// drops `inbound`, which ends the task.
struct Handle {
    shared: Arc<Shared>,
    inbound: mpsc::Sender<Vec<u8>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the task: a stream read (window to reopen), wrote, closed.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Dev,
    epoch: Instant,
    owned: HashSet<Ipv4Addr>,
    conns: HashMap<SocketHandle, Conn>,
    /// (address, port) pairs taken by connections and listeners.
    ports: HashSet<(Ipv4Addr, u16)>,
    next_port: u16,
    /// Sockets whose stream was dropped (or never handed out), closing.
    orphans: Vec<SocketHandle>,
    listeners: HashMap<u64, ListenerState>,
    next_listener: u64,
    /// The task has ended; every stream fails.
    stopped: bool,
}

struct Conn {
    local: SocketAddrV4,
    /// This connection reserved `local` in `State::ports` (listeners' sockets
    /// share the listener's reservation).
    owns_port: bool,
    closed_by: Option<Closer>,
    /// `poll_shutdown` was called (FIN queued).
    shutdown: bool,
    /// The peer's FIN was read: reads return 0 from now on.
    eof: bool,
    orphaned_at: Option<Instant>,
    /// When the task first saw this orphan in TIME-WAIT.
    time_wait_since: Option<Instant>,
}

#[derive(Clone, Copy)]
enum Closer {
    /// [`TcpStream::abort`].
    Aborted,
    /// [`NetStack::set_addresses`] removed the connection's address.
    AddressRemoved,
}

struct ListenerState {
    addr: SocketAddrV4,
    /// Sockets in LISTEN or SYN-RECEIVED.
    pending: Vec<SocketHandle>,
    /// Established connections not accepted yet.
    ready: VecDeque<SocketHandle>,
    waker: Option<Waker>,
    /// The listener's address was removed.
    closed: bool,
}

fn stopped_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "network stack stopped")
}

impl Conn {
    fn new(local: SocketAddrV4, owns_port: bool) -> Conn {
        Conn {
            local,
            owns_port,
            closed_by: None,
            shutdown: false,
            eof: false,
            orphaned_at: None,
            time_wait_since: None,
        }
    }

    /// The error of a connection that can no longer carry data.
    fn error(&self) -> io::Error {
        match self.closed_by {
            Some(Closer::Aborted) => {
                io::Error::new(io::ErrorKind::ConnectionAborted, "connection aborted")
            }
            Some(Closer::AddressRemoved) => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection's address was removed from the network stack",
            ),
            None => io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer"),
        }
    }
}

fn v4(addr: IpAddress) -> Ipv4Addr {
    match addr {
        IpAddress::Ipv4(a) => a,
    }
}

fn listen_endpoint(addr: SocketAddrV4) -> IpListenEndpoint {
    IpListenEndpoint {
        addr: Some(IpAddress::Ipv4(*addr.ip())),
        port: addr.port(),
    }
}

fn new_socket() -> tcp::Socket<'static> {
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    // Writes land in the buffer and go out when the task polls, which already
    // coalesces them; Nagle would only add a delayed-ACK wait to every
    // request/response exchange.
    sock.set_nagle_enabled(false);
    sock.set_keep_alive(Some(KEEP_ALIVE.into()));
    sock.set_timeout(Some(IDLE_TIMEOUT.into()));
    sock.set_congestion_control(tcp::CongestionControl::Reno);
    sock
}

impl State {
    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Whether an incoming packet is IPv4 and for one of our addresses.
    fn accepts(&self, packet: &[u8]) -> bool {
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return false;
        }
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        self.owned.contains(&dst)
    }

    fn alloc_port(&mut self, ip: Ipv4Addr) -> io::Result<u16> {
        for _ in 0..EPHEMERAL_COUNT {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                port + 1
            };
            if self.ports.insert((ip, port)) {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no free ephemeral port on {ip}"),
        ))
    }

    fn add_conn(&mut self, sock: tcp::Socket<'static>, conn: Conn) -> SocketHandle {
        let handle = self.sockets.add(sock);
        self.conns.insert(handle, conn);
        handle
    }

    /// Hands a socket to the task to close and remove.
    fn orphan(&mut self, handle: SocketHandle) {
        let now = Instant::now();
        if let Some(conn) = self.conns.get_mut(&handle) {
            if conn.orphaned_at.is_none() {
                conn.orphaned_at = Some(now);
                self.orphans.push(handle);
            }
        }
    }

    fn set_addresses(&mut self, addrs: &[Ipv4Addr]) {
        let new: HashSet<Ipv4Addr> = addrs
            .iter()
            .copied()
            .filter(|a| {
                let usable = !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
                if !usable {
                    tracing::warn!(address = %a, "netstack: ignoring an address that is not unicast");
                }
                usable
            })
            .collect();
        // Reset the connections and close the listeners of removed addresses.
        for (&handle, conn) in self.conns.iter_mut() {
            if !new.contains(conn.local.ip()) && conn.closed_by.is_none() {
                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                conn.closed_by = Some(Closer::AddressRemoved);
            }
        }
        let gone: Vec<u64> = self
            .listeners
            .iter()
            .filter(|(_, l)| !new.contains(l.addr.ip()))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.close_listener(id, false);
        }
        self.owned = new;
        let anchor = self.owned.iter().min().copied();
        self.iface.update_ip_addrs(|ips| {
            ips.clear();
            if let Some(a) = anchor {
                let _ = ips.push(IpCidr::new(IpAddress::Ipv4(a), 32));
            }
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        if let Some(a) = anchor {
            // The table has room for it: it was just emptied.
            let _ = routes.add_default_ipv4_route(a);
        }
    }

    /// Aborts a listener's sockets; `remove` forgets the listener (dropped),
    /// else it stays, closed, so `accept` can report why.
    fn close_listener(&mut self, id: u64, remove: bool) {
        let Some(l) = self.listeners.get_mut(&id) else {
            return;
        };
        let handles: Vec<SocketHandle> = l.pending.drain(..).chain(l.ready.drain(..)).collect();
        if !l.closed {
            l.closed = true;
            self.ports.remove(&(*l.addr.ip(), l.addr.port()));
        }
        if let Some(w) = l.waker.take() {
            w.wake();
        }
        if remove {
            self.listeners.remove(&id);
        }
        for h in handles {
            self.tcp(h).abort();
            self.orphan(h);
        }
    }

    /// One round of work: take packets, poll the interface until it has
    /// nothing more to send (or the outbound channel is full), then advance
    /// the listeners and close the orphans. Returns when to run again.
    fn run(&mut self, inbound: &mut mpsc::Receiver<Vec<u8>>) -> Option<Duration> {
        for _ in 0..POLL_ROUNDS {
            let mut took = 0;
            while took < INBOUND_BATCH {
                let Ok(packet) = inbound.try_recv() else {
                    break;
                };
                took += 1;
                if self.accepts(&packet) {
                    self.dev.rx.push_back(packet);
                }
            }
            self.dev.tx_blocked = false;
            let now = self.now();
            let result = self.iface.poll(now, &mut self.dev, &mut self.sockets);
            if (result == PollResult::None && took == 0) || self.dev.tx_blocked {
                break;
            }
        }
        self.advance_listeners();
        let orphan_due = self.close_orphans();
        let now = self.now();
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let delay = match (delay, orphan_due) {
            (Some(d), Some(o)) => Some(d.min(o)),
            (d, o) => d.or(o),
        };
        if self.dev.tx_blocked {
            // Waiting for room in the outbound channel; timers still count.
            delay.filter(|d| !d.is_zero())
        } else {
            delay
        }
    }

    fn advance_listeners(&mut self) {
        let ids: Vec<u64> = self.listeners.keys().copied().collect();
        for id in ids {
            let l = self.listeners.get_mut(&id).expect("listed above");
            if l.closed {
                continue;
            }
            let addr = l.addr;
            let mut woke = false;
            let mut i = 0;
            while i < l.pending.len() {
                let h = l.pending[i];
                let sock = self.sockets.get_mut::<tcp::Socket>(h);
                match sock.state() {
                    tcp::State::Listen | tcp::State::SynReceived => i += 1,
                    tcp::State::Closed | tcp::State::TimeWait => {
                        // Reset before it was established: listen again.
                        let _ = sock.listen(listen_endpoint(addr));
                        i += 1;
                    }
                    _ => {
                        l.pending.swap_remove(i);
                        l.ready.push_back(h);
                        woke = true;
                    }
                }
            }
            if woke {
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
            let missing = LISTEN_BACKLOG
                .saturating_sub(l.pending.len())
                .min(ACCEPT_QUEUE.saturating_sub(l.ready.len() + l.pending.len()));
            for _ in 0..missing {
                let mut sock = new_socket();
                if sock.listen(listen_endpoint(addr)).is_err() {
                    break;
                }
                let h = self.sockets.add(sock);
                self.conns.insert(h, Conn::new(addr, false));
                self.listeners
                    .get_mut(&id)
                    .expect("listed above")
                    .pending
                    .push(h);
            }
        }
    }

    /// Removes the sockets of dropped streams that finished closing, resets
    /// those that take too long. Returns when to look again.
    fn close_orphans(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let mut due: Option<Duration> = None;
        let mut at = |deadline: Duration| due = Some(due.map_or(deadline, |d| d.min(deadline)));
        let mut i = 0;
        while i < self.orphans.len() {
            let h = self.orphans[i];
            let conn = self.conns.get_mut(&h).expect("orphans have conns");
            let age = conn
                .orphaned_at
                .map_or(Duration::ZERO, |t| now.duration_since(t));
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            let done = match sock.state() {
                // Both FINs are acknowledged, or will be once our delayed ACK
                // of theirs went out: wait that long, not the whole TIME-WAIT
                // (the port allocator cycles through all ephemeral ports
                // before it reuses this one).
                tcp::State::TimeWait => {
                    let since = *conn.time_wait_since.get_or_insert(now);
                    let left = TIME_WAIT_LINGER.saturating_sub(now.duration_since(since));
                    if !left.is_zero() {
                        at(left);
                    }
                    left.is_zero()
                }
                // The reset (if one was due) has gone out.
                tcp::State::Closed => {
                    if sock.remote_endpoint().is_none() || age > CLOSED_LINGER {
                        true
                    } else {
                        at(CLOSED_LINGER - age);
                        false
                    }
                }
                _ => {
                    // Data after the stream was dropped has no reader, and a
                    // graceful close may not take forever.
                    if sock.recv_queue() > 0 || age > ORPHAN_LINGER {
                        sock.abort();
                        at(Duration::ZERO);
                    } else {
                        at(ORPHAN_LINGER - age);
                    }
                    false
                }
            };
            if done {
                self.sockets.remove(h);
                let conn = self.conns.remove(&h).expect("orphans have conns");
                if conn.owns_port {
                    self.ports.remove(&(*conn.local.ip(), conn.local.port()));
                }
                self.orphans.swap_remove(i);
            } else {
                i += 1;
            }
        }
        due
    }

    /// The task ends: every socket is reset, every waiter woken.
    fn stop(&mut self) {
        self.stopped = true;
        let handles: Vec<SocketHandle> = self.conns.keys().copied().collect();
        for h in handles {
            self.tcp(h).abort();
        }
        for l in self.listeners.values_mut() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
        // Best effort: tell the peers.
        self.dev.tx_blocked = false;
        let now = self.now();
        for _ in 0..4 {
            if self.iface.poll(now, &mut self.dev, &mut self.sockets) == PollResult::None {
                break;
            }
        }
        self.conns.clear();
        self.listeners.clear();
        self.orphans.clear();
        self.sockets = SocketSet::new(Vec::new());
    }
}

/// The smoltcp device: packets in from a queue the task fills, packets out
/// to the outbound channel.
struct Dev {
    rx: VecDeque<Vec<u8>>,
    out: mpsc::Sender<Vec<u8>>,
    mtu: usize,
    /// The last transmit found the outbound channel full.
    tx_blocked: bool,
}

struct RxToken(Vec<u8>);

struct TxToken<'a>(&'a mpsc::Sender<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        // The task is the channel's only sender and checked for room before
        // handing out this token; replies to incoming packets (RST for a
        // closed port) are dropped when it is full, and TCP sends them again.
        let _ = self.0.try_send(packet);
        r
    }
}

impl phy::Device for Dev {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&self.out)))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if self.out.capacity() == 0 {
            self.tx_blocked = true;
            return None;
        }
        Some(TxToken(&self.out))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Incoming packets were authenticated by the tunnel (an AEAD), so
        // verifying their checksums again is wasted work; outgoing ones get
        // checksums, as the peer's kernel checks them.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

async fn run_task(
    shared: Arc<Shared>,
    mut inbound: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Vec<u8>>,
) {
    loop {
        let (delay, tx_blocked) = {
            let mut st = shared.lock();
            let delay = st.run(&mut inbound);
            (delay, st.dev.tx_blocked)
        };
        if delay == Some(Duration::ZERO) {
            // More to send right away; let the streams and other tasks in.
            tokio::task::yield_now().await;
            continue;
        }
        let sleep = async {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let room = async {
            if tx_blocked {
                // Wait for room, then give the permit back right away.
                let _ = out.reserve().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            packet = inbound.recv() => match packet {
                Some(packet) => {
                    let mut st = shared.lock();
                    if st.accepts(&packet) {
                        st.dev.rx.push_back(packet);
                    }
                }
                None => break,
            },
            _ = shared.wake.notified() => {}
            _ = sleep => {}
            _ = room => {}
        }
    }
    shared.lock().stop();
}

impl NetStack {
    /// Starts the stack's task. IPv4 packets it emits (at most `mtu` bytes
    /// each) go to `outbound`; when that channel is full the stack waits for
    /// room (data stays in the connections' bounded buffers, and callers are
    /// never blocked). `mtu` must be between 576 and 65535.
    pub fn spawn(mtu: usize, outbound: mpsc::Sender<Vec<u8>>) -> NetStack {
        assert!(
            (576..=65535).contains(&mtu),
            "netstack mtu must be between 576 and 65535, not {mtu}"
        );
        let seed = random_seed();
        let mut dev = Dev {
            rx: VecDeque::new(),
            out: outbound.clone(),
            mtu,
            tx_blocked: false,
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::from_micros(0));
        // Owned addresses are checked before packets reach smoltcp (it holds
        // only a few addresses); see the module docs.
        iface.set_any_ip(true);
        let state = State {
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            epoch,
            owned: HashSet::new(),
            conns: HashMap::new(),
            ports: HashSet::new(),
            next_port: EPHEMERAL_FIRST + (seed % EPHEMERAL_COUNT as u64) as u16,
            orphans: Vec::new(),
            listeners: HashMap::new(),
            next_listener: 0,
            stopped: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wake: Notify::new(),
        });
        let (inbound, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        tokio::spawn(run_task(shared.clone(), inbound_rx, outbound));
        NetStack {
            inner: Arc::new(Handle { shared, inbound }),
        }
    }

    /// Hands the stack one IPv4 packet that came out of the tunnel. Never
    /// blocks: when the stack is behind, the packet is dropped.
    pub fn deliver(&self, packet: &[u8]) {
        if let Ok(permit) = self.inner.inbound.try_reserve() {
            permit.send(packet.to_vec());
        }
    }

    /// The addresses the stack owns (replaces the set). Packets to other
    /// addresses are ignored; connections from removed addresses are reset.
    /// Addresses that are not unicast are ignored.
    pub fn set_addresses(&self, addrs: &[Ipv4Addr]) {
        self.inner.shared.lock().set_addresses(addrs);
        self.inner.shared.wake.notify_one();
    }

    /// Opens a TCP connection from `src` (one of the stack's addresses) to
    /// `dst`. Refused (RST) → `ConnectionRefused`; no answer within `timeout`
    /// → `TimedOut`; `src` not owned → `AddrNotAvailable`.
    pub async fn connect(
        &self,
        src: Ipv4Addr,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let dst_ip = *dst.ip();
        if dst.port() == 0
            || dst_ip.is_unspecified()
            || dst_ip.is_broadcast()
            || dst_ip.is_multicast()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot connect to {dst}"),
            ));
        }
        let shared = &self.inner.shared;
        let stream = {
            let mut st = shared.lock();
            if st.stopped {
                return Err(stopped_error());
            }
            if !st.owned.contains(&src) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{src} is not an address of this network stack"),
                ));
            }
            let port = st.alloc_port(src)?;
            let mut sock = new_socket();
            let remote = IpEndpoint::new(IpAddress::Ipv4(dst_ip), dst.port());
            let local = IpEndpoint::new(IpAddress::Ipv4(src), port);
            if let Err(e) = sock.connect(st.iface.context(), remote, local) {
                st.ports.remove(&(src, port));
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot connect from {src} to {dst}: {e}"),
                ));
            }
            let local = SocketAddrV4::new(src, port);
            let handle = st.add_conn(sock, Conn::new(local, true));
            TcpStream {
                shared: shared.clone(),
                handle,
                local,
                peer: dst,
            }
        };
        shared.wake.notify_one();
        // On an error or a timeout, dropping `stream` resets and frees the
        // socket.
        match tokio::time::timeout(timeout, poll_fn(|cx| stream.poll_established(cx))).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {dst} within {timeout:?}"),
            )),
        }
    }

    /// Accepts TCP connections to `addr` (one of the stack's addresses).
    /// `AddrNotAvailable` if the address is not owned, `AddrInUse` if the
    /// port is taken.
    pub async fn listen(&self, addr: SocketAddrV4) -> io::Result<Listener> {
        let shared = &self.inner.shared;
        let id = {
            let mut st = shared.lock();
            if st.stopped {
                return Err(stopped_error());
            }
            if !st.owned.contains(addr.ip()) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{} is not an address of this network stack", addr.ip()),
                ));
            }
            if addr.port() == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cannot listen on port 0",
                ));
            }
            if !st.ports.insert((*addr.ip(), addr.port())) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{addr} is in use"),
                ));
            }
            let id = st.next_listener;
            st.next_listener += 1;
            st.listeners.insert(
                id,
                ListenerState {
                    addr,
                    pending: Vec::new(),
                    ready: VecDeque::new(),
                    waker: None,
                    closed: false,
                },
            );
            st.advance_listeners();
            id
        };
        shared.wake.notify_one();
        Ok(Listener {
            shared: shared.clone(),
            id,
            addr,
        })
    }

    /// Sockets the stack holds: connections (also those closing after their
    /// stream was dropped) and listeners' waiting sockets.
    pub fn socket_count(&self) -> usize {
        self.inner.shared.lock().sockets.iter().count()
    }
}

/// Accepts connections to one address and port; see [`NetStack::listen`].
/// Dropping it resets the connections not accepted yet.
pub struct Listener {
    shared: Arc<Shared>,
    id: u64,
    addr: SocketAddrV4,
}

impl Listener {
    /// The address and port listened on.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The next connection and its peer's address. Fails when the stack
    /// stopped or the address was removed from it.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddrV4)> {
        let result = poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.stopped {
                return Poll::Ready(Err(stopped_error()));
            }
            let Some(l) = st.listeners.get_mut(&self.id) else {
                return Poll::Ready(Err(stopped_error()));
            };
            if let Some(h) = l.ready.pop_front() {
                let addr = l.addr;
                let peer = st
                    .tcp(h)
                    .remote_endpoint()
                    .map(|e| SocketAddrV4::new(v4(e.addr), e.port));
                // A connection reset before this accept has no peer any
                // more: hand it out anyway; its first read reports the reset.
                let peer = peer.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
                let stream = TcpStream {
                    shared: self.shared.clone(),
                    handle: h,
                    local: addr,
                    peer,
                };
                return Poll::Ready(Ok((stream, peer)));
            }
            if l.closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{} was removed from the network stack", l.addr.ip()),
                )));
            }
            l.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        // The backlog may need a new listening socket.
        self.shared.wake.notify_one();
        result
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.stopped {
            return;
        }
        st.close_listener(self.id, true);
        drop(st);
        self.shared.wake.notify_one();
    }
}

/// One TCP connection of the stack. Shutdown sends FIN; drop closes it
/// (reset if data was left unread).
pub struct TcpStream {
    shared: Arc<Shared>,
    handle: SocketHandle,
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

impl TcpStream {
    /// Resets the connection now (RST).
    pub fn abort(&mut self) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if st.stopped {
            return;
        }
        if let Some(conn) = st.conns.get_mut(&self.handle) {
            if conn.closed_by.is_none() {
                conn.closed_by = Some(Closer::Aborted);
                st.sockets.get_mut::<tcp::Socket>(self.handle).abort();
            }
        }
        drop(guard);
        self.shared.wake.notify_one();
    }

    /// The local address and port.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The peer's address and port.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    fn poll_established(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if st.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        let Some(conn) = st.conns.get(&self.handle) else {
            return Poll::Ready(Err(stopped_error()));
        };
        let sock = st.sockets.get_mut::<tcp::Socket>(self.handle);
        match sock.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                sock.register_send_waker(cx.waker());
                Poll::Pending
            }
            tcp::State::Closed | tcp::State::Listen => Poll::Ready(Err(match conn.closed_by {
                Some(_) => conn.error(),
                None => io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{} refused the connection", self.peer),
                ),
            })),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if st.stopped {
            return;
        }
        let Some(conn) = st.conns.get(&self.handle) else {
            return;
        };
        if conn.closed_by.is_none() {
            let sock = st.sockets.get_mut::<tcp::Socket>(self.handle);
            if sock.recv_queue() == 0 {
                sock.close();
            } else {
                sock.abort();
            }
        }
        st.orphan(self.handle);
        drop(guard);
        self.shared.wake.notify_one();
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let st = &mut *guard;
        if st.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        let Some(conn) = st.conns.get_mut(&this.handle) else {
            return Poll::Ready(Err(stopped_error()));
        };
        if conn.eof || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if conn.closed_by.is_some() {
            return Poll::Ready(Err(conn.error()));
        }
        let sock = st.sockets.get_mut::<tcp::Socket>(this.handle);
        match sock.recv_slice(buf.initialize_unfilled()) {
            Ok(0) => {
                sock.register_recv_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                buf.advance(n);
                drop(guard);
                // The window may have to be reopened.
                this.shared.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Err(tcp::RecvError::Finished) => {
                conn.eof = true;
                Poll::Ready(Ok(()))
            }
            Err(tcp::RecvError::InvalidState) => Poll::Ready(Err(conn.error())),
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let st = &mut *guard;
        if st.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        let Some(conn) = st.conns.get(&this.handle) else {
            return Poll::Ready(Err(stopped_error()));
        };
        if conn.closed_by.is_some() {
            return Poll::Ready(Err(conn.error()));
        }
        if conn.shutdown {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let sock = st.sockets.get_mut::<tcp::Socket>(this.handle);
        match sock.send_slice(buf) {
            Ok(0) => {
                sock.register_send_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                drop(guard);
                this.shared.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(tcp::SendError::InvalidState) => Poll::Ready(Err(conn.error())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is in the stack's buffer and goes out on its own.
        Poll::Ready(Ok(()))
    }

    /// Sends FIN after the data written so far, and resolves once the peer
    /// has acknowledged all of that data.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let st = &mut *guard;
        if st.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        let Some(conn) = st.conns.get_mut(&this.handle) else {
            return Poll::Ready(Err(stopped_error()));
        };
        if conn.closed_by.is_some() {
            return Poll::Ready(Err(conn.error()));
        }
        let sock = st.sockets.get_mut::<tcp::Socket>(this.handle);
        if !conn.shutdown {
            conn.shutdown = true;
            sock.close();
            this.shared.wake.notify_one();
        }
        if sock.send_queue() == 0 {
            return Poll::Ready(Ok(()));
        }
        if sock.state() == tcp::State::Closed {
            return Poll::Ready(Err(conn.error()));
        }
        sock.register_send_waker(cx.waker());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Weak;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
    const WAIT: Duration = Duration::from_secs(20);

    /// Two stacks wired back to back: what A emits B receives and the other
    /// way round. The forwarders hold the stacks weakly (dropping a stack's
    /// handles stops it) and drop everything while `unplugged` is set.
    struct Pair {
        a: NetStack,
        b: NetStack,
        unplugged: Arc<AtomicBool>,
    }

    fn forward(mut from: mpsc::Receiver<Vec<u8>>, to: Weak<Handle>, unplugged: Arc<AtomicBool>) {
        tokio::spawn(async move {
            while let Some(packet) = from.recv().await {
                if unplugged.load(Ordering::Relaxed) {
                    continue;
                }
                let Some(inner) = to.upgrade() else { continue };
                NetStack { inner }.deliver(&packet);
            }
        });
    }

    fn pair() -> Pair {
        let (a_out, a_rx) = mpsc::channel(1024);
        let (b_out, b_rx) = mpsc::channel(1024);
        let a = NetStack::spawn(1380, a_out);
        let b = NetStack::spawn(1380, b_out);
        a.set_addresses(&[A]);
        b.set_addresses(&[B]);
        let unplugged = Arc::new(AtomicBool::new(false));
        forward(a_rx, Arc::downgrade(&b.inner), unplugged.clone());
        forward(b_rx, Arc::downgrade(&a.inner), unplugged.clone());
        Pair { a, b, unplugged }
    }

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no result within {WAIT:?}"))
    }

    /// A connection from A to B, both ends.
    async fn connected(p: &Pair, port: u16) -> (TcpStream, TcpStream, Listener) {
        let listener = p.b.listen(SocketAddrV4::new(B, port)).await.unwrap();
        let client =
            p.a.connect(A, SocketAddrV4::new(B, port), CONNECT_TIMEOUT)
                .await
                .unwrap();
        let (server, peer) = within("accept", listener.accept()).await.unwrap();
        assert_eq!(peer, client.local_addr());
        (client, server, listener)
    }

    /// Waits until `f` holds (state that settles asynchronously).
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        within(what, async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn echo_round_trip_then_eof() {
        let p = pair();
        let listener = p.b.listen(SocketAddrV4::new(B, 7)).await.unwrap();
        let server = tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            let (mut r, mut w) = tokio::io::split(&mut s);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            peer
        });
        let mut c =
            p.a.connect(A, SocketAddrV4::new(B, 7), CONNECT_TIMEOUT)
                .await
                .unwrap();
        assert_eq!(*c.local_addr().ip(), A);
        assert!(c.local_addr().port() >= EPHEMERAL_FIRST);
        assert_eq!(c.peer_addr(), SocketAddrV4::new(B, 7));
        c.write_all(b"hello, mesh").await.unwrap();
        let mut got = [0u8; 11];
        within("echo", c.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"hello, mesh");
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within("eof", c.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        // Reads after EOF keep returning 0.
        assert_eq!(c.read(&mut got).await.unwrap(), 0);
        assert_eq!(server.await.unwrap(), c.local_addr());
        // Writing after shutdown is refused.
        let err = c.write_all(b"late").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    /// Deterministic bytes: `block` repeated; its length is not a power of
    /// two, so data arriving at the wrong offset does not match.
    fn pattern(seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..(1 << 20) + 7)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn send_pattern(w: &mut (impl AsyncWrite + Unpin), block: &[u8], total: usize) {
        let mut sent = 0;
        while sent < total {
            let off = sent % block.len();
            let n = (block.len() - off).min(total - sent).min(64 * 1024);
            w.write_all(&block[off..off + n]).await.unwrap();
            sent += n;
        }
        w.shutdown().await.unwrap();
    }

    /// Reads to EOF; returns how many bytes matched the pattern before the
    /// first mismatch, and how many arrived.
    async fn check_pattern(r: &mut (impl AsyncRead + Unpin), block: &[u8]) -> (usize, usize) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        let mut good = None;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return (good.unwrap_or(got), got);
            }
            let mut i = 0;
            while i < n && good.is_none() {
                let off = (got + i) % block.len();
                let m = (block.len() - off).min(n - i);
                if buf[i..i + m] != block[off..off + m] {
                    good = Some(got + i);
                }
                i += m;
            }
            got += n;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixty_four_mib_both_ways_at_once_arrive_intact() {
        const TOTAL: usize = 64 << 20;
        let p = pair();
        let (c, s, _l) = connected(&p, 8080).await;
        let up = Arc::new(pattern(1));
        let down = Arc::new(pattern(2));
        let side = |stream: TcpStream, send: Arc<Vec<u8>>, expect: Arc<Vec<u8>>| {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                let writer = async { send_pattern(&mut w, &send, TOTAL).await };
                let reader = async { check_pattern(&mut r, &expect).await };
                tokio::join!(writer, reader).1
            })
        };
        let client = side(c, up.clone(), down.clone());
        let server = side(s, down, up);
        let (at_client, at_server) = within("64 MiB each way", async {
            (client.await.unwrap(), server.await.unwrap())
        })
        .await;
        assert_eq!(at_client, (TOTAL, TOTAL), "download: (intact, received)");
        assert_eq!(at_server, (TOTAL, TOTAL), "upload: (intact, received)");
    }

    #[tokio::test]
    async fn a_reader_that_stops_blocks_the_writer_until_it_reads_again() {
        let p = pair();
        let (mut c, mut s, _l) = connected(&p, 9000).await;
        let chunk = vec![7u8; 16 * 1024];
        // Write until a write stays pending: the server reads nothing.
        let mut written = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_millis(300), c.write(&chunk)).await {
                Ok(n) => written += n.unwrap(),
                Err(_) => break,
            }
            assert!(
                written <= 4 * SOCKET_BUFFER,
                "{written} bytes accepted for a reader that reads nothing"
            );
        }
        // The peer's receive buffer and our send buffer are full, no more.
        assert!(
            written >= SOCKET_BUFFER,
            "only {written} bytes before blocking"
        );
        assert!(written <= 2 * SOCKET_BUFFER, "{written} bytes buffered");
        // Reading resumes: the blocked writer finishes, everything arrives.
        let extra = 3 * SOCKET_BUFFER;
        let writer = tokio::spawn(async move {
            let mut left = extra;
            while left > 0 {
                let n = left.min(chunk.len());
                c.write_all(&chunk[..n]).await.unwrap();
                left -= n;
            }
            c.shutdown().await.unwrap();
            c
        });
        let mut all = Vec::new();
        within("read everything", s.read_to_end(&mut all))
            .await
            .unwrap();
        assert_eq!(all.len(), written + extra);
        assert!(all.iter().all(|&b| b == 7));
        within("writer", writer).await.unwrap();
    }

    #[tokio::test]
    async fn connect_errors_refused_timed_out_and_foreign_source() {
        let p = pair();
        // Nobody listens on B:9: B answers with a reset.
        let started = Instant::now();
        let err =
            p.a.connect(A, SocketAddrV4::new(B, 9), Duration::from_secs(10))
                .await
                .err()
                .expect("connect to a closed port");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // A source address the stack does not own.
        let err =
            p.a.connect(
                Ipv4Addr::new(100, 64, 0, 77),
                SocketAddrV4::new(B, 80),
                CONNECT_TIMEOUT,
            )
            .await
            .err()
            .expect("foreign source");
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable, "{err}");

        // B unplugged: no answer at all.
        let _l = p.b.listen(SocketAddrV4::new(B, 80)).await.unwrap();
        p.unplugged.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let err =
            p.a.connect(A, SocketAddrV4::new(B, 80), Duration::from_millis(400))
                .await
                .err()
                .expect("connect while unplugged");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3));
        // The abandoned attempt's socket goes away.
        eventually("abandoned socket removed", || p.a.socket_count() == 0).await;

        // Plugged back in, the same listener answers.
        p.unplugged.store(false, Ordering::Relaxed);
        p.a.connect(A, SocketAddrV4::new(B, 80), CONNECT_TIMEOUT)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn removing_an_address_resets_its_connections() {
        let p = pair();
        let (mut c, mut s, _l) = connected(&p, 5432).await;
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();

        p.a.set_addresses(&[Ipv4Addr::new(100, 64, 0, 10)]);
        // Our side fails at once, the peer sees the reset.
        let err = c.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
        let err = c.write(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
        let err = within("peer sees reset", s.read(&mut buf))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // The address can no longer be used, the new one can.
        let err =
            p.a.connect(A, SocketAddrV4::new(B, 5432), CONNECT_TIMEOUT)
                .await
                .err()
                .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
        p.a.connect(
            Ipv4Addr::new(100, 64, 0, 10),
            SocketAddrV4::new(B, 5432),
            CONNECT_TIMEOUT,
        )
        .await
        .unwrap();
        // Packets to the removed address are ignored (no reset from A).
        drop(c);
    }

    #[tokio::test]
    async fn abort_and_drop_with_unread_data_reset_the_peer_drop_after_reading_closes() {
        let p = pair();
        let l = p.b.listen(SocketAddrV4::new(B, 22)).await.unwrap();
        let target = SocketAddrV4::new(B, 22);

        // abort(): the peer's read and write fail with a reset.
        let mut c = p.a.connect(A, target, CONNECT_TIMEOUT).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        c.abort();
        let mut buf = [0u8; 8];
        let err = within("read after abort", s.read(&mut buf))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let err = s.write(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let err = c.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");

        // Dropped with data it never read: reset.
        let c = p.a.connect(A, target, CONNECT_TIMEOUT).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"unread").await.unwrap();
        let c_local = c.local_addr();
        eventually("data reaches the client", || {
            let st = p.a.inner.shared.lock();
            st.conns.iter().any(|(h, conn)| {
                conn.local == c_local && st.sockets.get::<tcp::Socket>(*h).recv_queue() == 6
            })
        })
        .await;
        drop(c);
        let err = within("read after drop", s.read(&mut buf))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");

        // Dropped after reading everything: a graceful close (EOF).
        let mut c = p.a.connect(A, target, CONNECT_TIMEOUT).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"read").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        drop(c);
        assert_eq!(within("eof after drop", s.read(&mut buf)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn thousands_of_sequential_connections_leave_no_sockets_behind() {
        let p = pair();
        let l = p.b.listen(SocketAddrV4::new(B, 443)).await.unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    break;
                };
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    s.read_to_end(&mut req).await.unwrap();
                    s.write_all(&req).await.unwrap();
                });
            }
        });
        let target = SocketAddrV4::new(B, 443);
        let mut ports = HashSet::new();
        within("2000 connections", async {
            for i in 0..2000u32 {
                let mut c = p.a.connect(A, target, CONNECT_TIMEOUT).await.unwrap();
                ports.insert(c.local_addr().port());
                c.write_all(&i.to_be_bytes()).await.unwrap();
                c.shutdown().await.unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, i.to_be_bytes());
            }
        })
        .await;
        // Each connection had its own port.
        assert_eq!(ports.len(), 2000);
        // Only the listener's waiting sockets remain.
        eventually("client sockets freed", || p.a.socket_count() == 0).await;
        eventually("server sockets freed", || {
            p.b.socket_count() == LISTEN_BACKLOG
        })
        .await;
        assert!(p.a.inner.shared.lock().ports.is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn dropping_the_stack_fails_pending_reads() {
        let p = pair();
        let (mut c, _s, _l) = connected(&p, 6379).await;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            c.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        let Pair { a, b, .. } = p;
        drop(a);
        let err = within("pending read", reader).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
        drop(b);
    }

    #[tokio::test]
    async fn listen_checks_its_address() {
        let p = pair();
        let err = p.b.listen(SocketAddrV4::new(A, 80)).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
        let l = p.b.listen(SocketAddrV4::new(B, 80)).await.unwrap();
        let err = p.b.listen(SocketAddrV4::new(B, 80)).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        let _again = p.b.listen(SocketAddrV4::new(B, 80)).await.unwrap();
        // Removing the address closes the listener.
        p.b.set_addresses(&[]);
        let err = _again.accept().await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
    }
}
