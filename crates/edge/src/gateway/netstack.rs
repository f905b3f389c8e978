//! A userspace TCP/IP stack (smoltcp) that dials TCP connections from given
//! overlay addresses and exchanges raw IPv4 packets with the member's tunnel.
//!
//! One task owns the smoltcp interface and its sockets. Packets the stack
//! emits go to the `outbound` channel given to [`NetStack::spawn`] (the
//! member encrypts them for the right peer); packets from the tunnel come in
//! through [`NetStack::deliver`]. Each [`TcpStream`] is an ordinary tokio
//! `AsyncRead + AsyncWrite`, with bounded buffers: a slow reader closes the
//! TCP window instead of growing memory.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// How long [`NetStack::connect`] waits for the SYN-ACK.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle to a running stack; clones share it. The task ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct NetStack {}

impl NetStack {
    /// Starts the stack's task. IPv4 packets it emits (at most `mtu` bytes
    /// each) go to `outbound`; when that channel is full they are dropped,
    /// as a NIC would, and TCP retransmits.
    pub fn spawn(mtu: usize, outbound: mpsc::Sender<Vec<u8>>) -> NetStack {
        let _ = (mtu, outbound);
        todo!()
    }

    /// Hands the stack one IPv4 packet that came out of the tunnel. Never
    /// blocks: when the stack is behind, the packet is dropped.
    pub fn deliver(&self, packet: &[u8]) {
        let _ = packet;
        todo!()
    }

    /// The addresses the stack owns (replaces the set). Packets to other
    /// addresses are ignored; connections from removed addresses are reset.
    pub fn set_addresses(&self, addrs: &[Ipv4Addr]) {
        let _ = addrs;
        todo!()
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
        let _ = (src, dst, timeout);
        todo!()
    }
}

/// One TCP connection of the stack. Shutdown sends FIN; drop closes it
/// (reset if data was left unread).
pub struct TcpStream {}

impl TcpStream {
    /// Resets the connection now (RST).
    pub fn abort(&mut self) {
        todo!()
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let _ = (cx, buf);
        todo!()
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let _ = (cx, buf);
        todo!()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        todo!()
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        todo!()
    }
}
