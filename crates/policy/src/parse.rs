//! Reading the TOML a person writes into a [`Policy`].
//!
//! The document is parsed into toml's spanned tree ([`DeTable`]) so that
//! every error can name the line of the offending value. Validation goes on
//! after the first problem: every error found is reported.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::ops::Range;

use ipnet::Ipv4Net;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::{Action, Policy, PolicyError, PortRange, Rule, Selector};
use crate::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

const RULE_FIELDS: &str = "name, action, from, to, ports";
const TOP_FIELDS: &str = "default, groups, rules";

/// Parses and validates a policy. Every problem found is reported, each with
/// its line and field; nothing partial is returned.
///
/// Field paths index rules and list entries from 0, as TOML tools do:
/// `rules[0]` is the first `[[rules]]` table, `rules[0].from[1]` the second
/// entry of its `from`.
///
/// Groups may not contain other groups (`group:` inside `[groups]` is
/// refused), so there are no cycles to detect.
pub fn parse(src: &str) -> Result<Policy, Vec<PolicyError>> {
    let mut cx = Ctx::new(src);
    let (doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        for e in syntax {
            let line = e.span().map(|s| cx.line(s.start)).unwrap_or(1);
            let at = e.span().map(|s| s.start).unwrap_or(0);
            // Quote the offending text when it is short and on one line.
            let near = e
                .span()
                .and_then(|s| src.get(s))
                .filter(|t| !t.trim().is_empty() && t.len() <= 40 && !t.contains('\n'))
                .map(|t| format!(" (at `{}`)", t.trim()))
                .unwrap_or_default();
            cx.errors.push((
                at,
                PolicyError {
                    line,
                    field: "syntax".into(),
                    message: format!("invalid TOML: {}{near}", e.message().trim()),
                },
            ));
        }
        return Err(cx.finish());
    }
    let doc = doc.into_inner();

    let mut default = None;
    let mut default_seen = false;
    let mut groups = BTreeMap::new();
    let mut rules = Vec::new();
    // Group references from rules, checked once `[groups]` is known.
    let mut refs: Vec<(String, Range<usize>, String)> = Vec::new();

    for (key, value) in doc.iter() {
        match key.get_ref().as_ref() {
            "default" => {
                default_seen = true;
                default = cx.action(value, "default");
            }
            "groups" => groups = cx.groups(value),
            "rules" => rules = cx.rules(value, &mut refs),
            other => cx.err(
                key.span(),
                other,
                format!("unknown field `{other}` (expected {TOP_FIELDS})"),
            ),
        }
    }
    if !default_seen {
        cx.err(
            0..0,
            "default",
            "missing required field `default`: write `default = \"allow\"` or `default = \"deny\"` \
             (what happens when no rule matches)",
        );
    }
    for (name, span, field) in refs {
        if !groups.contains_key(&name) {
            cx.err(
                span,
                field,
                format!("group `{name}` is not defined in [groups]"),
            );
        }
    }

    // Duplicate rule names (after defaulting unnamed rules to `rule N`),
    // among all rules, valid or not.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, (name, line, span)) in std::mem::take(&mut cx.names).into_iter().enumerate() {
        if let Some(first) = seen.get(&name) {
            cx.err(
                span,
                format!("rules[{i}].name"),
                format!(
                    "duplicate rule name `{name}` (already used by the rule at line {first}); \
                     rule names must be unique"
                ),
            );
        } else {
            seen.insert(name, line);
        }
    }

    if !cx.errors.is_empty() {
        return Err(cx.finish());
    }
    Ok(Policy {
        default: default.expect("default checked above"),
        groups,
        rules,
    })
}

struct Ctx {
    line_starts: Vec<usize>,
    /// With the byte offset they were found at, to sort them.
    errors: Vec<(usize, PolicyError)>,
    /// Every rule's name (given or default), header line and name span.
    names: Vec<(String, usize, Range<usize>)>,
}

type Val<'i> = Spanned<DeValue<'i>>;

impl Ctx {
    fn new(src: &str) -> Ctx {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Ctx {
            line_starts,
            errors: Vec::new(),
            names: Vec::new(),
        }
    }

    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset).max(1)
    }

    fn err(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let line = self.line(span.start);
        self.errors.push((
            span.start,
            PolicyError {
                line,
                field: field.into(),
                message: message.into(),
            },
        ));
    }

    fn finish(mut self) -> Vec<PolicyError> {
        // Stable: errors at one place keep the order they were found in.
        self.errors.sort_by_key(|e| e.0);
        let mut out: Vec<PolicyError> = self.errors.into_iter().map(|e| e.1).collect();
        out.dedup();
        out
    }

    fn string<'a>(&mut self, v: &'a Val<'_>, field: &str, what: &str) -> Option<&'a str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                self.err(
                    v.span(),
                    field,
                    format!("expected {what}, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn action(&mut self, v: &Val<'_>, field: &str) -> Option<Action> {
        let s = self.string(v, field, "\"allow\" or \"deny\"")?;
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            other => {
                self.err(
                    v.span(),
                    field,
                    format!("expected \"allow\" or \"deny\", found \"{other}\""),
                );
                None
            }
        }
    }

    /// A non-empty array of strings, each parsed by `item`. `None` if the
    /// value is not an array or is empty; bad items are reported and skipped.
    fn list<T>(
        &mut self,
        v: &Val<'_>,
        field: &str,
        example: &str,
        mut item: impl FnMut(&mut Ctx, &str, Range<usize>, String) -> Option<T>,
    ) -> Option<Vec<T>> {
        let arr = match v.get_ref() {
            DeValue::Array(a) => a,
            other => {
                self.err(
                    v.span(),
                    field,
                    format!(
                        "expected a list such as {example}, found {}",
                        type_name(other)
                    ),
                );
                return None;
            }
        };
        if arr.is_empty() {
            self.err(
                v.span(),
                field,
                "empty list matches nothing; remove it or list at least one entry",
            );
            return None;
        }
        let mut out = Vec::with_capacity(arr.len());
        for (i, e) in arr.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let Some(s) = self.string(e, &f, "a string") else {
                continue;
            };
            if let Some(t) = item(self, s, e.span(), f) {
                out.push(t);
            }
        }
        Some(out)
    }

    fn groups(&mut self, v: &Val<'_>) -> BTreeMap<String, Vec<Selector>> {
        let mut out = BTreeMap::new();
        let DeValue::Table(t) = v.get_ref() else {
            self.err(
                v.span(),
                "groups",
                format!(
                    "expected a table of groups such as `[groups]` then `admins = [\"laptop-ana\"]`, found {}",
                    type_name(v.get_ref())
                ),
            );
            return out;
        };
        for (k, gv) in t.iter() {
            let name = k.get_ref().as_ref();
            let field = format!("groups.{name}");
            if let Err(m) = check_label(name) {
                self.err(k.span(), &field, format!("invalid group name: {m}"));
                continue;
            }
            let members = self.list(
                gv,
                &field,
                "[\"laptop-ana\", \"tag:ops\"]",
                |cx, s, span, f| match parse_selector(s) {
                    Ok(Selector::Group(g)) => {
                        cx.err(
                            span,
                            f,
                            format!(
                                "groups cannot contain other groups (`group:{g}`); \
                                 list that group's members here instead"
                            ),
                        );
                        None
                    }
                    Ok(sel) => Some(sel),
                    Err(m) => {
                        cx.err(span, f, m);
                        None
                    }
                },
            );
            if let Some(m) = members {
                out.insert(name.to_string(), m);
            }
        }
        out
    }

    fn rules(&mut self, v: &Val<'_>, refs: &mut Vec<(String, Range<usize>, String)>) -> Vec<Rule> {
        let mut out = Vec::new();
        let DeValue::Array(arr) = v.get_ref() else {
            self.err(
                v.span(),
                "rules",
                format!(
                    "expected a list of `[[rules]]` tables, found {}",
                    type_name(v.get_ref())
                ),
            );
            return out;
        };
        for (i, rv) in arr.iter().enumerate() {
            let prefix = format!("rules[{i}]");
            let DeValue::Table(t) = rv.get_ref() else {
                self.err(
                    rv.span(),
                    &prefix,
                    format!(
                        "expected a rule table (`[[rules]]`), found {}",
                        type_name(rv.get_ref())
                    ),
                );
                continue;
            };
            if let Some(r) = self.rule(i, rv.span(), t, refs) {
                out.push(r);
            }
        }
        out
    }

    fn rule(
        &mut self,
        i: usize,
        header: Range<usize>,
        t: &DeTable<'_>,
        refs: &mut Vec<(String, Range<usize>, String)>,
    ) -> Option<Rule> {
        let prefix = format!("rules[{i}]");
        let before = self.errors.len();
        let mut name = None;
        let mut name_span = header.clone();
        let mut action = None;
        let mut from = None;
        let mut to = None;
        let mut ports = None;
        let mut seen = [false; 5];
        for (k, v) in t.iter() {
            let key = k.get_ref().as_ref();
            let field = format!("{prefix}.{key}");
            let selectors =
                |cx: &mut Ctx, refs: &mut Vec<_>| {
                    cx.list(v, &field, "[\"tag:web\", \"db-1\"]", |cx, s, span, f| {
                        match parse_selector(s) {
                            Ok(sel) => {
                                if let Selector::Group(g) = &sel {
                                    refs.push((g.clone(), span, f));
                                }
                                Some(sel)
                            }
                            Err(m) => {
                                cx.err(span, f, m);
                                None
                            }
                        }
                    })
                };
            match key {
                "name" => {
                    seen[0] = true;
                    name_span = v.span();
                    if let Some(s) = self.string(v, &field, "a string") {
                        if s.trim().is_empty() {
                            self.err(v.span(), &field, "rule name is empty");
                        } else {
                            name = Some(s.to_string());
                        }
                    }
                }
                "action" => {
                    seen[1] = true;
                    action = self.action(v, &field);
                }
                "from" => {
                    seen[2] = true;
                    from = selectors(self, refs);
                }
                "to" => {
                    seen[3] = true;
                    to = selectors(self, refs);
                }
                "ports" => {
                    seen[4] = true;
                    ports = self.list(v, &field, "[\"tcp:443\", \"udp:53\"]", |cx, s, span, f| {
                        match parse_ports(s) {
                            Ok(p) => Some(p),
                            Err(m) => {
                                cx.err(span, f, m);
                                None
                            }
                        }
                    });
                }
                other => self.err(
                    k.span(),
                    field,
                    format!("unknown field `{other}` (expected {RULE_FIELDS})"),
                ),
            }
        }
        for (idx, key, hint) in [
            (1, "action", "\"allow\" or \"deny\""),
            (2, "from", "a list of sources, e.g. [\"*\"]"),
            (3, "to", "a list of destinations, e.g. [\"tag:web\"]"),
        ] {
            if !seen[idx] {
                self.err(
                    header.clone(),
                    format!("{prefix}.{key}"),
                    format!("missing required field `{key}` ({hint})"),
                );
            }
        }
        let line = self.line(header.start);
        let name = name.unwrap_or_else(|| format!("rule {}", i + 1));
        self.names.push((name.clone(), line, name_span));
        if self.errors.len() > before {
            return None;
        }
        Some(Rule {
            name,
            action: action?,
            from: from?,
            to: to?,
            ports: ports.unwrap_or_else(|| vec![PortRange::ANY]),
            line,
        })
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

/// Node names: 1–63 lowercase letters, digits and hyphens, not starting or
/// ending with a hyphen.
pub(crate) fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Tag, group and binding names: 1–63 letters, digits, `-`, `_` or `.`.
fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("the name is empty".into());
    }
    if s.len() > 63 {
        return Err(format!("`{s}` is longer than 63 characters"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "`{s}` contains {c:?}; use letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// Parses one source or destination selector.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    if s == "*" {
        return Ok(Selector::Any);
    }
    if let Some((prefix, rest)) = s.split_once(':') {
        let make: fn(String) -> Selector = match prefix {
            "tag" => Selector::Tag,
            "group" => Selector::Group,
            "binding" => Selector::Binding,
            _ => {
                return Err(format!(
                    "unknown selector `{s}`: `{prefix}:` is not a known prefix \
                     (expected tag:NAME, group:NAME, binding:NAME, a node name, \
                     an IPv4 address or CIDR, or *)"
                ))
            }
        };
        return match check_label(rest) {
            Ok(()) => Ok(make(rest.to_string())),
            Err(m) => Err(format!("invalid {prefix} name in `{s}`: {m}")),
        };
    }
    if s.contains('.') || s.contains('/') {
        return parse_cidr(s).map(Selector::Cidr);
    }
    if is_node_name(s) {
        return Ok(Selector::Node(s.to_string()));
    }
    let lower = s.to_ascii_lowercase();
    let hint = if lower != s && is_node_name(&lower) {
        format!("; node names are lowercase: did you mean `{lower}`?")
    } else {
        String::new()
    };
    Err(format!(
        "`{s}` is not a valid selector: node names are 1-63 lowercase letters, digits \
         and hyphens, not starting or ending with a hyphen (other selectors: *, tag:NAME, \
         group:NAME, binding:NAME, an IPv4 address or CIDR){hint}"
    ))
}

fn parse_cidr(s: &str) -> Result<Ipv4Net, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("`{s}` is not a valid IPv4 address or CIDR"))?;
    let len = match len {
        None => 32,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= 32 => n,
            _ => {
                return Err(format!(
                    "`{s}` has an invalid prefix length `/{l}` (expected /0 to /32)"
                ))
            }
        },
    };
    let net = Ipv4Net::new(ip, len).expect("prefix length checked");
    if net.network() != ip {
        return Err(format!(
            "{s} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses one `ports` entry: `*`, `tcp`, `udp`, `icmp`, `tcp:80`,
/// `udp:53`, `tcp:8000-8100`.
pub fn parse_ports(s: &str) -> Result<PortRange, String> {
    if s == "*" {
        return Ok(PortRange::ANY);
    }
    let (proto_s, rest) = match s.split_once(':') {
        Some((p, r)) => (p, Some(r)),
        None => (s, None),
    };
    let proto = match proto_s {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "icmp" => PROTO_ICMP,
        _ => {
            return Err(format!(
                "unknown protocol `{proto_s}` in `{s}` (expected tcp, udp, icmp, \
                 tcp:PORT, udp:LO-HI or *)"
            ))
        }
    };
    let all = PortRange {
        proto: Some(proto),
        lo: 0,
        hi: u16::MAX,
    };
    let Some(rest) = rest else {
        return Ok(all);
    };
    if proto == PROTO_ICMP {
        return Err(format!("icmp has no ports: write `icmp` instead of `{s}`"));
    }
    let (lo, hi) = match rest.split_once('-') {
        Some((lo, hi)) => (port_number(lo, s)?, port_number(hi, s)?),
        None => {
            let p = port_number(rest, s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!(
            "range {lo}-{hi} in `{s}` is backwards; did you mean {proto_s}:{hi}-{lo}?"
        ));
    }
    Ok(PortRange {
        proto: Some(proto),
        lo,
        hi,
    })
}

fn port_number(p: &str, whole: &str) -> Result<u16, String> {
    if p.is_empty() {
        return Err(format!("missing port number in `{whole}`"));
    }
    if !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{p}` in `{whole}` is not a port number"));
    }
    match p.parse::<u64>() {
        Ok(0) => Err(format!(
            "port 0 in `{whole}` is not a valid port (ports are 1-65535)"
        )),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(format!(
            "port {p} in `{whole}` is out of range (ports are 1-65535)"
        )),
    }
}
