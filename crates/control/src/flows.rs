//! Flow logs: batches of flow records that nodes send over their control
//! streams, stored exactly once, kept for the configured retention, and served
//! under `/api/v1/logs/flows` (pages, a JSON-lines export, and a live
//! Server-Sent-Events stream).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sqlx::{FromRow, QueryBuilder, Sqlite};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use trellis_proto::{
    validate_name, ApiError, FlowLogPage, FlowLogRecord, FlowRecord, TrafficSummary,
};

use crate::api::{Admin, ApiErr, AppState};
use crate::store::{Node, Store, StoreError, StoreResult};

/// Most records one batch may hold; a bigger batch is refused whole.
pub const MAX_BATCH: usize = 5_000;
/// How long flow records are kept unless configured.
pub const DEFAULT_FLOW_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// How often records older than the retention are deleted (also once at start).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// Default and largest page of `GET /logs/flows`.
pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;
/// Records per database round trip of the JSON-lines export.
const EXPORT_PAGE: i64 = 500;
/// Batches the live channel holds for a slow subscriber before it lags.
const LIVE_CAPACITY: usize = 1024;

const MAX_PROTO: usize = 16;
const MAX_PATH: usize = 16;
const MAX_RULE: usize = 128;
const MAX_END_REASON: usize = 16;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Parses a duration such as `30d`, `12h`, `10m` or `90s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "invalid duration {s:?}: use a number followed by s, m, h or d, e.g. 30d, 12h or 10m"
        )
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = n
        .checked_mul(mult)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .ok_or_else(|| format!("duration {s:?} is too long (at most 100 years)"))?;
    Ok(Duration::from_secs(secs))
}

/// A point in time given as `10m`/`2h`/`7d` ago or as unix seconds; unix ms.
pub(crate) fn parse_time(name: &str, s: &str, now_ms: i64) -> Result<i64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = t
            .parse()
            .map_err(|_| format!("{name}={s:?} is out of range"))?;
        return secs
            .checked_mul(1000)
            .ok_or_else(|| format!("{name}={s:?} is out of range"));
    }
    let ago = parse_duration(t).map_err(|_| {
        format!("invalid {name}={s:?}: give a time ago such as 10m, 2h or 7d, or unix seconds")
    })?;
    Ok(now_ms.saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)))
}

/// Keeps the first `max` characters of `s`, without control characters.
pub(crate) fn clean(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

pub(crate) fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Checks a batch; returns its records with strings cleaned and truncated, or
/// why the whole batch is refused.
pub fn validate_batch(records: &[FlowRecord]) -> Result<Vec<FlowRecord>, String> {
    if records.len() > MAX_BATCH {
        return Err(format!(
            "batch of {} records is larger than the limit of {MAX_BATCH}",
            records.len()
        ));
    }
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let bad = |m: String| format!("record {i}: {m}");
            if r.start_ms < 0 || r.end_ms < r.start_ms {
                return Err(bad(format!(
                    "bad times: start_ms {} end_ms {} (need 0 <= start <= end)",
                    r.start_ms, r.end_ms
                )));
            }
            if r.decision != "allow" && r.decision != "deny" {
                return Err(bad(format!(
                    "decision {:?} is neither allow nor deny",
                    clean(&r.decision, 32)
                )));
            }
            if r.direction != "in" && r.direction != "out" {
                return Err(bad(format!(
                    "direction {:?} is neither in nor out",
                    clean(&r.direction, 32)
                )));
            }
            let proto = clean(&r.proto, MAX_PROTO).to_ascii_lowercase();
            if proto.is_empty() {
                return Err(bad("empty proto".into()));
            }
            Ok(FlowRecord {
                proto,
                path: clean(&r.path, MAX_PATH),
                via: clean(&r.via, MAX_RULE),
                rule: clean(&r.rule, MAX_RULE),
                end_reason: clean(&r.end_reason, MAX_END_REASON),
                count: r.count.max(1),
                ..r.clone()
            })
        })
        .collect()
}

/// Records stored together, for live subscribers.
#[derive(Debug)]
pub struct FlowBatch {
    pub account_id: i64,
    pub records: Vec<FlowLogRecord>,
}

/// The live feed of newly stored records, per process.
pub struct FlowBus {
    tx: broadcast::Sender<Arc<FlowBatch>>,
}

impl Default for FlowBus {
    fn default() -> Self {
        FlowBus::new()
    }
}

impl FlowBus {
    pub fn new() -> FlowBus {
        FlowBus {
            tx: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowBatch>> {
        self.tx.subscribe()
    }

    /// Never blocks: a subscriber that falls behind loses the oldest batches.
    pub fn publish(&self, batch: FlowBatch) {
        if !batch.records.is_empty() {
            let _ = self.tx.send(Arc::new(batch));
        }
    }
}

/// What became of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored now, with this many records.
    Stored(usize),
    /// Its seq was stored before (a resend after a lost ack): nothing stored.
    Duplicate,
}

/// Why a batch was not stored (and so is not acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A record ready to insert: what the node sent plus the names of both ends.
struct NewFlow<'a> {
    rec: &'a FlowRecord,
    src_node: String,
    dst_node: String,
}

/// Validates and stores batch `seq` of `node` exactly once, then publishes the
/// new records to live subscribers. Acknowledge the batch only on `Ok`.
pub async fn ingest(
    state: &AppState,
    node: &Node,
    seq: u64,
    records: &[FlowRecord],
) -> Result<Ingested, IngestError> {
    let seq = i64::try_from(seq)
        .map_err(|_| IngestError::Refused(format!("seq {seq} is out of range")))?;
    let records = validate_batch(records).map_err(IngestError::Refused)?;
    let nodes = state.store.list_nodes(node.account_id).await?;
    let names: HashMap<Ipv4Addr, &str> = nodes.iter().map(|n| (n.ip, n.name.as_str())).collect();
    let node_name = nodes
        .iter()
        .find(|n| n.id == node.id)
        .map_or(node.name.as_str(), |n| n.name.as_str())
        .to_string();
    let name_of = |ip: &Ipv4Addr| names.get(ip).map(|s| s.to_string()).unwrap_or_default();
    let rows: Vec<NewFlow> = records
        .iter()
        .map(|rec| NewFlow {
            rec,
            src_node: name_of(&rec.src_ip),
            dst_node: name_of(&rec.dst_ip),
        })
        .collect();
    let Some(ids) = state
        .store
        .store_flow_batch(node.account_id, node.id, &node_name, seq, &rows, now_ms())
        .await?
    else {
        return Ok(Ingested::Duplicate);
    };
    let stored: Vec<FlowLogRecord> = rows
        .into_iter()
        .zip(ids)
        .map(|(f, id)| FlowLogRecord {
            id,
            node: node_name.clone(),
            start_ms: f.rec.start_ms,
            end_ms: f.rec.end_ms,
            proto: f.rec.proto.clone(),
            src_ip: f.rec.src_ip,
            src_port: f.rec.src_port,
            src_node: f.src_node,
            dst_ip: f.rec.dst_ip,
            dst_port: f.rec.dst_port,
            dst_node: f.dst_node,
            direction: f.rec.direction.clone(),
            // What is read back from the database, saturated the same way.
            packets_out: sat(f.rec.packets_out) as u64,
            bytes_out: sat(f.rec.bytes_out) as u64,
            packets_in: sat(f.rec.packets_in) as u64,
            bytes_in: sat(f.rec.bytes_in) as u64,
            path: f.rec.path.clone(),
            via: f.rec.via.clone(),
            decision: f.rec.decision.clone(),
            rule: f.rec.rule.clone(),
            count: sat(f.rec.count) as u64,
            end_reason: f.rec.end_reason.clone(),
        })
        .collect();
    let n = stored.len();
    state.flows.publish(FlowBatch {
        account_id: node.account_id,
        records: stored,
    });
    Ok(Ingested::Stored(n))
}

/// Which records a query wants (all given conditions hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// end_ms at or after.
    pub since_ms: Option<i64>,
    /// end_ms at or before.
    pub until_ms: Option<i64>,
    /// The reporting node, or the node at either end.
    pub node: Option<String>,
    pub decision: Option<String>,
    pub proto: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, r: &FlowLogRecord) -> bool {
        self.since_ms.is_none_or(|t| r.end_ms >= t)
            && self.until_ms.is_none_or(|t| r.end_ms <= t)
            && self
                .node
                .as_deref()
                .is_none_or(|n| r.node == n || r.src_node == n || r.dst_node == n)
            && self.decision.as_deref().is_none_or(|d| r.decision == d)
            && self.proto.as_deref().is_none_or(|p| r.proto == p)
    }
}

/// Where a page starts.
#[derive(Debug, Clone, Copy)]
pub enum Cursor {
    /// Newest first, ids below the given one (all when None).
    Before(Option<i64>),
    /// Oldest first, ids above `after` up to and including `upto`.
    After { after: i64, upto: i64 },
}

#[derive(FromRow)]
struct FlowRow {
    id: i64,
    node_name: String,
    start_ms: i64,
    end_ms: i64,
    proto: String,
    src_ip: String,
    src_port: i64,
    src_node: String,
    dst_ip: String,
    dst_port: i64,
    dst_node: String,
    direction: String,
    packets_out: i64,
    bytes_out: i64,
    packets_in: i64,
    bytes_in: i64,
    path: String,
    via: String,
    decision: String,
    rule: String,
    count: i64,
    end_reason: String,
}

impl TryFrom<FlowRow> for FlowLogRecord {
    type Error = StoreError;
    fn try_from(r: FlowRow) -> StoreResult<FlowLogRecord> {
        let bad = |what: &str| StoreError::Corrupt(format!("flow {} has a bad {what}", r.id));
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(FlowLogRecord {
            src_ip: r.src_ip.parse().map_err(|_| bad("src_ip"))?,
            dst_ip: r.dst_ip.parse().map_err(|_| bad("dst_ip"))?,
            src_port: u16::try_from(r.src_port).map_err(|_| bad("src_port"))?,
            dst_port: u16::try_from(r.dst_port).map_err(|_| bad("dst_port"))?,
            id: r.id,
            node: r.node_name,
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            proto: r.proto,
            src_node: r.src_node,
            dst_node: r.dst_node,
            direction: r.direction,
            packets_out: u(r.packets_out),
            bytes_out: u(r.bytes_out),
            packets_in: u(r.packets_in),
            bytes_in: u(r.bytes_in),
            path: r.path,
            via: r.via,
            decision: r.decision,
            rule: r.rule,
            count: u(r.count),
            end_reason: r.end_reason,
        })
    }
}

impl Store {
    /// Stores batch `seq` of a node in one transaction: nothing if `seq` is at
    /// or below the node's last stored batch (returns None), else every record
    /// and the new last seq (returns the new rows' ids, in order).
    async fn store_flow_batch(
        &self,
        account_id: i64,
        node_id: i64,
        node_name: &str,
        seq: i64,
        rows: &[NewFlow<'_>],
        received_ms: i64,
    ) -> StoreResult<Option<Vec<i64>>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let advanced = sqlx::query(
            "INSERT INTO node_flow_seq (node_id, last_seq) VALUES (?, ?) \
             ON CONFLICT (node_id) DO UPDATE SET last_seq = excluded.last_seq \
             WHERE node_flow_seq.last_seq < excluded.last_seq",
        )
        .bind(node_id)
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if advanced == 0 {
            return Ok(None);
        }
        let mut ids = Vec::with_capacity(rows.len());
        for f in rows {
            let r = f.rec;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO flows (account_id, node_id, node_name, start_ms, end_ms, proto, \
                 src_ip, src_port, src_node, dst_ip, dst_port, dst_node, direction, \
                 packets_out, bytes_out, packets_in, bytes_in, path, decision, rule, count, \
                 end_reason, received_ms, via) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 RETURNING id",
            )
            .bind(account_id)
            .bind(node_id)
            .bind(node_name)
            .bind(r.start_ms)
            .bind(r.end_ms)
            .bind(&r.proto)
            .bind(r.src_ip.to_string())
            .bind(i64::from(r.src_port))
            .bind(&f.src_node)
            .bind(r.dst_ip.to_string())
            .bind(i64::from(r.dst_port))
            .bind(&f.dst_node)
            .bind(&r.direction)
            .bind(sat(r.packets_out))
            .bind(sat(r.bytes_out))
            .bind(sat(r.packets_in))
            .bind(sat(r.bytes_in))
            .bind(&r.path)
            .bind(&r.decision)
            .bind(&r.rule)
            .bind(sat(r.count))
            .bind(&r.end_reason)
            .bind(received_ms)
            .bind(&r.via)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(Some(ids))
    }

    /// What the account's network carried since `since_ms`.
    pub async fn traffic_summary(
        &self,
        account_id: i64,
        since_ms: i64,
    ) -> StoreResult<TrafficSummary> {
        let (connections, bytes, denied): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT \
               COALESCE(SUM(CASE WHEN decision = 'allow' AND direction = 'out' THEN 1 ELSE 0 END), 0), \
               SUM(CASE WHEN decision = 'allow' AND direction = 'out' THEN bytes_out + bytes_in ELSE 0 END), \
               SUM(CASE WHEN decision = 'deny' THEN count ELSE 0 END) \
             FROM flows WHERE account_id = ? AND end_ms >= ?",
        )
        .bind(account_id)
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(TrafficSummary {
            since_ms,
            connections: u(connections),
            bytes: u(bytes.unwrap_or(0)),
            denied: u(denied.unwrap_or(0)),
        })
    }

    /// The last flow batch stored for a node, if any.
    pub async fn last_flow_seq(&self, node_id: i64) -> StoreResult<Option<u64>> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM node_flow_seq WHERE node_id = ?")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.map(|s| u64::try_from(s).unwrap_or(0)))
    }

    /// Up to `limit` records of an account matching `filter`, from `cursor`.
    pub async fn query_flows(
        &self,
        account_id: i64,
        filter: &FlowFilter,
        cursor: Cursor,
        limit: i64,
    ) -> StoreResult<Vec<FlowLogRecord>> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, node_name, start_ms, end_ms, proto, src_ip, src_port, src_node, dst_ip, \
             dst_port, dst_node, direction, packets_out, bytes_out, packets_in, bytes_in, path, \
             decision, rule, count, end_reason, via FROM flows WHERE account_id = ",
        );
        q.push_bind(account_id);
        if let Some(t) = filter.since_ms {
            q.push(" AND end_ms >= ").push_bind(t);
        }
        if let Some(t) = filter.until_ms {
            q.push(" AND end_ms <= ").push_bind(t);
        }
        if let Some(n) = &filter.node {
            q.push(" AND (node_name = ")
                .push_bind(n.clone())
                .push(" OR src_node = ")
                .push_bind(n.clone())
                .push(" OR dst_node = ")
                .push_bind(n.clone())
                .push(")");
        }
        if let Some(d) = &filter.decision {
            q.push(" AND decision = ").push_bind(d.clone());
        }
        if let Some(p) = &filter.proto {
            q.push(" AND proto = ").push_bind(p.clone());
        }
        match cursor {
            Cursor::Before(before) => {
                if let Some(b) = before {
                    q.push(" AND id < ").push_bind(b);
                }
                q.push(" ORDER BY id DESC");
            }
            Cursor::After { after, upto } => {
                q.push(" AND id > ").push_bind(after);
                q.push(" AND id <= ").push_bind(upto);
                q.push(" ORDER BY id ASC");
            }
        }
        q.push(" LIMIT ").push_bind(limit);
        let rows: Vec<FlowRow> = q.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(FlowLogRecord::try_from).collect()
    }

    /// The highest flow id of an account (0 when it has none).
    pub async fn max_flow_id(&self, account_id: i64) -> StoreResult<i64> {
        let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM flows WHERE account_id = ?")
            .bind(account_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(id.unwrap_or(0))
    }

    /// Deletes the records that ended before `before_ms`; returns how many.
    pub async fn prune_flows(&self, before_ms: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM flows WHERE end_ms < ?")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

/// Deletes records older than `retention` now and every [`PRUNE_INTERVAL`].
pub fn spawn_retention(store: Store, retention: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let keep = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            match store.prune_flows(now_ms().saturating_sub(keep)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "deleted flow records past their retention"),
                Err(e) => tracing::warn!(error = %e, "could not delete old flow records"),
            }
            // The gateway's request log is kept as long as flows.
            match store.prune_requests(now_ms().saturating_sub(keep)).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(deleted = n, "deleted request records past their retention")
                }
                Err(e) => tracing::warn!(error = %e, "could not delete old request records"),
            }
        }
    })
}

/// Query parameters of the flow-log endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowParams {
    since: Option<String>,
    until: Option<String>,
    node: Option<String>,
    decision: Option<String>,
    proto: Option<String>,
    limit: Option<String>,
    before_id: Option<String>,
    format: Option<String>,
    /// Read by the [`Admin`] extractor.
    #[allow(dead_code)]
    account: Option<String>,
}

fn bad(m: impl Into<String>) -> ApiErr {
    ApiErr::new(StatusCode::BAD_REQUEST, m)
}

fn params(uri: &Uri) -> Result<FlowParams, ApiErr> {
    Query::<FlowParams>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| {
            bad(format!(
                "bad query string: {} (parameters: since, until, node, decision, proto, limit, before_id, format, account)",
                e.body_text()
            ))
        })
}

/// `since`/`until` of a log query (a time ago or unix seconds) in unix ms.
pub(crate) fn parse_window(
    since: &Option<String>,
    until: &Option<String>,
    now_ms: i64,
) -> Result<(Option<i64>, Option<i64>), ApiErr> {
    let nonempty = |o: &Option<String>| o.as_ref().filter(|s| !s.is_empty()).cloned();
    let since_ms = nonempty(since)
        .map(|s| parse_time("since", &s, now_ms))
        .transpose()
        .map_err(bad)?;
    let until_ms = nonempty(until)
        .map(|s| parse_time("until", &s, now_ms))
        .transpose()
        .map_err(bad)?;
    if let (Some(s), Some(u)) = (since_ms, until_ms) {
        if s > u {
            return Err(bad("since is after until: nothing can match"));
        }
    }
    Ok((since_ms, until_ms))
}

/// `limit` of a log query: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
pub(crate) fn parse_limit(limit: Option<&str>) -> Result<i64, ApiErr> {
    match limit.filter(|s| !s.is_empty()) {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "invalid limit={s:?}: give a number from 1 to {MAX_LIMIT}"
            ))),
        },
    }
}

/// `before_id` of a log query: the `next_before_id` of the previous page.
pub(crate) fn parse_before_id(before_id: Option<&str>) -> Result<Option<i64>, ApiErr> {
    match before_id.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(bad(format!(
                "invalid before_id={s:?}: give the next_before_id of the previous page"
            ))),
        },
    }
}

impl FlowParams {
    pub(crate) fn filter(&self, now_ms: i64) -> Result<FlowFilter, ApiErr> {
        let nonempty = |o: &Option<String>| o.as_ref().filter(|s| !s.is_empty()).cloned();
        let (since_ms, until_ms) = parse_window(&self.since, &self.until, now_ms)?;
        let node = nonempty(&self.node);
        if let Some(n) = &node {
            validate_name("node", n).map_err(|e| bad(format!("invalid node={n:?}: {e}")))?;
        }
        let decision = nonempty(&self.decision);
        if let Some(d) = &decision {
            if d != "allow" && d != "deny" {
                return Err(bad(format!("invalid decision={d:?}: use allow or deny")));
            }
        }
        let proto = nonempty(&self.proto).map(|p| p.to_ascii_lowercase());
        if let Some(p) = &proto {
            if p.len() > MAX_PROTO || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(bad(format!(
                    "invalid proto={p:?}: use tcp, udp, icmp or an IP protocol number"
                )));
            }
        }
        Ok(FlowFilter {
            since_ms,
            until_ms,
            node,
            decision,
            proto,
        })
    }

    fn limit(&self) -> Result<i64, ApiErr> {
        parse_limit(self.limit.as_deref())
    }

    pub(crate) fn before_id(&self) -> Result<Option<i64>, ApiErr> {
        parse_before_id(self.before_id.as_deref())
    }
}

/// Whether the caller asked for JSON lines.
fn wants_jsonl(p: &FlowParams, headers: &HeaderMap) -> Result<bool, ApiErr> {
    match p.format.as_deref() {
        Some("jsonl") | Some("ndjson") => Ok(true),
        Some("json") => Ok(false),
        Some(f) => Err(bad(format!("invalid format={f:?}: use json or jsonl"))),
        None => Ok(headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/x-ndjson"))),
    }
}

/// Flow records of the account, newest first, a page at a time; or, with
/// `format=jsonl` (or `Accept: application/x-ndjson`), every matching record
/// oldest first as JSON lines (the export for log shippers).
#[utoipa::path(get, path = "/api/v1/logs/flows", tag = "logs",
    params(
        ("since" = Option<String>, Query, description = "Records that ended at or after: a time ago (`10m`, `2h`, `7d`) or unix seconds"),
        ("until" = Option<String>, Query, description = "Records that ended at or before: a time ago or unix seconds"),
        ("node" = Option<String>, Query, description = "The reporting node, or the node at either end"),
        ("decision" = Option<String>, Query, description = "`allow` or `deny`"),
        ("proto" = Option<String>, Query, description = "`tcp`, `udp`, `icmp` or an IP protocol number"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 100); not used by the jsonl export"),
        ("before_id" = Option<i64>, Query, description = "Only records older than this id: next_before_id of the previous page"),
        ("format" = Option<String>, Query, description = "`json` (pages, default) or `jsonl` (every matching record, oldest first, one JSON object a line)"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = FlowLogPage, description = "A page (or, for jsonl, application/x-ndjson lines of FlowLogRecord)"),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_flows(
    State(st): State<AppState>,
    admin: Admin,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiErr> {
    let p = params(&uri)?;
    let filter = p.filter(now_ms())?;
    let limit = p.limit()?;
    let before = p.before_id()?;
    if wants_jsonl(&p, &headers)? {
        return export(st.store, admin.account.id, filter, before).await;
    }
    let records = st
        .store
        .query_flows(admin.account.id, &filter, Cursor::Before(before), limit)
        .await?;
    let next_before_id = if records.len() as i64 == limit {
        records.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(FlowLogPage {
        records,
        next_before_id,
    })
    .into_response())
}

/// Streams every matching record up to now, oldest first, a database page at a time.
async fn export(
    store: Store,
    account_id: i64,
    filter: FlowFilter,
    before: Option<i64>,
) -> Result<Response, ApiErr> {
    let mut upto = store.max_flow_id(account_id).await?;
    if let Some(b) = before {
        upto = upto.min(b - 1);
    }
    let state = Some((store, 0i64));
    let body = futures_util::stream::unfold(state, move |state| {
        let filter = filter.clone();
        async move {
            let (store, after) = state?;
            if after >= upto {
                return None;
            }
            let page = store
                .query_flows(
                    account_id,
                    &filter,
                    Cursor::After { after, upto },
                    EXPORT_PAGE,
                )
                .await;
            match page {
                Err(e) => {
                    tracing::warn!(error = %e, "flow export failed");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
                Ok(page) if page.is_empty() => None,
                Ok(page) => {
                    let mut out = Vec::new();
                    for r in &page {
                        // A record always serialises.
                        let _ = serde_json::to_writer(&mut out, r);
                        out.push(b'\n');
                    }
                    let last = page.last().map_or(upto, |r| r.id);
                    let next = if (page.len() as i64) < EXPORT_PAGE {
                        None
                    } else {
                        Some((store, last))
                    };
                    Some((Ok::<_, std::io::Error>(Bytes::from(out)), next))
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Newly stored flow records of the account, live, as Server-Sent Events: one
/// `data:` event (a FlowLogRecord in JSON) per record that matches the
/// filters. A subscriber too slow to keep up gets an `event: lagged` whose
/// data tells how many batches it missed.
#[utoipa::path(get, path = "/api/v1/logs/flows/stream", tag = "logs",
    params(
        ("node" = Option<String>, Query, description = "The reporting node, or the node at either end"),
        ("decision" = Option<String>, Query, description = "`allow` or `deny`"),
        ("proto" = Option<String>, Query, description = "`tcp`, `udp`, `icmp` or an IP protocol number"),
        ("since" = Option<String>, Query, description = "Only records that ended at or after (as for /logs/flows)"),
        ("until" = Option<String>, Query, description = "Only records that ended at or before"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of FlowLogRecord events"),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn stream_flows(
    State(st): State<AppState>,
    admin: Admin,
    uri: Uri,
) -> Result<Response, ApiErr> {
    let p = params(&uri)?;
    let filter = p.filter(now_ms())?;
    p.limit()?;
    p.before_id()?;
    // Subscribed before the response starts: every record stored after the
    // client sees the response headers reaches it.
    Ok(Sse::new(live_events(&st, admin.account.id, filter))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The SSE events of the account's newly stored records matching `filter`
/// (subscribed now); ends when the server shuts down.
pub(crate) fn live_events(
    st: &AppState,
    account_id: i64,
    filter: FlowFilter,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let live = Live {
        rx: st.flows.subscribe(),
        shutdown: st.hub.shutdown_signal(),
        pending: VecDeque::new(),
        account_id,
        filter,
    };
    futures_util::stream::unfold(live, |mut l| async move {
        loop {
            if let Some(e) = l.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), l));
            }
            if *l.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                r = l.rx.recv() => match r {
                    Ok(batch) => {
                        if batch.account_id != l.account_id {
                            continue;
                        }
                        for rec in batch.records.iter().filter(|r| l.filter.matches(r)) {
                            if let Ok(e) = Event::default().json_data(rec) {
                                l.pending.push_back(e);
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        l.pending.push_back(
                            Event::default()
                                .event("lagged")
                                .data(format!("{{\"missed_batches\":{n}}}")),
                        );
                    }
                    Err(RecvError::Closed) => return None,
                },
                r = l.shutdown.changed() => {
                    if r.is_err() {
                        return None;
                    }
                }
            }
        }
    })
}

struct Live {
    rx: broadcast::Receiver<Arc<FlowBatch>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    pending: VecDeque<Event>,
    account_id: i64,
    filter: FlowFilter,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> FlowRecord {
        FlowRecord {
            start_ms: 1,
            end_ms: 2,
            proto: "TCP".into(),
            src_ip: "100.64.0.1".parse().unwrap(),
            src_port: 1000,
            dst_ip: "100.64.0.2".parse().unwrap(),
            dst_port: 22,
            direction: "out".into(),
            packets_out: 1,
            bytes_out: 60,
            packets_in: 1,
            bytes_in: 60,
            path: "direct".into(),
            via: String::new(),
            decision: "allow".into(),
            rule: "r\u{7}ule".into(),
            count: 0,
            end_reason: "x".repeat(100),
        }
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        for bad in ["", "7", "d", "1w", "-1d", "1.5h", "99999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("1w").unwrap_err().contains("30d"));
        assert_eq!(parse_time("since", "10m", 1_000_000).unwrap(), 400_000);
        assert_eq!(
            parse_time("since", "1700000000", 0).unwrap(),
            1_700_000_000_000
        );
        assert!(parse_time("since", "yesterday", 0)
            .unwrap_err()
            .contains("since"));
    }

    #[test]
    fn batches_are_cleaned_or_refused() {
        let ok = validate_batch(&[rec()]).unwrap();
        assert_eq!(ok[0].proto, "tcp");
        assert_eq!(ok[0].rule, "rule");
        assert_eq!(ok[0].end_reason.len(), MAX_END_REASON);
        assert_eq!(ok[0].count, 1);
        let mut r = rec();
        r.decision = "maybe".into();
        assert!(validate_batch(&[rec(), r])
            .unwrap_err()
            .contains("record 1"));
        let mut r = rec();
        r.end_ms = 0;
        assert!(validate_batch(&[r]).is_err());
        let mut r = rec();
        r.direction = "sideways".into();
        assert!(validate_batch(&[r]).is_err());
        let many = vec![rec(); MAX_BATCH + 1];
        assert!(validate_batch(&many).unwrap_err().contains("5000"));
        assert_eq!(
            validate_batch(&vec![rec(); MAX_BATCH]).unwrap().len(),
            MAX_BATCH
        );
    }
}

#[derive(Debug, Deserialize)]
pub struct SummaryParams {
    since: Option<String>,
}

/// What the account's network carried: allowed connections (counted once),
/// their bytes both ways, and denied attempts, since `since` (default 24h).
#[utoipa::path(get, path = "/api/v1/logs/summary", tag = "logs",
    params(("since" = Option<String>, Query, description = "A time ago (`10m`, `24h`, `7d`) or unix seconds; default 24h"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = TrafficSummary),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn traffic(
    State(st): State<AppState>,
    admin: Admin,
    Query(q): Query<SummaryParams>,
) -> Result<Json<TrafficSummary>, ApiErr> {
    let since = parse_time("since", q.since.as_deref().unwrap_or("24h"), now_ms())
        .map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    Ok(Json(
        st.store.traffic_summary(admin.account.id, since).await?,
    ))
}
