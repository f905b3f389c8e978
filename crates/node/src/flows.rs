//! Flow-record delivery, node side: a durable on-disk spool of numbered
//! batches (`<state-dir>/flows/`) and the send window that ships them over
//! the control stream until the control plane acknowledges each one.
//!
//! Records are collected in memory and sealed about once a second into a
//! batch file `flows/<seq>.json` (a JSON `Vec<FlowRecord>`), written tmp +
//! fsync + rename. `seq` grows by one per batch, forever: the next one is
//! kept in `flows/seq`, made durable before any batch that uses it, so a
//! restart (even after every batch was acknowledged and deleted) never
//! reuses a number the server has already seen. A batch file is deleted only
//! when the server acknowledges it, so batches spooled while the control
//! plane is down, or before the agent crashed, are sent later. The spool is
//! bounded (bytes and files): past the bound the oldest batches are deleted,
//! with a warning and a counter (`flow_records_dropped` in `trellis status`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use trellis_proto::FlowRecord;

/// Hard bound of the spool on disk, in bytes of batch files.
pub const MAX_SPOOL_BYTES: u64 = 64 * 1024 * 1024;
/// Hard bound of the spool on disk, in batch files.
pub const MAX_SPOOL_BATCHES: usize = 2_000;
/// Most records in one batch: more pending than this are sealed as several.
pub const BATCH_RECORDS: usize = 500;
/// How often collected records are sealed into a batch.
pub const SEAL_EVERY: Duration = Duration::from_secs(1);
/// Most batches sent and not yet acknowledged on one connection.
pub const IN_FLIGHT: usize = 4;

const SEQ_FILE: &str = "seq";
const BATCH_EXT: &str = "json";

/// Bounds of a [`FlowSpool`]; the defaults are the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub max_batches: usize,
    /// Most records per batch file.
    pub batch_records: usize,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_bytes: MAX_SPOOL_BYTES,
            max_batches: MAX_SPOOL_BATCHES,
            batch_records: BATCH_RECORDS,
        }
    }
}

/// Counters readable without touching the spool (for `trellis status`).
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records deleted unsent because the spool was full (since the agent started).
    pub records_dropped: AtomicU64,
    /// Batches deleted unsent: full spool, or a damaged file.
    pub batches_dropped: AtomicU64,
    /// Batch files on disk waiting for an acknowledgement.
    pub batches_pending: AtomicU64,
    /// Records collected and not sealed into a batch yet.
    pub records_unsealed: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct BatchMeta {
    bytes: u64,
    /// Unknown for batches found on disk at start (read when needed).
    records: Option<u64>,
}

/// The on-disk queue of flow-record batches. Every method may do file IO:
/// call it from a blocking context (`spawn_blocking`), not on the runtime.
pub struct FlowSpool {
    dir: PathBuf,
    limits: SpoolLimits,
    next_seq: u64,
    buffer: Vec<FlowRecord>,
    batches: BTreeMap<u64, BatchMeta>,
    bytes: u64,
    stats: Arc<SpoolStats>,
}

impl FlowSpool {
    /// Opens (creating it if needed) the spool in `dir` with the default bounds.
    pub fn open(dir: impl Into<PathBuf>) -> anyhow::Result<FlowSpool> {
        FlowSpool::open_with(dir, SpoolLimits::default())
    }

    /// Opens the spool in `dir`: finds the batches left by an earlier run
    /// (they are sent again), removes half-written temporary files, and
    /// continues the sequence where it stopped.
    pub fn open_with(dir: impl Into<PathBuf>, limits: SpoolLimits) -> anyhow::Result<FlowSpool> {
        let dir = dir.into();
        anyhow::ensure!(
            limits.max_batches > 0 && limits.batch_records > 0,
            "flow spool limits must allow at least one batch of one record"
        );
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating the flow spool {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("securing the flow spool {}", dir.display()))?;
        let mut batches = BTreeMap::new();
        let mut bytes = 0;
        for entry in fs::read_dir(&dir)
            .with_context(|| format!("reading the flow spool {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // A write the agent did not finish: never renamed, never sent.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(seq) = parse_batch_name(&name) else {
                continue;
            };
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            bytes += size;
            batches.insert(
                seq,
                BatchMeta {
                    bytes: size,
                    records: None,
                },
            );
        }
        let after_batches = batches.last_key_value().map(|(s, _)| s + 1).unwrap_or(1);
        let next_seq = match fs::read_to_string(dir.join(SEQ_FILE)) {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(n) => n.max(after_batches),
                Err(_) => damaged_seq(&dir, after_batches),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => after_batches,
            Err(_) => damaged_seq(&dir, after_batches),
        };
        let mut spool = FlowSpool {
            dir,
            limits,
            next_seq,
            buffer: Vec::new(),
            batches,
            bytes,
            stats: Arc::new(SpoolStats::default()),
        };
        spool.enforce_bounds();
        spool.publish();
        Ok(spool)
    }

    /// The counters, shared (they stay current as the spool changes).
    pub fn stats(&self) -> Arc<SpoolStats> {
        self.stats.clone()
    }

    /// Collects records in memory until the next [`seal`](Self::seal).
    pub fn push(&mut self, records: Vec<FlowRecord>) {
        self.buffer.extend(records);
        self.publish();
    }

    /// Records collected and not sealed yet.
    pub fn unsealed(&self) -> usize {
        self.buffer.len()
    }

    /// Whether enough records are waiting to fill a batch.
    pub fn should_seal(&self) -> bool {
        self.buffer.len() >= self.limits.batch_records
    }

    /// Writes the collected records as batch files (at most
    /// `batch_records` each) and returns the new sequence numbers; none
    /// when nothing was collected. On an error the records stay collected
    /// for the next try.
    pub fn seal(&mut self) -> anyhow::Result<Vec<u64>> {
        if self.buffer.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.buffer.len().div_ceil(self.limits.batch_records) as u64;
        let first = self.next_seq;
        // The numbers are reserved durably before any batch uses them.
        write_atomic(
            &self.dir.join(SEQ_FILE),
            format!("{}\n", first + n).as_bytes(),
        )?;
        self.next_seq = first + n;
        let mut sealed = Vec::new();
        let mut seq = first;
        while !self.buffer.is_empty() {
            let take = self.buffer.len().min(self.limits.batch_records);
            let body = serde_json::to_vec(&self.buffer[..take])?;
            write_atomic(&self.batch_path(seq), &body)?;
            self.buffer.drain(..take);
            self.bytes += body.len() as u64;
            self.batches.insert(
                seq,
                BatchMeta {
                    bytes: body.len() as u64,
                    records: Some(take as u64),
                },
            );
            sealed.push(seq);
            seq += 1;
        }
        self.enforce_bounds();
        self.publish();
        sealed.retain(|s| self.batches.contains_key(s));
        Ok(sealed)
    }

    /// Unacknowledged batches, oldest first.
    pub fn pending(&self) -> Vec<u64> {
        self.batches.keys().copied().collect()
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads batch `seq`. `None` when it is gone (acknowledged or dropped) or
    /// damaged: a damaged file is logged and removed so that it never holds
    /// up the batches after it.
    pub fn load(&mut self, seq: u64) -> Option<Vec<FlowRecord>> {
        self.batches.get(&seq)?;
        let path = self.batch_path(seq);
        let parsed = fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice::<Vec<FlowRecord>>(&b)?));
        match parsed {
            Ok(records) => {
                if let Some(m) = self.batches.get_mut(&seq) {
                    m.records = Some(records.len() as u64);
                }
                Some(records)
            }
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    error = %format!("{e:#}"),
                    "removing an unreadable flow-record batch; its records are lost"
                );
                self.remove(seq);
                self.stats.batches_dropped.fetch_add(1, Ordering::Relaxed);
                self.publish();
                None
            }
        }
    }

    /// The control plane stored batch `seq`: delete it. Unknown numbers are ignored.
    pub fn ack(&mut self, seq: u64) {
        if self.batches.contains_key(&seq) {
            self.remove(seq);
            self.publish();
        }
    }

    /// Records dropped unsent because the spool was full.
    pub fn records_dropped(&self) -> u64 {
        self.stats.records_dropped.load(Ordering::Relaxed)
    }

    fn batch_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{BATCH_EXT}"))
    }

    fn remove(&mut self, seq: u64) -> Option<BatchMeta> {
        let meta = self.batches.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(meta.bytes);
        let path = self.batch_path(seq);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a flow-record batch");
            }
        }
        Some(meta)
    }

    /// Deletes the oldest batches while the spool is over its bounds.
    fn enforce_bounds(&mut self) {
        let mut batches = 0u64;
        let mut records = 0u64;
        while self.batches.len() > self.limits.max_batches || self.bytes > self.limits.max_bytes {
            let Some((&seq, meta)) = self.batches.first_key_value() else {
                break;
            };
            let n = match meta.records {
                Some(n) => n,
                None => fs::read(self.batch_path(seq))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Vec<FlowRecord>>(&b).ok())
                    .map_or(0, |r| r.len() as u64),
            };
            self.remove(seq);
            batches += 1;
            records += n;
        }
        if batches > 0 {
            self.stats
                .records_dropped
                .fetch_add(records, Ordering::Relaxed);
            self.stats
                .batches_dropped
                .fetch_add(batches, Ordering::Relaxed);
            tracing::warn!(
                records,
                batches,
                max_bytes = self.limits.max_bytes,
                max_batches = self.limits.max_batches,
                "flow-record spool full (control plane unreachable for long?): dropped the oldest records"
            );
        }
    }

    fn publish(&self) {
        self.stats
            .batches_pending
            .store(self.batches.len() as u64, Ordering::Relaxed);
        self.stats
            .records_unsealed
            .store(self.buffer.len() as u64, Ordering::Relaxed);
    }
}

fn parse_batch_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(BATCH_EXT)?.strip_suffix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The sequence file is unreadable: numbers the server has seen may be
/// lost, so jump far past them (to the current Unix milliseconds, which
/// a sequence growing by one per second never reaches) rather than reuse one.
fn damaged_seq(dir: &Path, after_batches: u64) -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let next = after_batches.max(now_ms);
    tracing::warn!(
        file = %dir.join(SEQ_FILE).display(),
        next,
        "the flow-record sequence file is damaged; continuing from a number past any used before"
    );
    next
}

/// Writes `bytes` to `path` (mode 0600) via a temporary file, fsynced, then
/// renamed, so that a crash leaves the old file or the new one.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Which batches to send next on the control stream: at most `window`
/// unacknowledged at a time, oldest first; after a reconnect everything
/// unacknowledged is sent again. Pure bookkeeping, no IO.
#[derive(Debug)]
pub struct Outbox {
    window: usize,
    /// Pending batches not sent on this connection yet.
    queued: BTreeSet<u64>,
    /// Sent on this connection, not acknowledged yet.
    in_flight: BTreeSet<u64>,
}

impl Outbox {
    pub fn new(window: usize) -> Outbox {
        Outbox {
            window: window.max(1),
            queued: BTreeSet::new(),
            in_flight: BTreeSet::new(),
        }
    }

    /// A new connection: nothing is in flight on it, so every pending
    /// batch is sent again (the server dedupes by seq).
    pub fn reconnect(&mut self) {
        self.queued.append(&mut self.in_flight);
    }

    /// Brings the queue up to date with the spool's pending batches: new
    /// ones are queued; batches gone from the spool (dropped) are forgotten,
    /// freeing their place in the window.
    pub fn sync(&mut self, pending: &[u64]) {
        let pending: BTreeSet<u64> = pending.iter().copied().collect();
        self.in_flight.retain(|s| pending.contains(s));
        self.queued = pending.difference(&self.in_flight).copied().collect();
    }

    /// The next batch to send, if the window has room; it counts as in flight.
    pub fn next_to_send(&mut self) -> Option<u64> {
        if self.in_flight.len() >= self.window {
            return None;
        }
        let seq = self.queued.pop_first()?;
        self.in_flight.insert(seq);
        Some(seq)
    }

    /// The server acknowledged `seq`. False (and nothing changes) when it
    /// is not in flight on this connection.
    pub fn ack(&mut self, seq: u64) -> bool {
        self.in_flight.remove(&seq)
    }

    /// Batch `seq` could not be sent (gone or damaged): stop tracking it.
    pub fn forget(&mut self, seq: u64) {
        self.queued.remove(&seq);
        self.in_flight.remove(&seq);
    }

    pub fn in_flight(&self) -> Vec<u64> {
        self.in_flight.iter().copied().collect()
    }
}

/// The agent's handle on its spool: every operation runs off the async
/// runtime, and `sealed` wakes the control stream when a batch appears.
pub struct Flows {
    spool: Arc<Mutex<FlowSpool>>,
    stats: Arc<SpoolStats>,
    sealed: tokio::sync::Notify,
}

impl Flows {
    pub async fn open(dir: PathBuf, limits: SpoolLimits) -> anyhow::Result<Flows> {
        let spool = blocking(move || FlowSpool::open_with(dir, limits)).await??;
        Ok(Flows {
            stats: spool.stats(),
            spool: Arc::new(Mutex::new(spool)),
            sealed: tokio::sync::Notify::new(),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut FlowSpool) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let spool = self.spool.clone();
        blocking(move || f(&mut spool.lock().unwrap_or_else(|e| e.into_inner()))).await
    }

    /// Adds records and seals everything collected into batches, waking the
    /// control stream when a batch was written.
    pub async fn add_and_seal(&self, records: Vec<FlowRecord>) {
        let sealed = self
            .with(move |s| {
                s.push(records);
                s.seal()
            })
            .await
            .and_then(|r| r);
        match sealed {
            Ok(seqs) if !seqs.is_empty() => self.sealed.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "cannot write flow records to the spool; keeping them in memory and trying again"
            ),
        }
    }

    /// Wakes when a new batch was sealed (a missed wake-up is kept).
    pub fn sealed(&self) -> &tokio::sync::Notify {
        &self.sealed
    }

    /// The batches to send now, given the window: reads them from the
    /// spool (dropping damaged ones) and marks them in flight.
    pub async fn next_batches(
        &self,
        outbox: &mut Outbox,
    ) -> anyhow::Result<Vec<(u64, Vec<FlowRecord>)>> {
        let pending = self.with(|s| s.pending()).await?;
        outbox.sync(&pending);
        let mut out = Vec::new();
        while let Some(seq) = outbox.next_to_send() {
            match self.with(move |s| s.load(seq)).await? {
                Some(records) => out.push((seq, records)),
                None => outbox.forget(seq),
            }
        }
        Ok(out)
    }

    /// The server stored `seq`: deletes it if it was in flight on this
    /// connection (an unknown number is ignored). True when it was.
    pub async fn ack(&self, outbox: &mut Outbox, seq: u64) -> anyhow::Result<bool> {
        if !outbox.ack(seq) {
            tracing::debug!(
                seq,
                "ignoring an acknowledgement of a flow batch not in flight"
            );
            return Ok(false);
        }
        self.with(move |s| s.ack(seq)).await?;
        Ok(true)
    }

    /// Records dropped unsent because the spool was full.
    pub fn records_dropped(&self) -> u64 {
        self.stats.records_dropped.load(Ordering::Relaxed)
    }

    /// Batches on disk waiting for an acknowledgement.
    pub fn batches_pending(&self) -> u64 {
        self.stats.batches_pending.load(Ordering::Relaxed)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("flow spool task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u16) -> FlowRecord {
        FlowRecord {
            start_ms: 1_700_000_000_000 + i as i64,
            end_ms: 1_700_000_000_500 + i as i64,
            proto: "tcp".into(),
            src_ip: "100.64.0.1".parse().unwrap(),
            src_port: 40000 + i,
            dst_ip: "100.64.0.2".parse().unwrap(),
            dst_port: 22,
            direction: "out".into(),
            packets_out: 3,
            bytes_out: 180,
            packets_in: 2,
            bytes_in: 120,
            path: "direct".into(),
            via: String::new(),
            decision: "allow".into(),
            rule: "ssh".into(),
            count: 1,
            end_reason: "closed".into(),
        }
    }

    fn recs(from: u16, n: u16) -> Vec<FlowRecord> {
        (from..from + n).map(rec).collect()
    }

    fn batch_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn batches_survive_a_reopen_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("flows");
        let mut s = FlowSpool::open(&dir).unwrap();
        assert_eq!(
            s.seal().unwrap(),
            Vec::<u64>::new(),
            "nothing collected, no batch"
        );
        assert!(batch_files(&dir).is_empty());
        s.push(recs(0, 3));
        s.push(recs(3, 2));
        assert_eq!(s.seal().unwrap(), vec![1]);
        s.push(recs(10, 1));
        assert_eq!(s.seal().unwrap(), vec![2]);
        assert_eq!(s.unsealed(), 0);
        drop(s);

        let mut s = FlowSpool::open(&dir).unwrap();
        assert_eq!(s.pending(), vec![1, 2]);
        assert_eq!(s.load(1).unwrap(), recs(0, 5));
        assert_eq!(s.load(2).unwrap(), recs(10, 1));
        assert_eq!(s.stats().batches_pending.load(Ordering::Relaxed), 2);
        s.push(recs(20, 1));
        assert_eq!(s.seal().unwrap(), vec![3], "numbering continues");
    }

    #[test]
    fn many_records_are_sealed_as_bounded_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = FlowSpool::open_with(
            tmp.path(),
            SpoolLimits {
                batch_records: 4,
                ..SpoolLimits::default()
            },
        )
        .unwrap();
        s.push(recs(0, 3));
        assert!(!s.should_seal());
        s.push(recs(3, 7));
        assert!(s.should_seal());
        assert_eq!(s.seal().unwrap(), vec![1, 2, 3]);
        assert_eq!(s.load(1).unwrap(), recs(0, 4));
        assert_eq!(s.load(2).unwrap(), recs(4, 4));
        assert_eq!(s.load(3).unwrap(), recs(8, 2));
    }

    #[test]
    fn seq_keeps_growing_after_everything_was_acked_and_reopened() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = FlowSpool::open(tmp.path()).unwrap();
        for i in 0..3 {
            s.push(recs(i, 1));
            s.seal().unwrap();
        }
        for seq in s.pending() {
            s.ack(seq);
        }
        assert!(s.pending().is_empty());
        assert!(
            batch_files(tmp.path()).is_empty(),
            "acked batches are deleted"
        );
        drop(s);
        let mut s = FlowSpool::open(tmp.path()).unwrap();
        assert!(s.pending().is_empty());
        s.push(recs(7, 1));
        assert_eq!(
            s.seal().unwrap(),
            vec![4],
            "a number the server saw is never reused"
        );
        drop(s);
        // A damaged sequence file never sends the numbering backwards.
        fs::write(tmp.path().join("seq"), "garbage").unwrap();
        let mut s = FlowSpool::open(tmp.path()).unwrap();
        s.push(recs(8, 1));
        let seq = s.seal().unwrap()[0];
        assert!(seq > 4, "{seq}");
    }

    #[test]
    fn ack_deletes_only_that_batch_and_unknown_acks_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = FlowSpool::open(tmp.path()).unwrap();
        for i in 0..3 {
            s.push(recs(i, 1));
            s.seal().unwrap();
        }
        s.ack(2);
        s.ack(99);
        assert_eq!(s.pending(), vec![1, 3]);
        assert_eq!(
            batch_files(tmp.path()),
            vec![format!("{:020}.json", 1), format!("{:020}.json", 3)]
        );
        assert_eq!(s.load(2), None);
        drop(s);
        assert_eq!(FlowSpool::open(tmp.path()).unwrap().pending(), vec![1, 3]);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_them() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            max_batches: 3,
            ..SpoolLimits::default()
        };
        let mut s = FlowSpool::open_with(tmp.path(), limits).unwrap();
        for (i, n) in [2u16, 5, 1, 1, 1].into_iter().enumerate() {
            s.push(recs(i as u16 * 10, n));
            s.seal().unwrap();
        }
        assert_eq!(s.pending(), vec![3, 4, 5], "the newest are kept");
        assert_eq!(s.records_dropped(), 7, "2 + 5 records of the two oldest");
        assert_eq!(batch_files(tmp.path()).len(), 3);
        let stats = s.stats();
        assert_eq!(stats.batches_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(stats.batches_pending.load(Ordering::Relaxed), 3);
        drop(s);

        // Bytes bound: batches found on disk at start (record count unknown
        // until read) are dropped and counted too.
        let size = fs::metadata(tmp.path().join(format!("{:020}.json", 3)))
            .unwrap()
            .len();
        let limits = SpoolLimits {
            max_bytes: size * 2,
            ..SpoolLimits::default()
        };
        let s = FlowSpool::open_with(tmp.path(), limits).unwrap();
        assert_eq!(s.pending(), vec![4, 5]);
        assert_eq!(s.records_dropped(), 1);
        let bytes: u64 = batch_files(tmp.path())
            .iter()
            .map(|n| fs::metadata(tmp.path().join(n)).unwrap().len())
            .sum();
        assert!(bytes <= size * 2);
    }

    #[test]
    fn a_damaged_batch_is_removed_and_does_not_block_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = FlowSpool::open(tmp.path()).unwrap();
        for i in 0..3 {
            s.push(recs(i, 1));
            s.seal().unwrap();
        }
        drop(s);
        let bad = tmp.path().join(format!("{:020}.json", 1));
        fs::write(&bad, b"[{\"start_ms\":").unwrap();
        // Leftovers of an interrupted write and strangers are not batches.
        fs::write(tmp.path().join(format!("{:020}.json.tmp", 9)), b"[").unwrap();
        fs::write(tmp.path().join("notes.json"), b"hi").unwrap();
        let mut s = FlowSpool::open(tmp.path()).unwrap();
        assert_eq!(s.pending(), vec![1, 2, 3]);
        assert!(!tmp.path().join(format!("{:020}.json.tmp", 9)).exists());
        assert_eq!(s.load(1), None);
        assert!(!bad.exists(), "the damaged file is removed");
        assert_eq!(s.pending(), vec![2, 3]);
        assert_eq!(s.load(2).unwrap(), recs(1, 1));
        assert_eq!(s.stats().batches_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn outbox_keeps_at_most_four_in_flight_in_order() {
        let mut o = Outbox::new(IN_FLIGHT);
        o.sync(&[1, 2, 3, 4, 5, 6]);
        let sent: Vec<u64> = std::iter::from_fn(|| o.next_to_send()).collect();
        assert_eq!(sent, vec![1, 2, 3, 4]);
        assert!(o.ack(2));
        assert_eq!(o.next_to_send(), Some(5));
        assert_eq!(o.next_to_send(), None, "window full again");
        // A new batch sealed meanwhile waits its turn behind 6.
        o.sync(&[1, 3, 4, 5, 6, 7]);
        assert_eq!(o.next_to_send(), None);
        assert!(o.ack(1));
        assert!(o.ack(3));
        assert_eq!(o.next_to_send(), Some(6));
        assert_eq!(o.next_to_send(), Some(7));
        assert_eq!(o.next_to_send(), None);
        assert_eq!(o.in_flight(), vec![4, 5, 6, 7]);
    }

    #[test]
    fn outbox_ignores_acks_of_batches_not_in_flight() {
        let mut o = Outbox::new(2);
        o.sync(&[1, 2, 3]);
        assert_eq!(o.next_to_send(), Some(1));
        assert_eq!(o.next_to_send(), Some(2));
        assert!(!o.ack(3), "queued but not sent");
        assert!(!o.ack(42), "never heard of");
        assert_eq!(o.next_to_send(), None, "unknown acks free no room");
        assert_eq!(o.in_flight(), vec![1, 2]);
    }

    #[test]
    fn outbox_sends_everything_unacked_again_after_a_reconnect() {
        let mut o = Outbox::new(IN_FLIGHT);
        o.sync(&[1, 2, 3, 4, 5]);
        while o.next_to_send().is_some() {}
        assert!(o.ack(1));
        o.reconnect();
        o.sync(&[2, 3, 4, 5]);
        let sent: Vec<u64> = std::iter::from_fn(|| o.next_to_send()).collect();
        assert_eq!(sent, vec![2, 3, 4, 5], "oldest first, from the start");
        // Batches dropped from the spool free their place in the window.
        o.sync(&[4, 5, 6]);
        assert_eq!(o.next_to_send(), Some(6));
    }

    #[tokio::test]
    async fn shipping_sends_spooled_batches_and_deletes_them_on_ack() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("flows");
        {
            // Spooled by an earlier run while the control plane was down.
            let mut s = FlowSpool::open(&dir).unwrap();
            for i in 0..5 {
                s.push(recs(i, 1));
                s.seal().unwrap();
            }
        }
        let flows = Flows::open(dir.clone(), SpoolLimits::default())
            .await
            .unwrap();
        assert_eq!(flows.batches_pending(), 5);
        let mut o = Outbox::new(IN_FLIGHT);
        let first = flows.next_batches(&mut o).await.unwrap();
        let seqs: Vec<u64> = first.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert_eq!(first[2].1, recs(2, 1));
        assert!(flows.next_batches(&mut o).await.unwrap().is_empty());

        assert!(!flows.ack(&mut o, 77).await.unwrap());
        assert!(flows.ack(&mut o, 1).await.unwrap());
        assert_eq!(flows.batches_pending(), 4);
        let next = flows.next_batches(&mut o).await.unwrap();
        assert_eq!(next.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5]);

        // A newly sealed batch wakes the sender and goes out once there is room.
        flows.add_and_seal(recs(100, 2)).await;
        tokio::time::timeout(Duration::from_secs(1), flows.sealed().notified())
            .await
            .expect("sealing wakes the control stream");
        assert!(flows.next_batches(&mut o).await.unwrap().is_empty());
        assert!(flows.ack(&mut o, 2).await.unwrap());
        let next = flows.next_batches(&mut o).await.unwrap();
        assert_eq!(next, vec![(6, recs(100, 2))]);

        // The connection drops: everything unacknowledged goes again.
        o.reconnect();
        let again = flows.next_batches(&mut o).await.unwrap();
        assert_eq!(
            again.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        for seq in [3, 4, 5, 6] {
            assert!(flows.ack(&mut o, seq).await.unwrap());
        }
        assert_eq!(flows.batches_pending(), 0);
        assert!(batch_files(&dir).is_empty());
    }
}
