//! Batched UDP for the node's data plane and the edge's relay: `recvmmsg`
//! with GRO on the way in, GSO on the way out (through `quinn-udp`), on a
//! non-blocking socket driven by `poll`. Buffers are allocated once.

use std::io;
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
        Ok(BatchSocket { socket, state })
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
        for _ in 0..50 {
            match self.state.try_send(UdpSockRef::from(&self.socket), t) {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(self.socket.as_raw_fd(), libc::POLLOUT, 10);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, to = %t.destination, "UDP send failed");
                    return false;
                }
            }
        }
        false
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

    #[test]
    fn a_batch_goes_out_and_comes_back_intact() {
        let a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        // 10 datagrams of 1000 bytes and a short last one, end to end: one GSO send.
        let mut buf = Vec::new();
        let mut outs = Vec::new();
        for k in 0..11u8 {
            let len = if k == 10 { 300 } else { 1000 };
            outs.push(Out {
                to: Some(to),
                offset: buf.len(),
                len,
            });
            buf.extend(std::iter::repeat_n(k, len));
        }
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
}
