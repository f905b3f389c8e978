//! The edge: where nodes discover their public endpoints (STUN) and the relay
//! for nodes that cannot reach each other directly (UDP here, WebSocket
//! through the control plane's HTTP port); later also the fetch gateway for
//! bindings. `trellis server` runs it next to the control plane.

pub mod gateway;
pub mod relay;
pub mod stun;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering};
use trellis_io::batch::{BatchSocket, Out, RecvBufs, RECV_BATCH};

pub use relay::{DropReason, Outcome, RelayHub, RelayStats, Revoked};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// How often stale relay registrations are dropped.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
/// How long the relay thread waits for a datagram before looking at the
/// stop flag and the expiry clock again.
const IDLE_POLL_MS: i32 = 200;
/// Bytes of outgoing frames gathered per batch.
const BATCH_BYTES: usize = 2 << 20;

/// The edge's UDP listener: answers STUN and drives a [`RelayHub`].
pub struct EdgeUdp {
    socket: BatchSocket,
    /// The same socket, for frames WebSocket clients send to UDP nodes.
    sender: std::net::UdpSocket,
    hub: Arc<RelayHub>,
    outbox: relay::UdpOutbox,
}

/// Stops the relay thread when the task serving it is dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl EdgeUdp {
    /// Binds `addr` and takes `hub`'s UDP outbox (a hub drives one socket).
    pub async fn bind(addr: SocketAddr, hub: Arc<RelayHub>) -> anyhow::Result<EdgeUdp> {
        let socket = std::net::UdpSocket::bind(addr).with_context(|| {
            format!("binding the edge UDP port {addr} (is another server using it?)")
        })?;
        let sender = socket.try_clone().context("cloning the edge UDP socket")?;
        let socket = BatchSocket::new(socket).context("configuring the edge UDP socket")?;
        let outbox = hub
            .take_udp_outbox()
            .context("this relay hub already drives another edge UDP socket")?;
        Ok(EdgeUdp {
            socket,
            sender,
            hub,
            outbox,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers discovery probes and relays frames until the task is dropped.
    /// The work happens on a thread of its own, a batch at a time (recvmmsg
    /// and GRO in, GSO out): relayed datagrams of one sender to one receiver
    /// arrive as a batch and leave as one.
    pub async fn serve(self) {
        let EdgeUdp {
            socket,
            sender,
            hub,
            mut outbox,
        } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let _guard = StopOnDrop(stop.clone());
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("trellis-edge-udp".into())
            .spawn(move || run(socket, hub, &thread_stop));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the edge UDP thread");
            return;
        }
        // Frames that WebSocket clients send to UDP nodes.
        while let Some((to, datagram)) = outbox.recv().await {
            for _ in 0..20 {
                match sender.send_to(&datagram, to) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %to, "edge UDP send error");
                        break;
                    }
                    Ok(_) => break,
                }
            }
        }
        std::future::pending::<()>().await;
    }
}

/// The relay thread: a batch in, a batch out.
fn run(socket: BatchSocket, hub: Arc<RelayHub>, stop: &AtomicBool) {
    let mut bufs = RecvBufs::default();
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    // Replies and relayed frames of one batch, end to end, and where each goes.
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    let mut outs: Vec<Out> = Vec::with_capacity(1024);
    let mut last_expire = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let readable = socket.wait_readable(IDLE_POLL_MS);
        let now = Instant::now();
        if now.duration_since(last_expire) >= EXPIRE_INTERVAL {
            hub.expire(now);
            last_expire = now;
        }
        if !readable {
            continue;
        }
        loop {
            match socket.recv(&mut bufs, RECV_BATCH) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "edge UDP receive error");
                    continue;
                }
            }
            batch.clear();
            outs.clear();
            let now = Instant::now();
            for (from, datagram) in bufs.datagrams() {
                if let Outcome::Send(to) = hub.handle_udp(now, from, datagram, &mut out) {
                    push(&mut batch, &mut outs, to, &out);
                }
            }
            socket.send_batch(&batch, &outs);
        }
    }
}

fn push(batch: &mut Vec<u8>, outs: &mut Vec<Out>, to: SocketAddr, bytes: &[u8]) {
    outs.push(Out {
        to: Some(to),
        offset: batch.len(),
        len: bytes.len(),
    });
    batch.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;
    use trellis_proto::frames::{
        decode_registered, FRAME_REGISTER, FRAME_RELAY_RECV, FRAME_RELAY_SEND,
    };

    const SECRET: [u8; 32] = [4; 32];

    async fn start() -> (SocketAddr, Arc<RelayHub>, tokio::task::JoinHandle<()>) {
        let hub = Arc::new(RelayHub::new(SECRET));
        let edge = EdgeUdp::bind("127.0.0.1:0".parse().unwrap(), hub.clone())
            .await
            .unwrap();
        let addr = edge.local_addr().unwrap();
        (addr, hub, tokio::spawn(edge.serve()))
    }

    async fn recv(sock: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        buf[..n].to_vec()
    }

    #[tokio::test]
    async fn answers_a_real_binding_request_on_loopback() {
        let (addr, _hub, task) = start().await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let txid = [3u8; 12];
        client.send_to(&stun::request(&txid), addr).await.unwrap();
        let answer = recv(&client).await;
        assert_eq!(
            stun::parse_response(&answer, &txid),
            Some(client.local_addr().unwrap())
        );
        task.abort();
    }

    #[tokio::test]
    async fn two_nodes_relay_through_a_running_edge() {
        let (addr, hub, task) = start().await;
        let expires = hub.unix_at(Instant::now()) + 3600;
        let keys = [[1u8; 32], [2u8; 32]];
        let mut nodes = Vec::new();
        for key in &keys {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut frame = vec![FRAME_REGISTER];
            frame.extend_from_slice(hub.issue_token(7, key, expires).as_bytes());
            sock.send_to(&frame, addr).await.unwrap();
            let answer = recv(&sock).await;
            assert_eq!(decode_registered(&answer), Some(sock.local_addr().unwrap()));
            nodes.push(sock);
        }
        for (from, to) in [(0usize, 1usize), (1, 0)] {
            let payload = format!("hello from {from}");
            let mut frame = vec![FRAME_RELAY_SEND];
            frame.extend_from_slice(&keys[to]);
            frame.extend_from_slice(payload.as_bytes());
            nodes[from].send_to(&frame, addr).await.unwrap();
            let got = recv(&nodes[to]).await;
            assert_eq!(got[0], FRAME_RELAY_RECV);
            assert_eq!(&got[1..33], &keys[from]);
            assert_eq!(&got[33..], payload.as_bytes());
        }
        assert_eq!(hub.stats().relayed_packets, 2);

        // A WebSocket client reaches a UDP node through the edge's socket.
        let c = [3u8; 32];
        let (_id, _rx) = hub.attach_ws(7, &c).unwrap();
        let mut frame = vec![FRAME_RELAY_SEND];
        frame.extend_from_slice(&keys[0]);
        frame.extend_from_slice(b"via ws");
        assert_eq!(
            hub.handle_ws_frame(Instant::now(), &c, &frame),
            Outcome::Queued
        );
        let got = recv(&nodes[0]).await;
        assert_eq!(&got[1..33], &c);
        assert_eq!(&got[33..], b"via ws");
        task.abort();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let (addr, _hub, task) = start().await;
        let other = Arc::new(RelayHub::new(SECRET));
        let err = EdgeUdp::bind(addr, other).await.err().expect("port taken");
        assert!(
            format!("{err:#}").contains("binding the edge UDP port"),
            "{err:#}"
        );
        task.abort();
    }
}
