use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::compile::Storage;
use crate::*;

fn errs(src: &str) -> Vec<PolicyError> {
    match parse(src) {
        Ok(p) => panic!("expected errors, parsed {p:?}"),
        Err(e) => e,
    }
}

/// Exactly one error: its line, field and a piece of its message.
fn one(src: &str, line: usize, field: &str, msg: &str) {
    let e = errs(src);
    assert_eq!(e.len(), 1, "expected one error, got {e:#?}");
    let e = &e[0];
    assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
    assert!(
        e.message.contains(msg),
        "message {:?} lacks {msg:?}",
        e.message
    );
}

/// A policy with one rule whose `extra` lines are appended to it; the rule's
/// fields start at line 3.
fn rule(extra: &str) -> String {
    format!("default = \"deny\"\n[[rules]]\n{extra}")
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- parse

#[test]
fn parses_the_full_contract() {
    let src = r#"default = "deny"                 # required
[groups]
admins = ["laptop-ana", "tag:ops"]

[[rules]]
name = "web"
action = "allow"
from = ["group:admins", "tag:agents", "binding:ci", "node-1", "*", "198.19.0.0/16"]
to = ["tag:web", "db-1", "198.19.10.0/24", "100.64.0.7", "*"]
ports = ["tcp:80", "tcp:8000-8100", "udp:53", "icmp", "tcp", "*"]

[[rules]]
action = "deny"
from = ["*"]
to = ["*"]
"#;
    let p = parse(src).unwrap();
    assert_eq!(p.default, Action::Deny);
    assert_eq!(
        p.groups["admins"],
        vec![
            Selector::Node("laptop-ana".into()),
            Selector::Tag("ops".into())
        ]
    );
    assert_eq!(p.rules.len(), 2);
    let web = &p.rules[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.line, 5);
    assert_eq!(web.action, Action::Allow);
    assert_eq!(
        web.from,
        vec![
            Selector::Group("admins".into()),
            Selector::Tag("agents".into()),
            Selector::Binding("ci".into()),
            Selector::Node("node-1".into()),
            Selector::Any,
            Selector::Cidr(net("198.19.0.0/16")),
        ]
    );
    assert_eq!(web.to[3], Selector::Cidr(net("100.64.0.7/32")));
    let tcp = |lo, hi| PortRange {
        proto: Some(PROTO_TCP),
        lo,
        hi,
    };
    assert_eq!(
        web.ports,
        vec![
            tcp(80, 80),
            tcp(8000, 8100),
            PortRange {
                proto: Some(PROTO_UDP),
                lo: 53,
                hi: 53
            },
            PortRange {
                proto: Some(PROTO_ICMP),
                lo: 0,
                hi: 65535
            },
            tcp(0, 65535),
            PortRange::ANY,
        ]
    );
    // Unnamed rules are "rule N", 1-based; absent ports are everything.
    assert_eq!(p.rules[1].name, "rule 2");
    assert_eq!(p.rules[1].line, 12);
    assert_eq!(p.rules[1].ports, vec![PortRange::ANY]);
}

#[test]
fn default_policy_parses_and_allows_everything() {
    let p = parse(DEFAULT_POLICY).unwrap();
    assert_eq!(p.default, Action::Allow);
    assert!(p.rules.is_empty());
    let (spec, warnings) = resolve(&p, &Directory::default());
    assert!(warnings.is_empty());
    let f = Filter::compile(&spec);
    assert!(
        f.decide(ip("100.64.0.1"), ip("100.64.0.2"), PROTO_TCP, 22)
            .allow
    );
}

#[test]
fn error_display_names_line_and_field() {
    let e = errs("default = \"maybe\"\n");
    assert_eq!(
        e[0].to_string(),
        "line 1, default: expected \"allow\" or \"deny\", found \"maybe\""
    );
}

#[test]
fn toml_syntax_error_has_its_line() {
    let e = errs("default = \"deny\"\n[[rules]]\naction = \"allow\nfrom = [\"*\"]\n");
    assert!(!e.is_empty());
    assert_eq!(e[0].line, 3, "{e:#?}");
    assert_eq!(e[0].field, "syntax");
    assert!(e[0].message.starts_with("invalid TOML"), "{}", e[0]);

    let e = errs("default = \"deny\"\n\n\nfoo = = 1\n");
    assert_eq!(e[0].line, 4, "{e:#?}");

    one(
        "default = \"deny\"\n[[rules]]\nfrom = [\"*\"]\nfrom = [\"*\"]\n",
        4,
        "syntax",
        "invalid TOML: duplicate key (at `from`)",
    );
}

#[test]
fn default_missing_or_wrong() {
    one(
        "[groups]\n",
        1,
        "default",
        "missing required field `default`",
    );
    one("default = \"permit\"\n", 1, "default", "found \"permit\"");
    one("\n\ndefault = true\n", 3, "default", "found a boolean");
}

#[test]
fn unknown_fields() {
    one(
        &rule(
            "name = \"a\"\nactoin = \"allow\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\n",
        ),
        4,
        "rules[0].actoin",
        "unknown field `actoin` (expected name, action, from, to, ports)",
    );
    one(
        "default = \"deny\"\ndefualt = \"allow\"\n",
        2,
        "defualt",
        "unknown field `defualt` (expected default, groups, rules)",
    );
}

#[test]
fn missing_required_rule_fields_point_at_the_header() {
    let e = errs("default = \"deny\"\n\n[[rules]]\nname = \"x\"\n");
    let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (3, "rules[0].action"),
            (3, "rules[0].from"),
            (3, "rules[0].to")
        ]
    );
    assert!(e[0].message.contains("missing required field `action`"));
}

#[test]
fn wrong_types() {
    one(
        &rule("action = \"allow\"\nfrom = \"*\"\nto = [\"*\"]\n"),
        4,
        "rules[0].from",
        "expected a list",
    );
    one(
        &rule("action = \"allow\"\nfrom = [\"*\", 7]\nto = [\"*\"]\n"),
        4,
        "rules[0].from[1]",
        "expected a string, found an integer",
    );
    one(
        &rule("name = 5\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\n"),
        3,
        "rules[0].name",
        "found an integer",
    );
    one(
        "default = \"deny\"\ngroups = [\"a\"]\n",
        2,
        "groups",
        "expected a table",
    );
    one(
        "default = \"deny\"\nrules = \"all\"\n",
        2,
        "rules",
        "expected a list",
    );
    one(
        "default = \"deny\"\n[rules]\naction = \"allow\"\n",
        2,
        "rules",
        "expected a list of `[[rules]]` tables, found a table",
    );
}

#[test]
fn bad_action() {
    one(
        &rule("action = \"accept\"\nfrom = [\"*\"]\nto = [\"*\"]\n"),
        3,
        "rules[0].action",
        "expected \"allow\" or \"deny\", found \"accept\"",
    );
}

#[test]
fn selectors() {
    let bad = |sel: &str, msg: &str| {
        one(
            &rule(&format!(
                "action = \"allow\"\nfrom = [\"*\"]\nto = [\"node-1\", \"{sel}\"]\n"
            )),
            5,
            "rules[0].to[1]",
            msg,
        )
    };
    bad(
        "198.19.10.1/24",
        "198.19.10.1/24 has host bits set; did you mean 198.19.10.0/24?",
    );
    bad("198.19.10.0/33", "invalid prefix length");
    bad("300.1.1.1", "not a valid IPv4 address");
    bad("foo:bar", "`foo:` is not a known prefix");
    bad("-web", "not a valid selector");
    bad("web-", "not a valid selector");
    bad("Web", "did you mean `web`?");
    bad("under_score", "not a valid selector");
    bad(&"a".repeat(64), "1-63");
    bad("tag:", "invalid tag name");
    bad("tag:a b", "invalid tag name");
    // Valid edge cases.
    let p = parse(&rule(&format!(
        "action = \"allow\"\nfrom = [\"0.0.0.0/0\", \"1\", \"{}\"]\nto = [\"10.0.0.1/32\"]\n",
        "a".repeat(63)
    )))
    .unwrap();
    assert_eq!(p.rules[0].from[0], Selector::Cidr(net("0.0.0.0/0")));
    assert_eq!(p.rules[0].from[1], Selector::Node("1".into()));
}

#[test]
fn empty_lists_match_nothing() {
    one(
        &rule("action = \"allow\"\nfrom = []\nto = [\"*\"]\n"),
        4,
        "rules[0].from",
        "matches nothing",
    );
    one(
        &rule("action = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\nports = []\n"),
        6,
        "rules[0].ports",
        "matches nothing",
    );
    one(
        "default = \"deny\"\n[groups]\nops = []\n",
        3,
        "groups.ops",
        "matches nothing",
    );
}

#[test]
fn groups_undefined_and_nested() {
    one(
        &rule("action = \"allow\"\nfrom = [\"group:admins\"]\nto = [\"*\"]\n"),
        4,
        "rules[0].from[0]",
        "group `admins` is not defined in [groups]",
    );
    one(
        "default = \"deny\"\n[groups]\na = [\"x\"]\nb = [\"y\", \"group:a\"]\n",
        4,
        "groups.b[1]",
        "groups cannot contain other groups",
    );
    one(
        "default = \"deny\"\n[groups]\n\"bad name\" = [\"x\"]\n",
        3,
        "groups.bad name",
        "invalid group name",
    );
}

#[test]
fn ports() {
    let bad = |p: &str, msg: &str| {
        one(
            &rule(&format!(
                "action = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:22\",\n  \"{p}\"]\n"
            )),
            7,
            "rules[0].ports[1]",
            msg,
        )
    };
    bad("tcp:0", "port 0");
    bad("tcp:65536", "out of range");
    bad("udp:99999999999999999999", "out of range");
    bad("tcp:8100-8000", "backwards; did you mean tcp:8000-8100?");
    bad("icmp:8", "icmp has no ports");
    bad("sctp:80", "unknown protocol `sctp`");
    bad("TCP:80", "unknown protocol `TCP`");
    bad("tcp:", "missing port");
    bad("tcp:http", "not a port number");
    bad("tcp:1-", "missing port");
    bad("tcp:-5", "missing port");
    let p = parse(&rule(
        "action = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:1-65535\", \"udp:65535\"]\n",
    ))
    .unwrap();
    assert_eq!(p.rules[0].ports[0].hi, 65535);
}

#[test]
fn duplicate_names() {
    let src = "default = \"deny\"\n\
        [[rules]]\nname = \"web\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\n\
        [[rules]]\nname = \"web\"\naction = \"deny\"\nfrom = [\"*\"]\nto = [\"*\"]\n";
    one(
        src,
        8,
        "rules[1].name",
        "duplicate rule name `web` (already used by the rule at line 2)",
    );
}

#[test]
fn reports_every_error_in_line_order() {
    let src = r#"default = "maybe"
[groups]
ops = ["Ana"]
[[rules]]
action = "allow"
from = ["group:nope", "198.19.10.1/24"]
to = ["*"]
ports = ["tcp:0"]
[[rules]]
action = "permit"
from = ["*"]
to = ["x:y"]
"#;
    let e = errs(src);
    let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (1, "default"),
            (3, "groups.ops[0]"),
            (6, "rules[0].from[0]"),
            (6, "rules[0].from[1]"),
            (8, "rules[0].ports[0]"),
            (10, "rules[1].action"),
            (12, "rules[1].to[0]"),
        ],
        "{e:#?}"
    );
}

// -------------------------------------------------------------- resolve

fn member(name: &str, ip: &str, tags: &[&str]) -> Member {
    Member {
        name: name.into(),
        ip: ip.parse().unwrap(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn directory() -> Directory {
    Directory {
        nodes: vec![
            member("laptop-ana", "100.64.0.1", &["ops"]),
            member("web-1", "100.64.0.10", &["web"]),
            member("web-2", "100.64.0.11", &["web"]),
            member("db-1", "100.64.0.20", &["db"]),
        ],
        bindings: vec![member("ci", "100.64.1.5", &["web", "agents"])],
    }
}

#[test]
fn resolves_names_tags_groups_bindings() {
    let src = r#"default = "deny"
[groups]
admins = ["laptop-ana", "tag:agents", "100.64.9.0/24"]
[[rules]]
name = "web"
action = "allow"
from = ["group:admins"]
to = ["tag:web"]
ports = ["tcp:443", "tcp:80", "tcp:81-90"]
[[rules]]
name = "db"
action = "allow"
from = ["binding:ci", "web-1", "web-1"]
to = ["db-1"]
[[rules]]
name = "any"
action = "deny"
from = ["*"]
to = ["198.19.0.0/16"]
"#;
    let (spec, warnings) = resolve(&parse(src).unwrap(), &directory());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(!spec.default_allow);
    let web = &spec.rules[0];
    assert_eq!(web.name, "web");
    assert!(web.allow);
    assert_eq!(
        web.src,
        vec![
            net("100.64.0.1/32"),
            net("100.64.1.5/32"),
            net("100.64.9.0/24")
        ]
    );
    // Nodes and bindings carrying the tag, adjacent /32s aggregated.
    assert_eq!(web.dst, vec![net("100.64.0.10/31"), net("100.64.1.5/32")]);
    // Ports sorted and merged.
    assert_eq!(
        web.ports,
        vec![
            PortRange {
                proto: Some(PROTO_TCP),
                lo: 80,
                hi: 90
            },
            PortRange {
                proto: Some(PROTO_TCP),
                lo: 443,
                hi: 443
            }
        ]
    );
    assert_eq!(
        spec.rules[1].src,
        vec![net("100.64.0.10/32"), net("100.64.1.5/32")]
    );
    assert_eq!(spec.rules[1].dst, vec![net("100.64.0.20/32")]);
    assert_eq!(spec.rules[1].ports, vec![PortRange::ANY]);
    assert_eq!(spec.rules[2].src, vec![net("0.0.0.0/0")]);
    assert!(!spec.rules[2].allow);
}

#[test]
fn warns_about_names_that_match_nothing_and_keeps_the_rule() {
    let src = r#"default = "allow"
[groups]
later = ["db-9"]
[[rules]]
name = "a"
action = "deny"
from = ["laptop-bob", "tag:nobody"]
to = ["binding:gone"]
[[rules]]
name = "b"
action = "deny"
from = ["laptop-bob", "group:later"]
to = ["*"]
"#;
    let (spec, warnings) = resolve(&parse(src).unwrap(), &directory());
    assert_eq!(spec.rules.len(), 2);
    assert!(spec.rules[0].src.is_empty() && spec.rules[0].dst.is_empty());
    assert!(spec.rules[1].src.is_empty());
    assert_eq!(spec.rules[1].dst, vec![net("0.0.0.0/0")]);
    let has = |needle: &str| {
        assert!(
            warnings.iter().any(|w| w.contains(needle)),
            "no warning with {needle:?} in {warnings:#?}"
        )
    };
    has("node `laptop-bob` (no node of that name has joined) matches nothing yet (used by rules `a`, `b`)");
    has("tag `nobody`");
    has("binding `gone`");
    has("node `db-9`");
    has("group `later`");
    assert_eq!(warnings.len(), 5, "{warnings:#?}");
    // Rules that match nothing never decide: the default does.
    let f = Filter::compile(&spec);
    let d = f.decide(ip("100.64.0.1"), ip("100.64.0.2"), PROTO_TCP, 1);
    assert_eq!(
        d,
        Decision {
            allow: true,
            rule: None
        }
    );
}

// -------------------------------------------------------------- filter

fn spec_of(src: &str) -> FilterSpec {
    resolve(&parse(src).unwrap(), &directory()).0
}

#[test]
fn first_match_wins_and_default_decides_the_rest() {
    let f = Filter::compile(&spec_of(
        r#"default = "deny"
[[rules]]
name = "no-ssh-to-db"
action = "deny"
from = ["*"]
to = ["db-1"]
ports = ["tcp:22"]
[[rules]]
name = "ops"
action = "allow"
from = ["tag:ops"]
to = ["*"]
[[rules]]
name = "web"
action = "allow"
from = ["*"]
to = ["tag:web"]
ports = ["tcp:443"]
"#,
    ));
    let ana = ip("100.64.0.1");
    let db = ip("100.64.0.20");
    let web = ip("100.64.0.10");
    let d = f.decide(ana, db, PROTO_TCP, 22);
    assert_eq!(
        d,
        Decision {
            allow: false,
            rule: Some(0)
        }
    );
    assert_eq!(f.rule_name(0), "no-ssh-to-db");
    assert_eq!(
        f.decide(ana, db, PROTO_TCP, 5432),
        Decision {
            allow: true,
            rule: Some(1)
        }
    );
    assert_eq!(
        f.decide(db, web, PROTO_TCP, 443),
        Decision {
            allow: true,
            rule: Some(2)
        }
    );
    assert_eq!(
        f.decide(db, web, PROTO_TCP, 80),
        Decision {
            allow: false,
            rule: None
        }
    );
    assert_eq!(f.rule_name(99), "");
    assert!(f.may_talk(ana, db));
    assert!(f.may_talk(db, web));
    assert!(!f.may_talk(web, db));
}

#[test]
fn protocols_and_ports() {
    let f = Filter::compile(&spec_of(
        r#"default = "deny"
[[rules]]
action = "allow"
from = ["*"]
to = ["web-1"]
ports = ["icmp", "udp:53", "tcp:8000-8100"]
[[rules]]
action = "allow"
from = ["*"]
to = ["web-2"]
ports = ["tcp"]
[[rules]]
action = "allow"
from = ["*"]
to = ["db-1"]
"#,
    ));
    let a = ip("100.64.0.1");
    let w1 = ip("100.64.0.10");
    let w2 = ip("100.64.0.11");
    let db = ip("100.64.0.20");
    // ICMP ignores the port.
    assert!(f.decide(a, w1, PROTO_ICMP, 0).allow);
    assert!(f.decide(a, w1, PROTO_ICMP, 777).allow);
    assert!(f.decide(a, w1, PROTO_UDP, 53).allow);
    assert!(!f.decide(a, w1, PROTO_UDP, 54).allow);
    assert!(!f.decide(a, w1, PROTO_TCP, 53).allow);
    assert!(!f.decide(a, w1, PROTO_TCP, 7999).allow);
    assert!(f.decide(a, w1, PROTO_TCP, 8000).allow);
    assert!(f.decide(a, w1, PROTO_TCP, 8100).allow);
    assert!(!f.decide(a, w1, PROTO_TCP, 8101).allow);
    assert!(!f.decide(a, w1, 47, 0).allow);
    // `tcp` is every TCP port, nothing else.
    assert!(f.decide(a, w2, PROTO_TCP, 1).allow);
    assert!(f.decide(a, w2, PROTO_TCP, 65535).allow);
    assert!(!f.decide(a, w2, PROTO_UDP, 1).allow);
    assert!(!f.decide(a, w2, PROTO_ICMP, 0).allow);
    // `*` (the default ports) is everything, any protocol.
    for proto in [0u8, PROTO_ICMP, PROTO_TCP, PROTO_UDP, 47, 255] {
        assert!(f.decide(a, db, proto, 65535).allow);
    }
    // Nobody reaches an address no rule names.
    assert!(!f.decide(a, ip("100.64.0.99"), PROTO_TCP, 8000).allow);
    assert!(!f.may_talk(a, ip("100.64.0.99")));
    assert!(f.may_talk(a, w1));
}

#[test]
fn allow_all_and_empty_rules() {
    let f = Filter::allow_all();
    assert_eq!(
        f.decide(ip("1.2.3.4"), ip("5.6.7.8"), PROTO_UDP, 9),
        Decision {
            allow: true,
            rule: None
        }
    );
    assert!(f.may_talk(ip("1.2.3.4"), ip("5.6.7.8")));
    let deny_all = Filter::compile(&FilterSpec {
        default_allow: false,
        rules: vec![],
    });
    assert!(!deny_all.may_talk(ip("1.2.3.4"), ip("5.6.7.8")));
}

#[test]
fn may_talk_sees_an_allow_behind_partial_denies() {
    let r = |allow, ports: Vec<PortRange>| FilterRule {
        name: String::new(),
        allow,
        src: vec![net("0.0.0.0/0")],
        dst: vec![net("0.0.0.0/0")],
        ports,
    };
    let p = |proto, lo, hi| PortRange {
        proto: Some(proto),
        lo,
        hi,
    };
    // Deny all of TCP and UDP and ICMP, then allow TCP 80: shadowed.
    let mut spec = FilterSpec {
        default_allow: false,
        rules: vec![
            r(false, vec![p(PROTO_TCP, 0, 65535), p(PROTO_UDP, 0, 65535)]),
            r(false, vec![p(PROTO_ICMP, 0, 0)]),
            r(true, vec![p(PROTO_TCP, 80, 80)]),
        ],
    };
    let a = ip("100.64.0.1");
    let b = ip("100.64.0.2");
    assert!(!Filter::compile(&spec).may_talk(a, b));
    // Leave one TCP port open: the later allow reaches it.
    spec.rules[0].ports[0] = p(PROTO_TCP, 0, 79);
    assert!(Filter::compile(&spec).may_talk(a, b));
    // With no allow rule, a default allow only counts if something is left.
    spec.rules[2].allow = false;
    assert!(!Filter::compile(&spec).may_talk(a, b));
    spec.default_allow = true;
    assert!(
        Filter::compile(&spec).may_talk(a, b),
        "tcp 81.. and other protocols are open"
    );
    spec.rules.push(r(false, vec![PortRange::ANY]));
    assert!(!Filter::compile(&spec).may_talk(a, b));
}

#[test]
fn filter_is_shareable() {
    fn check<T: Send + Sync + Clone + std::fmt::Debug>() {}
    check::<Filter>();
}

// ------------------------------------------------- randomized equivalence

/// xorshift64*: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The obvious implementation: every rule in order.
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

/// Addresses from a small universe so that prefixes overlap a lot.
fn rand_ip(rng: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, rng.below(4) as u8, rng.below(40) as u8)
}

fn rand_net(rng: &mut Rng) -> Ipv4Net {
    let len = match rng.below(10) {
        0 => 0,
        1 => rng.below(33) as u8,
        2..=3 => 22 + rng.below(11) as u8,
        _ => 32,
    };
    Ipv4Net::new(rand_ip(rng), len).unwrap().trunc()
}

const PROTOS: [u8; 5] = [PROTO_ICMP, PROTO_TCP, PROTO_UDP, 47, 0];

fn rand_port(rng: &mut Rng) -> u16 {
    match rng.below(4) {
        0 => rng.below(65536) as u16,
        1 => [0, 1, 65535][rng.below(3) as usize],
        _ => 20 + rng.below(20) as u16,
    }
}

fn rand_ports(rng: &mut Rng) -> PortRange {
    match rng.below(8) {
        0 => PortRange::ANY,
        1 => PortRange {
            proto: Some(PROTOS[rng.below(5) as usize]),
            lo: 0,
            hi: 65535,
        },
        _ => {
            let a = rand_port(rng);
            let b = if rng.below(2) == 0 { a } else { rand_port(rng) };
            PortRange {
                proto: Some(PROTOS[rng.below(5) as usize]),
                lo: a.min(b),
                hi: a.max(b),
            }
        }
    }
}

fn rand_spec(rng: &mut Rng, rules: usize) -> FilterSpec {
    let list = |rng: &mut Rng, f: &dyn Fn(&mut Rng) -> Ipv4Net| {
        (0..rng.below(4)).map(|_| f(rng)).collect::<Vec<_>>()
    };
    FilterSpec {
        default_allow: rng.below(2) == 0,
        rules: (0..rules)
            .map(|i| FilterRule {
                name: format!("r{i}"),
                allow: rng.below(2) == 0,
                src: list(rng, &rand_net),
                dst: list(rng, &rand_net),
                ports: (0..rng.below(4)).map(|_| rand_ports(rng)).collect(),
            })
            .collect(),
    }
}

#[test]
fn compiled_filter_agrees_with_the_naive_scan() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut matched = 0;
    let mut defaulted = 0;
    let (mut dense, mut sparse) = (0, 0);
    for round in 0..24 {
        let rules = [1, 5, 30, 100, 200, 400, 1000, 50][round % 8];
        let spec = rand_spec(&mut rng, rules);
        // Sets stored as the heuristic picks, and each path on its own.
        let storage = [Storage::Auto, Storage::AllSparse, Storage::AllDense][round % 3];
        let f = Filter::compile_with(&spec, storage);
        let st = f.stats();
        dense += st.dense_sets;
        sparse += st.sets - st.dense_sets;
        for _ in 0..1500 {
            let (s, d) = (rand_ip(&mut rng), rand_ip(&mut rng));
            let proto = PROTOS[rng.below(5) as usize];
            let port = rand_port(&mut rng);
            let want = naive(&spec, s, d, proto, port);
            assert_eq!(
                f.decide(s, d, proto, port),
                want,
                "round {round}: {s} -> {d} proto {proto} port {port}"
            );
            if want.rule.is_some() {
                matched += 1;
            } else {
                defaulted += 1;
            }
        }
        // may_talk: decide is constant between port boundaries, so the
        // boundaries of every rule's ranges cover all cases.
        let mut keys: Vec<(u8, u16)> = vec![(200, 0)];
        for p in PROTOS {
            keys.push((p, 0));
        }
        for r in &spec.rules {
            for p in &r.ports {
                for proto in p.proto.map(|p| vec![p]).unwrap_or(PROTOS.to_vec()) {
                    keys.push((proto, p.lo));
                    keys.push((proto, p.hi));
                    keys.push((proto, p.lo.saturating_sub(1)));
                    keys.push((proto, p.hi.saturating_add(1)));
                }
            }
        }
        for _ in 0..150 {
            let (s, d) = (rand_ip(&mut rng), rand_ip(&mut rng));
            let want = keys
                .iter()
                .any(|&(proto, port)| naive(&spec, s, d, proto, port).allow);
            assert_eq!(f.may_talk(s, d), want, "round {round}: may_talk {s} -> {d}");
        }
    }
    // The test exercises both rules and the default.
    assert!(matched > 5000 && defaulted > 3000, "{matched} {defaulted}");
    // ... and both ways of storing rule sets.
    assert!(
        dense > 50 && sparse > 50,
        "{dense} dense, {sparse} sparse sets"
    );
}

/// Many narrow rules: each address is in few rules, so rule sets are sparse
/// and the intersection probes sets whose words sit at different indices.
#[test]
fn compiled_filter_agrees_with_the_naive_scan_on_narrow_rules() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let addr = |i: u64| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i as u32);
    let mut matched = 0;
    for round in 0..6 {
        let universe = 2000;
        let n = 3000;
        let rules: Vec<FilterRule> = (0..n)
            .map(|i| {
                let wide = rng.below(300) == 0;
                let pick = |rng: &mut Rng| {
                    if wide {
                        vec![Ipv4Net::new(addr(rng.below(universe)), 24).unwrap().trunc()]
                    } else {
                        (0..1 + rng.below(2))
                            .map(|_| Ipv4Net::new(addr(rng.below(universe)), 32).unwrap())
                            .collect()
                    }
                };
                FilterRule {
                    name: format!("r{i}"),
                    allow: rng.below(2) == 0,
                    src: pick(&mut rng),
                    dst: pick(&mut rng),
                    ports: (0..1 + rng.below(2))
                        .map(|_| rand_ports(&mut rng))
                        .collect(),
                }
            })
            .collect();
        let spec = FilterSpec {
            default_allow: rng.below(2) == 0,
            rules,
        };
        let storage = [Storage::Auto, Storage::AllSparse, Storage::AllDense][round % 3];
        let f = Filter::compile_with(&spec, storage);
        if storage == Storage::Auto {
            let st = f.stats();
            assert!(st.sets - st.dense_sets > 1000, "{st:?}");
        }
        for _ in 0..3000 {
            let (s, d) = if rng.below(2) == 0 {
                let r = &spec.rules[rng.below(n) as usize];
                let host = |n: &Ipv4Net, rng: &mut Rng| {
                    Ipv4Addr::from(
                        u32::from(n.network()) + rng.below(1 << (32 - n.prefix_len())) as u32,
                    )
                };
                (host(&r.src[0], &mut rng), host(&r.dst[0], &mut rng))
            } else {
                (addr(rng.below(universe)), addr(rng.below(universe)))
            };
            let proto = PROTOS[rng.below(5) as usize];
            let port = rand_port(&mut rng);
            let want = naive(&spec, s, d, proto, port);
            assert_eq!(
                f.decide(s, d, proto, port),
                want,
                "round {round}: {s} -> {d} proto {proto} port {port}"
            );
            matched += want.rule.is_some() as usize;
        }
    }
    assert!(matched > 2000, "{matched}");
}

#[test]
fn debug_output_stays_small() {
    let spec = rand_spec(&mut Rng(7), 400);
    let s = format!("{:?}", Filter::compile(&spec));
    assert!(s.starts_with("Filter {") && s.len() < 400, "{s}");
}
