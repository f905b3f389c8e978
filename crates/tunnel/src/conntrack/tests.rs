//! The connection table alone, with hand-built packets and time passed in.

use super::*;
use crate::testpkt::*;
use std::hash::BuildHasher;
use trellis_policy::{FilterRule, FilterSpec, PortRange};

const A: &str = "100.64.0.2";
const B: &str = "100.64.0.3";
const PEER: [u8; 32] = [7u8; 32];

fn path() -> Path {
    Path::Direct("198.18.0.2:51820".parse().unwrap())
}

fn rule(name: &str, allow: bool, src: &str, dst: &str, ports: Vec<PortRange>) -> FilterRule {
    FilterRule {
        name: name.into(),
        allow,
        src: vec![src.parse().unwrap()],
        dst: vec![dst.parse().unwrap()],
        ports,
    }
}

fn tcp_port(p: u16) -> PortRange {
    PortRange {
        proto: Some(PROTO_TCP),
        lo: p,
        hi: p,
    }
}

/// Default deny; A may reach B on TCP 22 ("ssh") and anything over UDP 53 ("dns").
fn ssh_only() -> Arc<Filter> {
    Arc::new(Filter::compile(&FilterSpec {
        default_allow: false,
        rules: vec![
            rule(
                "ssh",
                true,
                "100.64.0.2/32",
                "100.64.0.3/32",
                vec![tcp_port(22)],
            ),
            dns_rule(),
        ],
    }))
}

fn dns_rule() -> FilterRule {
    rule(
        "dns",
        true,
        "100.64.0.2/32",
        "100.64.0.3/32",
        vec![PortRange {
            proto: Some(PROTO_UDP),
            lo: 53,
            hi: 53,
        }],
    )
}

fn deny_all() -> Arc<Filter> {
    Arc::new(Filter::compile(&FilterSpec {
        default_allow: false,
        rules: vec![],
    }))
}

fn ct(filter: Arc<Filter>, now: Instant) -> ConnTrack {
    let mut c = ConnTrack::new(42);
    c.set_filter(now, filter);
    c
}

fn out(c: &mut ConnTrack, now: Instant, p: &[u8]) -> Result<(), DropReason> {
    c.check(now, p, Side::Egress, &PEER, path())
}

fn inn(c: &mut ConnTrack, now: Instant, p: &[u8]) -> Result<(), DropReason> {
    c.check(now, p, Side::Ingress, &PEER, path())
}

fn drain(c: &mut ConnTrack) -> Vec<FlowEnd> {
    let mut v = vec![];
    c.drain(&mut v);
    v
}

#[test]
fn reply_of_an_allowed_flow_passes_although_the_reverse_alone_is_denied() {
    let now = Instant::now();
    let mut c = ct(ssh_only(), now);
    // The reverse direction, on its own, is denied.
    assert!(
        !c.filter
            .decide(B.parse().unwrap(), A.parse().unwrap(), PROTO_TCP, 40000)
            .allow
    );
    assert_eq!(out(&mut c, now, &tcp(A, 40000, B, 22, SYN, 0)), Ok(()));
    assert_eq!(
        inn(&mut c, now, &tcp(B, 22, A, 40000, SYN | ACK, 0)),
        Ok(())
    );
    assert_eq!(out(&mut c, now, &tcp(A, 40000, B, 22, ACK, 0)), Ok(()));
    assert_eq!(
        inn(&mut c, now, &tcp(B, 22, A, 40000, PSH | ACK, 100)),
        Ok(())
    );
    assert_eq!(c.stats().entries, 1);
    // But B opening a connection to A is denied, and recorded as such.
    assert_eq!(
        inn(&mut c, now, &tcp(B, 22, A, 40001, SYN, 0)),
        Err(DropReason::Denied)
    );
    let recs = drain(&mut c);
    assert_eq!(recs.len(), 1);
    assert!(!recs[0].allow);
    assert_eq!(recs[0].end_reason, "denied");
    assert_eq!(recs[0].direction, FlowDirection::In);
    assert_eq!(recs[0].src, B.parse::<Ipv4Addr>().unwrap());
    assert_eq!(recs[0].dst_port, 40001);
    assert_eq!(c.stats().dropped_by_policy, 1);
}

#[test]
fn connections_open_before_a_restart_are_adopted_when_the_policy_allows_them() {
    let now = Instant::now();
    // A fresh table (the agent restarted) sees segments of connections
    // that were already open.
    let mut c = ct(ssh_only(), now);
    // The opener's side, mid-stream: allowed (A may reach B:22).
    assert_eq!(
        out(&mut c, now, &tcp(A, 40000, B, 22, PSH | ACK, 10)),
        Ok(())
    );
    // The other side of another connection, mid-stream: B:22 answering A is
    // allowed because A may open it; it is recorded with A as the initiator.
    assert_eq!(inn(&mut c, now, &tcp(B, 22, A, 40001, ACK, 0)), Ok(()));
    assert_eq!(out(&mut c, now, &tcp(A, 40001, B, 22, ACK, 5)), Ok(()));
    assert_eq!(c.stats().entries, 2);
    // Neither way allowed: dropped, and no flow.
    assert_eq!(
        inn(&mut c, now, &tcp(B, 5555, A, 22, ACK, 0)),
        Err(DropReason::NoConnection)
    );
    // A reset never opens anything.
    assert_eq!(
        out(&mut c, now, &tcp(A, 40002, B, 22, RST, 0)),
        Err(DropReason::NoConnection)
    );
    assert_eq!(c.stats().dropped_untracked, 2);
    assert_eq!(c.stats().entries, 2);
    c.close_all(now);
    let recs = drain(&mut c);
    let adopted = recs.iter().find(|r| r.src_port == 40001).unwrap();
    assert_eq!(adopted.src, A.parse::<Ipv4Addr>().unwrap());
    assert_eq!(adopted.dst_port, 22);
    assert_eq!(adopted.direction, FlowDirection::Out);
    assert_eq!((adopted.packets_out, adopted.packets_in), (1, 1));
    assert_eq!(adopted.rule.as_deref(), Some("ssh"));
}

#[test]
fn tcp_close_gives_one_record_with_counters_each_way() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut c = ct(ssh_only(), t0);
    out(&mut c, ms(0), &tcp(A, 40000, B, 22, SYN, 0)).unwrap(); // 40
    inn(&mut c, ms(1), &tcp(B, 22, A, 40000, SYN | ACK, 0)).unwrap(); // 40
    out(&mut c, ms(2), &tcp(A, 40000, B, 22, ACK, 0)).unwrap(); // 40
    out(&mut c, ms(3), &tcp(A, 40000, B, 22, PSH | ACK, 100)).unwrap(); // 140
    inn(&mut c, ms(4), &tcp(B, 22, A, 40000, PSH | ACK, 300)).unwrap(); // 340
    out(&mut c, ms(5), &tcp(A, 40000, B, 22, FIN | ACK, 0)).unwrap(); // 40
    inn(&mut c, ms(6), &tcp(B, 22, A, 40000, FIN | ACK, 0)).unwrap(); // 40
                                                                      // The last ACK passes during the grace period.
    out(&mut c, ms(7), &tcp(A, 40000, B, 22, ACK, 0)).unwrap(); // 40
    c.sweep(ms(500));
    assert!(drain(&mut c).is_empty(), "still in its grace period");
    c.sweep(ms(1100));
    let recs = drain(&mut c);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r.end_reason, "closed");
    assert_eq!((r.packets_out, r.bytes_out), (5, 40 * 4 + 140));
    assert_eq!((r.packets_in, r.bytes_in), (3, 40 * 2 + 340));
    assert_eq!((r.start, r.end), (ms(0), ms(7)));
    assert_eq!(r.proto, PROTO_TCP);
    assert_eq!((r.src_port, r.dst_port), (40000, 22));
    assert_eq!(r.direction, FlowDirection::Out);
    assert_eq!(r.path, path());
    assert_eq!(r.peer, PEER);
    assert!(r.allow);
    assert_eq!(r.rule.as_deref(), Some("ssh"));
    assert_eq!(r.count, 1);
    assert_eq!(c.stats().entries, 0);
    // Late segments of the closed connection are dropped.
    assert_eq!(
        inn(&mut c, ms(1200), &tcp(B, 22, A, 40000, ACK, 0)),
        Err(DropReason::NoConnection)
    );
}

#[test]
fn tcp_reset_ends_at_once_with_one_record() {
    let now = Instant::now();
    let mut c = ConnTrack::new(3);
    inn(&mut c, now, &tcp(A, 5000, B, 443, SYN, 0)).unwrap();
    out(&mut c, now, &tcp(B, 443, A, 5000, SYN | ACK, 0)).unwrap();
    inn(&mut c, now, &tcp(A, 5000, B, 443, PSH | ACK, 60)).unwrap();
    out(&mut c, now, &tcp(B, 443, A, 5000, RST, 0)).unwrap();
    let recs = drain(&mut c);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.end_reason, "reset");
    assert_eq!(r.direction, FlowDirection::In);
    assert_eq!(r.rule, None, "allowed by the default");
    assert_eq!((r.packets_out, r.bytes_out), (2, 40 + 100));
    assert_eq!((r.packets_in, r.bytes_in), (2, 80));
    assert_eq!(
        inn(&mut c, now, &tcp(A, 5000, B, 443, ACK, 0)),
        Err(DropReason::NoConnection)
    );
    assert!(drain(&mut c).is_empty());
}

#[test]
fn revocation_cuts_an_open_connection_in_both_directions() {
    let now = Instant::now();
    let later = now + Duration::from_millis(300);
    let mut c = ct(ssh_only(), now);
    out(&mut c, now, &tcp(A, 40000, B, 22, SYN, 0)).unwrap();
    inn(&mut c, now, &tcp(B, 22, A, 40000, SYN | ACK, 0)).unwrap();
    out(&mut c, now, &tcp(A, 40000, B, 22, ACK, 0)).unwrap();
    // A UDP flow that the new filter still allows survives.
    out(&mut c, now, &udp(A, 6000, B, 53, 20)).unwrap();
    let dns_only = Arc::new(Filter::compile(&FilterSpec {
        default_allow: false,
        rules: vec![dns_rule()],
    }));
    c.set_filter(later, dns_only);
    let recs = drain(&mut c);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].end_reason, "revoked");
    assert_eq!(recs[0].end, later);
    assert_eq!((recs[0].packets_out, recs[0].packets_in), (2, 1));
    assert_eq!(recs[0].rule.as_deref(), Some("ssh"));
    assert_eq!(c.stats().revoked, 1);
    assert_eq!(c.stats().entries, 1, "the DNS flow is still open");
    assert_eq!(
        out(&mut c, later, &tcp(A, 40000, B, 22, PSH | ACK, 10)),
        Err(DropReason::NoConnection)
    );
    assert_eq!(
        inn(&mut c, later, &tcp(B, 22, A, 40000, PSH | ACK, 10)),
        Err(DropReason::NoConnection)
    );
    // Even a policy under which the other side could open it does not bring
    // the revoked connection back: it is remembered as ended.
    let b_to_a = Arc::new(Filter::compile(&FilterSpec {
        default_allow: false,
        rules: vec![rule(
            "back",
            true,
            "100.64.0.3/32",
            "100.64.0.2/32",
            vec![PortRange::ANY],
        )],
    }));
    c.set_filter(later, b_to_a);
    assert_eq!(
        inn(&mut c, later, &tcp(B, 22, A, 40000, PSH | ACK, 10)),
        Err(DropReason::NoConnection)
    );
    c.set_filter(
        later,
        Arc::new(Filter::compile(&FilterSpec {
            default_allow: false,
            rules: vec![dns_rule()],
        })),
    );
    // A new attempt is denied by the new filter.
    assert_eq!(
        out(&mut c, later, &tcp(A, 40001, B, 22, SYN, 0)),
        Err(DropReason::Denied)
    );
    assert_eq!(out(&mut c, later, &udp(A, 6000, B, 53, 20)), Ok(()));
}

#[test]
fn udp_flow_ends_after_30_idle_seconds() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut c = ConnTrack::new(4);
    out(&mut c, s(0), &udp(A, 6000, B, 53, 30)).unwrap();
    inn(&mut c, s(20), &udp(B, 53, A, 6000, 100)).unwrap();
    c.sweep(s(49));
    assert!(drain(&mut c).is_empty(), "a reply 29 s ago keeps it open");
    c.sweep(s(50));
    let recs = drain(&mut c);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.end_reason, "idle");
    assert_eq!((r.start, r.end), (s(0), s(20)), "ends at its last packet");
    assert_eq!(r.proto, PROTO_UDP);
    assert_eq!(
        (r.packets_out, r.bytes_out, r.packets_in, r.bytes_in),
        (1, 58, 1, 128)
    );
    assert_eq!(c.stats().entries, 0);
    // ICMP idles out after 10 s.
    out(&mut c, s(60), &icmp_echo(A, B, 8, 9)).unwrap();
    c.sweep(s(69));
    assert!(drain(&mut c).is_empty());
    c.sweep(s(70));
    assert_eq!(drain(&mut c)[0].end_reason, "idle");
}

#[test]
fn full_table_drops_new_flows_until_one_expires() {
    let t0 = Instant::now();
    let mut c = ConnTrack::new(5);
    c.set_max_flows(3);
    for port in 1..=3 {
        out(&mut c, t0, &udp(A, port, B, 53, 0)).unwrap();
    }
    assert_eq!(
        out(&mut c, t0, &udp(A, 4, B, 53, 0)),
        Err(DropReason::TableFull)
    );
    assert_eq!(
        out(&mut c, t0, &tcp(A, 4, B, 22, SYN, 0)),
        Err(DropReason::TableFull)
    );
    // Tracked flows still pass.
    assert_eq!(inn(&mut c, t0, &udp(B, 53, A, 2, 0)), Ok(()));
    let st = c.stats();
    assert_eq!(
        (st.entries, st.max_entries, st.dropped_table_full),
        (3, 3, 2)
    );
    // Once some expired, a new flow takes a place at once (no sweep needed).
    let later = t0 + UDP_IDLE;
    assert_eq!(out(&mut c, later, &udp(A, 4, B, 53, 0)), Ok(()));
    assert!(c.stats().entries <= 3);
    assert!(drain(&mut c).iter().all(|r| r.end_reason == "idle"));
}

#[test]
fn denied_attempts_are_aggregated_and_bounded() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut c = ct(deny_all(), t0);
    for sport in 0..10 {
        assert_eq!(
            out(&mut c, s(0), &tcp(A, 30000 + sport, B, 3389, SYN, 0)),
            Err(DropReason::Denied)
        );
    }
    let first = drain(&mut c);
    assert_eq!(first.len(), 1, "the first attempt is recorded at once");
    assert_eq!(first[0].count, 1);
    assert_eq!(first[0].end_reason, "denied");
    assert_eq!(first[0].dst_port, 3389);
    assert!(!first[0].allow);
    c.sweep(s(1));
    assert!(drain(&mut c).is_empty(), "at most one record per 5 s");
    c.sweep(s(5));
    let next = drain(&mut c);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].count, 9);
    assert_eq!(c.stats().dropped_by_policy, 10);
    // A quiet key is forgotten; a flood of distinct keys stays bounded.
    c.sweep(s(11));
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.denies.len(), 0);
    for i in 0..3000u32 {
        let dst = Ipv4Addr::from(0x6440_1000 + i).to_string();
        let _ = out(&mut c, s(12), &udp(A, 1, &dst, 9, 0));
    }
    assert_eq!(c.denies.len(), MAX_DENY_KEYS);
    assert_eq!(drain(&mut c).len(), MAX_DENY_KEYS);
    assert_eq!(c.stats().denies_unrecorded, 2000);
    assert_eq!(c.stats().dropped_by_policy, 3010);
}

#[test]
fn icmp_echo_reply_matches_its_request_and_errors_follow_their_flow() {
    let now = Instant::now();
    let mut c = ct(ssh_only(), now);
    let icmp_a_b = Arc::new(Filter::compile(&FilterSpec {
        default_allow: false,
        rules: vec![
            rule(
                "ping",
                true,
                "100.64.0.2/32",
                "100.64.0.3/32",
                vec![PortRange {
                    proto: Some(PROTO_ICMP),
                    lo: 0,
                    hi: 0,
                }],
            ),
            dns_rule(),
        ],
    }));
    c.set_filter(now, icmp_a_b);
    assert_eq!(
        inn(&mut c, now, &icmp_echo(B, A, 0, 77)),
        Err(DropReason::NoConnection),
        "an unsolicited echo reply"
    );
    assert_eq!(
        inn(&mut c, now, &icmp_echo(B, A, 8, 77)),
        Err(DropReason::Denied),
        "B may not ping A"
    );
    out(&mut c, now, &icmp_echo(A, B, 8, 77)).unwrap();
    assert_eq!(inn(&mut c, now, &icmp_echo(B, A, 0, 77)), Ok(()));
    assert_eq!(
        inn(&mut c, now, &icmp_echo(B, A, 0, 78)),
        Err(DropReason::NoConnection),
        "another identifier"
    );
    // An error about a tracked UDP flow passes; one about nothing is decided (denied here).
    let q = udp(A, 6000, B, 53, 10);
    out(&mut c, now, &q).unwrap();
    assert_eq!(inn(&mut c, now, &icmp_error(B, A, 3, &q)), Ok(()));
    let other = udp(A, 6001, B, 54, 10);
    assert_eq!(
        inn(&mut c, now, &icmp_error(B, A, 3, &other)),
        Err(DropReason::Denied)
    );
    // Errors opened no connection.
    assert_eq!(c.stats().entries, 2);
    c.close_all(now);
    let recs: Vec<_> = drain(&mut c)
        .into_iter()
        .filter(|r| r.end_reason == "shutdown")
        .collect();
    assert_eq!(recs.len(), 2);
    let ping = recs.iter().find(|r| r.proto == PROTO_ICMP).unwrap();
    assert_eq!((ping.packets_out, ping.packets_in), (1, 1));
    assert_eq!(ping.rule.as_deref(), Some("ping"));
    assert_eq!(c.stats().entries, 0);
}

#[test]
fn non_first_fragments_follow_a_flow_between_the_same_hosts() {
    let now = Instant::now();
    let mut c = ct(ssh_only(), now);
    assert_eq!(
        inn(&mut c, now, &fragment(B, A, PROTO_UDP, 500)),
        Err(DropReason::Denied),
        "no flow: decided with port 0"
    );
    out(&mut c, now, &udp(A, 6000, B, 53, 1400)).unwrap();
    assert_eq!(inn(&mut c, now, &fragment(B, A, PROTO_UDP, 500)), Ok(()));
    assert_eq!(
        inn(&mut c, now, &fragment(B, A, PROTO_TCP, 500)),
        Err(DropReason::Denied),
        "another protocol"
    );
    c.close_all(now);
    assert_eq!(
        inn(&mut c, now, &fragment(B, A, PROTO_UDP, 500)),
        Err(DropReason::Denied),
        "the pair is forgotten with its last flow"
    );
}

#[test]
fn malformed_headers_are_dropped() {
    let now = Instant::now();
    let mut c = ConnTrack::new(6);
    let mut short = tcp(A, 1, B, 2, SYN, 0);
    short.truncate(30);
    assert_eq!(out(&mut c, now, &short), Err(DropReason::Malformed));
    let mut bad_ihl = udp(A, 1, B, 2, 0);
    bad_ihl[0] = 0x4f; // 60-byte header in a 28-byte packet
    assert_eq!(out(&mut c, now, &bad_ihl), Err(DropReason::Malformed));
    assert_eq!(c.stats().entries, 0);
}

#[test]
fn ports_reused_after_a_close_open_a_new_flow() {
    let now = Instant::now();
    let mut c = ConnTrack::new(8);
    out(&mut c, now, &tcp(A, 1, B, 2, SYN, 0)).unwrap();
    inn(&mut c, now, &tcp(B, 2, A, 1, SYN | ACK, 0)).unwrap();
    out(&mut c, now, &tcp(A, 1, B, 2, FIN | ACK, 0)).unwrap();
    inn(&mut c, now, &tcp(B, 2, A, 1, FIN | ACK, 0)).unwrap();
    out(&mut c, now, &tcp(A, 1, B, 2, SYN, 0)).unwrap();
    let recs = drain(&mut c);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].end_reason, "closed");
    assert_eq!(c.stats().entries, 1);
}

#[test]
fn hasher_spreads_keys_that_differ_in_one_port() {
    let b = FoldBuild::new(1);
    let mut buckets = std::collections::HashSet::new();
    for port in 0..1024u16 {
        let k = Key::new(PROTO_TCP, 0x6440_0002, 40000 + port, 0x6440_0003, 443);
        buckets.insert(b.hash_one(k) & 1023);
    }
    // A uniform hash fills about 63% of 1024 buckets with 1024 keys.
    assert!(buckets.len() > 550, "{}", buckets.len());
}

#[test]
fn interleaved_flows_and_a_reused_slot_keep_their_counters_apart() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut c = ConnTrack::new(5);
    // Two flows, packets alternating and in runs (the last flow is remembered).
    out(&mut c, s(0), &udp(A, 6000, B, 53, 10)).unwrap();
    out(&mut c, s(0), &udp(A, 6001, B, 53, 20)).unwrap();
    out(&mut c, s(0), &udp(A, 6000, B, 53, 10)).unwrap();
    inn(&mut c, s(0), &udp(B, 53, A, 6001, 30)).unwrap();
    inn(&mut c, s(0), &udp(B, 53, A, 6001, 30)).unwrap();
    out(&mut c, s(0), &udp(A, 6000, B, 53, 10)).unwrap();
    // The first ends (reset); a new flow takes its slot, then the old key again.
    out(&mut c, s(1), &tcp(A, 7000, B, 22, SYN, 0)).unwrap();
    out(&mut c, s(1), &tcp(A, 7000, B, 22, RST, 0)).unwrap();
    out(&mut c, s(1), &udp(A, 6002, B, 53, 40)).unwrap();
    assert_eq!(
        out(&mut c, s(1), &tcp(A, 7000, B, 22, ACK, 0)),
        Err(DropReason::NoConnection),
        "the reset connection's key must not match the flow in its slot"
    );
    out(&mut c, s(1), &udp(A, 6002, B, 53, 40)).unwrap();
    c.close_all(s(2));
    let mut recs = drain(&mut c);
    recs.retain(|r| r.proto == PROTO_UDP);
    recs.sort_by_key(|r| r.src_port);
    let counts: Vec<_> = recs
        .iter()
        .map(|r| (r.src_port, r.packets_out, r.packets_in, r.bytes_out))
        .collect();
    assert_eq!(
        counts,
        vec![(6000, 3, 0, 3 * 38), (6001, 1, 2, 48), (6002, 2, 0, 2 * 68)]
    );
}
