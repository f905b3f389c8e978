//! The edge: where nodes discover their public endpoints (STUN), and — in
//! later work — the relay for nodes that cannot reach each other directly and
//! the fetch gateway for bindings. `trellis server` runs it next to the
//! control plane.

pub mod stun;

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::UdpSocket;

/// The edge's UDP listener.
pub struct EdgeUdp {
    socket: UdpSocket,
}

impl EdgeUdp {
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<EdgeUdp> {
        let socket = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding the edge UDP port {addr}"))?;
        Ok(EdgeUdp { socket })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers discovery probes until the task is dropped.
    pub async fn serve(self) {
        let mut buf = vec![0u8; 2048];
        let mut out = [0u8; 128];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "edge UDP receive error");
                    continue;
                }
            };
            if let Some(len) = stun::respond(&buf[..n], from, &mut out) {
                let _ = self.socket.send_to(&out[..len], from).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_a_real_binding_request_on_loopback() {
        let edge = EdgeUdp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = edge.local_addr().unwrap();
        let task = tokio::spawn(edge.serve());
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let txid = [3u8; 12];
        client.send_to(&stun::request(&txid), addr).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            stun::parse_response(&buf[..n], &txid),
            Some(client.local_addr().unwrap())
        );
        task.abort();
    }
}
