//! Batched UDP for the node's data plane and the edge's relay: `recvmmsg`
//! with GRO on the way in, GSO on the way out (through `quinn-udp`), on a
//! non-blocking socket driven by `poll`. Buffers are allocated once.

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

/// A GSO batch must stay at or under 64 KiB, or the kernel refuses all of it.
pub const MAX_GSO_BYTES: usize = 65_000;
/// Bytes of one receive buffer (a GRO batch can fill it).
const RECV_BUF: usize = 65_536;
/// Socket buffers: large enough that a burst is not dropped while a thread is busy.
const SOCKET_BUFFER: usize = 4 << 20;

/// One datagram (or a run of equal-size datagrams) to send: bytes at
/// `buf[offset..offset + len]`. `to: None` marks bytes for somewhere else
/// (the TCP relay); [`BatchSocket::send_batch`] skips them.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    pub to: Option<SocketAddr>,
    pub offset: usize,
    pub len: usize,
}

pub struct BatchSocket {
    socket: UdpSocket,
    state: UdpSocketState,
}

/// Waits until `fd` is ready for `events`, or the timeout passes.
pub fn wait_fd(fd: std::os::fd::RawFd, events: i16, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents != 0
}

impl AsRawFd for BatchSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

impl BatchSocket {
    /// Takes a bound socket, makes it non-blocking, turns on GRO and sizes its buffers.
    pub fn new(socket: UdpSocket) -> io::Result<BatchSocket> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        // quinn-udp asks for each message's destination address and ECN
        // bits; nothing here reads them, so the kernel need not build those
        // control messages for every receive (GRO's segment size stays on).
        if socket.local_addr()?.is_ipv4() {
            for option in [libc::IP_PKTINFO, libc::IP_RECVTOS] {
                let _ = set_option(&socket, libc::IPPROTO_IP, option, 0);
            }
        }
        Ok(BatchSocket { socket, state })
    }

    /// A socket on the same local `port` as this node's (which must have
    /// `SO_REUSEPORT` on, see [`share_port`]), connected to `to`: the
    /// kernel hands it the datagrams from `to` and keeps the route to and
    /// from `to` with it, where an unconnected socket costs a route lookup
    /// per datagram on both the sending and the receiving side. IPv4 only.
    pub fn connected(port: u16, to: SocketAddr) -> io::Result<BatchSocket> {
        if !to.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "connected sockets are IPv4 only",
            ));
        }
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        set_option(&sock, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        sock.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())?;
        sock.connect(&to.into())?;
        BatchSocket::new(sock.into())
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits up to `timeout_ms` for something to read.
    pub fn wait_readable(&self, timeout_ms: i32) -> bool {
        wait_fd(self.socket.as_raw_fd(), libc::POLLIN, timeout_ms)
    }

    /// Reads one batch of at most `max` messages (1 to
    /// [`quinn_udp::BATCH_SIZE`]) into `bufs`; `Ok(0)` when nothing is
    /// waiting. A message is one datagram, or several coalesced by GRO.
    ///
    /// At a low rate one message is all there is: asking for one saves
    /// preparing (and the kernel looking at) a whole batch of headers.
    pub fn recv(&self, bufs: &mut RecvBufs, max: usize) -> io::Result<usize> {
        let max = max.clamp(1, quinn_udp::BATCH_SIZE);
        if max == 1 {
            return self.recv_one(bufs);
        }
        let mut slices: [io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = {
            let mut chunks = bufs.data.chunks_mut(RECV_BUF);
            std::array::from_fn(|_| io::IoSliceMut::new(chunks.next().unwrap_or(&mut [])))
        };
        loop {
            match self.state.recv(
                UdpSockRef::from(&self.socket),
                &mut slices[..max],
                &mut bufs.meta,
            ) {
                Ok(n) => {
                    bufs.filled = n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    bufs.filled = 0;
                    return Ok(0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One message with a plain `recvmsg`: one header, a small control
    /// buffer for GRO's segment size, nothing else to prepare or decode.
    /// At a low rate every receive runs from a cold cache, and quinn-udp's
    /// batch receive prepares and clears room for a whole batch.
    fn recv_one(&self, bufs: &mut RecvBufs) -> io::Result<usize> {
        bufs.filled = 0;
        // SAFETY: plain-old-data C structs; all-zero is a valid value.
        let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut ctrl = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: bufs.data.as_mut_ptr().cast(),
            iov_len: RECV_BUF.min(bufs.data.len()),
        };
        // SAFETY: as above.
        let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
        hdr.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = ctrl.as_mut_ptr().cast();
        hdr.msg_controllen = mem::size_of_val(&ctrl) as _;
        let len = loop {
            // SAFETY: every pointer in `hdr` points at a live local or at
            // `bufs.data`, with its length, for the duration of the call.
            let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut hdr, 0) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        if hdr.msg_flags & libc::MSG_CTRUNC != 0 {
            // The segment size may be missing: the message cannot be split.
            return Err(io::Error::other("UDP control data truncated"));
        }
        let mut stride = len;
        // SAFETY: `hdr` was filled by the kernel; the CMSG_* helpers walk
        // its control buffer within `msg_controllen`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if size > 0 {
                        stride = size as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&hdr, c);
            }
        }
        let Some(addr) = socket_addr(&name) else {
            return Err(io::Error::other("UDP message without an IP source"));
        };
        let m = &mut bufs.meta[0];
        *m = RecvMeta::default();
        m.addr = addr;
        m.len = len;
        m.stride = stride;
        bufs.filled = 1;
        Ok(1)
    }

    /// Sends `outs` from `buf`, merging runs that share a destination, lie
    /// end to end and have equal sizes (the last may be shorter) into one GSO
    /// send each. Entries without a destination are skipped.
    pub fn send_batch(&self, buf: &[u8], outs: &[Out]) -> usize {
        let max_segments = self.state.max_gso_segments().max(1);
        let mut errors = 0;
        let mut i = 0;
        while i < outs.len() {
            let first = outs[i];
            let Some(destination) = first.to else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            let mut end = first.offset + first.len;
            while j < outs.len()
                && j - i < max_segments
                && outs[j].to == first.to
                && outs[j].offset == end
                && outs[j].len <= first.len
                && outs[j - 1].len == first.len
                && end + outs[j].len - first.offset <= MAX_GSO_BYTES
            {
                end += outs[j].len;
                j += 1;
            }
            let transmit = Transmit {
                destination,
                ecn: None,
                contents: &buf[first.offset..end],
                segment_size: (j - i > 1).then_some(first.len),
                src_ip: None,
            };
            if !self.send_one(&transmit) {
                errors += 1;
            }
            i = j;
        }
        errors
    }

    fn send_one(&self, t: &Transmit<'_>) -> bool {
        // A lone datagram goes out with a plain sendto: quinn-udp adds a
        // TOS control message to every send, which the kernel parses.
        self.retry(t.destination, || match t.segment_size {
            None => self.socket.send_to(t.contents, t.destination).map(drop),
            Some(_) => self.state.try_send(UdpSockRef::from(&self.socket), t),
        })
    }

    /// Sends one datagram to where the socket is connected (see
    /// [`BatchSocket::connected`]): no destination address, so the kernel
    /// uses the route it keeps with the socket instead of looking one up.
    pub fn send_connected(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.retry(to, || self.socket.send(datagram).map(drop))
    }

    /// Runs `send` until it is done, waiting while the socket buffer is full.
    fn retry(&self, to: SocketAddr, mut send: impl FnMut() -> io::Result<()>) -> bool {
        for _ in 0..50 {
            match send() {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(self.socket.as_raw_fd(), libc::POLLOUT, 10);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, %to, "UDP send failed");
                    return false;
                }
            }
        }
        false
    }
}

/// Lets sockets made by [`BatchSocket::connected`] share `socket`'s port.
/// Set after `socket` was bound, so that its bind still failed if another
/// socket held the port; from now on, only sockets of the same user that ask
/// for it can join.
pub fn share_port(socket: &UdpSocket) -> io::Result<()> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
}

/// The IP socket address the kernel wrote into `name`, if it is one.
fn socket_addr(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match name.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub(crate) fn set_option(
    socket: &impl AsRawFd,
    level: i32,
    name: i32,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Most messages one receive takes.
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;

/// Receive buffers for one batch, allocated once.
pub struct RecvBufs {
    data: Vec<u8>,
    meta: [RecvMeta; quinn_udp::BATCH_SIZE],
    filled: usize,
}

impl Default for RecvBufs {
    fn default() -> Self {
        RecvBufs {
            data: vec![0u8; quinn_udp::BATCH_SIZE * RECV_BUF],
            meta: [RecvMeta::default(); quinn_udp::BATCH_SIZE],
            filled: 0,
        }
    }
}

impl RecvBufs {
    /// Every datagram of the last batch with its source (GRO batches split at their stride).
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.filled).flat_map(move |i| {
            let m = &self.meta[i];
            let data = &self.data[i * RECV_BUF..i * RECV_BUF + m.len];
            let stride = if m.stride == 0 {
                m.len.max(1)
            } else {
                m.stride
            };
            data.chunks(stride).map(move |d| (m.addr, d))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` datagrams to `to` lying end to end, datagram `k` filled with
    /// byte `k`: `size` bytes each but the last, which has `last`.
    fn run_of(to: SocketAddr, n: u8, size: usize, last: usize) -> (Vec<u8>, Vec<Out>) {
        let mut buf = Vec::new();
        let mut outs = Vec::new();
        for k in 0..n {
            let len = if k == n - 1 { last } else { size };
            outs.push(Out {
                to: Some(to),
                offset: buf.len(),
                len,
            });
            buf.extend(std::iter::repeat_n(k, len));
        }
        (buf, outs)
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_intact() {
        let a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        // 10 datagrams of 1000 bytes and a short last one, end to end: one GSO send.
        let (buf, outs) = run_of(to, 11, 1000, 300);
        assert_eq!(a.send_batch(&buf, &outs), 0);
        let mut bufs = RecvBufs::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for _ in 0..50 {
            if got.len() == 11 {
                break;
            }
            b.wait_readable(100);
            b.recv(&mut bufs, RECV_BATCH).unwrap();
            got.extend(bufs.datagrams().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got.len(), 11);
        for (k, d) in got.iter().enumerate() {
            assert!(d.iter().all(|x| *x == k as u8), "datagram {k} intact");
        }
        assert_eq!(got[10].len(), 300);
    }

    /// The next datagram `sock` receives, with its sender.
    fn next_datagram(sock: &BatchSocket) -> Option<(SocketAddr, Vec<u8>)> {
        let mut bufs = RecvBufs::default();
        for _ in 0..20 {
            sock.wait_readable(50);
            if sock.recv(&mut bufs, 1).unwrap() > 0 {
                return bufs.datagrams().next().map(|(f, d)| (f, d.to_vec()));
            }
        }
        None
    }

    #[test]
    fn a_connected_socket_takes_its_peers_datagrams_and_sends_from_the_shared_port() {
        let node = UdpSocket::bind("0.0.0.0:0").unwrap();
        share_port(&node).unwrap();
        let node = BatchSocket::new(node).unwrap();
        let port = node.local_addr().unwrap().port();
        let at_node = SocketAddr::from(([127, 0, 0, 1], port));
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let conn = BatchSocket::connected(port, peer_addr).unwrap();

        peer.send_to(b"from the peer", at_node).unwrap();
        other.send_to(b"from another", at_node).unwrap();
        assert_eq!(
            next_datagram(&conn),
            Some((peer_addr, b"from the peer".to_vec()))
        );
        assert_eq!(
            next_datagram(&node),
            Some((other.local_addr().unwrap(), b"from another".to_vec()))
        );

        // Sent on the connected socket, it comes from the node's port.
        assert!(conn.send_connected(peer_addr, b"answer"));
        let mut buf = [0u8; 64];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"answer"[..], at_node));

        // Closed, the node's socket gets the peer's datagrams again.
        drop(conn);
        peer.send_to(b"after", at_node).unwrap();
        assert_eq!(next_datagram(&node), Some((peer_addr, b"after".to_vec())));
    }

    #[test]
    fn a_port_not_shared_takes_no_connected_socket() {
        let node = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = node.local_addr().unwrap().port();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = BatchSocket::connected(port, peer.local_addr().unwrap()).err();
        assert_eq!(
            err.map(|e| e.kind()),
            Some(io::ErrorKind::AddrInUse),
            "the port stays the node's alone"
        );
    }

    #[test]
    fn a_receive_of_one_takes_one_and_leaves_the_rest_in_order() {
        let a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        // Three separate sends of different sizes: three messages.
        let buf: Vec<u8> = (0..600).map(|i| (i / 100) as u8).collect();
        for (offset, len) in [(0, 100), (100, 200), (300, 300)] {
            let outs = [Out {
                to: Some(to),
                offset,
                len,
            }];
            assert_eq!(a.send_batch(&buf, &outs), 0);
        }
        let mut bufs = RecvBufs::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for _ in 0..50 {
            if got.len() == 3 {
                break;
            }
            b.wait_readable(100);
            let n = b.recv(&mut bufs, 1).unwrap();
            assert!(n <= 1, "asked for one message, got {n}");
            got.extend(bufs.datagrams().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(
            got,
            vec![
                buf[..100].to_vec(),
                buf[100..300].to_vec(),
                buf[300..].to_vec()
            ]
        );
        // Nothing is left over.
        assert_eq!(b.recv(&mut bufs, RECV_BATCH).unwrap(), 0);
    }

    #[test]
    fn a_receive_of_one_splits_a_coalesced_batch_and_names_its_sender() {
        let a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        // 6 datagrams of 700 bytes and a short last one in one GSO send:
        // GRO hands them over as one message that must be split again.
        let (buf, outs) = run_of(to, 7, 700, 123);
        assert_eq!(a.send_batch(&buf, &outs), 0);
        let mut bufs = RecvBufs::default();
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        for _ in 0..50 {
            if got.len() == 7 {
                break;
            }
            b.wait_readable(100);
            assert!(b.recv(&mut bufs, 1).unwrap() <= 1);
            got.extend(bufs.datagrams().map(|(from, d)| (from, d.to_vec())));
        }
        assert_eq!(got.len(), 7, "seven datagrams, not one glued run");
        for (k, (from, d)) in got.iter().enumerate() {
            assert_eq!(
                *from,
                a.local_addr().unwrap(),
                "the sender's address and port"
            );
            let len = if k == 6 { 123 } else { 700 };
            assert_eq!(d.len(), len, "datagram {k}'s length");
            assert!(d.iter().all(|x| *x == k as u8), "datagram {k} intact");
        }
        assert_eq!(b.recv(&mut bufs, 1).unwrap(), 0, "nothing left over");
    }
}
