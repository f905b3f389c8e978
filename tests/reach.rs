//! End-to-end tests of "reach every node from anywhere": NAT traversal,
//! the UDP and TCP relays of the edge, relay-to-direct upgrade, roaming.
//!
//! Topology (all made by the test, see tests/harness/mod.rs): an "internet"
//! switch 198.18.0.0/24 with the server on 198.18.0.1 (HTTP :8080, edge UDP
//! :3478); router `rK` has its WAN leg on 198.18.0.(10+K) and a LAN
//! 198.19.K.0/24 of its own (gateway 198.19.K.1, node on 198.19.K.10), with
//! nftables NAT (cone = `masquerade`, symmetric = `masquerade random`);
//! "public" nodes sit on the internet switch directly.
//!
//! Needs root, /dev/net/tun, iproute2 and nft; otherwise each test prints
//! `SKIPPED: <why>` and passes — except with CI=true, where it fails.
//!
//! Timings that go into the README are printed as `[reach] ...` lines
//! (run with `-- --nocapture --test-threads=1` for undisturbed figures).

mod harness;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use harness::*;

/// Port of the long-stream sink on the overlay.
const STREAM_PORT: u16 = 7001;

struct Reach {
    lab: Lab,
    srv: Server,
    tok: String,
}

/// Two joined nodes with echo listeners on both.
struct Pair {
    a: Node,
    b: Node,
    a_ip: Ipv4Addr,
    b_ip: Ipv4Addr,
    /// When `trellis join` of `b` was started.
    b_joined: Instant,
    /// When `b` first showed an overlay IP.
    b_ready: Instant,
    _la: EchoListener,
    _lb: EchoListener,
}

impl Reach {
    fn new() -> Option<Reach> {
        if !require_privileges() {
            return None;
        }
        let lab = Lab::new();
        let h = lab.host("server", "198.18.0.1/24");
        let srv = lab.start_server(&h);
        let tok = lab.create_token(
            &srv,
            TokenOpts {
                reusable: true,
                ..Default::default()
            },
        );
        Some(Reach { lab, srv, tok })
    }

    /// Router `r<k>`: WAN 198.18.0.(10+k), LAN 198.19.k.1/24.
    fn router(&self, k: u8, nat: Nat) -> Router {
        self.lab.router(
            &format!("r{k}"),
            &format!("198.18.0.{}/24", 10 + k),
            &format!("198.19.{k}.1/24"),
            nat,
        )
    }

    /// A host on router `r`'s LAN at .10.
    fn behind(&self, r: &Router, name: &str) -> Host {
        let k = r.lan.octets()[2];
        self.lab.host_behind(r, name, &format!("198.19.{k}.10/24"))
    }

    /// A host with a public underlay address on the internet switch.
    fn public(&self, name: &str, octet: u8) -> Host {
        self.lab.host(name, &format!("198.18.0.{octet}/24"))
    }

    /// Joins `n1` on `ha` (waits until ready), then `n2` on `hb`, with echo
    /// listeners on both hosts from the start. Measures the time from
    /// starting `trellis join` of n2 to the first TCP exchange that succeeds
    /// (n2 -> n1), prints it, then checks n1 -> n2 as well.
    fn pair(&self, ha: &Host, hb: &Host, scenario: &str) -> Pair {
        let lab = &self.lab;
        let any = |h: &Host, name: &str| {
            lab.check(
                tcp_listen(&h.ns, SocketAddr::from(([0, 0, 0, 0], APP_PORT)), name),
                &format!("listen on {name}"),
            )
        };
        let la = any(ha, "n1");
        let lb = any(hb, "n2");
        let a = lab.join(ha, &self.srv, "n1", &self.tok, None);
        let a_ip = lab.wait_ready(&a).ip.expect("ready");

        let b_joined = Instant::now();
        let b = lab.join(hb, &self.srv, "n2", &self.tok, None);
        let (b_ip, b_ready) = loop {
            if let Some(s) = lab.exited(b.proc) {
                lab.fail(&format!("n2 agent exited: {s}"));
            }
            if let Ok(st) = lab.status(&b) {
                if let Some(ip) = st.ip {
                    break (ip, Instant::now());
                }
            }
            if b_joined.elapsed() > Duration::from_secs(30) {
                lab.fail("n2 never showed an IP in `trellis status`");
            }
            thread::sleep(Duration::from_millis(50));
        };

        // A new attempt every 250 ms (each may take up to 3 s), so the time
        // of the first success is not quantised by TCP's SYN backoff.
        let to_a = SocketAddr::from((a_ip, APP_PORT));
        let (tx, rx) = mpsc::channel::<Instant>();
        let deadline = b_joined + Duration::from_secs(30);
        let mut first = None;
        let mut last_err = String::new();
        let (etx, erx) = mpsc::channel::<String>();
        while first.is_none() && Instant::now() < deadline {
            let (tx, etx, ns) = (tx.clone(), etx.clone(), hb.ns.clone());
            thread::spawn(move || {
                match tcp_exchange(&ns, to_a, 64 * 1024, Duration::from_secs(3)) {
                    Ok(n) if n == "n1" => {
                        let _ = tx.send(Instant::now());
                    }
                    Ok(n) => {
                        let _ = etx.send(format!("answered by {n:?}"));
                    }
                    Err(e) => {
                        let _ = etx.send(e);
                    }
                }
            });
            if let Ok(t) = rx.recv_timeout(Duration::from_millis(250)) {
                first = Some(t);
            }
            while let Ok(e) = erx.try_recv() {
                last_err = e;
            }
        }
        if first.is_none() {
            // Attempts still in flight may yet succeed.
            first = rx.recv_timeout(Duration::from_secs(3)).ok();
        }
        let Some(first) = first else {
            let st = |n: &Node| {
                lab.status(n)
                    .map(|s| s.raw.to_string())
                    .unwrap_or_else(|e| e)
            };
            lab.fail(&format!(
                "{scenario}: n2 -> n1 ({to_a}) never succeeded within 30 s of joining n2; \
                 last error: {last_err}\nstatus n1: {}\nstatus n2: {}",
                st(&a),
                st(&b)
            ));
        };
        eprintln!(
            "[reach] {scenario}: join n2 -> first TCP exchange: {:.2} s (n2 ready after {:.2} s)",
            (first - b_joined).as_secs_f64(),
            (b_ready - b_joined).as_secs_f64()
        );
        let p = Pair {
            a,
            b,
            a_ip,
            b_ip,
            b_joined,
            b_ready,
            _la: la,
            _lb: lb,
        };
        self.exchange_both_ways(&p, Duration::from_secs(10), scenario);
        p
    }

    /// TCP exchanges n1 -> n2 and n2 -> n1 (each retried until `within`).
    fn exchange_both_ways(&self, p: &Pair, within: Duration, what: &str) {
        let probes = [
            Probe::new(&p.a, "n2", p.b_ip),
            Probe::new(&p.b, "n1", p.a_ip),
        ];
        let fails = all_reach(&probes, Instant::now() + within, Duration::from_secs(3));
        if !fails.is_empty() {
            self.lab.fail(&format!(
                "{what}: TCP exchange failed:\n  {}\nstatus n1: {}\nstatus n2: {}",
                fails.join("\n  "),
                self.raw_status(&p.a),
                self.raw_status(&p.b)
            ));
        }
    }

    /// `trellis nodes list --json` as one line (or the error).
    fn server_view(&self) -> String {
        let out = self.lab.admin(
            &self.srv,
            &self.srv.admin_key(),
            &["nodes", "list", "--json"],
        );
        if out.success() {
            out.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
        } else {
            out.describe()
        }
    }

    fn raw_status(&self, n: &Node) -> String {
        self.lab
            .status(n)
            .map(|s| s.raw.to_string())
            .unwrap_or_else(|e| e)
    }

    /// Polls `node`'s status until its entry for `peer` has a path in
    /// `want`; returns that status and when it was seen. Fails the test
    /// (with both statuses and logs) after `within`.
    fn wait_path(
        &self,
        node: &Node,
        peer: &str,
        want: &[&str],
        within: Duration,
    ) -> (Status, Instant) {
        let r = eventually(Instant::now() + within, || {
            if let Some(s) = self.lab.exited(node.proc) {
                return Err(format!("agent {} exited: {s}", node.name));
            }
            let st = self.lab.status(node)?;
            let p = st
                .peer(peer)
                .ok_or_else(|| format!("{peer} not in peers: {}", st.raw))?;
            if want.contains(&p.path.as_str()) {
                Ok((st.clone(), Instant::now()))
            } else {
                Err(format!("path to {peer} is {:?}: {}", p.path, st.raw))
            }
        });
        self.lab.check(
            r,
            &format!(
                "{}: path to {peer} did not become one of {want:?} within {within:?}",
                node.name
            ),
        )
    }

    /// Both sides of the pair on a path in `want` (each within `within`).
    fn wait_both(&self, p: &Pair, want: &[&str], within: Duration) -> (Status, Status, Instant) {
        let end = Instant::now() + within;
        let (sa, ta) = self.wait_path(&p.a, "n2", want, within);
        let left = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        let (sb, tb) = self.wait_path(&p.b, "n1", want, left);
        (sa, sb, ta.max(tb))
    }

    /// Checks, for `hold`, that neither side ever reports a path in `never`.
    fn hold_not(&self, p: &Pair, never: &[&str], hold: Duration, why: &str) {
        let end = Instant::now() + hold;
        while Instant::now() < end {
            for (n, peer) in [(&p.a, "n2"), (&p.b, "n1")] {
                let st = self.lab.check(self.lab.status(n), "status");
                if let Some(e) = st.peer(peer) {
                    if never.contains(&e.path.as_str()) {
                        self.lab.fail(&format!(
                            "{why}: {} reports path {:?} to {peer}: {}",
                            n.name, e.path, st.raw
                        ));
                    }
                }
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn endpoint_ip_is(&self, st: &Status, peer: &str, ip: Ipv4Addr, what: &str) {
        let e = st
            .peer(peer)
            .map(|p| p.endpoint.clone())
            .unwrap_or_default();
        self.lab.ensure(
            e.starts_with(&format!("{ip}:")),
            format!(
                "{what}: endpoint of {peer} in {}'s status is {e:?}, expected {ip}:<port>: {}",
                st.name, st.raw
            ),
        );
    }
}

/// Wall-clock time of day (UTC, HH:MM:SS.mmm) to match the agents' logs.
fn utc_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Status timeline and received data (per 250 ms) around a move.
fn roam_report(
    timeline: &[String],
    snap: &SinkProgress,
    roamed: Instant,
    wall: &str,
    server_view: &str,
) -> String {
    let mut out = format!("moved at {wall} UTC; status timeline (from the move):\n");
    for l in timeline {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("stream bytes received per 250 ms from 1 s before the move:\n ");
    let from = roamed - Duration::from_secs(1);
    let mut prev = snap
        .arrivals
        .iter()
        .take_while(|a| a.0 <= from)
        .last()
        .map(|a| a.1)
        .unwrap_or(0);
    for k in 0..48u32 {
        let end = from + Duration::from_millis(250) * (k + 1);
        let upto = snap
            .arrivals
            .iter()
            .take_while(|a| a.0 <= end)
            .last()
            .map(|a| a.1)
            .unwrap_or(prev);
        out.push_str(&format!(" {}", (upto - prev) >> 10));
        prev = upto;
    }
    out.push_str(" (KiB)\n");
    out.push_str(&format!(
        "server's view (nodes list --json) at the end: {server_view}\n"
    ));
    out
}

/// `t - origin` in seconds, negative when `t` is earlier.
fn signed_secs(t: Instant, origin: Instant) -> f64 {
    if t >= origin {
        (t - origin).as_secs_f64()
    } else {
        -(origin - t).as_secs_f64()
    }
}

// ---------------------------------------------------------------------------
// 0. the lab itself: NAT behaviour, firewall rules, roaming (no trellis)
// ---------------------------------------------------------------------------

/// A UDP socket on 0.0.0.0:`port` made inside `ns`.
fn udp_sock(lab: &Lab, ns: &str, port: u16) -> UdpSocket {
    let s = lab.check(
        in_netns(ns, move || {
            UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).map_err(|e| e.to_string())
        }),
        "bind udp",
    );
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Answers every datagram with the text of its source address.
struct Reflector {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn reflector(lab: &Lab, ns: &str, ports: &[u16]) -> Reflector {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = ports
        .iter()
        .map(|&p| {
            let s = udp_sock(lab, ns, p);
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((_, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(from.to_string().as_bytes(), from);
                    }
                }
            })
        })
        .collect();
    Reflector { stop, threads }
}

/// The source address `to` (a reflector) sees for `s`, if it answers.
fn observed(s: &UdpSocket, to: SocketAddr) -> Option<SocketAddr> {
    let mut buf = [0u8; 1500];
    for _ in 0..5 {
        let _ = s.send_to(b"who", to);
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                if from == to {
                    return std::str::from_utf8(&buf[..n]).ok()?.parse().ok();
                }
            }
        }
    }
    None
}

/// Both sockets send to each other's mapped address for ~2 s; true when
/// both have received from the other.
fn punch(a: &UdpSocket, a_pub: SocketAddr, b: &UdpSocket, b_pub: SocketAddr) -> bool {
    let (mut got_a, mut got_b) = (false, false);
    let mut buf = [0u8; 1500];
    let end = Instant::now() + Duration::from_secs(2);
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    while Instant::now() < end && !(got_a && got_b) {
        let _ = a.send_to(b"punch", b_pub);
        let _ = b.send_to(b"punch", a_pub);
        thread::sleep(Duration::from_millis(50));
        while let Ok((_, from)) = a.recv_from(&mut buf) {
            got_a |= from == b_pub;
        }
        while let Ok((_, from)) = b.recv_from(&mut buf) {
            got_b |= from == a_pub;
        }
    }
    a.set_nonblocking(false).unwrap();
    b.set_nonblocking(false).unwrap();
    got_a && got_b
}

/// Checks the lab's building blocks without trellis, so that a failure of
/// the scenarios below points at the feature, not at the topology.
#[test]
fn nat_lab_selftest() {
    if !require_privileges() {
        return;
    }
    let lab = Lab::new();
    let stun = lab.host("stun", "198.18.0.2/24");
    let _refl = reflector(&lab, &stun.ns, &[5000, 5001]);
    let (s1, s2) = (
        SocketAddr::from((stun.addr, 5000)),
        SocketAddr::from((stun.addr, 5001)),
    );
    let mk = |k: u8, nat| {
        lab.router(
            &format!("r{k}"),
            &format!("198.18.0.{}/24", 10 + k),
            &format!("198.19.{k}.1/24"),
            nat,
        )
    };
    let (r1, r2, r3, r4) = (
        mk(1, Nat::Cone),
        mk(2, Nat::Cone),
        mk(3, Nat::Symmetric),
        mk(4, Nat::Symmetric),
    );
    lab.router_add_network(&r1, "198.19.11.1/24", "198.18.0.31/24");
    let mut h1 = lab.host_behind(&r1, "h1", "198.19.1.10/24");
    let h2 = lab.host_behind(&r2, "h2", "198.19.2.10/24");
    let h3 = lab.host_behind(&r3, "h3", "198.19.3.10/24");
    let h4 = lab.host_behind(&r4, "h4", "198.19.4.10/24");
    let public = lab.host("pub", "198.18.0.20/24");

    // Cone: one mapping for every destination, source port kept.
    let u1 = udp_sock(&lab, &h1.ns, 4000);
    let m1 = observed(&u1, s1).expect("h1 mapping via s1");
    assert_eq!(
        m1,
        SocketAddr::from((r1.wan, 4000)),
        "cone NAT keeps the port"
    );
    assert_eq!(
        observed(&u1, s2),
        Some(m1),
        "cone NAT: same mapping for another destination"
    );
    let u2 = udp_sock(&lab, &h2.ns, 4000);
    let m2 = observed(&u2, s1).expect("h2 mapping");
    // Symmetric: a new mapping per destination.
    let u3 = udp_sock(&lab, &h3.ns, 4000);
    let m3a = observed(&u3, s1).expect("h3 mapping via s1");
    let m3b = observed(&u3, s2).expect("h3 mapping via s2");
    assert_eq!(m3a.ip(), std::net::IpAddr::V4(r3.wan));
    assert_ne!(m3a, m3b, "symmetric NAT must map each destination apart");
    let u4 = udp_sock(&lab, &h4.ns, 4000);
    let m4 = observed(&u4, s1).expect("h4 mapping");

    // Filtering: nothing gets in unsolicited.
    let up = udp_sock(&lab, &public.ns, 4000);
    let _ = up.send_to(b"unsolicited", m1);
    let mut buf = [0u8; 64];
    assert!(
        u1.recv_from(&mut buf).is_err(),
        "cone NAT let an unsolicited datagram in"
    );

    // Hole punching: cone <-> cone and cone <-> public work, symmetric <->
    // symmetric does not.
    assert!(
        punch(&u1, m1, &u2, m2),
        "cone <-> cone hole punching failed"
    );
    let pm = SocketAddr::from((public.addr, 4000));
    assert!(
        punch(&u1, m1, &up, pm),
        "cone <-> public hole punching failed"
    );
    assert!(
        !punch(&u3, m3a, &u4, m4),
        "symmetric <-> symmetric punching should fail"
    );

    // Blocking UDP between the two cone routers stops punching, but not the
    // way to the server; unblocking brings it back.
    let v1 = udp_sock(&lab, &h1.ns, 4100);
    let v2 = udp_sock(&lab, &h2.ns, 4100);
    let (n1, n2) = (observed(&v1, s1).unwrap(), observed(&v2, s1).unwrap());
    lab.block_udp_between(&r1, r2.wan);
    assert!(!punch(&v1, n1, &v2, n2), "punching passed a blocked path");
    assert_eq!(
        observed(&v1, s2),
        Some(n1),
        "block must not stop UDP to the server"
    );
    lab.unblock_udp_between(&r1);
    assert!(punch(&v1, n1, &v2, n2), "punching failed after unblocking");

    // A node without UDP: no UDP either way, TCP passes.
    let _tl = lab.check(
        tcp_listen(&stun.ns, SocketAddr::from(([0, 0, 0, 0], APP_PORT)), "stun"),
        "listen",
    );
    lab.block_all_udp_of(&r2, h2.addr);
    let w2 = udp_sock(&lab, &h2.ns, 4200);
    assert_eq!(observed(&w2, s1), None, "UDP passed a UDP-blocked router");
    let who = lab.check(
        tcp_exchange(
            &h2.ns,
            SocketAddr::from((stun.addr, APP_PORT)),
            4096,
            Duration::from_secs(3),
        ),
        "TCP from the UDP-blocked host",
    );
    assert_eq!(who, "stun");

    // Roaming: after the move, the same socket gets a new mapping.
    lab.move_host(
        &mut h1,
        "198.19.11.10/24",
        Some(Ipv4Addr::new(198, 19, 11, 1)),
    );
    assert_eq!(h1.addr, Ipv4Addr::new(198, 19, 11, 10));
    let m1b = observed(&u1, s1).expect("h1 mapping after the move");
    assert_eq!(
        m1b,
        SocketAddr::from(([198, 18, 0, 31], 4000)),
        "a moved host gets the other network's public address"
    );
    assert_eq!(
        observed(&u1, s2),
        Some(m1b),
        "still endpoint-independent after the move"
    );
    assert!(punch(&u1, m1b, &up, pm), "punching failed after the move");
    eprintln!("[reach] selftest: cone {m1} / {m2}, symmetric {m3a} vs {m3b}, roamed {m1} -> {m1b}");
}

// ---------------------------------------------------------------------------
// 1. cone NAT <-> cone NAT: direct
// ---------------------------------------------------------------------------

#[test]
fn cone_nats_go_direct() {
    let Some(r) = Reach::new() else { return };
    let (r1, r2) = (r.router(1, Nat::Cone), r.router(2, Nat::Cone));
    let (ha, hb) = (r.behind(&r1, "n1"), r.behind(&r2, "n2"));
    let p = r.pair(&ha, &hb, "cone/cone");
    let (sa, sb, t) = r.wait_both(&p, &["direct"], Duration::from_secs(10));
    eprintln!(
        "[reach] cone/cone: join n2 -> direct on both sides: {:.2} s (after n2 ready: {:.2} s)",
        (t - p.b_joined).as_secs_f64(),
        (t - p.b_ready).as_secs_f64()
    );
    // The direct endpoints are the other side's NAT mappings.
    r.endpoint_ip_is(&sa, "n2", r2.wan, "cone/cone");
    r.endpoint_ip_is(&sb, "n1", r1.wan, "cone/cone");
    for st in [&sa, &sb] {
        r.lab.ensure(
            st.relay == "udp",
            format!(
                "{}: relay field is {:?}, expected \"udp\": {}",
                st.name, st.relay, st.raw
            ),
        );
        r.lab.ensure(
            !st.reflexive.is_empty(),
            format!("{}: no reflexive address: {}", st.name, st.raw),
        );
    }
    r.exchange_both_ways(&p, Duration::from_secs(10), "cone/cone on the direct path");
    let (sa, _) = r.wait_path(&p.a, "n2", &["direct"], Duration::from_secs(1));
    let e = sa.peer("n2").expect("listed");
    r.lab.ensure(
        e.rx_bytes > 0 && e.tx_bytes > 0,
        format!("no bytes counted on the direct path: {}", sa.raw),
    );
}

// ---------------------------------------------------------------------------
// 2. symmetric NAT <-> symmetric NAT: relayed over UDP
// ---------------------------------------------------------------------------

#[test]
fn symmetric_nats_use_udp_relay() {
    let Some(r) = Reach::new() else { return };
    let (r1, r2) = (r.router(1, Nat::Symmetric), r.router(2, Nat::Symmetric));
    let (ha, hb) = (r.behind(&r1, "n1"), r.behind(&r2, "n2"));
    let p = r.pair(&ha, &hb, "symmetric/symmetric");
    let (sa, sb, _) = r.wait_both(&p, &["relay-udp"], Duration::from_secs(10));
    for st in [&sa, &sb] {
        r.lab.ensure(
            st.relay == "udp",
            format!(
                "{}: relay field is {:?}, expected \"udp\": {}",
                st.name, st.relay, st.raw
            ),
        );
    }
    // Probing cannot succeed through two symmetric NATs: the pair stays on
    // the relay (and keeps working) while probes come and go.
    r.hold_not(
        &p,
        &["direct", "relay-tcp", ""],
        Duration::from_secs(6),
        "symmetric/symmetric",
    );
    r.exchange_both_ways(
        &p,
        Duration::from_secs(10),
        "symmetric/symmetric over relay-udp",
    );
    let (sa, _) = r.wait_path(&p.a, "n2", &["relay-udp"], Duration::from_secs(1));
    let e = sa.peer("n2").expect("listed");
    r.lab.ensure(
        e.rx_bytes > 0 && e.tx_bytes > 0,
        format!("no bytes counted on the relay path: {}", sa.raw),
    );
}

// ---------------------------------------------------------------------------
// 3. a node without any UDP: relayed over TCP
// ---------------------------------------------------------------------------

#[test]
fn udp_blocked_node_uses_tcp_relay() {
    let Some(r) = Reach::new() else { return };
    let (r1, r2) = (r.router(1, Nat::Cone), r.router(2, Nat::Cone));
    let (ha, hb) = (r.behind(&r1, "n1"), r.behind(&r2, "n2"));
    // n1's router drops all of n1's UDP (TCP, so HTTP and WebSocket, passes).
    r.lab.block_all_udp_of(&r1, ha.addr);
    let p = r.pair(&ha, &hb, "udp-blocked/cone");
    let (sa, _) = r.wait_path(&p.a, "n2", &["relay-tcp"], Duration::from_secs(10));
    r.lab.ensure(
        sa.relay == "tcp",
        format!(
            "n1 (no UDP): relay field is {:?}, expected \"tcp\": {}",
            sa.relay, sa.raw
        ),
    );
    let (sb, _) = r.wait_path(
        &p.b,
        "n1",
        &["relay-udp", "relay-tcp"],
        Duration::from_secs(10),
    );
    eprintln!(
        "[reach] udp-blocked/cone: n1 sees n2 via {:?}, n2 sees n1 via {:?}",
        sa.peer("n2").map(|e| e.path.clone()),
        sb.peer("n1").map(|e| e.path.clone())
    );
    r.hold_not(
        &p,
        &["direct", ""],
        Duration::from_secs(4),
        "udp-blocked/cone",
    );
    r.exchange_both_ways(
        &p,
        Duration::from_secs(10),
        "udp-blocked/cone over the TCP relay",
    );
    let (sa, _) = r.wait_path(&p.a, "n2", &["relay-tcp"], Duration::from_secs(1));
    let e = sa.peer("n2").expect("listed");
    r.lab.ensure(
        e.rx_bytes > 0 && e.tx_bytes > 0,
        format!("no bytes counted on the TCP relay path: {}", sa.raw),
    );
}

// ---------------------------------------------------------------------------
// 4. cone NAT <-> public address: direct
// ---------------------------------------------------------------------------

#[test]
fn cone_nat_and_public_node_go_direct() {
    let Some(r) = Reach::new() else { return };
    let r1 = r.router(1, Nat::Cone);
    let ha = r.behind(&r1, "n1");
    let hb = r.public("n2", 20);
    let p = r.pair(&ha, &hb, "cone/public");
    let (sa, sb, t) = r.wait_both(&p, &["direct"], Duration::from_secs(10));
    eprintln!(
        "[reach] cone/public: join n2 -> direct on both sides: {:.2} s (after n2 ready: {:.2} s)",
        (t - p.b_joined).as_secs_f64(),
        (t - p.b_ready).as_secs_f64()
    );
    r.endpoint_ip_is(&sa, "n2", hb.addr, "cone/public");
    r.endpoint_ip_is(&sb, "n1", r1.wan, "cone/public");
    r.exchange_both_ways(
        &p,
        Duration::from_secs(10),
        "cone/public on the direct path",
    );
}

// ---------------------------------------------------------------------------
// 5. relay -> direct upgrade under a running TCP transfer
// ---------------------------------------------------------------------------

#[test]
fn relay_to_direct_upgrade_keeps_tcp_stream() {
    let Some(r) = Reach::new() else { return };
    let (r1, r2) = (r.router(1, Nat::Cone), r.router(2, Nat::Cone));
    let (ha, hb) = (r.behind(&r1, "n1"), r.behind(&r2, "n2"));
    // Only the direct path is blocked: UDP to the edge still passes.
    r.lab.block_udp_between(&r1, r2.wan);
    let p = r.pair(&ha, &hb, "cone/cone, direct blocked");
    r.wait_both(&p, &["relay-udp"], Duration::from_secs(10));
    r.hold_not(
        &p,
        &["direct"],
        Duration::from_secs(3),
        "direct path blocked",
    );

    let sink = r.lab.check(
        stream_sink(&hb.ns, SocketAddr::from(([0, 0, 0, 0], STREAM_PORT))),
        "stream sink on n2",
    );
    const RATE: u64 = 3 << 20; // 3 MiB/s
    const TOTAL: u64 = 12 * RATE; // ~12 s
    let started = Instant::now();
    let sender = stream_send(
        &ha.ns,
        SocketAddr::from((p.b_ip, STREAM_PORT)),
        TOTAL,
        RATE,
        Duration::from_secs(20),
    );
    thread::sleep(Duration::from_secs(4));
    let before = sink.snapshot().bytes;
    r.lab.ensure(
        before > 0,
        format!(
            "no stream data reached n2 over the relay in 4 s (sink: {:?})",
            sink.snapshot().error
        ),
    );
    let (sa, _) = r.wait_path(&p.a, "n2", &["relay-udp"], Duration::from_secs(1));
    r.lab.unblock_udp_between(&r1);
    let unblocked = Instant::now();
    let (sa2, sb2, t_direct) = r.wait_both(&p, &["direct"], Duration::from_secs(10));
    eprintln!(
        "[reach] upgrade: unblock -> direct on both sides: {:.2} s ({} of {} MiB streamed at unblock, {:.1} s into the stream)",
        (t_direct - unblocked).as_secs_f64(),
        before >> 20,
        TOTAL >> 20,
        (unblocked - started).as_secs_f64()
    );
    let res = sender
        .join()
        .unwrap_or_else(|_| Err("sender thread panicked".into()));
    let snap = sink.snapshot();
    let rep = match res {
        Ok(rep) => rep,
        Err(e) => r.lab.fail(&format!(
            "stream across the relay -> direct switch failed: {e}\nsink: {} bytes, error {:?}\n\
             status n1 before: {}\nstatus n1 after: {}\nstatus n2 after: {}",
            snap.bytes, snap.error, sa.raw, sa2.raw, sb2.raw
        )),
    };
    r.lab.ensure(
        snap.error.is_none() && snap.done && snap.bytes == TOTAL && snap.connections == 1,
        format!(
            "sink: {} of {TOTAL} bytes, done {}, error {:?}, connections {}",
            snap.bytes, snap.done, snap.error, snap.connections
        ),
    );
    let gap = snap.max_gap_after(unblocked);
    eprintln!(
        "[reach] upgrade: stream of {} MiB intact in {:.1} s; longest pause in received data after unblocking: {}",
        rep.bytes >> 20,
        rep.elapsed.as_secs_f64(),
        gap.map(|(d, _)| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "none".into())
    );
    // Still direct after the transfer.
    r.wait_both(&p, &["direct"], Duration::from_secs(2));
}

// ---------------------------------------------------------------------------
// 6. roaming: the underlay address changes mid-transfer
// ---------------------------------------------------------------------------

#[test]
fn roaming_node_keeps_tcp_stream() {
    let Some(r) = Reach::new() else { return };
    let (r1, r2) = (r.router(1, Nat::Cone), r.router(2, Nat::Cone));
    // A second network behind r1 (LAN 198.19.11.0/24, public 198.18.0.31)
    // for n1 to move to.
    r.lab
        .router_add_network(&r1, "198.19.11.1/24", "198.18.0.31/24");
    let (mut ha, hb) = (r.behind(&r1, "n1"), r.behind(&r2, "n2"));
    let p = r.pair(&ha, &hb, "roaming");
    let (sa0, _, _) = r.wait_both(&p, &["direct"], Duration::from_secs(10));

    let sink = r.lab.check(
        stream_sink(&hb.ns, SocketAddr::from(([0, 0, 0, 0], STREAM_PORT))),
        "stream sink on n2",
    );
    const RATE: u64 = 2 << 20; // 2 MiB/s
    const TOTAL: u64 = 15 * RATE; // ~15 s
    let sender = stream_send(
        &ha.ns,
        SocketAddr::from((p.b_ip, STREAM_PORT)),
        TOTAL,
        RATE,
        Duration::from_secs(20),
    );
    thread::sleep(Duration::from_secs(4));
    r.lab.ensure(
        sink.snapshot().bytes > 0,
        format!(
            "no stream data reached n2 in 4 s (sink: {:?})",
            sink.snapshot().error
        ),
    );
    let old = ha.addr;
    r.lab.move_host(
        &mut ha,
        "198.19.11.10/24",
        Some(Ipv4Addr::new(198, 19, 11, 1)),
    );
    let roamed = Instant::now();
    let wall = utc_now();
    eprintln!(
        "[reach] roaming: n1 moved {old} -> {} at {wall} UTC",
        ha.addr
    );

    // Watch both sides for 10 s: when the pair is direct again on n1's new
    // mapping, and a timeline of both statuses and of the stream.
    let mut timeline = Vec::new();
    let mut direct_at: Option<(Instant, Status)> = None;
    let mut last = String::new();
    while roamed.elapsed() < Duration::from_secs(10) {
        let (sa, sb) = match (r.lab.status(&p.a), r.lab.status(&p.b)) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                timeline.push(format!(
                    "{:+.2}s status error: {:?} {:?}",
                    roamed.elapsed().as_secs_f64(),
                    a.err(),
                    b.err()
                ));
                continue;
            }
        };
        let (ea, eb) = (sa.peer("n2").cloned(), sb.peer("n1").cloned());
        let line = |st: &Status, e: &Option<PeerStatus>| match e {
            Some(e) => format!(
                "{} relay {} refl {} -> {} {} rx {} tx {} hs {:?}",
                st.name,
                st.relay,
                st.reflexive,
                e.path,
                e.endpoint,
                e.rx_bytes,
                e.tx_bytes,
                e.last_handshake_secs
            ),
            None => format!("{} (peer not listed)", st.name),
        };
        last = format!(
            "n1 {} | n2 {} | sink {} KiB",
            line(&sa, &ea),
            line(&sb, &eb),
            sink.snapshot().bytes >> 10
        );
        timeline.push(format!("{:+.2}s {last}", roamed.elapsed().as_secs_f64()));
        let path = |e: &Option<PeerStatus>| e.as_ref().map(|e| e.path.clone()).unwrap_or_default();
        // Direct again means: n1 learnt its new mapping and n2 sends there.
        let n2_to_new = eb
            .as_ref()
            .map(|e| e.endpoint == sa.reflexive)
            .unwrap_or(false);
        if direct_at.is_none()
            && path(&ea) == "direct"
            && path(&eb) == "direct"
            && sa.reflexive != sa0.reflexive
            && n2_to_new
        {
            direct_at = Some((Instant::now(), sa));
        }
        thread::sleep(Duration::from_millis(150));
    }
    let r_direct = direct_at.ok_or_else(|| last.clone());
    let res = sender
        .join()
        .unwrap_or_else(|_| Err("sender thread panicked".into()));
    let snap = sink.snapshot();
    let gap = snap.max_gap_after(roamed);
    let resumed = snap
        .arrivals
        .iter()
        .find(|a| a.0 > roamed + Duration::from_millis(300));
    eprintln!(
        "[reach] roaming: longest pause in received data after the move: {} (stream {}), \
         first data more than 300 ms after the move at +{}",
        gap.map(|(d, at)| format!(
            "{} ms starting {:+.2} s from the move",
            d.as_millis(),
            signed_secs(at, roamed)
        ))
        .unwrap_or_else(|| "none".into()),
        if res.is_ok() { "intact" } else { "FAILED" },
        resumed
            .map(|a| format!("{:.2} s", (a.0 - roamed).as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    );
    match &r_direct {
        Ok((t, sa)) => eprintln!(
            "[reach] roaming: move -> direct again on both sides: {:.2} s (n1 reflexive {} -> {})",
            (*t - roamed).as_secs_f64(),
            sa0.reflexive,
            sa.reflexive
        ),
        Err(e) => eprintln!("[reach] roaming: not direct again within 10 s: {e}"),
    }
    if let Err(e) = res {
        r.lab.fail(&format!(
            "stream across the move failed: {e}\nsink: {} of {TOTAL} bytes, error {:?}\nstatus n1: {}\nstatus n2: {}\n{}",
            snap.bytes,
            snap.error,
            r.raw_status(&p.a),
            r.raw_status(&p.b),
            roam_report(&timeline, &snap, roamed, &wall, &r.server_view())
        ));
    }
    r.lab.ensure(
        snap.error.is_none() && snap.done && snap.bytes == TOTAL && snap.connections == 1,
        format!(
            "sink: {} of {TOTAL} bytes, done {}, error {:?}",
            snap.bytes, snap.done, snap.error
        ),
    );
    let (g, _) = gap.unwrap_or((Duration::ZERO, roamed));
    r.lab.ensure(
        g <= Duration::from_secs(5),
        format!(
            "traffic stopped for {} ms after the move (limit 5 s)\n{}",
            g.as_millis(),
            roam_report(&timeline, &snap, roamed, &wall, &r.server_view())
        ),
    );
    if let Err(e) = r_direct {
        r.lab.fail(&format!(
            "pair not direct again within 10 s of the move: {e}\n{}",
            roam_report(&timeline, &snap, roamed, &wall, &r.server_view())
        ));
    }
    r.exchange_both_ways(&p, Duration::from_secs(5), "after roaming");
}

// ---------------------------------------------------------------------------
// 7. `trellis ping` shows the path, relayed and direct
// ---------------------------------------------------------------------------

/// `trellis ping PEER --count 3` on `node` must exit 0 with a line
/// `reply from NAME (...): ... time=... path=PATH [via IP:PORT]`.
fn ping_reply_with(
    r: &Reach,
    node: &Node,
    peer: &str,
    name: &str,
    path: &str,
    via: Option<Ipv4Addr>,
) -> String {
    let out = r.lab.ping(node, peer, 3);
    let ok_line = out.stdout.lines().find(|l| {
        l.starts_with(&format!("reply from {name} "))
            && l.contains(" time=")
            && l.split_whitespace().any(|w| w == format!("path={path}"))
            && via
                .map(|ip| l.contains(&format!("via {ip}:")))
                .unwrap_or(true)
    });
    if !out.success() || ok_line.is_none() {
        r.lab.fail(&format!(
            "`trellis ping {peer}` should exit 0 with a reply on path={path}{}:\n{}\nstatus: {}",
            via.map(|ip| format!(" via {ip}:<port>"))
                .unwrap_or_default(),
            out.describe(),
            r.raw_status(node)
        ));
    }
    out.stdout
}

#[test]
fn ping_shows_relay_then_direct_path() {
    let Some(r) = Reach::new() else { return };
    let (r1, r2) = (r.router(1, Nat::Cone), r.router(2, Nat::Cone));
    let (ha, hb) = (r.behind(&r1, "n1"), r.behind(&r2, "n2"));
    r.lab.block_udp_between(&r1, r2.wan);
    let p = r.pair(&ha, &hb, "ping");
    r.wait_path(&p.a, "n2", &["relay-udp"], Duration::from_secs(10));
    let relayed = ping_reply_with(&r, &p.a, "n2", "n2", "relay-udp", None);
    eprintln!("[reach] ping while relayed:\n{}", relayed.trim_end());

    r.lab.unblock_udp_between(&r1);
    r.wait_both(&p, &["direct"], Duration::from_secs(10));
    let direct = ping_reply_with(&r, &p.a, "n2", "n2", "direct", Some(r2.wan));
    eprintln!("[reach] ping when direct:\n{}", direct.trim_end());
    // By overlay IP too.
    ping_reply_with(&r, &p.b, &p.a_ip.to_string(), "n1", "direct", Some(r1.wan));
}
