//! Persistent state of the control plane.
//!
//! Everything the control plane knows lives behind [`Store`], so a PostgreSQL
//! backend can sit beside the SQLite one later without touching the API layer.
//! Secrets (API keys, join tokens, node secrets) are stored only as SHA-256
//! hex digests; the plaintext is returned once to the caller that created it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ipnet::Ipv4Net;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{FromRow, SqlitePool};
use sqlx::{Sqlite, Transaction};
use trellis_proto::{sanitize_name, validate_name, NodeKey, TokenInfo, OVERLAY_SPACE};

use crate::audit::{self, action};
use crate::mesh::{validate_record_addr, validate_record_name, validate_routes, ApprovedRoute};

/// Name of the account created on first start.
pub const DEFAULT_ACCOUNT: &str = "default";
/// Block of the default account.
pub const DEFAULT_CIDR: &str = "100.64.0.0/16";
/// Most tags one node carries.
pub const MAX_NODE_TAGS: usize = 64;
/// Longest join-token lifetime: one year.
pub const MAX_TOKEN_TTL_SECS: u64 = 365 * 24 * 3600;

/// What went wrong in a store operation. Each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One account: one private network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub cidr: Ipv4Net,
    pub created_at: i64,
}

#[derive(FromRow)]
struct AccountRow {
    id: i64,
    name: String,
    cidr: String,
    created_at: i64,
}

impl TryFrom<AccountRow> for Account {
    type Error = StoreError;
    fn try_from(r: AccountRow) -> StoreResult<Account> {
        let cidr = r.cidr.parse().map_err(|_| {
            StoreError::Corrupt(format!("account {:?} has cidr {:?}", r.name, r.cidr))
        })?;
        Ok(Account {
            id: r.id,
            name: r.name,
            cidr,
            created_at: r.created_at,
        })
    }
}

/// One enrolled node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: i64,
    pub account_id: i64,
    pub name: String,
    pub public_key: NodeKey,
    pub ip: Ipv4Addr,
    pub hostname: String,
    pub os: String,
    pub version: String,
    pub tags: Vec<String>,
    pub listen_port: Option<u16>,
    pub local_addrs: Vec<IpAddr>,
    pub observed_ip: Option<IpAddr>,
    /// The address the edge saw the node's WireGuard socket come from.
    pub reflexive: Option<SocketAddr>,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    /// Disabled by an admin: kept enrolled, but cut off from every peer.
    pub disabled: bool,
}

#[derive(FromRow)]
struct NodeRow {
    id: i64,
    account_id: i64,
    name: String,
    public_key: String,
    ip: String,
    hostname: String,
    os: String,
    version: String,
    tags: String,
    listen_port: Option<i64>,
    local_addrs: String,
    observed_ip: Option<String>,
    reflexive: Option<String>,
    created_at: i64,
    last_seen: Option<i64>,
    disabled_at: Option<i64>,
}

const NODE_COLUMNS: &str = "id, account_id, name, public_key, ip, hostname, os, version, tags, \
     listen_port, local_addrs, observed_ip, reflexive, created_at, last_seen, disabled_at";

impl TryFrom<NodeRow> for Node {
    type Error = StoreError;
    fn try_from(r: NodeRow) -> StoreResult<Node> {
        let bad = |what: &str| StoreError::Corrupt(format!("node {} has a bad {what}", r.id));
        Ok(Node {
            public_key: r.public_key.parse().map_err(|_| bad("public key"))?,
            ip: r.ip.parse().map_err(|_| bad("ip"))?,
            tags: serde_json::from_str(&r.tags).map_err(|_| bad("tag list"))?,
            listen_port: match r.listen_port {
                None => None,
                Some(p) => Some(u16::try_from(p).map_err(|_| bad("listen port"))?),
            },
            local_addrs: serde_json::from_str(&r.local_addrs)
                .map_err(|_| bad("local address list"))?,
            observed_ip: match &r.observed_ip {
                None => None,
                Some(s) => Some(s.parse().map_err(|_| bad("observed ip"))?),
            },
            reflexive: match &r.reflexive {
                None => None,
                Some(s) => Some(s.parse().map_err(|_| bad("reflexive address"))?),
            },
            id: r.id,
            account_id: r.account_id,
            name: r.name,
            hostname: r.hostname,
            os: r.os,
            version: r.version,
            created_at: r.created_at,
            last_seen: r.last_seen,
            disabled: r.disabled_at.is_some(),
        })
    }
}

#[derive(FromRow)]
struct TokenRow {
    id: i64,
    account_id: i64,
    revoked_at: Option<i64>,
    reusable: bool,
    expires_at: i64,
    uses: i64,
    tags: String,
    routes_auto_approve: bool,
}

/// What a node tells about itself in its `Hello`, plus where it connected from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    pub listen_port: u16,
    pub local_addrs: Vec<IpAddr>,
    pub observed_ip: IpAddr,
    /// The server-reflexive address the node learned from the edge, if any.
    pub reflexive: Option<SocketAddr>,
    pub os: String,
    pub version: String,
    /// Subnets the node advertises now (already checked): replaces what it
    /// advertised before.
    pub advertise_routes: Vec<Ipv4Net>,
}

/// Input of [`Store::enroll`].
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub token: String,
    pub public_key: NodeKey,
    pub name: Option<String>,
    pub hostname: String,
    pub os: String,
    pub version: String,
    /// Subnets the node advertises (checked with [`crate::mesh::validate_routes`]).
    pub advertise_routes: Vec<Ipv4Net>,
}

/// Result of a successful enrollment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub node: Node,
    pub account: Account,
    /// The node's control-stream credential, in plaintext; shown once.
    pub secret: String,
}

/// SHA-256 hex digest of a secret.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random secret with a recognisable prefix.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The whole overlay space, parsed.
pub fn overlay_space() -> Ipv4Net {
    // The constant is a valid literal; fall back to the same value built by hand.
    Ipv4Net::from_str(OVERLAY_SPACE)
        .unwrap_or_else(|_| Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10))
}

/// Checks an explicitly requested account block.
pub fn validate_cidr(cidr: &Ipv4Net) -> Result<(), String> {
    let space = overlay_space();
    if !space.contains(cidr) {
        return Err(format!(
            "address block {cidr} is outside the overlay space {OVERLAY_SPACE}; pick a block inside it, e.g. 100.65.0.0/16"
        ));
    }
    if !(8..=29).contains(&cidr.prefix_len()) {
        return Err(format!(
            "address block {cidr} has prefix length /{}; use /10 to /29 (a /29 holds 5 nodes)",
            cidr.prefix_len()
        ));
    }
    if cidr.addr() != cidr.network() {
        return Err(format!(
            "{cidr} is not a network address; did you mean {}?",
            cidr.trunc()
        ));
    }
    Ok(())
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first /16 inside the overlay space that overlaps none of `taken`.
pub fn next_free_block(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    overlay_space()
        .subnets(16)
        .ok()?
        .find(|candidate| !taken.iter().any(|t| overlaps(candidate, t)))
}

/// Lowest free node address in `cidr`: offset 1 is the account gateway's, the
/// network and broadcast addresses are never handed out.
pub fn lowest_free_ip(cidr: &Ipv4Net, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let net = u32::from(cidr.network());
    let bcast = u32::from(cidr.broadcast());
    let first = net.checked_add(2)?;
    let last = bcast.checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
}

/// `base`, or `base-2`, `base-3`, ... — the first not in `taken`, at most 63 characters.
pub fn unique_name(base: &str, taken: &HashSet<String>) -> String {
    if !taken.contains(base) {
        return base.to_string();
    }
    let mut n: u64 = 2;
    loop {
        let suffix = format!("-{n}");
        let keep = 63usize.saturating_sub(suffix.len());
        let stem: String = base.chars().take(keep).collect();
        let candidate = format!("{}{suffix}", stem.trim_end_matches('-'));
        if !taken.contains(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// Unix seconds → "2024-05-01T12:00:00Z".
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// The control plane's database.
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and runs migrations.
    pub async fn open_sqlite(path: &Path) -> anyhow::Result<Store> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .with_context(|| format!("opening database {}", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .with_context(|| format!("migrating database {}", path.display()))?;
        crate::policy::ensure_policies(&pool, crate::api::now())
            .await
            .with_context(|| format!("giving every account a policy in {}", path.display()))?;
        Ok(Store { pool })
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Creates account `default` when no account exists (first start); returns
    /// the first account (`default`, unless the setup wizard renamed it).
    pub async fn ensure_default_account(&self, now: i64) -> StoreResult<Account> {
        sqlx::query(
            "INSERT INTO accounts (name, cidr, created_at) SELECT ?, ?, ? \
             WHERE NOT EXISTS (SELECT 1 FROM accounts)",
        )
        .bind(DEFAULT_ACCOUNT)
        .bind(DEFAULT_CIDR)
        .bind(now)
        .execute(&self.pool)
        .await?;
        crate::policy::ensure_policies(&self.pool, now).await?;
        let row: Option<AccountRow> =
            sqlx::query_as("SELECT id, name, cidr, created_at FROM accounts ORDER BY id LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        row.map(Account::try_from)
            .transpose()?
            .ok_or_else(|| StoreError::Corrupt("the first account vanished".into()))
    }

    /// Creates an API key for `account_id`; returns the plaintext key.
    pub async fn create_api_key(
        &self,
        account_id: i64,
        operator: bool,
        now: i64,
    ) -> StoreResult<String> {
        let key = new_secret("trk_");
        sqlx::query(
            "INSERT INTO api_keys (key_hash, account_id, operator, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash_secret(&key))
        .bind(account_id)
        .bind(operator)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(key)
    }

    /// Looks up an API key: its account, whether it is the operator key, and
    /// its id. A revoked key is refused with a message saying so.
    pub async fn auth_api_key(&self, key: &str) -> StoreResult<Option<(Account, bool, i64)>> {
        #[derive(FromRow)]
        struct Row {
            id: i64,
            name: String,
            cidr: String,
            created_at: i64,
            operator: bool,
            key_id: i64,
            revoked_at: Option<i64>,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT a.id, a.name, a.cidr, a.created_at, k.operator, k.id AS key_id, k.revoked_at \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ?",
        )
        .bind(hash_secret(key))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) if r.revoked_at.is_some() => Err(StoreError::Unauthorized(format!(
                "this API key (id {}) was revoked at {}; ask an admin of the account for a new one",
                r.key_id,
                rfc3339(r.revoked_at.unwrap_or(0))
            ))),
            Some(r) => {
                let key_id = r.key_id;
                let account = Account::try_from(AccountRow {
                    id: r.id,
                    name: r.name,
                    cidr: r.cidr,
                    created_at: r.created_at,
                })?;
                Ok(Some((account, r.operator, key_id)))
            }
        }
    }

    pub async fn account_by_name(&self, name: &str) -> StoreResult<Option<Account>> {
        let row: Option<AccountRow> =
            sqlx::query_as("SELECT id, name, cidr, created_at FROM accounts WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        row.map(Account::try_from).transpose()
    }

    pub async fn account_by_id(&self, id: i64) -> StoreResult<Option<Account>> {
        let row: Option<AccountRow> =
            sqlx::query_as("SELECT id, name, cidr, created_at FROM accounts WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(Account::try_from).transpose()
    }

    pub async fn list_accounts(&self) -> StoreResult<Vec<Account>> {
        let rows: Vec<AccountRow> =
            sqlx::query_as("SELECT id, name, cidr, created_at FROM accounts ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(Account::try_from).collect()
    }

    /// Creates an account and its admin API key (plaintext returned once).
    /// Without `cidr`, the account gets the next /16 that overlaps no other account.
    pub async fn create_account(
        &self,
        name: &str,
        cidr: Option<Ipv4Net>,
        now: i64,
        actor: &str,
    ) -> StoreResult<(Account, String)> {
        validate_name("account", name).map_err(StoreError::Invalid)?;
        if let Some(c) = &cidr {
            validate_cidr(c).map_err(StoreError::Invalid)?;
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let existing: Vec<AccountRow> =
            sqlx::query_as("SELECT id, name, cidr, created_at FROM accounts")
                .fetch_all(&mut *tx)
                .await?;
        if existing.iter().any(|a| a.name == name) {
            return Err(StoreError::Conflict(format!(
                "an account named {name:?} already exists; pick another name"
            )));
        }
        let cidr = match cidr {
            Some(c) => c,
            None => {
                let taken = existing
                    .into_iter()
                    .map(|r| Account::try_from(r).map(|a| a.cidr))
                    .collect::<StoreResult<Vec<_>>>()?;
                next_free_block(&taken).ok_or_else(|| {
                    StoreError::Conflict(format!(
                        "no free /16 block left in {OVERLAY_SPACE}; give the account an explicit cidr (accounts may overlap)"
                    ))
                })?
            }
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (name, cidr, created_at) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(cidr.to_string())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let key = new_secret("trk_");
        sqlx::query(
            "INSERT INTO api_keys (key_hash, account_id, operator, created_at) VALUES (?, ?, 0, ?)",
        )
        .bind(hash_secret(&key))
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        crate::policy::insert_initial(&mut tx, id, now).await?;
        audit::record(
            &mut tx,
            id,
            actor,
            action::ACCOUNT_CREATE,
            name,
            &format!("block {cidr}"),
        )
        .await?;
        tx.commit().await?;
        Ok((
            Account {
                id,
                name: name.to_string(),
                cidr,
                created_at: now,
            },
            key,
        ))
    }

    /// Creates a join token; returns its id, the plaintext token and its expiry.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_token(
        &self,
        account_id: i64,
        reusable: bool,
        routes_auto_approve: bool,
        ttl_secs: u64,
        tags: &[String],
        now: i64,
        actor: &str,
    ) -> StoreResult<(i64, String, i64)> {
        if ttl_secs == 0 {
            return Err(StoreError::Invalid(
                "ttl_secs must be at least 1 second (default 3600)".into(),
            ));
        }
        if ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(StoreError::Invalid(format!(
                "ttl_secs {ttl_secs} is longer than the maximum of one year ({MAX_TOKEN_TTL_SECS} s)"
            )));
        }
        for t in tags {
            validate_name("tag", t).map_err(StoreError::Invalid)?;
        }
        // ttl_secs <= one year, so this fits in i64.
        let expires_at = now + ttl_secs as i64;
        let token = new_secret("trj_");
        let tags_json =
            serde_json::to_string(tags).map_err(|e| StoreError::Invalid(format!("tags: {e}")))?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO join_tokens (token_hash, account_id, reusable, routes_auto_approve, expires_at, \
             uses, tags, created_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?) RETURNING id",
        )
        .bind(hash_secret(&token))
        .bind(account_id)
        .bind(reusable)
        .bind(routes_auto_approve)
        .bind(expires_at)
        .bind(&tags_json)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let detail = format!(
            "{}, expires {}, tags {tags_json}{}",
            if reusable { "reusable" } else { "single-use" },
            rfc3339(expires_at),
            if routes_auto_approve {
                ", routes auto-approved"
            } else {
                ""
            }
        );
        audit::record(
            &mut tx,
            account_id,
            actor,
            action::TOKEN_CREATE,
            &format!("token {id}"),
            &detail,
        )
        .await?;
        tx.commit().await?;
        Ok((id, token, expires_at))
    }

    /// The join tokens of `account_id`, newest first.
    pub async fn list_tokens(&self, account_id: i64) -> StoreResult<Vec<TokenInfo>> {
        #[derive(FromRow)]
        struct Row {
            id: i64,
            reusable: bool,
            routes_auto_approve: bool,
            expires_at: i64,
            uses: i64,
            tags: String,
            revoked_at: Option<i64>,
            created_at: i64,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, reusable, routes_auto_approve, expires_at, uses, tags, revoked_at, created_at \
             FROM join_tokens WHERE account_id = ? ORDER BY id DESC",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(TokenInfo {
                    tags: serde_json::from_str(&r.tags).map_err(|_| {
                        StoreError::Corrupt(format!("join token {} has bad tags", r.id))
                    })?,
                    id: r.id,
                    reusable: r.reusable,
                    routes_auto_approve: r.routes_auto_approve,
                    expires_at: r.expires_at,
                    uses: r.uses,
                    revoked: r.revoked_at.is_some(),
                    created_at: r.created_at,
                })
            })
            .collect()
    }

    /// Revokes join token `id` of `account`: it enrolls nothing from now on.
    /// Revoking a revoked token changes nothing.
    pub async fn revoke_token(
        &self,
        account: &Account,
        id: i64,
        now: i64,
        actor: &str,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let revoked: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT revoked_at FROM join_tokens WHERE id = ? AND account_id = ?",
        )
        .bind(id)
        .bind(account.id)
        .fetch_optional(&mut *tx)
        .await?;
        match revoked {
            None => {
                return Err(StoreError::NotFound(format!(
                    "no join token with id {id} in account {:?}; see `trellis token list`",
                    account.name
                )))
            }
            Some(Some(_)) => return Ok(()),
            Some(None) => {}
        }
        sqlx::query("UPDATE join_tokens SET revoked_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::TOKEN_REVOKE,
            &format!("token {id}"),
            "",
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Enrolls a node: checks the token, allocates a name and an address, stores
    /// the node and counts the token use — all in one transaction.
    pub async fn enroll(&self, req: &Enrollment, now: i64) -> StoreResult<Enrolled> {
        let routes = validate_routes(&req.advertise_routes).map_err(StoreError::Invalid)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;

        let token: Option<TokenRow> = sqlx::query_as(
            "SELECT id, account_id, reusable, expires_at, uses, tags, routes_auto_approve, revoked_at FROM join_tokens \
             WHERE token_hash = ?",
        )
        .bind(hash_secret(req.token.trim()))
        .fetch_optional(&mut *tx)
        .await?;
        let token = token.ok_or_else(|| {
            StoreError::Unauthorized(
                "join token not recognised — check it was copied whole, or create a new one with `trellis token create`".into(),
            )
        })?;
        if let Some(at) = token.revoked_at {
            return Err(StoreError::Unauthorized(format!(
                "join token was revoked by an admin at {} — ask for a new one (`trellis token create`)",
                rfc3339(at)
            )));
        }
        if token.expires_at <= now {
            return Err(StoreError::Unauthorized(format!(
                "join token expired at {} — create a new one",
                rfc3339(token.expires_at)
            )));
        }
        if !token.reusable && token.uses > 0 {
            return Err(StoreError::Unauthorized(
                "join token was already used; single-use tokens enroll one node (create one with --reusable for several)".into(),
            ));
        }

        let key_text = req.public_key.to_string();
        let revoked: Option<i64> =
            sqlx::query_scalar("SELECT revoked_at FROM revoked_keys WHERE public_key = ?")
                .bind(&key_text)
                .fetch_optional(&mut *tx)
                .await?;
        if revoked.is_some() {
            return Err(StoreError::Forbidden(
                "this node key was removed from the network and cannot enroll again".into(),
            ));
        }
        let existing: Option<String> =
            sqlx::query_scalar("SELECT name FROM nodes WHERE public_key = ?")
                .bind(&key_text)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(name) = existing {
            return Err(StoreError::Conflict(format!(
                "this public key is already enrolled as node {name:?}; reuse that node's state directory instead of enrolling again"
            )));
        }

        let base = match &req.name {
            Some(n) => {
                validate_name("node", n).map_err(StoreError::Invalid)?;
                n.clone()
            }
            None => sanitize_name(&req.hostname),
        };

        let account_row: AccountRow =
            sqlx::query_as("SELECT id, name, cidr, created_at FROM accounts WHERE id = ?")
                .bind(token.account_id)
                .fetch_one(&mut *tx)
                .await?;
        let account = Account::try_from(account_row)?;

        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, ip FROM nodes WHERE account_id = ?")
                .bind(account.id)
                .fetch_all(&mut *tx)
                .await?;
        let mut names = HashSet::new();
        let mut used = HashSet::new();
        for (name, ip) in rows {
            names.insert(name);
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("a node has ip {ip:?}")))?;
            used.insert(ip);
        }
        used.extend(binding_ips(&mut tx, account.id).await?);
        // A single-label extra record would answer for the same name.
        let records: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM dns_records WHERE account_id = ? AND instr(name, '.') = 0",
        )
        .bind(account.id)
        .fetch_all(&mut *tx)
        .await?;
        names.extend(records);
        let name = unique_name(&base, &names);
        let ip = lowest_free_ip(&account.cidr, &used).ok_or_else(|| {
            StoreError::Conflict(format!(
                "account {:?} has no free address left in {} ({} in use by nodes and bindings); delete unused nodes with `trellis nodes delete`",
                account.name,
                account.cidr,
                used.len()
            ))
        })?;
        let tags: Vec<String> = serde_json::from_str(&token.tags)
            .map_err(|_| StoreError::Corrupt(format!("join token {} has bad tags", token.id)))?;

        let secret = new_secret("trn_");
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO nodes (account_id, name, public_key, ip, secret_hash, hostname, os, version, tags, \
             local_addrs, routes_auto_approve, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', ?, ?) \
             RETURNING id",
        )
        .bind(account.id)
        .bind(&name)
        .bind(&key_text)
        .bind(ip.to_string())
        .bind(hash_secret(&secret))
        .bind(&req.hostname)
        .bind(&req.os)
        .bind(&req.version)
        .bind(&token.tags)
        .bind(token.routes_auto_approve)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        replace_routes(&mut tx, id, &routes, token.routes_auto_approve, now).await?;

        let counted = sqlx::query(
            "UPDATE join_tokens SET uses = uses + 1 WHERE id = ? AND (reusable = 1 OR uses = 0)",
        )
        .bind(token.id)
        .execute(&mut *tx)
        .await?;
        if counted.rows_affected() != 1 {
            return Err(StoreError::Unauthorized(
                "join token was already used; single-use tokens enroll one node (create one with --reusable for several)".into(),
            ));
        }
        tx.commit().await?;

        Ok(Enrolled {
            node: Node {
                id,
                account_id: account.id,
                name,
                public_key: req.public_key,
                ip,
                hostname: req.hostname.clone(),
                os: req.os.clone(),
                version: req.version.clone(),
                tags,
                listen_port: None,
                local_addrs: Vec::new(),
                observed_ip: None,
                reflexive: None,
                created_at: now,
                last_seen: None,
                disabled: false,
            },
            account,
            secret,
        })
    }

    pub async fn list_nodes(&self, account_id: i64) -> StoreResult<Vec<Node>> {
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE account_id = ? ORDER BY id"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Node::try_from).collect()
    }

    /// The node holding this control-stream secret, if any (removed nodes have none).
    pub async fn node_by_secret(&self, secret: &str) -> StoreResult<Option<Node>> {
        let row: Option<NodeRow> = sqlx::query_as(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE secret_hash = ? \
             AND public_key NOT IN (SELECT public_key FROM revoked_keys)"
        ))
        .bind(hash_secret(secret.trim()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(Node::try_from).transpose()
    }

    /// Stores what a node said in its Hello. Returns false if the node no longer exists.
    pub async fn update_hello(
        &self,
        node_id: i64,
        hello: &HelloInfo,
        now: i64,
    ) -> StoreResult<bool> {
        let locals = serde_json::to_string(&hello.local_addrs)
            .map_err(|e| StoreError::Invalid(format!("local addresses: {e}")))?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let done = sqlx::query(
            "UPDATE nodes SET listen_port = ?, local_addrs = ?, observed_ip = ?, reflexive = ?, os = ?, \
             version = ?, last_seen = ? WHERE id = ?",
        )
        .bind(i64::from(hello.listen_port))
        .bind(locals)
        .bind(hello.observed_ip.to_string())
        .bind(hello.reflexive.map(|a| a.to_string()))
        .bind(&hello.os)
        .bind(&hello.version)
        .bind(now)
        .bind(node_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        let auto: bool = sqlx::query_scalar("SELECT routes_auto_approve FROM nodes WHERE id = ?")
            .bind(node_id)
            .fetch_one(&mut *tx)
            .await?;
        replace_routes(&mut tx, node_id, &hello.advertise_routes, auto, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn touch_last_seen(&self, node_id: i64, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE nodes SET last_seen = ? WHERE id = ?")
            .bind(now)
            .bind(node_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every key ever revoked (deleted nodes), for the relay's refusal list.
    pub async fn revoked_keys(&self) -> StoreResult<Vec<NodeKey>> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT public_key FROM revoked_keys")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|k| {
                k.parse()
                    .map_err(|_| StoreError::Corrupt(format!("revoked key {k:?} is not a key")))
            })
            .collect()
    }

    /// Deletes a node by name and revokes its key for good. Returns the deleted node.
    pub async fn delete_node(
        &self,
        account: &Account,
        name: &str,
        now: i64,
        actor: &str,
    ) -> StoreResult<Node> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let node = node_row_named(&mut tx, account, name).await?;
        sqlx::query("DELETE FROM nodes WHERE id = ?")
            .bind(node.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT OR REPLACE INTO revoked_keys (public_key, account_id, revoked_at) VALUES (?, ?, ?)",
        )
        .bind(node.public_key.to_string())
        .bind(account.id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::NODE_DELETE,
            &node.name,
            &format!("ip {}, key {} revoked", node.ip, node.public_key),
        )
        .await?;
        tx.commit().await?;
        Ok(node)
    }
}

/// A subnet a node advertises now, and its approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub node_id: i64,
    pub node_name: String,
    pub cidr: Ipv4Net,
    /// Place in the approval order; None while not approved.
    pub approved_seq: Option<i64>,
}

#[derive(FromRow)]
struct RouteRow {
    node_id: i64,
    node_name: String,
    cidr: String,
    approved_seq: Option<i64>,
}

impl TryFrom<RouteRow> for RouteEntry {
    type Error = StoreError;
    fn try_from(r: RouteRow) -> StoreResult<RouteEntry> {
        let cidr = r.cidr.parse().map_err(|_| {
            StoreError::Corrupt(format!("node {} has route {:?}", r.node_id, r.cidr))
        })?;
        Ok(RouteEntry {
            node_id: r.node_id,
            node_name: r.node_name,
            cidr,
            approved_seq: r.approved_seq,
        })
    }
}

/// Replaces what `node_id` advertises with `routes`. Rows of withdrawn routes
/// stay (not advertised) so that an approval survives re-advertisement; with
/// `auto_approve`, advertised routes not yet approved are approved now.
async fn replace_routes(
    tx: &mut Transaction<'_, Sqlite>,
    node_id: i64,
    routes: &[Ipv4Net],
    auto_approve: bool,
    now: i64,
) -> StoreResult<()> {
    sqlx::query("UPDATE routes SET advertised = 0 WHERE node_id = ?")
        .bind(node_id)
        .execute(&mut **tx)
        .await?;
    for r in routes {
        let cidr = r.trunc().to_string();
        sqlx::query(
            "INSERT INTO routes (node_id, cidr, advertised, created_at) VALUES (?, ?, 1, ?) \
             ON CONFLICT (node_id, cidr) DO UPDATE SET advertised = 1",
        )
        .bind(node_id)
        .bind(&cidr)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        if auto_approve {
            approve_in(tx, node_id, &cidr, now).await?;
        }
    }
    Ok(())
}

/// Approves one route row if it is not approved yet; it goes last in the approval order.
async fn approve_in(
    tx: &mut Transaction<'_, Sqlite>,
    node_id: i64,
    cidr: &str,
    now: i64,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE routes SET approved_seq = (SELECT COALESCE(MAX(approved_seq), 0) + 1 FROM routes), \
         approved_at = ? WHERE node_id = ? AND cidr = ? AND approved_seq IS NULL",
    )
    .bind(now)
    .bind(node_id)
    .bind(cidr)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

const ROUTE_SELECT: &str = "SELECT r.node_id, n.name AS node_name, r.cidr, r.approved_seq \
     FROM routes r JOIN nodes n ON n.id = r.node_id";

fn no_node(account: &Account, name: &str) -> StoreError {
    StoreError::NotFound(format!(
        "no node named {name:?} in account {:?}; see `trellis nodes list`",
        account.name
    ))
}

impl Store {
    /// The routes the nodes of `account_id` advertise now, approved or not,
    /// by subnet then node name.
    pub async fn list_routes(&self, account_id: i64) -> StoreResult<Vec<RouteEntry>> {
        let rows: Vec<RouteRow> = sqlx::query_as(&format!(
            "{ROUTE_SELECT} WHERE n.account_id = ? AND r.advertised = 1 ORDER BY r.cidr, n.name"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RouteEntry::try_from).collect()
    }

    /// The routes of `account_id` that are advertised and approved.
    pub async fn approved_routes(&self, account_id: i64) -> StoreResult<Vec<ApprovedRoute>> {
        Ok(self
            .list_routes(account_id)
            .await?
            .into_iter()
            .filter_map(|r| {
                r.approved_seq.map(|seq| ApprovedRoute {
                    node_id: r.node_id,
                    cidr: r.cidr,
                    seq,
                })
            })
            .collect())
    }

    /// Approves `cidr` as advertised by node `node_name`. Approving an
    /// approved route changes nothing.
    pub async fn approve_route(
        &self,
        account: &Account,
        node_name: &str,
        cidr: &Ipv4Net,
        now: i64,
        actor: &str,
    ) -> StoreResult<RouteEntry> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let node_id: Option<i64> = node_named(&mut tx, account.id, node_name).await?;
        let node_id = node_id.ok_or_else(|| no_node(account, node_name))?;
        let text = cidr.to_string();
        let advertised: Option<bool> =
            sqlx::query_scalar("SELECT advertised FROM routes WHERE node_id = ? AND cidr = ?")
                .bind(node_id)
                .bind(&text)
                .fetch_optional(&mut *tx)
                .await?;
        if advertised != Some(true) {
            return Err(StoreError::NotFound(format!(
                "node {node_name:?} does not advertise {cidr}; see `trellis routes list` (a node advertises subnets with `trellis join --advertise-routes`)"
            )));
        }
        if approve_in(&mut tx, node_id, &text, now).await? {
            audit::record(
                &mut tx,
                account.id,
                actor,
                action::ROUTE_APPROVE,
                &text,
                &format!("via node {node_name}"),
            )
            .await?;
        }
        let row: RouteRow = sqlx::query_as(&format!(
            "{ROUTE_SELECT} WHERE r.node_id = ? AND r.cidr = ?"
        ))
        .bind(node_id)
        .bind(&text)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        RouteEntry::try_from(row)
    }

    /// The extra DNS records of `account_id`, by name.
    pub async fn dns_records(&self, account_id: i64) -> StoreResult<Vec<(String, IpAddr)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, addr FROM dns_records WHERE account_id = ? ORDER BY name")
                .bind(account_id)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(name, addr)| {
                let ip = addr.parse().map_err(|_| {
                    StoreError::Corrupt(format!("DNS record {name:?} has address {addr:?}"))
                })?;
                Ok((name, ip))
            })
            .collect()
    }

    /// Adds an extra record `name` → `addr` to the account.
    pub async fn add_dns_record(
        &self,
        account: &Account,
        name: &str,
        addr: IpAddr,
        now: i64,
        actor: &str,
    ) -> StoreResult<()> {
        validate_record_name(name).map_err(StoreError::Invalid)?;
        validate_record_addr(&addr).map_err(StoreError::Invalid)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let node: Option<i64> = node_named(&mut tx, account.id, name).await?;
        if node.is_some() {
            return Err(StoreError::Conflict(format!(
                "{name:?} is the name of a node of account {:?}; pick another record name (or rename the node with `trellis nodes rename`)",
                account.name
            )));
        }
        let existing: Option<String> = record_named(&mut tx, account.id, name).await?;
        if let Some(addr) = existing {
            return Err(StoreError::Conflict(format!(
                "a record named {name:?} already exists (→ {addr}); remove it first with `trellis dns remove {name}`"
            )));
        }
        sqlx::query(
            "INSERT INTO dns_records (account_id, name, addr, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(account.id)
        .bind(name)
        .bind(addr.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::DNS_ADD,
            name,
            &format!("-> {addr}"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes the extra record `name`.
    pub async fn delete_dns_record(
        &self,
        account: &Account,
        name: &str,
        actor: &str,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let addr: Option<String> = sqlx::query_scalar(
            "DELETE FROM dns_records WHERE account_id = ? AND name = ? RETURNING addr",
        )
        .bind(account.id)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(addr) = addr else {
            return Err(StoreError::NotFound(format!(
                "no DNS record named {name:?} in account {:?}; see `trellis dns list`",
                account.name
            )));
        };
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::DNS_REMOVE,
            name,
            &format!("was -> {addr}"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Renames node `name` to `new_name`; returns the renamed node. Renaming
    /// to its own name changes nothing.
    pub async fn rename_node(
        &self,
        account: &Account,
        name: &str,
        new_name: &str,
        actor: &str,
    ) -> StoreResult<Node> {
        validate_name("node", new_name).map_err(StoreError::Invalid)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut node = node_row_named(&mut tx, account, name).await?;
        if name == new_name {
            return Ok(node);
        }
        let taken: Option<i64> = node_named(&mut tx, account.id, new_name).await?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "another node of account {:?} is already named {new_name:?}; pick another name",
                account.name
            )));
        }
        let record: Option<String> = record_named(&mut tx, account.id, new_name).await?;
        if let Some(addr) = record {
            return Err(StoreError::Conflict(format!(
                "{new_name:?} is already a DNS record of account {:?} (→ {addr}); pick another name or remove the record with `trellis dns remove {new_name}`",
                account.name
            )));
        }
        sqlx::query("UPDATE nodes SET name = ? WHERE id = ?")
            .bind(new_name)
            .bind(node.id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::NODE_RENAME,
            new_name,
            &format!("{name} -> {new_name}"),
        )
        .await?;
        tx.commit().await?;
        node.name = new_name.to_string();
        Ok(node)
    }

    /// Replaces the tags of node `name` (each checked like a name; duplicates
    /// dropped, order kept). Returns the node, and whether its tags changed.
    /// Disables (or enables) node `name`. Returns the node and whether
    /// anything changed; a change is in the audit log.
    pub async fn set_node_disabled(
        &self,
        account: &Account,
        name: &str,
        disabled: bool,
        actor: &str,
        now: i64,
    ) -> StoreResult<(Node, bool)> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut node = node_row_named(&mut tx, account, name).await?;
        if node.disabled == disabled {
            return Ok((node, false));
        }
        sqlx::query("UPDATE nodes SET disabled_at = ? WHERE id = ?")
            .bind(disabled.then_some(now))
            .bind(node.id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            account.id,
            actor,
            if disabled {
                action::NODE_DISABLE
            } else {
                action::NODE_ENABLE
            },
            name,
            "",
        )
        .await?;
        tx.commit().await?;
        node.disabled = disabled;
        Ok((node, true))
    }

    pub async fn set_node_tags(
        &self,
        account: &Account,
        name: &str,
        tags: &[String],
        actor: &str,
    ) -> StoreResult<(Node, bool)> {
        let mut clean: Vec<String> = Vec::with_capacity(tags.len());
        for t in tags {
            validate_name("tag", t).map_err(StoreError::Invalid)?;
            if !clean.contains(t) {
                clean.push(t.clone());
            }
        }
        if clean.len() > MAX_NODE_TAGS {
            return Err(StoreError::Invalid(format!(
                "{} tags given; a node carries at most {MAX_NODE_TAGS}",
                clean.len()
            )));
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut node = node_row_named(&mut tx, account, name).await?;
        if node.tags == clean {
            return Ok((node, false));
        }
        let json =
            serde_json::to_string(&clean).map_err(|e| StoreError::Invalid(format!("tags: {e}")))?;
        sqlx::query("UPDATE nodes SET tags = ? WHERE id = ?")
            .bind(&json)
            .bind(node.id)
            .execute(&mut *tx)
            .await?;
        let old = serde_json::to_string(&node.tags).unwrap_or_default();
        audit::record(
            &mut tx,
            account.id,
            actor,
            action::NODE_TAG,
            name,
            &format!("{old} -> {json}"),
        )
        .await?;
        tx.commit().await?;
        node.tags = clean;
        Ok((node, true))
    }
}

/// Every address the account's bindings hold or held (revoked ones
/// included: an address is never handed out twice).
pub(crate) async fn binding_ips(
    conn: &mut sqlx::SqliteConnection,
    account_id: i64,
) -> StoreResult<HashSet<Ipv4Addr>> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT ip FROM bindings WHERE account_id = ?")
        .bind(account_id)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|ip| {
            ip.parse()
                .map_err(|_| StoreError::Corrupt(format!("a binding has ip {ip:?}")))
        })
        .collect()
}

/// Every address the account's nodes and bindings hold (see [`binding_ips`]).
pub(crate) async fn used_ips(
    conn: &mut sqlx::SqliteConnection,
    account_id: i64,
) -> StoreResult<HashSet<Ipv4Addr>> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT ip FROM nodes WHERE account_id = ?")
        .bind(account_id)
        .fetch_all(&mut *conn)
        .await?;
    let mut used = binding_ips(conn, account_id).await?;
    for ip in rows {
        used.insert(
            ip.parse()
                .map_err(|_| StoreError::Corrupt(format!("a node has ip {ip:?}")))?,
        );
    }
    Ok(used)
}

/// The node called `name` in `account`, or a NotFound that says so.
async fn node_row_named(
    tx: &mut sqlx::SqliteConnection,
    account: &Account,
    name: &str,
) -> StoreResult<Node> {
    let row: Option<NodeRow> = sqlx::query_as(&format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE account_id = ? AND name = ?"
    ))
    .bind(account.id)
    .bind(name)
    .fetch_optional(tx)
    .await?;
    match row {
        Some(r) => Node::try_from(r),
        None => Err(no_node(account, name)),
    }
}

/// The id of the node called `name` in an account, if any.
async fn node_named(
    tx: &mut sqlx::SqliteConnection,
    account_id: i64,
    name: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM nodes WHERE account_id = ? AND name = ?")
        .bind(account_id)
        .bind(name)
        .fetch_optional(tx)
        .await
}

/// The address of the DNS record called `name` in an account, if any.
async fn record_named(
    tx: &mut sqlx::SqliteConnection,
    account_id: i64,
    name: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT addr FROM dns_records WHERE account_id = ? AND name = ?")
        .bind(account_id)
        .bind(name)
        .fetch_optional(tx)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn ip_allocation_skips_gateway_network_and_broadcast() {
        let cidr = net("100.64.0.0/29");
        let mut used = HashSet::new();
        let mut got = Vec::new();
        while let Some(ip) = lowest_free_ip(&cidr, &used) {
            used.insert(ip);
            got.push(ip.to_string());
        }
        assert_eq!(
            got,
            [
                "100.64.0.2",
                "100.64.0.3",
                "100.64.0.4",
                "100.64.0.5",
                "100.64.0.6"
            ]
        );
        used.remove(&"100.64.0.4".parse().unwrap());
        assert_eq!(
            lowest_free_ip(&cidr, &used),
            Some("100.64.0.4".parse().unwrap())
        );
    }

    #[test]
    fn blocks_and_cidr_checks() {
        assert_eq!(next_free_block(&[]), Some(net("100.64.0.0/16")));
        assert_eq!(
            next_free_block(&[net("100.64.0.0/16"), net("100.65.128.0/24")]),
            Some(net("100.66.0.0/16"))
        );
        assert_eq!(
            next_free_block(&[net("100.64.0.0/10")]),
            None,
            "a /10 account takes all"
        );
        assert!(validate_cidr(&net("100.65.0.0/16")).is_ok());
        assert!(validate_cidr(&net("10.0.0.0/16")).is_err());
        assert!(validate_cidr(&net("100.64.0.0/30")).is_err());
        assert!(validate_cidr(&net("100.65.1.0/16")).is_err());
    }

    #[test]
    fn names_get_suffixes() {
        let mut taken = HashSet::new();
        assert_eq!(unique_name("db", &taken), "db");
        taken.insert("db".to_string());
        assert_eq!(unique_name("db", &taken), "db-2");
        taken.insert("db-2".to_string());
        assert_eq!(unique_name("db", &taken), "db-3");
        let long = "a".repeat(63);
        taken.insert(long.clone());
        let n = unique_name(&long, &taken);
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("-2"));
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn hashes_are_hex_sha256() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = new_secret("x_");
        assert!(a.starts_with("x_") && a.len() > 40 && a != new_secret("x_"));
    }
}
