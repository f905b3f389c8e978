//! Decisions per second and compile time of a large policy: 10,000 rules over
//! an account of 5,000 nodes (node /32s, tags, groups, bindings, CIDRs, port
//! ranges). Also prints the compiled sizes, and those of the worst case for
//! memory: 10,000 rules each naming distinct /32s.

use std::fmt::Write;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::Ipv4Net;
use trellis_policy::{
    parse, resolve, Decision, Directory, Filter, FilterRule, FilterSpec, Member, PortRange,
    PROTO_TCP, PROTO_UDP,
};

const NODES: usize = 5_000;
const RULES: usize = 10_000;
const TAGS: usize = 200;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i as u32)
}

fn directory(rng: &mut Rng) -> Directory {
    let tags = |rng: &mut Rng| {
        (0..1 + rng.below(3))
            .map(|_| format!("t{}", rng.below(TAGS)))
            .collect()
    };
    Directory {
        nodes: (0..NODES)
            .map(|i| Member {
                name: format!("node-{i}"),
                ip: node_ip(i),
                tags: tags(rng),
            })
            .collect(),
        bindings: (0..100)
            .map(|i| Member {
                name: format!("b{i}"),
                ip: Ipv4Addr::new(100, 65, 0, i as u8 + 1),
                tags: tags(rng),
            })
            .collect(),
    }
}

fn policy_text(rng: &mut Rng) -> String {
    let mut s = String::from("default = \"deny\"\n[groups]\n");
    for g in 0..50 {
        let members: Vec<String> = (0..10)
            .map(|_| match rng.below(3) {
                0 => format!("\"tag:t{}\"", rng.below(TAGS)),
                _ => format!("\"node-{}\"", rng.below(NODES)),
            })
            .collect();
        writeln!(s, "g{g} = [{}]", members.join(", ")).unwrap();
    }
    let sel = |rng: &mut Rng| match rng.below(100) {
        0..=54 => format!("\"node-{}\"", rng.below(NODES)),
        55..=74 => format!("\"tag:t{}\"", rng.below(TAGS)),
        75..=84 => format!("\"group:g{}\"", rng.below(50)),
        85..=89 => format!("\"binding:b{}\"", rng.below(100)),
        90..=98 => format!("\"100.64.{}.0/{}\"", rng.below(20), 24 + rng.below(9)),
        _ => "\"*\"".to_string(),
    };
    let port = |rng: &mut Rng| match rng.below(10) {
        0 => "\"*\"".to_string(),
        1 => "\"icmp\"".to_string(),
        2 => "\"udp:53\"".to_string(),
        3 | 4 => {
            let lo = 1000 + rng.below(50_000);
            format!("\"tcp:{lo}-{}\"", lo + rng.below(1000))
        }
        _ => format!("\"tcp:{}\"", [22, 80, 443, 5432, 6379, 8080][rng.below(6)]),
    };
    for i in 0..RULES {
        let action = if rng.below(5) == 0 { "deny" } else { "allow" };
        let list = |rng: &mut Rng, f: &dyn Fn(&mut Rng) -> String| {
            (0..1 + rng.below(2))
                .map(|_| f(rng))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            s,
            "[[rules]]\nname = \"r{i}\"\naction = \"{action}\"\nfrom = [{}]\nto = [{}]\nports = [{}]",
            list(rng, &sel),
            list(rng, &sel),
            list(rng, &port)
        )
        .unwrap();
    }
    s
}

/// Queries between nodes that rules name (so they hit rules), with ports
/// the rules use.
fn queries(rng: &mut Rng, n: usize) -> Vec<(Ipv4Addr, Ipv4Addr, u8, u16)> {
    (0..n)
        .map(|_| {
            let proto = [PROTO_TCP, PROTO_TCP, PROTO_TCP, PROTO_UDP][rng.below(4)];
            let port = match rng.below(3) {
                0 => [22, 80, 443, 5432, 6379, 8080, 53][rng.below(7)],
                _ => 1 + rng.below(65535),
            } as u16;
            (
                node_ip(rng.below(NODES)),
                node_ip(rng.below(NODES)),
                proto,
                port,
            )
        })
        .collect()
}

fn naive(spec: &FilterSpec, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> Decision {
    for (i, r) in spec.rules.iter().enumerate() {
        if r.src.iter().any(|n| n.contains(&src))
            && r.dst.iter().any(|n| n.contains(&dst))
            && r.ports.iter().any(|p| p.matches(proto, port))
        {
            return Decision {
                allow: r.allow,
                rule: Some(i as u32),
            };
        }
    }
    Decision {
        allow: spec.default_allow,
        rule: None,
    }
}

/// 10,000 rules, each from one distinct /32 to another, on distinct ports,
/// after a first rule matching everything on one port: every range of every
/// dimension has its own rule set.
fn distinct_hosts_spec() -> FilterSpec {
    let host = |i: usize| Ipv4Net::new(node_ip(i), 32).unwrap();
    let mut rules = vec![FilterRule {
        name: "any-ssh".into(),
        allow: true,
        src: vec![Ipv4Net::default()],
        dst: vec![Ipv4Net::default()],
        ports: vec![PortRange {
            proto: Some(PROTO_TCP),
            lo: 22,
            hi: 22,
        }],
    }];
    rules.extend((0..RULES).map(|i| FilterRule {
        name: format!("r{i}"),
        allow: i % 2 == 0,
        src: vec![host(i)],
        dst: vec![host(RULES + i)],
        ports: vec![PortRange {
            proto: Some(PROTO_TCP),
            lo: 1000 + i as u16,
            hi: 1000 + i as u16,
        }],
    }));
    FilterSpec {
        default_allow: false,
        rules,
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let dir = directory(&mut rng);
    let text = policy_text(&mut rng);

    let t = Instant::now();
    let policy = parse(&text).expect("generated policy parses");
    let parse_time = t.elapsed();
    let t = Instant::now();
    let (spec, warnings) = resolve(&policy, &dir);
    let resolve_time = t.elapsed();
    let t = Instant::now();
    let filter = Filter::compile(&spec);
    let compile_time = t.elapsed();
    let prefixes: usize = spec.rules.iter().map(|r| r.src.len() + r.dst.len()).sum();
    println!(
        "policy: {} bytes of TOML, {RULES} rules, {NODES} nodes, {} warnings, {prefixes} prefixes after resolving",
        text.len(),
        warnings.len()
    );
    println!("one-shot: parse {parse_time:?}, resolve {resolve_time:?}, compile {compile_time:?}");
    println!("compiled: {:?}", filter.stats());
    let worst = distinct_hosts_spec();
    let t = Instant::now();
    let worst_filter = Filter::compile(&worst);
    println!(
        "distinct /32s: compile {:?}, {:?}",
        t.elapsed(),
        worst_filter.stats()
    );

    let qs = queries(&mut rng, 4096);
    let hits = qs
        .iter()
        .filter(|q| filter.decide(q.0, q.1, q.2, q.3).rule.is_some())
        .count();
    println!("queries matching a rule: {hits} of {}", qs.len());
    for q in qs.iter().take(256) {
        assert_eq!(
            filter.decide(q.0, q.1, q.2, q.3),
            naive(&spec, q.0, q.1, q.2, q.3)
        );
    }

    let mut g = c.benchmark_group("policy");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(qs.len() as u64));
    g.bench_function("decide 10k rules (batch of 4096)", |b| {
        b.iter(|| {
            let mut allowed = 0u32;
            for &(s, d, p, port) in &qs {
                allowed += black_box(&filter).decide(s, d, p, port).allow as u32;
            }
            allowed
        })
    });
    let wq: Vec<_> = (0..4096)
        .map(|i| {
            let r = rng.below(RULES);
            (
                node_ip(r),
                node_ip(RULES + if i % 2 == 0 { r } else { rng.below(RULES) }),
                PROTO_TCP,
                if i % 3 == 0 { 22 } else { 1000 + r as u16 },
            )
        })
        .collect();
    g.bench_function("decide distinct /32s (batch of 4096)", |b| {
        b.iter(|| {
            let mut allowed = 0u32;
            for &(s, d, p, port) in &wq {
                allowed += black_box(&worst_filter).decide(s, d, p, port).allow as u32;
            }
            allowed
        })
    });
    g.throughput(Throughput::Elements(64));
    g.sample_size(10);
    g.bench_function("naive scan 10k rules (batch of 64)", |b| {
        b.iter(|| {
            let mut allowed = 0u32;
            for &(s, d, p, port) in &qs[..64] {
                allowed += naive(black_box(&spec), s, d, p, port).allow as u32;
            }
            allowed
        })
    });
    g.throughput(Throughput::Elements(256));
    g.bench_function("may_talk 10k rules (batch of 256)", |b| {
        b.iter(|| {
            let mut yes = 0u32;
            for &(s, d, _, _) in &qs[..256] {
                yes += black_box(&filter).may_talk(s, d) as u32;
            }
            yes
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("compile 10k rules", |b| {
        b.iter(|| Filter::compile(black_box(&spec)))
    });
    g.bench_function("parse+resolve 10k rules", |b| {
        b.iter(|| resolve(&parse(black_box(&text)).unwrap(), &dir))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
