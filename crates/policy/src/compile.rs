//! The structure that decides packets.
//!
//! Each of the three dimensions of a rule (source address, destination
//! address, protocol and port) is cut into disjoint ranges; each range maps
//! to the set of rules that match anywhere in it. A decision looks up the
//! range of each dimension (binary search), intersects the three sets and
//! takes the lowest rule index: the first matching rule. Its cost depends on
//! the number of distinct range boundaries only logarithmically and on the
//! rules only through the size of the three sets, never on the number of
//! nodes; it does not allocate.
//!
//! Sets are bitsets over rule indices stored sparsely (only the non-zero
//! 64-bit words, with their word index) and interned: identical sets, across
//! all three dimensions, are stored once.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::{Decision, FilterSpec, PortRange, PROTO_TCP, PROTO_UDP};

/// Protocol and port as one key: `proto << 16 | port`.
const KEY_MAX: u32 = (256 << 16) - 1;

/// A compiled [`FilterSpec`], ready to decide packets. Cheap to clone (the
/// compiled form is shared).
#[derive(Debug, Clone)]
pub struct Filter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spec: FilterSpec,
    allow: Vec<bool>,
    src: RangeMap,
    dst: RangeMap,
    port: RangeMap,
    sets: SetArena,
    /// Per rule, its sorted disjoint protocol/port key ranges (for `may_talk`).
    port_off: Vec<u32>,
    port_ranges: Vec<(u32, u32)>,
}

/// Sizes of a compiled filter, to see what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterStats {
    pub rules: usize,
    /// Disjoint ranges per dimension.
    pub src_ranges: usize,
    pub dst_ranges: usize,
    pub port_ranges: usize,
    /// Distinct rule sets after interning.
    pub sets: usize,
    /// Non-zero 64-bit words stored over all sets.
    pub set_words: usize,
    /// Approximate heap bytes of the compiled form (not counting the spec).
    pub bytes: usize,
}

/// Disjoint ranges covering a key space: range `i` is
/// `starts[i] ..= starts[i + 1] - 1` and matches the rule set `sets[i]`.
#[derive(Debug, Default)]
struct RangeMap {
    starts: Vec<u32>,
    sets: Vec<u32>,
}

impl RangeMap {
    #[inline]
    fn lookup(&self, key: u32) -> u32 {
        // starts[0] == 0, so the partition point is at least 1.
        let i = self.starts.partition_point(|&s| s <= key);
        self.sets[i - 1]
    }

    fn bytes(&self) -> usize {
        (self.starts.capacity() + self.sets.capacity()) * 4
    }
}

/// Interned sparse bitsets. Set 0 is the empty set.
#[derive(Debug)]
struct SetArena {
    /// Set `i` is `idx[off[i]..off[i + 1]]` / `words[..]`.
    off: Vec<u32>,
    idx: Vec<u32>,
    words: Vec<u64>,
}

impl SetArena {
    #[inline]
    fn get(&self, id: u32) -> (&[u32], &[u64]) {
        let a = self.off[id as usize] as usize;
        let b = self.off[id as usize + 1] as usize;
        (&self.idx[a..b], &self.words[a..b])
    }

    fn bytes(&self) -> usize {
        self.off.capacity() * 4 + self.idx.capacity() * 4 + self.words.capacity() * 8
    }
}

/// Moves `i` forward to the first entry of `v` that is `>= target`.
#[inline]
fn seek(v: &[u32], i: usize, target: u32) -> usize {
    if v[i] >= target {
        return i;
    }
    // Usually the next entry or close: gallop, then binary search.
    let mut step = 1;
    let mut lo = i;
    while lo + step < v.len() && v[lo + step] < target {
        lo += step;
        step *= 2;
    }
    let hi = (lo + step + 1).min(v.len());
    lo + v[lo..hi].partition_point(|&x| x < target)
}

impl SetArena {
    /// The lowest rule present in all three sets.
    #[inline]
    fn first_common(&self, a: u32, b: u32, c: u32) -> Option<u32> {
        let (ia, wa) = self.get(a);
        let (ib, wb) = self.get(b);
        let (ic, wc) = self.get(c);
        let (mut i, mut j, mut k) = (0, 0, 0);
        while i < ia.len() && j < ib.len() && k < ic.len() {
            let m = ia[i].max(ib[j]).max(ic[k]);
            if ia[i] == m && ib[j] == m && ic[k] == m {
                let w = wa[i] & wb[j] & wc[k];
                if w != 0 {
                    return Some(m * 64 + w.trailing_zeros());
                }
                i += 1;
                j += 1;
                k += 1;
            } else {
                i = seek(ia, i, m);
                if i == ia.len() {
                    break;
                }
                j = seek(ib, j, m);
                if j == ib.len() {
                    break;
                }
                k = seek(ic, k, m);
            }
        }
        None
    }

    /// Calls `f` with every rule present in both sets, lowest first, until it
    /// returns `Some`.
    fn each_common<T>(&self, a: u32, b: u32, mut f: impl FnMut(u32) -> Option<T>) -> Option<T> {
        let (ia, wa) = self.get(a);
        let (ib, wb) = self.get(b);
        let (mut i, mut j) = (0, 0);
        while i < ia.len() && j < ib.len() {
            if ia[i] < ib[j] {
                i = seek(ia, i, ib[j]);
            } else if ib[j] < ia[i] {
                j = seek(ib, j, ia[i]);
            } else {
                let mut w = wa[i] & wb[j];
                while w != 0 {
                    let r = ia[i] * 64 + w.trailing_zeros();
                    if let Some(t) = f(r) {
                        return Some(t);
                    }
                    w &= w - 1;
                }
                i += 1;
                j += 1;
            }
        }
        None
    }
}

struct Builder {
    words: usize,
    arena: SetArena,
    intern: HashMap<Vec<(u32, u64)>, u32>,
    scratch: Vec<(u32, u64)>,
}

impl Builder {
    fn new(rules: usize) -> Builder {
        let mut intern = HashMap::new();
        intern.insert(Vec::new(), 0);
        Builder {
            words: rules.div_ceil(64),
            arena: SetArena {
                off: vec![0, 0],
                idx: Vec::new(),
                words: Vec::new(),
            },
            intern,
            scratch: Vec::new(),
        }
    }

    fn intern(&mut self, dense: &[u64]) -> u32 {
        self.scratch.clear();
        self.scratch.extend(
            dense
                .iter()
                .enumerate()
                .filter(|(_, w)| **w != 0)
                .map(|(i, w)| (i as u32, *w)),
        );
        if let Some(&id) = self.intern.get(&self.scratch) {
            return id;
        }
        let id = (self.arena.off.len() - 1) as u32;
        for &(i, w) in &self.scratch {
            self.arena.idx.push(i);
            self.arena.words.push(w);
        }
        self.arena.off.push(self.arena.idx.len() as u32);
        self.intern.insert(self.scratch.clone(), id);
        id
    }

    /// Sweeps the inclusive ranges `(rule, lo, hi)` over `0..=max`.
    fn dimension(&mut self, mut events: Vec<(u64, bool, u32)>, max: u32) -> RangeMap {
        // (position, is_start, rule): ends are at hi + 1.
        events.sort_unstable_by_key(|e| e.0);
        let rules = self.words * 64;
        let mut count = vec![0u32; rules];
        let mut cur = vec![0u64; self.words];
        let mut map = RangeMap::default();
        if events.first().is_none_or(|e| e.0 > 0) {
            map.starts.push(0);
            map.sets.push(0);
        }
        let mut e = 0;
        while e < events.len() {
            let pos = events[e].0;
            while e < events.len() && events[e].0 == pos {
                let (_, start, r) = events[e];
                let r = r as usize;
                if start {
                    count[r] += 1;
                    cur[r / 64] |= 1 << (r % 64);
                } else {
                    count[r] -= 1;
                    if count[r] == 0 {
                        cur[r / 64] &= !(1 << (r % 64));
                    }
                }
                e += 1;
            }
            if pos > u64::from(max) {
                break;
            }
            let id = self.intern(&cur);
            if map.sets.last() != Some(&id) {
                map.starts.push(pos as u32);
                map.sets.push(id);
            }
        }
        map.starts.shrink_to_fit();
        map.sets.shrink_to_fit();
        map
    }
}

fn port_key_range(p: &PortRange) -> Option<(u32, u32)> {
    match p.proto {
        None => Some((0, KEY_MAX)),
        Some(proto @ (PROTO_TCP | PROTO_UDP)) => {
            let base = u32::from(proto) << 16;
            (p.lo <= p.hi).then(|| (base | u32::from(p.lo), base | u32::from(p.hi)))
        }
        Some(proto) => {
            let base = u32::from(proto) << 16;
            Some((base, base | 0xffff))
        }
    }
}

/// Sorts and merges inclusive ranges.
fn merge(mut v: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    v.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if u64::from(lo) <= u64::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

impl Filter {
    pub fn compile(spec: &FilterSpec) -> Filter {
        let n = spec.rules.len();
        assert!(n < u32::MAX as usize / 2, "too many rules");
        let mut b = Builder::new(n);
        let addr_events = |pick: fn(&crate::FilterRule) -> &Vec<ipnet::Ipv4Net>| {
            let mut ev = Vec::new();
            for (i, r) in spec.rules.iter().enumerate() {
                for net in pick(r) {
                    let lo = u32::from(net.network());
                    let hi = u32::from(net.broadcast());
                    ev.push((u64::from(lo), true, i as u32));
                    ev.push((u64::from(hi) + 1, false, i as u32));
                }
            }
            ev
        };
        let src = b.dimension(addr_events(|r| &r.src), u32::MAX);
        let dst = b.dimension(addr_events(|r| &r.dst), u32::MAX);

        let mut port_off = Vec::with_capacity(n + 1);
        let mut port_ranges = Vec::new();
        port_off.push(0);
        let mut ev = Vec::new();
        for (i, r) in spec.rules.iter().enumerate() {
            let ranges = merge(r.ports.iter().filter_map(port_key_range).collect());
            for &(lo, hi) in &ranges {
                ev.push((u64::from(lo), true, i as u32));
                ev.push((u64::from(hi) + 1, false, i as u32));
            }
            port_ranges.extend_from_slice(&ranges);
            port_off.push(port_ranges.len() as u32);
        }
        let port = b.dimension(ev, KEY_MAX);
        port_ranges.shrink_to_fit();

        let mut sets = b.arena;
        sets.off.shrink_to_fit();
        sets.idx.shrink_to_fit();
        sets.words.shrink_to_fit();
        Filter {
            inner: Arc::new(Inner {
                spec: spec.clone(),
                allow: spec.rules.iter().map(|r| r.allow).collect(),
                src,
                dst,
                port,
                sets,
                port_off,
                port_ranges,
            }),
        }
    }

    pub fn allow_all() -> Filter {
        Filter::compile(&FilterSpec::allow_all())
    }

    /// Decides a packet that opens a flow: source, destination, IP protocol
    /// number and destination port (0 for protocols without ports).
    #[inline]
    pub fn decide(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dport: u16) -> Decision {
        let f = &*self.inner;
        let a = f.src.lookup(u32::from(src));
        let b = f.dst.lookup(u32::from(dst));
        let c = f.port.lookup(u32::from(proto) << 16 | u32::from(dport));
        match f.sets.first_common(a, b, c) {
            Some(r) => Decision {
                allow: f.allow[r as usize],
                rule: Some(r),
            },
            None => Decision {
                allow: f.spec.default_allow,
                rule: None,
            },
        }
    }

    /// Whether `a` may open any flow at all to `b`: true if some protocol
    /// and port exist for which [`Filter::decide`] allows. Meant for
    /// decisions per peer (the edge refusing to relay), not per packet: it
    /// walks the rules that match both addresses, in order, until the whole
    /// protocol/port space is decided.
    pub fn may_talk(&self, a: Ipv4Addr, b: Ipv4Addr) -> bool {
        let f = &*self.inner;
        let sa = f.src.lookup(u32::from(a));
        let sb = f.dst.lookup(u32::from(b));
        // Protocol/port keys no earlier rule has decided.
        let mut open: Vec<(u32, u32)> = vec![(0, KEY_MAX)];
        let mut next = Vec::new();
        let decided = f.sets.each_common(sa, sb, |r| {
            let lo = f.port_off[r as usize] as usize;
            let hi = f.port_off[r as usize + 1] as usize;
            let ranges = &f.port_ranges[lo..hi];
            if f.allow[r as usize] && intersects(&open, ranges) {
                return Some(true);
            }
            subtract(&open, ranges, &mut next);
            std::mem::swap(&mut open, &mut next);
            if open.is_empty() {
                return Some(false);
            }
            None
        });
        decided.unwrap_or(f.spec.default_allow && !open.is_empty())
    }

    /// The name of rule `idx` (as given by [`Decision::rule`]).
    pub fn rule_name(&self, idx: u32) -> &str {
        self.inner
            .spec
            .rules
            .get(idx as usize)
            .map(|r| r.name.as_str())
            .unwrap_or("")
    }

    pub fn spec(&self) -> &FilterSpec {
        &self.inner.spec
    }

    pub fn stats(&self) -> FilterStats {
        let f = &*self.inner;
        FilterStats {
            rules: f.spec.rules.len(),
            src_ranges: f.src.starts.len(),
            dst_ranges: f.dst.starts.len(),
            port_ranges: f.port.starts.len(),
            sets: f.sets.off.len() - 1,
            set_words: f.sets.words.len(),
            bytes: f.src.bytes()
                + f.dst.bytes()
                + f.port.bytes()
                + f.sets.bytes()
                + f.allow.capacity()
                + f.port_off.capacity() * 4
                + f.port_ranges.capacity() * 8,
        }
    }
}

/// Whether two sorted lists of disjoint inclusive ranges overlap.
fn intersects(a: &[(u32, u32)], b: &[(u32, u32)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].1 < b[j].0 {
            i += 1;
        } else if b[j].1 < a[i].0 {
            j += 1;
        } else {
            return true;
        }
    }
    false
}

/// `out = a - b` for sorted lists of disjoint inclusive ranges.
fn subtract(a: &[(u32, u32)], b: &[(u32, u32)], out: &mut Vec<(u32, u32)>) {
    out.clear();
    let mut j = 0;
    for &(lo, hi) in a {
        let mut lo = u64::from(lo);
        let hi = u64::from(hi);
        while j < b.len() && u64::from(b[j].1) < lo {
            j += 1;
        }
        let mut k = j;
        while lo <= hi {
            if k >= b.len() || u64::from(b[k].0) > hi {
                out.push((lo as u32, hi as u32));
                break;
            }
            let (blo, bhi) = (u64::from(b[k].0), u64::from(b[k].1));
            if blo > lo {
                out.push((lo as u32, (blo - 1) as u32));
            }
            lo = bhi + 1;
            k += 1;
        }
    }
}
