//! Bindings: credentials that let code without a VPN client (an AI agent, a
//! serverless function, a CI job) reach an account's network through the
//! edge's fetch gateway (`docs/gateway.md`).
//!
//! Each binding has its own overlay address from the account's block, a
//! public id (the `b_<id>` of its URL) and a secret shown once (only its
//! SHA-256 is stored). The control plane keeps the gateway's view of every
//! account up to date ([`spawn_gateway_sync`]), puts the gateway's member in
//! the network maps of accounts that have live bindings, and stores the
//! gateway's request records ([`spawn_request_ingest`]) for
//! `GET /api/v1/logs/requests`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::Json;
use rand::Rng;
use serde::Deserialize;
use sqlx::{FromRow, QueryBuilder, Sqlite};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use trellis_edge::gateway::{
    gateway_ip, hash_secret, AccountSnapshot, BindingEntry, Gateway, GatewayPeer, RequestRecord,
    BINDING_USER_PREFIX,
};
use trellis_proto::{
    validate_name, ApiError, BindingInfo, CreateBindingRequest, CreateBindingResponse,
    RequestLogPage, RequestLogRecord,
};

use crate::api::{now, Admin, ApiErr, ApiJson, AppState};
use crate::audit::{self, action};
use crate::flows::{clean, now_ms, sat};
use crate::map::{peer_of, AccountView};
use crate::store::{lowest_free_ip, rfc3339, used_ips, Account, Store, StoreError, StoreResult};

/// Most tags one binding carries.
pub const MAX_BINDING_TAGS: usize = 64;
/// Longest binding lifetime: ten years.
pub const MAX_BINDING_TTL_SECS: u64 = 10 * 365 * 86_400;
/// Characters of a public id (lower-case base32).
pub const PUBLIC_ID_LEN: usize = 16;
/// Characters of a secret (base62).
pub const SECRET_LEN: usize = 32;
/// Most request records stored in one transaction.
pub const INGEST_BATCH: usize = 500;
/// Longest a request record waits before its batch is stored.
pub const INGEST_INTERVAL: Duration = Duration::from_millis(200);
/// How often expiry is checked: an expired binding leaves the gateway and
/// the maps within this time.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(1);
/// Name of the gateway's member in network maps (its peer id is 0).
pub const GATEWAY_PEER_NAME: &str = "gateway";

const BASE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The gateway this server runs, and the URL agents reach it at.
pub struct GatewayFront {
    pub gateway: Arc<Gateway>,
    /// `https` when the gateway has a TLS certificate, else `http`.
    pub scheme: &'static str,
    /// `HOST:PORT` agents connect to.
    pub authority: String,
}

impl GatewayFront {
    /// The proxy URL of a binding: `SCHEME://b_<id>:<secret>@HOST:PORT`.
    pub fn url(&self, public_id: &str, secret: &str) -> String {
        format!(
            "{}://{BINDING_USER_PREFIX}{public_id}:{secret}@{}",
            self.scheme, self.authority
        )
    }
}

/// One stored binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub id: i64,
    pub account_id: i64,
    pub public_id: String,
    pub name: String,
    pub secret_hash: [u8; 32],
    pub ip: Ipv4Addr,
    pub tags: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub requests: u64,
    pub last_used_at: Option<i64>,
}

impl Binding {
    /// Not revoked and not expired at unix time `now`.
    pub fn live(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| t > now)
    }

    pub fn info(&self, account: &str) -> BindingInfo {
        BindingInfo {
            name: self.name.clone(),
            public_id: self.public_id.clone(),
            account: account.to_string(),
            ip: self.ip,
            tags: self.tags.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            requests: self.requests,
            last_used_at: self.last_used_at,
        }
    }

    /// The binding as the gateway authenticates it.
    pub fn entry(&self) -> BindingEntry {
        BindingEntry {
            id: self.id,
            public_id: self.public_id.clone(),
            name: self.name.clone(),
            secret_hash: self.secret_hash,
            ip: self.ip,
            expires_at: self.expires_at,
        }
    }
}

#[derive(FromRow)]
struct BindingRow {
    id: i64,
    account_id: i64,
    public_id: String,
    name: String,
    secret_hash: Vec<u8>,
    ip: String,
    tags: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    requests: i64,
    last_used_at: Option<i64>,
}

const BINDING_COLUMNS: &str =
    "id, account_id, public_id, name, secret_hash, ip, tags, created_at, \
     expires_at, revoked_at, requests, last_used_at";

impl TryFrom<BindingRow> for Binding {
    type Error = StoreError;
    fn try_from(r: BindingRow) -> StoreResult<Binding> {
        let bad = |what: &str| StoreError::Corrupt(format!("binding {} has a bad {what}", r.id));
        Ok(Binding {
            secret_hash: r
                .secret_hash
                .as_slice()
                .try_into()
                .map_err(|_| bad("secret hash"))?,
            ip: r.ip.parse().map_err(|_| bad("ip"))?,
            tags: serde_json::from_str(&r.tags).map_err(|_| bad("tag list"))?,
            requests: u64::try_from(r.requests).unwrap_or(0),
            id: r.id,
            account_id: r.account_id,
            public_id: r.public_id,
            name: r.name,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
        })
    }
}

/// A fresh public id: 16 lower-case base32 characters (80 random bits).
pub fn new_public_id() -> String {
    let mut rng = rand::rngs::OsRng;
    (0..PUBLIC_ID_LEN)
        .map(|_| char::from(BASE32[rng.gen_range(0..BASE32.len())]))
        .collect()
}

/// A fresh secret: 32 base62 characters (about 190 random bits).
pub fn new_binding_secret() -> String {
    rand::rngs::OsRng
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(SECRET_LEN)
        .map(char::from)
        .collect()
}

/// Checks tags like names; duplicates dropped, order kept.
pub fn clean_tags(tags: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        validate_name("tag", t)?;
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    if out.len() > MAX_BINDING_TAGS {
        return Err(format!(
            "{} tags given; a binding carries at most {MAX_BINDING_TAGS}",
            out.len()
        ));
    }
    Ok(out)
}

/// Checks a requested lifetime.
pub fn check_ttl(ttl_secs: Option<u64>) -> Result<(), String> {
    match ttl_secs {
        Some(0) => Err("ttl_secs must be at least 1 second; leave it out for a binding that never expires".into()),
        Some(t) if t > MAX_BINDING_TTL_SECS => Err(format!(
            "ttl_secs {t} is longer than the maximum of ten years ({MAX_BINDING_TTL_SECS} s); leave it out for a binding that never expires"
        )),
        _ => Ok(()),
    }
}

fn no_binding(account: &Account, name: &str) -> StoreError {
    StoreError::NotFound(format!(
        "account {:?} has no binding named {name:?} that is not revoked; see `trellis binding list`",
        account.name
    ))
}

impl Store {
    /// Creates a binding: checks its input, allocates an address (never one a
    /// node or any binding, revoked ones included, holds), stores it with its
    /// audit entry in one transaction. Returns it and its secret (plaintext,
    /// shown once). An expired, unrevoked binding of the same name is revoked
    /// on the way (its name is free again).
    pub async fn create_binding(
        &self,
        account: &Account,
        req: &CreateBindingRequest,
        now: i64,
        actor: &str,
    ) -> StoreResult<(Binding, String)> {
        validate_name("binding", &req.name).map_err(StoreError::Invalid)?;
        let tags = clean_tags(&req.tags).map_err(StoreError::Invalid)?;
        check_ttl(req.ttl_secs).map_err(StoreError::Invalid)?;
        // ttl <= ten years, so this fits in i64.
        let expires_at = req.ttl_secs.map(|t| now + t as i64);
        let tags_json =
            serde_json::to_string(&tags).map_err(|e| StoreError::Invalid(format!("tags: {e}")))?;

        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let namesake: Option<(i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, expires_at FROM bindings WHERE account_id = ? AND name = ? AND revoked_at IS NULL",
        )
        .bind(account.id)
        .bind(&req.name)
        .fetch_optional(&mut *tx)
        .await?;
        match namesake {
            Some((_, expires)) if expires.is_none_or(|t| t > now) => {
                return Err(StoreError::Conflict(format!(
                    "account {:?} already has a binding named {:?}; pick another name or revoke it first (`trellis binding revoke {}`)",
                    account.name, req.name, req.name
                )));
            }
            Some((id, expires)) => {
                sqlx::query("UPDATE bindings SET revoked_at = ? WHERE id = ?")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                audit::record(
                    &mut tx,
                    account.id,
                    actor,
                    action::BINDING_REVOKE,
                    &req.name,
                    &format!(
                        "expired at {}; revoked as its name was given to a new binding",
                        rfc3339(expires.unwrap_or(now))
                    ),
                )
                .await?;
            }
            None => {}
        }
        let used = used_ips(&mut tx, account.id).await?;
        let ip = lowest_free_ip(&account.cidr, &used).ok_or_else(|| {
            StoreError::Conflict(format!(
                "account {:?} has no free address left in {} ({} in use by nodes and bindings)",
                account.name,
                account.cidr,
                used.len()
            ))
        })?;
        let public_id = new_public_id();
        let secret = new_binding_secret();
        let secret_hash = hash_secret(&secret);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO bindings (account_id, public_id, name, secret_hash, ip, tags, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(account.id)
        .bind(&public_id)
        .bind(&req.name)
        .bind(secret_hash.as_slice())
        .bind(ip.to_string())
        .bind(&tags_json)
        .bind(now)
        .bind(expires_at)
        .fetch_one(&mut *tx)
        .await?;
        let detail = format!(
            "{ip}, tags {tags_json}, {}",
            match expires_at {
                Some(t) => format!("expires {}", rfc3339(t)),
                None => "never expires".into(),
            }
        );
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::BINDING_CREATE,
            &req.name,
            &detail,
        )
        .await?;
        tx.commit().await?;
        Ok((
            Binding {
                id,
                account_id: account.id,
                public_id,
                name: req.name.clone(),
                secret_hash,
                ip,
                tags,
                created_at: now,
                expires_at,
                revoked_at: None,
                requests: 0,
                last_used_at: None,
            },
            secret,
        ))
    }

    /// Every binding of the account, revoked ones too, oldest first.
    pub async fn list_bindings(&self, account_id: i64) -> StoreResult<Vec<Binding>> {
        let rows: Vec<BindingRow> = sqlx::query_as(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE account_id = ? ORDER BY id"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Binding::try_from).collect()
    }

    /// The bindings of the account that are neither revoked nor expired at `now`.
    pub async fn live_bindings(&self, account_id: i64, now: i64) -> StoreResult<Vec<Binding>> {
        let rows: Vec<BindingRow> = sqlx::query_as(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE account_id = ? AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?) ORDER BY id"
        ))
        .bind(account_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Binding::try_from).collect()
    }

    /// The binding called `name`: the one not revoked if there is one, else
    /// the one revoked last.
    pub async fn binding_named(&self, account: &Account, name: &str) -> StoreResult<Binding> {
        let row: Option<BindingRow> = sqlx::query_as(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE account_id = ? AND name = ? \
             ORDER BY revoked_at IS NULL DESC, id DESC LIMIT 1"
        ))
        .bind(account.id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Binding::try_from(r),
            None => Err(StoreError::NotFound(format!(
                "account {:?} has no binding named {name:?}; see `trellis binding list`",
                account.name
            ))),
        }
    }

    /// Revokes the binding called `name` (one not revoked yet), with its audit entry.
    pub async fn revoke_binding(
        &self,
        account: &Account,
        name: &str,
        now: i64,
        actor: &str,
    ) -> StoreResult<Binding> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<BindingRow> = sqlx::query_as(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE account_id = ? AND name = ? AND revoked_at IS NULL"
        ))
        .bind(account.id)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let mut b = Binding::try_from(row.ok_or_else(|| no_binding(account, name))?)?;
        sqlx::query("UPDATE bindings SET revoked_at = ? WHERE id = ?")
            .bind(now)
            .bind(b.id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::BINDING_REVOKE,
            name,
            &b.ip.to_string(),
        )
        .await?;
        tx.commit().await?;
        b.revoked_at = Some(now);
        Ok(b)
    }

    /// Stores request records in one transaction and counts each towards its
    /// binding's usage. Records of accounts that no longer exist are dropped;
    /// a binding id that is not the account's is stored as none. Returns how
    /// many were stored.
    pub async fn store_requests(&self, records: &[RequestRecord]) -> StoreResult<usize> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut stored = 0;
        for r in records {
            let done = sqlx::query(
                "INSERT INTO requests (account_id, binding_id, binding, start_ms, duration_ms, form, \
                 method, target, dst_ip, dst_port, node, path, status, bytes_up, bytes_down, decision, \
                 rule, error) \
                 SELECT ?1, (SELECT id FROM bindings WHERE id = ?2 AND account_id = ?1), ?3, ?4, ?5, \
                 ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18 \
                 WHERE EXISTS (SELECT 1 FROM accounts WHERE id = ?1)",
            )
            .bind(r.account_id)
            .bind(r.binding_id)
            .bind(clean(&r.binding, 64))
            .bind(r.start_ms)
            .bind(r.duration_ms.max(0))
            .bind(clean(&r.form, 16))
            .bind(clean(&r.method, 32))
            .bind(clean(&r.target, 512))
            .bind(r.dst_ip.map(|ip| ip.to_string()))
            .bind(i64::from(r.dst_port))
            .bind(r.node.as_deref().map(|s| clean(s, 64)))
            .bind(r.path.as_deref().map(|s| clean(s, 2048)))
            .bind(i64::from(r.status))
            .bind(sat(r.bytes_up))
            .bind(sat(r.bytes_down))
            .bind(clean(&r.decision, 8))
            .bind(r.rule.as_deref().map(|s| clean(s, 128)))
            .bind(r.error.as_deref().map(|s| clean(s, 32)))
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                continue;
            }
            stored += 1;
            if let Some(id) = r.binding_id {
                let used_at = r
                    .start_ms
                    .saturating_add(r.duration_ms.max(0))
                    .div_euclid(1000);
                sqlx::query(
                    "UPDATE bindings SET requests = requests + 1, \
                     last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ? AND account_id = ?",
                )
                .bind(used_at)
                .bind(id)
                .bind(r.account_id)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Up to `limit` request records of an account, newest first.
    pub async fn query_requests(
        &self,
        account_id: i64,
        filter: &RequestFilter,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<RequestLogRecord>> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, binding, start_ms, duration_ms, form, method, target, dst_ip, dst_port, node, \
             path, status, bytes_up, bytes_down, decision, rule, error FROM requests WHERE account_id = ",
        );
        q.push_bind(account_id);
        if let Some(t) = filter.since_ms {
            q.push(" AND start_ms >= ").push_bind(t);
        }
        if let Some(t) = filter.until_ms {
            q.push(" AND start_ms <= ").push_bind(t);
        }
        if let Some(b) = &filter.binding {
            q.push(" AND binding = ").push_bind(b.clone());
        }
        if let Some(b) = before_id {
            q.push(" AND id < ").push_bind(b);
        }
        q.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
        let rows: Vec<RequestRow> = q.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(RequestLogRecord::try_from).collect()
    }

    /// Deletes the request records that started before `before_ms`; returns how many.
    pub async fn prune_requests(&self, before_ms: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM requests WHERE start_ms < ?")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

#[derive(FromRow)]
struct RequestRow {
    id: i64,
    binding: String,
    start_ms: i64,
    duration_ms: i64,
    form: String,
    method: String,
    target: String,
    dst_ip: Option<String>,
    dst_port: i64,
    node: Option<String>,
    path: Option<String>,
    status: i64,
    bytes_up: i64,
    bytes_down: i64,
    decision: String,
    rule: Option<String>,
    error: Option<String>,
}

impl TryFrom<RequestRow> for RequestLogRecord {
    type Error = StoreError;
    fn try_from(r: RequestRow) -> StoreResult<RequestLogRecord> {
        let bad = |what: &str| StoreError::Corrupt(format!("request {} has a bad {what}", r.id));
        Ok(RequestLogRecord {
            dst_ip: match &r.dst_ip {
                None => None,
                Some(s) => Some(s.parse().map_err(|_| bad("dst_ip"))?),
            },
            dst_port: u16::try_from(r.dst_port).map_err(|_| bad("dst_port"))?,
            status: u16::try_from(r.status).map_err(|_| bad("status"))?,
            bytes_up: u64::try_from(r.bytes_up).unwrap_or(0),
            bytes_down: u64::try_from(r.bytes_down).unwrap_or(0),
            id: r.id,
            binding: r.binding,
            start_ms: r.start_ms,
            duration_ms: r.duration_ms,
            form: r.form,
            method: r.method,
            target: r.target,
            node: r.node,
            path: r.path,
            decision: r.decision,
            rule: r.rule,
            error: r.error,
        })
    }
}

/// Which request records a query wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Started at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Started at or before (unix ms).
    pub until_ms: Option<i64>,
    pub binding: Option<String>,
}

// ---- the API ----

fn bad(m: impl Into<String>) -> ApiErr {
    ApiErr::new(StatusCode::BAD_REQUEST, m)
}

/// Creates a binding. The answer holds its URL, with the secret: shown once.
#[utoipa::path(post, path = "/api/v1/bindings", tag = "bindings",
    request_body = CreateBindingRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 201, body = CreateBindingResponse),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 409, body = ApiError, description = "A binding of that name exists, the block is full, or this server runs no gateway")))]
pub async fn create_binding(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<CreateBindingRequest>,
) -> Result<(StatusCode, Json<CreateBindingResponse>), ApiErr> {
    let made = create(&st, &admin.account, &req, &admin.actor).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

/// Creates a binding for `account` as `actor` — what `POST /bindings` and
/// the dashboard both do: checks the input, needs a gateway, stores it with
/// its audit entry and tells the account's nodes and the gateway. The
/// answer's URL holds the secret (shown once).
pub async fn create(
    st: &AppState,
    account: &Account,
    req: &CreateBindingRequest,
    actor: &str,
) -> Result<CreateBindingResponse, ApiErr> {
    validate_name("binding", &req.name).map_err(bad)?;
    clean_tags(&req.tags).map_err(bad)?;
    check_ttl(req.ttl_secs).map_err(bad)?;
    let front = st
        .gateway
        .clone()
        .ok_or_else(|| ApiErr::new(StatusCode::CONFLICT, NO_GATEWAY))?;
    let (binding, secret) = st.store.create_binding(account, req, now(), actor).await?;
    st.hub.notify(account.id);
    tracing::info!(account = %account.name, binding = %binding.name, ip = %binding.ip, actor = %actor, "binding created");
    Ok(CreateBindingResponse {
        url: front.url(&binding.public_id, &secret),
        binding: binding.info(&account.name),
    })
}

/// Why bindings cannot be created on a server without a gateway.
pub const NO_GATEWAY: &str = "this server runs no fetch gateway, so bindings cannot be used; start it with --gateway-listen ADDR (default 0.0.0.0:8443)";

/// Lists the account's bindings, revoked ones too, with their usage.
#[utoipa::path(get, path = "/api/v1/bindings", tag = "bindings",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<BindingInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_bindings(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<BindingInfo>>, ApiErr> {
    let v = st.store.list_bindings(admin.account.id).await?;
    Ok(Json(
        v.iter().map(|b| b.info(&admin.account.name)).collect(),
    ))
}

/// One binding: the one of that name not revoked, else the one revoked last.
#[utoipa::path(get, path = "/api/v1/bindings/{name}", tag = "bindings",
    params(("name" = String, Path, description = "Binding name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = BindingInfo),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn get_binding(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<BindingInfo>, ApiErr> {
    validate_name("binding", &name).map_err(bad)?;
    let b = st.store.binding_named(&admin.account, &name).await?;
    Ok(Json(b.info(&admin.account.name)))
}

/// Revokes a binding: the gateway refuses it within a second and closes its
/// open streams; its address leaves the nodes' maps.
#[utoipa::path(delete, path = "/api/v1/bindings/{name}", tag = "bindings",
    params(("name" = String, Path, description = "Binding name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = BindingInfo, description = "Revoked"),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError, description = "No binding of that name that is not revoked")))]
pub async fn revoke_binding(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<BindingInfo>, ApiErr> {
    let b = revoke(&st, &admin.account, &name, &admin.actor).await?;
    Ok(Json(b.info(&admin.account.name)))
}

/// Revokes `account`'s binding `name` as `actor` — what `DELETE
/// /bindings/{name}` and the dashboard both do: the audit entry, and the
/// nodes and the gateway told.
pub async fn revoke(
    st: &AppState,
    account: &Account,
    name: &str,
    actor: &str,
) -> Result<Binding, ApiErr> {
    validate_name("binding", name).map_err(bad)?;
    let b = st.store.revoke_binding(account, name, now(), actor).await?;
    st.hub.notify(account.id);
    tracing::info!(account = %account.name, binding = %name, actor = %actor, "binding revoked");
    Ok(b)
}

/// Query parameters of `GET /logs/requests`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestParams {
    binding: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    #[serde(alias = "before")]
    before_id: Option<String>,
    /// Read by the [`Admin`] extractor.
    #[allow(dead_code)]
    account: Option<String>,
}

impl RequestParams {
    pub(crate) fn filter(&self, now_ms: i64) -> Result<RequestFilter, ApiErr> {
        let nonempty = |o: &Option<String>| o.as_ref().filter(|s| !s.is_empty()).cloned();
        let (since_ms, until_ms) = crate::flows::parse_window(&self.since, &self.until, now_ms)?;
        let binding = nonempty(&self.binding);
        if let Some(b) = &binding {
            validate_name("binding", b).map_err(|e| bad(format!("invalid binding={b:?}: {e}")))?;
        }
        Ok(RequestFilter {
            since_ms,
            until_ms,
            binding,
        })
    }

    fn limit(&self) -> Result<i64, ApiErr> {
        crate::flows::parse_limit(self.limit.as_deref())
    }

    pub(crate) fn before_id(&self) -> Result<Option<i64>, ApiErr> {
        crate::flows::parse_before_id(self.before_id.as_deref())
    }
}

/// Requests through the fetch gateway, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/logs/requests", tag = "logs",
    params(
        ("binding" = Option<String>, Query, description = "Only requests of this binding"),
        ("since" = Option<String>, Query, description = "Requests that started at or after: a time ago (`10m`, `2h`, `7d`) or unix seconds"),
        ("until" = Option<String>, Query, description = "Requests that started at or before: a time ago or unix seconds"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 100)"),
        ("before_id" = Option<i64>, Query, description = "Only records older than this id: next_before_id of the previous page (`before` works too)"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = RequestLogPage),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_requests(
    State(st): State<AppState>,
    admin: Admin,
    uri: Uri,
) -> Result<Json<RequestLogPage>, ApiErr> {
    let p = Query::<RequestParams>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| {
            bad(format!(
                "bad query string: {} (parameters: binding, since, until, limit, before_id, account)",
                e.body_text()
            ))
        })?;
    let filter = p.filter(now_ms())?;
    let limit = p.limit()?;
    let before = p.before_id()?;
    let records = st
        .store
        .query_requests(admin.account.id, &filter, before, limit)
        .await?;
    let next_before_id = if records.len() as i64 == limit {
        records.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(RequestLogPage {
        records,
        next_before_id,
    }))
}

// ---- keeping the gateway in step ----

/// What the gateway knows of the account in `view`.
pub fn snapshot_of(view: &AccountView) -> AccountSnapshot {
    let routes_of = |id: i64| view.routes.get(&id).map(Vec::as_slice).unwrap_or(&[]);
    let peers = view
        .nodes
        .iter()
        .filter(|n| !n.disabled && n.account_id == view.account.id)
        .map(|n| {
            let online = view.online.contains(&n.id);
            GatewayPeer {
                name: n.name.clone(),
                public_key: n.public_key.0,
                ip: n.ip,
                allowed_ips: peer_of(n, online, routes_of(n.id)).allowed_ips,
                online,
                last_seen: n.last_seen,
            }
        })
        .collect();
    let names = view
        .dns
        .iter()
        .flat_map(|d| d.records.iter())
        .filter_map(|r| match r.addr {
            IpAddr::V4(v4) => Some((r.name.to_ascii_lowercase(), v4)),
            IpAddr::V6(_) => None,
        })
        .collect();
    AccountSnapshot {
        account_id: view.account.id,
        name: view.account.name.clone(),
        cidr: view.account.cidr,
        domain: view.dns.as_ref().map(|d| d.domain.clone()),
        names,
        peers,
        filter: view.filter.clone(),
        bindings: view.bindings.iter().map(Binding::entry).collect(),
    }
}

/// The gateway's member as the account's nodes see it; None when the server
/// runs no gateway or the account has no live binding.
pub fn gateway_member(
    front: Option<&GatewayFront>,
    account: &Account,
    bindings: &[Binding],
) -> Option<crate::map::GatewayMember> {
    let front = front?;
    if bindings.is_empty() {
        return None;
    }
    Some(crate::map::GatewayMember {
        public_key: trellis_proto::NodeKey(front.gateway.member_public_key(account.id)),
        ip: gateway_ip(&account.cidr),
        allowed_ips: bindings
            .iter()
            .map(|b| ipnet::Ipv4Net::from(b.ip))
            .collect(),
    })
}

/// Keeps the gateway's account snapshots in step: every account at start,
/// then each account after every change of it (the notifications that push
/// network maps), and once a second the accounts whose next binding expiry
/// has passed are announced as changed (so the gateway and the maps drop
/// it). None when this server runs no gateway.
pub fn spawn_gateway_sync(state: AppState) -> Option<tokio::task::JoinHandle<()>> {
    let front = state.gateway.clone()?;
    Some(tokio::spawn(async move {
        let mut changes = state.hub.subscribe();
        let mut sync = GatewaySync {
            state: &state,
            gateway: &front.gateway,
            last: HashMap::new(),
            next_expiry: HashMap::new(),
        };
        sync.all().await;
        let mut tick = tokio::time::interval(EXPIRY_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(id) => sync.account(id).await,
                    Err(RecvError::Lagged(_)) => sync.all().await,
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    let t = now();
                    let due: Vec<i64> = sync
                        .next_expiry
                        .iter()
                        .filter(|(_, at)| **at <= t)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in due {
                        sync.next_expiry.remove(&id);
                        tracing::info!(account_id = id, "a binding expired");
                        state.hub.notify(id);
                    }
                }
            }
        }
    }))
}

struct GatewaySync<'a> {
    state: &'a AppState,
    gateway: &'a Gateway,
    last: HashMap<i64, AccountSnapshot>,
    /// The soonest expiry among each account's live bindings.
    next_expiry: HashMap<i64, i64>,
}

impl GatewaySync<'_> {
    async fn all(&mut self) {
        match self.state.store.list_accounts().await {
            Ok(accounts) => {
                for a in accounts {
                    self.account(a.id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list accounts for the gateway"),
        }
    }

    async fn account(&mut self, id: i64) {
        let view = match crate::stream::account_view(self.state, id).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(account_id = id, error = %format!("{e:#}"), "cannot update the gateway's view of an account");
                return;
            }
        };
        let Some(view) = view else {
            self.gateway.remove_account(id);
            self.last.remove(&id);
            self.next_expiry.remove(&id);
            return;
        };
        match view.bindings.iter().filter_map(|b| b.expires_at).min() {
            Some(t) => self.next_expiry.insert(id, t),
            None => self.next_expiry.remove(&id),
        };
        let snap = snapshot_of(&view);
        if self.last.get(&id) != Some(&snap) {
            tracing::debug!(account = %snap.name, bindings = snap.bindings.len(), "gateway view updated");
            self.gateway.set_account(snap.clone());
            self.last.insert(id, snap);
        }
    }
}

/// Stores the gateway's request records: in batches of up to
/// [`INGEST_BATCH`], at most [`INGEST_INTERVAL`] after the first record of a
/// batch arrived, one transaction per batch.
pub fn spawn_request_ingest(
    store: Store,
    mut rx: mpsc::Receiver<RequestRecord>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + INGEST_INTERVAL;
            while batch.len() < INGEST_BATCH {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => batch.push(r),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            match store.store_requests(&batch).await {
                Ok(n) => tracing::debug!(stored = n, "request records stored"),
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.len(), "request records could not be stored and were dropped")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_secrets_have_their_shape() {
        let id = new_public_id();
        assert_eq!(id.len(), PUBLIC_ID_LEN);
        assert!(id.bytes().all(|b| BASE32.contains(&b)), "{id}");
        let s = new_binding_secret();
        assert_eq!(s.len(), SECRET_LEN);
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
        assert_ne!(new_binding_secret(), s);
        assert_ne!(new_public_id(), id);
    }

    #[test]
    fn tags_and_ttls_are_checked() {
        assert_eq!(
            clean_tags(&["a".into(), "b".into(), "a".into()]).unwrap(),
            ["a", "b"]
        );
        assert!(clean_tags(&["Bad Tag".into()])
            .unwrap_err()
            .contains("invalid tag"));
        let many: Vec<String> = (0..=MAX_BINDING_TAGS).map(|i| format!("t{i}")).collect();
        assert!(clean_tags(&many).is_err());
        assert!(check_ttl(None).is_ok());
        assert!(check_ttl(Some(60)).is_ok());
        assert!(check_ttl(Some(0))
            .unwrap_err()
            .contains("at least 1 second"));
        assert!(check_ttl(Some(MAX_BINDING_TTL_SECS + 1)).is_err());
    }
}
