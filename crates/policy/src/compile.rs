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
#[derive(Clone)]
pub struct Filter {
    inner: Arc<Inner>,
}

/// Sizes only: the compiled form can be megabytes.
impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("default_allow", &self.inner.spec.default_allow)
            .field("stats", &self.stats())
            .finish()
    }
}

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
    /// How many of them are stored densely.
    pub dense_sets: usize,
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

/// Interned bitsets over rule indices. Set 0 is the empty set. A set is
/// stored sparsely (its non-zero words with their index) unless at least
/// two thirds of its words are non-zero; then densely (every word), which
/// costs no more memory and lets lookups index it directly.
#[derive(Debug)]
struct SetArena {
    /// Words per dense set.
    nwords: usize,
    sets: Vec<SetRef>,
    idx: Vec<u32>,
    words: Vec<u64>,
    dense: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
enum SetRef {
    Sparse { off: u32, len: u32 },
    Dense { off: u32 },
}

#[derive(Clone, Copy)]
enum View<'a> {
    Sparse(&'a [u32], &'a [u64]),
    Dense(&'a [u64]),
}

impl SetArena {
    #[inline]
    fn view(&self, id: u32) -> View<'_> {
        match self.sets[id as usize] {
            SetRef::Sparse { off, len } => {
                let r = off as usize..(off + len) as usize;
                View::Sparse(&self.idx[r.clone()], &self.words[r])
            }
            SetRef::Dense { off } => {
                View::Dense(&self.dense[off as usize..off as usize + self.nwords])
            }
        }
    }

    fn bytes(&self) -> usize {
        self.sets.capacity() * std::mem::size_of::<SetRef>()
            + self.idx.capacity() * 4
            + (self.words.capacity() + self.dense.capacity()) * 8
    }

    /// Calls `f(word_index, word)` for every non-zero word of the
    /// intersection of the sets, in ascending order, until it returns true.
    #[inline]
    fn scan<const N: usize>(&self, ids: [u32; N], mut f: impl FnMut(u32, u64) -> bool) {
        let views = ids.map(|id| self.view(id));
        // Drive with the shortest sparse set; probe the others.
        let mut driver = None;
        let mut best = usize::MAX;
        for (i, v) in views.iter().enumerate() {
            if let View::Sparse(ix, _) = v {
                if ix.len() < best {
                    best = ix.len();
                    driver = Some(i);
                }
            }
        }
        let Some(d) = driver else {
            let xs = views.map(|v| match v {
                View::Dense(x) => x,
                View::Sparse(..) => unreachable!("no sparse set"),
            });
            let and = |wi: usize| xs.iter().fold(!0u64, |w, x| w & x[wi]);
            let n = self.nwords;
            let mut wi = 0;
            while wi < n {
                // Skip four words at a time while the intersection is empty.
                if wi + 4 <= n && (and(wi) | and(wi + 1) | and(wi + 2) | and(wi + 3)) == 0 {
                    wi += 4;
                    continue;
                }
                let w = and(wi);
                if w != 0 && f(wi as u32, w) {
                    return;
                }
                wi += 1;
            }
            return;
        };
        let View::Sparse(di, dw) = views[d] else {
            unreachable!("driver is sparse")
        };
        let mut cur = [0usize; N];
        for (&wi, &dword) in di.iter().zip(dw) {
            let mut w = dword;
            for (k, v) in views.iter().enumerate() {
                if k == d || w == 0 {
                    continue;
                }
                match *v {
                    View::Dense(x) => w &= x[wi as usize],
                    View::Sparse(ix, xw) => {
                        let c = seek(ix, cur[k], wi);
                        if c == ix.len() {
                            return;
                        }
                        cur[k] = c;
                        w &= if ix[c] == wi { xw[c] } else { 0 };
                    }
                }
            }
            if w != 0 && f(wi, w) {
                return;
            }
        }
    }

    /// The lowest rule present in all three sets.
    #[inline]
    fn first_common(&self, a: u32, b: u32, c: u32) -> Option<u32> {
        let mut out = None;
        self.scan([a, b, c], |wi, w| {
            out = Some(wi * 64 + w.trailing_zeros());
            true
        });
        out
    }

    /// Calls `f` with every rule present in both sets, lowest first, until it
    /// returns `Some`.
    fn each_common<T>(&self, a: u32, b: u32, mut f: impl FnMut(u32) -> Option<T>) -> Option<T> {
        let mut out = None;
        self.scan([a, b], |wi, mut w| {
            while w != 0 {
                if let Some(t) = f(wi * 64 + w.trailing_zeros()) {
                    out = Some(t);
                    return true;
                }
                w &= w - 1;
            }
            false
        });
        out
    }
}

/// Moves `i` forward to the first entry of `v` that is `>= target`
/// (`v.len()` if none).
#[inline]
fn seek(v: &[u32], i: usize, target: u32) -> usize {
    if i >= v.len() || v[i] >= target {
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

/// How sets are stored: by the size heuristic, or (to test both paths)
/// all one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    Auto,
    #[cfg_attr(not(test), allow(dead_code))]
    AllSparse,
    #[cfg_attr(not(test), allow(dead_code))]
    AllDense,
}

struct Builder {
    storage: Storage,
    arena: SetArena,
    intern: HashMap<Vec<(u32, u64)>, u32>,
    scratch: Vec<(u32, u64)>,
}

impl Builder {
    fn new(rules: usize, storage: Storage) -> Builder {
        let mut intern = HashMap::new();
        intern.insert(Vec::new(), 0);
        Builder {
            storage,
            arena: SetArena {
                nwords: rules.div_ceil(64),
                sets: vec![SetRef::Sparse { off: 0, len: 0 }],
                idx: Vec::new(),
                words: Vec::new(),
                dense: Vec::new(),
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
        let a = &mut self.arena;
        let id = a.sets.len() as u32;
        let as_dense = match self.storage {
            Storage::Auto => !self.scratch.is_empty() && self.scratch.len() * 3 >= a.nwords * 2,
            Storage::AllSparse => false,
            Storage::AllDense => true,
        };
        if as_dense {
            a.sets.push(SetRef::Dense {
                off: a.dense.len() as u32,
            });
            a.dense.extend_from_slice(dense);
        } else {
            a.sets.push(SetRef::Sparse {
                off: a.idx.len() as u32,
                len: self.scratch.len() as u32,
            });
            for &(i, w) in &self.scratch {
                a.idx.push(i);
                a.words.push(w);
            }
        }
        self.intern.insert(self.scratch.clone(), id);
        id
    }

    /// Sweeps the inclusive ranges `(rule, lo, hi)` over `0..=max`.
    fn dimension(&mut self, mut events: Vec<(u64, bool, u32)>, max: u32) -> RangeMap {
        // (position, is_start, rule): ends are at hi + 1.
        events.sort_unstable_by_key(|e| e.0);
        let nwords = self.arena.nwords;
        let mut count = vec![0u32; nwords * 64];
        let mut cur = vec![0u64; nwords];
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
        Filter::compile_with(spec, Storage::Auto)
    }

    pub(crate) fn compile_with(spec: &FilterSpec, storage: Storage) -> Filter {
        let n = spec.rules.len();
        assert!(n < u32::MAX as usize / 2, "too many rules");
        let mut b = Builder::new(n, storage);
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
        sets.sets.shrink_to_fit();
        sets.idx.shrink_to_fit();
        sets.words.shrink_to_fit();
        sets.dense.shrink_to_fit();
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
            sets: f.sets.sets.len(),
            dense_sets: f
                .sets
                .sets
                .iter()
                .filter(|s| matches!(s, SetRef::Dense { .. }))
                .count(),
            set_words: f.sets.words.len() + f.sets.dense.len(),
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
