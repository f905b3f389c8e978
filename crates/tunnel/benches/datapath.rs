//! Per-packet cost of the tunnel core, without namespaces or sockets:
//! encrypt (TUN → UDP) and decrypt (UDP → TUN) of one packet on an
//! established session, per packet size, and a direct-path batch of 64.
//!
//!   cargo bench -p trellis-tunnel --bench datapath

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use trellis_policy::{Filter, FilterRule, FilterSpec, PortRange};
use trellis_tunnel::{Action, PeerConfig, PublicKey, StaticSecret, Tunnel};

const A_UL: &str = "198.18.0.1:51820";
const B_UL: &str = "198.18.0.2:51820";

fn ip_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 2]);
    p[16..20].copy_from_slice(&[100, 64, 0, 3]);
    p
}

/// Two tunnels with an established session (handshake done in memory).
fn pair() -> (Tunnel, Tunnel) {
    let ka = StaticSecret::from([1u8; 32]);
    let kb = StaticSecret::from([2u8; 32]);
    let pa = *PublicKey::from(&ka).as_bytes();
    let pb = *PublicKey::from(&kb).as_bytes();
    let now = Instant::now();
    let mut a = Tunnel::new(ka, 1);
    let mut b = Tunnel::new(kb, 2);
    a.upsert_peer(
        now,
        PeerConfig {
            public_key: pb,
            name: "b".into(),
            allowed_ips: vec!["100.64.0.3/32".parse().unwrap()],
            endpoints: vec![B_UL.parse().unwrap()],
        },
    );
    b.upsert_peer(
        now,
        PeerConfig {
            public_key: pa,
            name: "a".into(),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            endpoints: vec![A_UL.parse().unwrap()],
        },
    );
    let a_ul: SocketAddr = A_UL.parse().unwrap();
    let b_ul: SocketAddr = B_UL.parse().unwrap();
    let mut out = vec![0u8; 4096];
    let mut out2 = vec![0u8; 4096];
    // Initiation a → b, response b → a, then the queued packet a → b.
    let Action::Send { offset, len, .. } = a.handle_tun_packet(now, &ip_packet(100), &mut out)
    else {
        panic!("no initiation");
    };
    let init = out[offset..offset + len].to_vec();
    let Action::Send { offset, len, .. } = b.handle_datagram(now, a_ul, &init, &mut out2) else {
        panic!("no response");
    };
    let resp = out2[offset..offset + len].to_vec();
    let _ = a.handle_datagram(now, b_ul, &resp, &mut out);
    while let Action::Send { offset, len, .. } = a.poll_flush(now, &mut out) {
        let d = out[offset..offset + len].to_vec();
        let _ = b.handle_datagram(now, a_ul, &d, &mut out2);
    }
    (a, b)
}

fn encrypt_decrypt(c: &mut Criterion) {
    let (mut a, mut b) = pair();
    let a_ul: SocketAddr = A_UL.parse().unwrap();
    let mut g = c.benchmark_group("packet");
    for size in [64usize, 512, 1380] {
        let pkt = ip_packet(size);
        let mut out = vec![0u8; 4096];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encrypt", size), &size, |bch, _| {
            bch.iter(|| {
                let act = a.handle_tun_packet(Instant::now(), &pkt, &mut out);
                assert!(matches!(act, Action::Send { .. }));
            })
        });
        let mut enc = vec![0u8; 4096];
        let mut dec = vec![0u8; 4096];
        g.bench_with_input(BenchmarkId::new("decrypt", size), &size, |bch, _| {
            bch.iter_batched(
                || {
                    let Action::Send { offset, len, .. } =
                        a.handle_tun_packet(Instant::now(), &pkt, &mut enc)
                    else {
                        panic!("no ciphertext")
                    };
                    enc[offset..offset + len].to_vec()
                },
                |ct| {
                    let act = b.handle_datagram(Instant::now(), a_ul, &ct, &mut dec);
                    assert!(matches!(act, Action::Deliver { .. }));
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // A batch as the TUN thread handles it: 64 full-size packets into one buffer.
    let mut g = c.benchmark_group("batch64");
    let pkt = ip_packet(1380);
    let mut out = vec![0u8; 64 * 1500];
    g.throughput(Throughput::Bytes(64 * 1380));
    g.bench_function("encrypt", |bch| {
        bch.iter(|| {
            let now = Instant::now();
            let mut cursor = 0;
            for _ in 0..64 {
                if let Action::Send { offset, len, .. } =
                    a.handle_tun_packet(now, &pkt, &mut out[cursor..])
                {
                    cursor += offset + len;
                }
            }
            cursor
        })
    });
    g.finish();

    // The same flow under a 20-rule policy (allowed by the last rule): a
    // tracked flow costs one table lookup, whatever the policy's size.
    let rules = (0..20u8)
        .map(|i| FilterRule {
            name: format!("rule {i}"),
            allow: i == 19,
            src: vec![format!("100.64.{}.0/24", if i == 19 { 0 } else { 100 + i })
                .parse()
                .unwrap()],
            dst: vec!["100.64.0.0/16".parse().unwrap()],
            ports: vec![PortRange::ANY],
        })
        .collect();
    let filter = Filter::compile(&FilterSpec {
        default_allow: false,
        rules,
    });
    a.set_filter(Instant::now(), Arc::new(filter));
    let mut g = c.benchmark_group("filtered");
    let pkt = ip_packet(1380);
    let mut out = vec![0u8; 4096];
    g.throughput(Throughput::Bytes(1380));
    g.bench_function("encrypt/1380", |bch| {
        bch.iter(|| {
            let act = a.handle_tun_packet(Instant::now(), &pkt, &mut out);
            assert!(matches!(act, Action::Send { .. }));
        })
    });
    g.finish();
}

criterion_group!(benches, encrypt_decrypt);
criterion_main!(benches);
