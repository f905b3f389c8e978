//! The data plane's IO shell: a TUN device and a UDP socket, and the threads
//! that move packets between them through the sans-IO [`Tunnel`] core.
//!
//! Three threads: the packet thread (UDP → decrypt → TUN, and at low rates
//! TUN → encrypt → UDP too), a TUN helper that takes over TUN → encrypt → UDP
//! under load so that encryption and decryption run on two cores, and a
//! timer tick. Each wakes on readiness, drains a whole batch, takes the
//! core's lock once per batch, and writes its outputs after releasing it.
//! Buffers are allocated once at start; the UDP side uses `quinn-udp` for
//! recvmmsg/GRO and GSO so that a batch costs few syscalls.
//!
//! Latency: at a low rate one thread carries a round trip's both halves, so
//! a ping or a request/response wakes one thread per packet, on a warm cache,
//! instead of two threads handing over to each other. When a TUN read brings
//! a batch (`HANDOVER_BATCH` packets or more) the packet thread hands the
//! TUN device to the helper; the helper hands it back when it falls idle.
//! The kernel often answers a packet while it is being written to the TUN
//! device (an echo reply, a TCP ACK, a local service's response), so after a
//! small receive batch the packet thread reads the TUN device once itself
//! and sends what it finds, whoever owns the device. The right to read the
//! device (with its buffers) is a lock held from read to send, so packets of
//! a flow leave in order across hand-overs. At a low rate each read is sent
//! at once and the device is looked at again afterwards.
//!
//! The peers in use (at most 16, the most recently heard) each get a UDP
//! socket connected to their direct endpoint on the node's port
//! (`SO_REUSEPORT`, as WireGuard's userspace implementations do): the kernel
//! hands a peer's datagrams to its socket without an input route lookup, and
//! a datagram sent on it without an address uses the route kept with the
//! socket. The packet thread polls them all alike.
//!
//! On Linux the TUN device is opened with offloads when the kernel allows it
//! (`IFF_VNET_HDR` with TSO4/TSO6, and USO where supported): one read brings
//! a TCP or UDP "super-packet" of up to 64 KiB that is split here into
//! MTU-sized IP packets before encryption, and the packets decrypted from
//! one receive batch are coalesced per flow (GRO) so that one write hands the
//! kernel up to 64 KiB. `TRELLIS_TUN_OFFLOAD=0` turns this off.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

pub mod batch;

use anyhow::Context;
pub use batch::{wait_fd, BatchSocket, Out, RecvBufs, RECV_BATCH};
use trellis_tunnel::{Action, PingError, PingResult, Tunnel, Via, MIN_BUFFER};
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Packets read from the TUN device per batch without offloads.
const TUN_BATCH: usize = 64;
/// Packet slots per batch with offloads: another read is made while a whole
/// split super-packet still fits.
const TUN_OFFLOAD_SLOTS: usize = 2 * IDEAL_BATCH_SIZE;
/// Packets coalesced per TUN write batch (GRO) with offloads.
const GRO_BATCH: usize = IDEAL_BATCH_SIZE;
/// Largest receive batch after which the packet thread looks for the
/// kernel's answers in the TUN device itself.
const ANSWER_BATCH: usize = 4;
/// A TUN drain of this many packets hands the TUN device to the helper
/// thread (see the module documentation).
const HANDOVER_BATCH: usize = 8;
/// The helper hands the TUN device back after this long without a packet...
const HANDBACK_IDLE_MS: i32 = 2;
/// ...or after this many drains in a row of at most one packet.
const HANDBACK_SMALL_DRAINS: u32 = 64;
/// Who reads the TUN device when it becomes readable.
const TUN_OWNER_PACKET: u8 = 0;
const TUN_OWNER_HELPER: u8 = 1;
/// The TUN device readable this soon after a write that was not looked
/// at for an answer: it was an answer.
const ANSWER_WINDOW: Duration = Duration::from_micros(100);
/// A TUN read this long after the last one that brought packets is sent
/// at once, without looking for more first.
const EAGER_GAP: Duration = Duration::from_micros(50);
/// Largest IP packet, and so the largest coalesced write.
const MAX_IP_PACKET: usize = 65_535;
/// Environment variable that turns TUN offloads off (`0`, `false`, `off`, `no`).
pub const OFFLOAD_ENV: &str = "TRELLIS_TUN_OFFLOAD";
/// How often the threads look at the stop flag when idle.
const IDLE_POLL_MS: i32 = 200;
const TIMER_TICK: Duration = Duration::from_millis(100);
/// At most this many peers in use get a socket connected to them (see
/// [`reconcile_connected`]); the packet thread polls each.
const MAX_CONNECTED: usize = 16;

#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Name of the TUN interface, e.g. `trellis0`.
    pub ifname: String,
    pub address: Ipv4Addr,
    /// Prefix length of the account's block: the route for the whole block goes into the tunnel.
    pub prefix_len: u8,
    pub mtu: u16,
    /// UDP port for WireGuard; 0 picks a free one.
    pub listen_port: u16,
}

/// Counters of what the shell dropped, for status and debugging.
#[derive(Debug, Default)]
pub struct Counters {
    pub tun_rx_packets: AtomicU64,
    pub udp_rx_datagrams: AtomicU64,
    pub dropped: AtomicU64,
    pub send_errors: AtomicU64,
    /// Times the packet thread handed the TUN device to the helper.
    pub tun_handovers: AtomicU64,
}

/// Where frames for the TCP relay go (the node agent's WebSocket task).
pub type RelayTcpSink = Box<dyn Fn(&[u8]) + Send + Sync>;

struct Shared {
    tunnel: Mutex<Tunnel>,
    /// The right to read the TUN device, with the buffers for it.
    tun_rx: Mutex<TunRx>,
    relay_tcp: Mutex<Option<RelayTcpSink>>,
    tun: SyncDevice,
    udp: BatchSocket,
    /// Whether `udp`'s port can be shared with connected sockets.
    port_shared: bool,
    /// Sockets connected to the direct endpoints of the peers in use, on
    /// `udp`'s port (see [`reconcile_connected`]).
    conns: RwLock<Vec<Arc<Conn>>>,
    /// Bumped on every change of `conns`.
    conns_gen: AtomicU64,
    /// [`TUN_OWNER_PACKET`] or [`TUN_OWNER_HELPER`]; changed only by the owner.
    tun_owner: AtomicU8,
    /// Wakes the packet thread when the helper hands the TUN device back.
    handback: OwnedFd,
    /// The helper thread, to wake it when it is handed the TUN device.
    helper: OnceLock<Thread>,
    stop: AtomicBool,
    counters: Counters,
    /// The TUN device carries a virtio-net header on every read and write.
    offload: bool,
}

/// A socket connected to one peer's direct endpoint.
struct Conn {
    to: SocketAddr,
    sock: BatchSocket,
}

/// A running data plane. Dropping it (or [`DataPlane::stop`]) stops the
/// threads and removes the TUN interface.
pub struct DataPlane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    listen_port: u16,
}

impl DataPlane {
    pub fn start(config: &DataPlaneConfig, tunnel: Tunnel) -> anyhow::Result<DataPlane> {
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(&config.ifname)
                .ipv4(config.address, config.prefix_len, None)
                .mtu(config.mtu)
                .offload(offload)
                .build_sync()
        };
        let tun = if offload_wanted() {
            match build(true) {
                Ok(tun) => Some(tun),
                Err(e) => {
                    tracing::info!(error = %e, "TUN offloads refused by the kernel; using plain reads and writes");
                    None
                }
            }
        } else {
            tracing::info!("TUN offloads turned off ({OFFLOAD_ENV}=0)");
            None
        };
        let tun = match tun {
            Some(tun) => tun,
            None => build(false).with_context(|| {
                format!(
                    "cannot create TUN interface {} (needs root or CAP_NET_ADMIN and /dev/net/tun)",
                    config.ifname
                )
            })?,
        };
        let offload = tun.tcp_gso();
        if offload {
            tracing::info!(
                udp = tun.udp_gso(),
                "TUN offloads on: TCP segmentation and coalescing{}",
                if tun.udp_gso() { ", UDP too" } else { "" }
            );
        }
        tun.set_nonblocking(true)
            .context("setting the TUN device non-blocking")?;

        let udp = bind_udp(config.listen_port)?;
        let port_shared = match batch::share_port(&udp) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(error = %e, "cannot share the UDP port; no connected sockets");
                false
            }
        };
        let udp = BatchSocket::new(udp).context("configuring the UDP socket")?;
        let listen_port = udp.local_addr()?.port();
        // SAFETY: eventfd takes no pointers; a valid result is a new fd we own.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error()).context("creating an eventfd");
        }
        // SAFETY: `efd` is a fresh, valid descriptor owned by nobody else.
        let handback = unsafe { OwnedFd::from_raw_fd(efd) };

        let shared = Arc::new(Shared {
            tunnel: Mutex::new(tunnel),
            tun_rx: Mutex::new(TunRx::new(config.mtu as usize, offload)),
            relay_tcp: Mutex::new(None),
            tun,
            udp,
            port_shared,
            conns: RwLock::new(Vec::new()),
            conns_gen: AtomicU64::new(0),
            tun_owner: AtomicU8::new(TUN_OWNER_PACKET),
            handback,
            helper: OnceLock::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            offload,
        });
        let mut threads = Vec::new();
        for (name, f) in [
            ("trellis-tun", tun_helper_loop as fn(&Shared)),
            ("trellis-packets", packet_loop),
            ("trellis-timers", timer_loop),
        ] {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&s))
                .context("spawning a data-plane thread")?;
            if name == "trellis-tun" {
                let _ = shared.helper.set(t.thread().clone());
            }
            threads.push(t);
        }
        tracing::info!(
            ifname = %config.ifname,
            address = %config.address,
            listen_port,
            offload,
            "data plane up"
        );
        Ok(DataPlane {
            shared,
            threads,
            listen_port,
        })
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// The tunnel core, for peer updates and status. Hold the lock briefly:
    /// the packet threads wait on it.
    pub fn tunnel(&self) -> MutexGuard<'_, Tunnel> {
        lock(&self.shared.tunnel)
    }

    /// Connects (or disconnects) the TCP relay: frames the core sends over it
    /// go to `sink`, and the core may choose the `relay-tcp` path.
    pub fn set_relay_tcp(&self, sink: Option<RelayTcpSink>) {
        let up = sink.is_some();
        *self
            .shared
            .relay_tcp
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = sink;
        self.tunnel().set_tcp_relay(up);
    }

    /// A frame that came in over the TCP relay.
    pub fn handle_relay_tcp_frame(&self, frame: &[u8]) {
        let mut out = vec![0u8; frame.len() + MIN_BUFFER];
        let mut sends: Vec<Out> = Vec::new();
        let mut ctrl = vec![0u8; 4 * 2048];
        let mut ccur = 0;
        let mut deliver = None;
        {
            let now = Instant::now();
            let mut tunnel = lock(&self.shared.tunnel);
            match tunnel.handle_relay_tcp_frame(now, frame, &mut out) {
                Action::Deliver { offset, len } => deliver = Some((offset, len)),
                Action::Send { to, offset, len } => {
                    push_ctrl(
                        &mut ctrl,
                        &mut ccur,
                        &mut sends,
                        Some(to),
                        &out[offset..offset + len],
                    );
                    flush_into(&mut tunnel, now, &mut ctrl, &mut ccur, &mut sends);
                }
                Action::SendRelayTcp { offset, len } => {
                    push_ctrl(
                        &mut ctrl,
                        &mut ccur,
                        &mut sends,
                        None,
                        &out[offset..offset + len],
                    );
                    flush_into(&mut tunnel, now, &mut ctrl, &mut ccur, &mut sends);
                }
                Action::Drop(reason) => tracing::trace!(%reason, "relayed frame dropped"),
                Action::None => {}
            }
        }
        if let Some((offset, len)) = deliver {
            write_tun(&self.shared, &out[offset..offset + len]);
        }
        send_all(&self.shared, &ctrl, &sends);
    }

    /// Sends one probe to a peer over its current path (`trellis ping`).
    pub fn ping(&self, peer: &[u8; 32]) -> Result<u64, PingError> {
        let mut out = vec![0u8; 512];
        let (txid, action) = self.tunnel().ping(Instant::now(), peer, &mut out)?;
        let mut sends = Vec::new();
        match action {
            Action::Send { to, offset, len } => sends.push(Out {
                to: Some(to),
                offset,
                len,
            }),
            Action::SendRelayTcp { offset, len } => sends.push(Out {
                to: None,
                offset,
                len,
            }),
            _ => {}
        }
        send_all(&self.shared, &out, &sends);
        Ok(txid)
    }

    pub fn ping_result(&self, txid: u64) -> Option<PingResult> {
        self.tunnel().ping_result(txid)
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Whether the TUN device runs with offloads (large reads and coalesced writes).
    pub fn offload(&self) -> bool {
        self.shared.offload
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.shared.helper.get() {
            t.unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Offloads are on unless `TRELLIS_TUN_OFFLOAD` says otherwise.
fn offload_wanted() -> bool {
    offload_setting(std::env::var(OFFLOAD_ENV).ok().as_deref())
}

fn offload_setting(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "false" | "off" | "no")
    )
}

fn lock(m: &Mutex<Tunnel>) -> MutexGuard<'_, Tunnel> {
    // A panic in another data-plane thread must not take the node down with a
    // poisoned lock: the tunnel state itself stays consistent per call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bind_udp(port: u16) -> anyhow::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    sock.set_nonblocking(true)?;
    let addr: SocketAddr = (Ipv4Addr::UNSPECIFIED, port).into();
    match sock.bind(&addr.into()) {
        Ok(()) => {}
        Err(e) if port != 0 && e.kind() == io::ErrorKind::AddrInUse => {
            tracing::warn!(port, "UDP port in use; picking another");
            sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        }
        Err(e) => return Err(e).with_context(|| format!("binding UDP port {port}")),
    }
    Ok(sock.into())
}

/// Sends `outs` from `buf`: UDP datagrams batched (GSO), frames for the TCP
/// relay (no destination) to its sink.
fn send_all(s: &Shared, buf: &[u8], outs: &[Out]) {
    if let [Out {
        to: Some(to),
        offset,
        len,
    }] = *outs
    {
        // A lone datagram (the low-rate case) to a peer in use goes out on
        // the socket connected to it.
        if let Some(c) = read_conns(s).iter().find(|c| c.to == to) {
            if !c.sock.send_connected(to, &buf[offset..offset + len]) {
                s.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    }
    if outs.iter().any(|o| o.to.is_none()) {
        if let Some(sink) = s
            .relay_tcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            for o in outs.iter().filter(|o| o.to.is_none()) {
                sink(&buf[o.offset..o.offset + o.len]);
            }
        }
    }
    let errors = s.udp.send_batch(buf, outs);
    if errors > 0 {
        s.counters
            .send_errors
            .fetch_add(errors as u64, Ordering::Relaxed);
    }
}

/// What reads the TUN device: its buffers, and the right to read. Whoever
/// holds it reads a batch, encrypts it and sends it before letting go, so
/// packets of a flow leave in the order they were read even though two
/// threads may read (see [`udp_loop`]).
struct TunRx {
    packets: Vec<Vec<u8>>,
    lens: Vec<usize>,
    /// Where a read with offloads lands before it is split.
    raw: Vec<u8>,
    out: Vec<u8>,
    outs: Vec<Out>,
    /// Another read is made only while this many packet slots are free.
    room: usize,
    /// When a read last brought packets (see [`TunRx::drain`]).
    last_read: Instant,
}

impl TunRx {
    fn new(mtu: usize, offload: bool) -> TunRx {
        let slot = mtu + 64;
        let (slots, room) = if offload {
            // A read may split into many packets: read again only while a
            // whole super-packet's worth of slots is free.
            (TUN_OFFLOAD_SLOTS, IDEAL_BATCH_SIZE)
        } else {
            (TUN_BATCH, 1)
        };
        let raw_len = if offload {
            VIRTIO_NET_HDR_LEN + MAX_IP_PACKET
        } else {
            0
        };
        let out_slot = slot + trellis_tunnel::DATA_OVERHEAD + MIN_BUFFER;
        TunRx {
            packets: (0..slots).map(|_| vec![0u8; slot]).collect(),
            lens: vec![0usize; slots],
            raw: vec![0u8; raw_len],
            out: vec![0u8; slots * out_slot],
            outs: Vec::with_capacity(slots),
            room,
            last_read: Instant::now(),
        }
    }

    /// Reads what the TUN device holds without waiting, encrypts it and
    /// sends it.
    ///
    /// At a low rate (nothing read for [`EAGER_GAP`]) one read is sent at
    /// once, without a second read that would find the device empty: the
    /// caller's next poll shows whatever came meanwhile. Under load, reads
    /// are gathered into a batch as long as there is room.
    ///
    /// Returns the number of packets read.
    fn drain(&mut self, s: &Shared) -> usize {
        let now = Instant::now();
        let eager = now.duration_since(self.last_read) > EAGER_GAP;
        let n = self.read(s, eager);
        if n > 0 {
            self.last_read = now;
            self.seal_and_send(s, n, now);
        }
        n
    }

    /// Reads into the packet slots: once if `once`, else until the device
    /// is empty or the slots are full. Returns the number of packets.
    fn read(&mut self, s: &Shared, once: bool) -> usize {
        let slots = self.packets.len();
        let mut n = 0;
        while n + self.room <= slots {
            match s.tun.recv_multiple(
                &mut self.raw,
                &mut self.packets[n..],
                &mut self.lens[n..],
                0,
            ) {
                Ok(k) => {
                    n += k;
                    if once && n > 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if s.offload && e.raw_os_error().is_none() => {
                    // A super-packet this side cannot split: it is lost, as
                    // on a wire; the sender retransmits.
                    s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "dropping a TUN packet that cannot be split");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the TUN device failed");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
        n
    }

    /// Encrypts the first `n` packet slots and sends them (`now`: when they were read).
    fn seal_and_send(&mut self, s: &Shared, n: usize, now: Instant) {
        s.counters
            .tun_rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        self.outs.clear();
        let mut cursor = 0;
        {
            let mut tunnel = lock(&s.tunnel);
            for (buf, &len) in self.packets.iter().zip(&self.lens).take(n) {
                let packet = &buf[..len];
                match tunnel.handle_tun_packet(now, packet, &mut self.out[cursor..]) {
                    Action::Send { to, offset, len } => {
                        self.outs.push(Out {
                            to: Some(to),
                            offset: cursor + offset,
                            len,
                        });
                        cursor += offset + len;
                    }
                    Action::SendRelayTcp { offset, len } => {
                        self.outs.push(Out {
                            to: None,
                            offset: cursor + offset,
                            len,
                        });
                        cursor += offset + len;
                    }
                    Action::Drop(reason) => {
                        s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(%reason, "outbound packet dropped");
                    }
                    Action::None | Action::Deliver { .. } => {}
                }
            }
        }
        send_all(s, &self.out, &self.outs);
    }
}

/// Reads, encrypts and sends what the TUN device holds (the caller owns the
/// device); returns the number of packets read.
fn drain_tun(s: &Shared) -> usize {
    // The other thread may hold the reader for a moment (and may have read
    // what woke this one already: the read then finds nothing).
    let mut rx = s.tun_rx.lock().unwrap_or_else(|e| e.into_inner());
    rx.drain(s)
}

/// The helper's side of TUN → encrypt → UDP: asleep until the packet thread
/// hands it the TUN device under load, then reads it until it falls idle.
fn tun_helper_loop(s: &Shared) {
    let fd = s.tun.as_raw_fd();
    let mut small = 0;
    while !s.stop.load(Ordering::Relaxed) {
        if s.tun_owner.load(Ordering::Acquire) != TUN_OWNER_HELPER {
            // Woken by a hand-over or by the stop.
            std::thread::park();
            small = 0;
            continue;
        }
        let busy = wait_fd(fd, libc::POLLIN, HANDBACK_IDLE_MS) && {
            let n = drain_tun(s);
            small = if n > 1 { 0 } else { small + 1 };
            small < HANDBACK_SMALL_DRAINS
        };
        if !busy {
            s.tun_owner.store(TUN_OWNER_PACKET, Ordering::Release);
            wake(&s.handback);
        }
    }
}

/// Hands the TUN device to the helper thread (the packet thread owns it).
fn hand_over(s: &Shared) {
    s.tun_owner.store(TUN_OWNER_HELPER, Ordering::Release);
    s.counters.tun_handovers.fetch_add(1, Ordering::Relaxed);
    if let Some(t) = s.helper.get() {
        t.unpark();
    }
}

fn wake(efd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd. It fails
    // only when the counter is full, and then the reader wakes anyway.
    unsafe { libc::write(efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

fn clear(efd: &OwnedFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer; non-blocking.
    unsafe { libc::read(efd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
}

/// Decrypted packets on their way to the TUN device: written one by one, or,
/// with offloads, coalesced per flow (GRO) and written in one go per batch.
struct TunWriter {
    /// With offloads: one buffer per packet, the packet after a virtio-net
    /// header's room; each can grow to a whole coalesced packet.
    bufs: Vec<Vec<u8>>,
    filled: usize,
    gro: GROTable,
}

impl TunWriter {
    fn new(offload: bool) -> TunWriter {
        // Coalescing needs room for the header twice and a full IP packet,
        // and never grows a buffer beyond its capacity.
        let bufs = if offload {
            (0..GRO_BATCH)
                .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + MAX_IP_PACKET))
                .collect()
        } else {
            Vec::new()
        };
        TunWriter {
            bufs,
            filled: 0,
            gro: GROTable::new(),
        }
    }

    fn push(&mut self, s: &Shared, packet: &[u8]) {
        if !s.offload {
            write_tun(s, packet);
            return;
        }
        if self.filled == self.bufs.len() {
            self.flush(s);
        }
        let buf = &mut self.bufs[self.filled];
        buf.clear();
        buf.extend_from_slice(&[0u8; VIRTIO_NET_HDR_LEN]);
        buf.extend_from_slice(packet);
        self.filled += 1;
    }

    fn flush(&mut self, s: &Shared) {
        if self.filled == 0 {
            return;
        }
        let n = self.filled;
        self.filled = 0;
        if let Err(e) = s
            .tun
            .send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
        {
            tracing::debug!(error = %e, "writing to the TUN device failed");
            // The whole batch is lost, not one packet.
            s.counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// UDP → decrypt → TUN, and TUN → encrypt → UDP while the TUN device is
/// not handed to the helper. Reads the node's socket and the sockets
/// connected to peers in use (see [`reconcile_connected`]) alike.
fn packet_loop(s: &Shared) {
    let mut rx = Receiver::new(s.offload);
    // The connected sockets polled, as of generation `conns_gen`.
    let mut conns: Vec<Arc<Conn>> = Vec::new();
    let mut conns_gen = u64::MAX;
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        let gen = s.conns_gen.load(Ordering::Acquire);
        if gen != conns_gen {
            conns_gen = gen;
            conns = read_conns(s).clone();
            // The node's socket, the hand-back eventfd, the TUN device (its
            // fd is negative, so ignored, while the helper owns it), then
            // the connected sockets.
            pfds = [s.udp.as_raw_fd(), s.handback.as_raw_fd(), s.tun.as_raw_fd()]
                .into_iter()
                .chain(conns.iter().map(|c| c.sock.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
        }
        let owns_tun = s.tun_owner.load(Ordering::Acquire) == TUN_OWNER_PACKET;
        pfds[2].fd = if owns_tun { s.tun.as_raw_fd() } else { -1 };
        // SAFETY: `pfds.len()` valid pollfds for the duration of the call.
        let ready =
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, IDLE_POLL_MS) };
        if ready <= 0 {
            continue;
        }
        if pfds[1].revents != 0 {
            clear(&s.handback);
        }
        let tun_ready = owns_tun && pfds[2].revents != 0;
        if tun_ready
            && rx
                .looked_away
                .is_some_and(|at| at.elapsed() < ANSWER_WINDOW)
        {
            // An answer came after all (not a packet of its own, later):
            // look for the next one at once.
            rx.answering = true;
        }
        rx.looked_away = None;
        if tun_ready && drain_tun(s) >= HANDOVER_BATCH {
            hand_over(s);
        }
        if pfds[0].revents != 0 {
            rx.receive(s, &s.udp);
        }
        for (c, p) in conns.iter().zip(&pfds[3..]) {
            if p.revents != 0 {
                rx.receive(s, &c.sock);
            }
        }
    }
}

/// The packet thread's receive side: buffers, and what it learned about
/// the traffic (see [`Receiver::receive`]).
struct Receiver {
    bufs: RecvBufs,
    plain: Vec<u8>,
    delivered: Vec<(usize, usize)>,
    ctrl: Vec<u8>,
    ctrl_outs: Vec<Out>,
    writer: TunWriter,
    /// Whether the kernel answered the last packets written (see below).
    answering: bool,
    looked_away: Option<Instant>,
    /// When the last receive was made (see the receive width below).
    last_rx: Instant,
}

impl Receiver {
    fn new(offload: bool) -> Receiver {
        Receiver {
            bufs: RecvBufs::default(),
            // Plaintext is never longer than its ciphertext.
            plain: vec![0u8; quinn_udp::BATCH_SIZE * 65_536 + MIN_BUFFER],
            delivered: Vec::with_capacity(4096),
            ctrl: vec![0u8; 64 * 2048],
            ctrl_outs: Vec::with_capacity(64),
            writer: TunWriter::new(offload),
            answering: true,
            looked_away: None,
            last_rx: Instant::now(),
        }
    }

    /// Receives from `sock` until it is empty (or, at a low rate, once),
    /// decrypts, and writes to the TUN device.
    fn receive(&mut self, s: &Shared, sock: &BatchSocket) {
        let Receiver {
            bufs,
            plain,
            delivered,
            ctrl,
            ctrl_outs,
            writer,
            ..
        } = self;
        loop {
            let now = Instant::now();
            // At a low rate (nothing received for a while) one message is
            // what there is; under load, a whole batch.
            let width = if now.duration_since(self.last_rx) > EAGER_GAP {
                1
            } else {
                RECV_BATCH
            };
            self.last_rx = now;
            let received = match sock.recv(bufs, width) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they are not fatal.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            delivered.clear();
            ctrl_outs.clear();
            let mut pcur = 0;
            let mut ccur = 0;
            let mut datagrams = 0u64;
            {
                let mut tunnel = lock(&s.tunnel);
                for (from, datagram) in bufs.datagrams() {
                    datagrams += 1;
                    match tunnel.handle_datagram(now, from, datagram, &mut plain[pcur..]) {
                        Action::Deliver { offset, len } => {
                            delivered.push((pcur + offset, len));
                            pcur += offset + len;
                        }
                        Action::Send { to, offset, len } => {
                            let bytes = &plain[pcur + offset..pcur + offset + len];
                            push_ctrl(ctrl, &mut ccur, ctrl_outs, Some(to), bytes);
                            flush_into(&mut tunnel, now, ctrl, &mut ccur, ctrl_outs);
                        }
                        Action::SendRelayTcp { offset, len } => {
                            let bytes = &plain[pcur + offset..pcur + offset + len];
                            push_ctrl(ctrl, &mut ccur, ctrl_outs, None, bytes);
                            flush_into(&mut tunnel, now, ctrl, &mut ccur, ctrl_outs);
                        }
                        Action::Drop(reason) => {
                            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::trace!(%reason, "inbound datagram dropped");
                        }
                        Action::None => {}
                    }
                }
            }
            s.counters
                .udp_rx_datagrams
                .fetch_add(datagrams, Ordering::Relaxed);
            if let [(off, len)] = delivered[..] {
                // A lone packet goes straight to the device: nothing to
                // coalesce, and no copy into the coalescing buffers.
                write_tun(s, &plain[off..off + len]);
            } else {
                for &(off, len) in delivered.iter() {
                    writer.push(s, &plain[off..off + len]);
                }
                writer.flush(s);
            }
            send_all(s, ctrl, ctrl_outs);
            if !delivered.is_empty() && delivered.len() <= ANSWER_BATCH {
                // The kernel often answers a packet while it is being
                // written (an echo reply, a TCP ACK, a local service's
                // reply): it already waits in the TUN device. Sending it
                // from here saves a poll, or the helper's wake-up. Only when
                // nobody else is reading the device, and only for small
                // batches: under load the helper is awake anyway. Where the
                // last look found nothing (this node asks, the other side
                // answers), the next poll shows an answer just as well,
                // without a read that finds nothing.
                let owns = s.tun_owner.load(Ordering::Acquire) == TUN_OWNER_PACKET;
                if self.answering || !owns {
                    if let Ok(mut tun_rx) = s.tun_rx.try_lock() {
                        let n = tun_rx.drain(s);
                        self.answering = n > 0;
                        if n >= HANDOVER_BATCH && owns {
                            drop(tun_rx);
                            hand_over(s);
                        }
                    }
                } else {
                    self.looked_away = Some(Instant::now());
                }
            }
            if received == 1 && datagrams == 1 {
                // A low rate: the next poll shows what comes meanwhile,
                // without a receive that finds nothing.
                break;
            }
        }
    }
}

/// Collects the packets a completed handshake released.
fn flush_into(
    tunnel: &mut Tunnel,
    now: Instant,
    ctrl: &mut [u8],
    ccur: &mut usize,
    outs: &mut Vec<Out>,
) {
    let mut scratch = [0u8; 2048];
    loop {
        match tunnel.poll_flush(now, &mut scratch) {
            Action::Send { to, offset, len } => {
                push_ctrl(ctrl, ccur, outs, Some(to), &scratch[offset..offset + len])
            }
            Action::SendRelayTcp { offset, len } => {
                push_ctrl(ctrl, ccur, outs, None, &scratch[offset..offset + len])
            }
            Action::None => break,
            _ => {}
        }
    }
}

/// Keeps a handshake reply or a flushed packet for sending after the lock is released.
fn push_ctrl(
    buf: &mut [u8],
    cursor: &mut usize,
    outs: &mut Vec<Out>,
    to: Option<SocketAddr>,
    bytes: &[u8],
) {
    if *cursor + bytes.len() > buf.len() {
        tracing::debug!("control send buffer full; dropping a packet");
        return;
    }
    buf[*cursor..*cursor + bytes.len()].copy_from_slice(bytes);
    outs.push(Out {
        to,
        offset: *cursor,
        len: bytes.len(),
    });
    *cursor += bytes.len();
}

/// Writes one packet to the TUN device (with an empty virtio-net header
/// in front when offloads are on).
fn write_tun(s: &Shared, packet: &[u8]) {
    let header = [0u8; VIRTIO_NET_HDR_LEN];
    let fd = s.tun.as_raw_fd();
    for _ in 0..50 {
        let result = if s.offload {
            let iov = [
                libc::iovec {
                    iov_base: header.as_ptr() as *mut libc::c_void,
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: packet.as_ptr() as *mut libc::c_void,
                    iov_len: packet.len(),
                },
            ];
            // SAFETY: both iovecs point into live buffers for the duration
            // of the call, which only reads from them.
            let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        } else {
            s.tun.send(packet).map(|_| ())
        };
        match result {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(fd, libc::POLLOUT, 10);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "writing to the TUN device failed");
                s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

fn timer_loop(s: &Shared) {
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 256 * 160];
    let mut outs: Vec<Out> = Vec::new();
    let mut in_use: Vec<SocketAddr> = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        outs.clear();
        let mut cursor = 0;
        {
            let now = Instant::now();
            let mut tunnel = lock(&s.tunnel);
            tunnel.poll_timers(now, &mut out, |via, bytes| {
                let to = match via {
                    Via::Udp(a) => Some(a),
                    Via::RelayTcp => None,
                };
                push_ctrl(&mut buf, &mut cursor, &mut outs, to, bytes);
            });
            if s.port_shared {
                tunnel.direct_endpoints(now, MAX_CONNECTED, &mut in_use);
            }
        }
        send_all(s, &buf, &outs);
        if s.port_shared {
            reconcile_connected(s, &in_use);
        }
    }
}

fn read_conns(s: &Shared) -> RwLockReadGuard<'_, Vec<Arc<Conn>>> {
    s.conns.read().unwrap_or_else(|e| e.into_inner())
}

/// Keeps one socket connected to each of `in_use` (the direct endpoints of
/// the peers in use), on the node's port. The kernel delivers a peer's
/// datagrams to the socket connected to it, and keeps the route with it:
/// neither side looks one up per datagram (a ping's round trip is some
/// 7 µs shorter here). The packet thread polls these sockets like the
/// node's own (it is woken to pick up a change); a socket that closes takes
/// the datagrams still queued in it along, as when a path changes on a wire.
fn reconcile_connected(s: &Shared, in_use: &[SocketAddr]) {
    let current = {
        let conns = read_conns(s);
        if conns.len() == in_use.len() && conns.iter().all(|c| in_use.contains(&c.to)) {
            return;
        }
        conns.clone()
    };
    let port = s.udp.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut next: Vec<Arc<Conn>> = Vec::with_capacity(in_use.len());
    for &to in in_use {
        if let Some(c) = current.iter().find(|c| c.to == to) {
            next.push(c.clone());
            continue;
        }
        match BatchSocket::connected(port, to) {
            Ok(sock) => next.push(Arc::new(Conn { to, sock })),
            Err(e) => tracing::debug!(error = %e, %to, "cannot connect a socket to the peer"),
        }
    }
    if next.len() == current.len() && next.iter().zip(&current).all(|(a, b)| a.to == b.to) {
        // The same sockets (another could not be made): nothing to pick up.
        return;
    }
    *s.conns.write().unwrap_or_else(|e| e.into_inner()) = next;
    s.conns_gen.fetch_add(1, Ordering::Release);
    wake(&s.handback);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_are_on_unless_the_environment_says_off() {
        assert!(offload_setting(None));
        assert!(offload_setting(Some("1")));
        assert!(offload_setting(Some("on")));
        for off in ["0", "false", "OFF", " no "] {
            assert!(!offload_setting(Some(off)), "{off:?} turns offloads off");
        }
    }
}
