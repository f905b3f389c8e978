//! The REST API under `/api/v1` and its OpenAPI document.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::SocketAddr;
use trellis_proto::{
    validate_name, AccountInfo, ApiError, ApproveRouteRequest, CreateAccountRequest,
    CreateAccountResponse, CreateTokenRequest, CreateTokenResponse, DnsRecordInfo, EnrollRequest,
    EnrollResponse, NodeInfo, RenameNodeRequest, RouteInfo,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::map::{endpoints, Hub};
use crate::mesh::{
    account_domain, validate_record_addr, validate_record_name, validate_routes, MAX_FQDN,
};
use crate::relay::{self, Relay};
use crate::store::{validate_cidr, Account, Enrollment, Node, Store, StoreError};
use crate::stream;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub relay: Arc<Relay>,
    /// Suffix of every account's domain (`ACCOUNT.SUFFIX`).
    pub dns_suffix: Arc<str>,
    /// Live feed of newly stored flow records.
    pub flows: Arc<crate::flows::FlowBus>,
    /// The dashboard's in-memory state (URL, login rate limit).
    pub dash: Arc<crate::dashboard::DashState>,
    /// How long flow records are kept (shown on the dashboard's settings page).
    pub flow_retention: std::time::Duration,
    /// The fetch gateway, when this server runs one.
    pub gateway: Option<Arc<crate::bindings::GatewayFront>>,
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A failed API call: a status and a sentence a person can act on.
#[derive(Debug)]
pub struct ApiErr {
    pub status: StatusCode,
    pub message: String,
}

impl ApiErr {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiErr {
        ApiErr {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> ApiErr {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            StoreError::Forbidden(_) => StatusCode::FORBIDDEN,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::Corrupt(_) | StoreError::Db(_) => {
                tracing::error!(error = %e, "store failure");
                return ApiErr::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the control plane's database failed; see the server log",
                );
            }
        };
        ApiErr::new(status, e.to_string())
    }
}

/// A JSON body whose every problem becomes a 400 with a readable message.
/// An empty body counts as `{}`. The Content-Type header is not required.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiErr;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiErr> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiErr::new(
                e.status(),
                format!("could not read the body: {}", e.body_text()),
            )
        })?;
        let text: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(ApiJson)
            .map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty()).then_some(rest)
}

#[derive(Deserialize)]
struct AccountQuery {
    account: Option<String>,
}

/// An authenticated admin call: the account it acts on, whether the key is
/// the operator's, and who acts (for the audit log).
pub struct Admin {
    pub account: Account,
    pub operator: bool,
    /// `operator`, or `account-key:ACCOUNT` for an account's own key.
    pub actor: String,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiErr> {
        let key = bearer(&parts.headers).ok_or_else(|| {
            ApiErr::new(
                StatusCode::UNAUTHORIZED,
                "missing API key: send `Authorization: Bearer <key>` (the operator key is in the server's DATA_DIR/admin.key)",
            )
        })?;
        let (own, operator, key_id) = state.store.auth_api_key(key).await?.ok_or_else(|| {
            ApiErr::new(
                StatusCode::UNAUTHORIZED,
                "API key not recognised — check it was copied whole (the operator key is in the server's DATA_DIR/admin.key)",
            )
        })?;
        let query =
            Query::<AccountQuery>::try_from_uri(&parts.uri).map_err(|e: QueryRejection| {
                ApiErr::new(
                    StatusCode::BAD_REQUEST,
                    format!("bad query string: {}", e.body_text()),
                )
            })?;
        let actor = if operator {
            "operator".to_string()
        } else {
            format!("account-key:{}#{key_id}", own.name)
        };
        let account = match query.0.account {
            None => own,
            Some(name) if name == own.name => own,
            Some(name) if operator => {
                state.store.account_by_name(&name).await?.ok_or_else(|| {
                    ApiErr::new(
                        StatusCode::NOT_FOUND,
                        format!("no account named {name:?}; see GET /api/v1/accounts"),
                    )
                })?
            }
            Some(name) => {
                return Err(ApiErr::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "this API key belongs to account {:?} and cannot act on account {name:?}",
                        own.name
                    ),
                ))
            }
        };
        Ok(Admin {
            account,
            operator,
            actor,
        })
    }
}

fn require_operator(admin: &Admin) -> Result<(), ApiErr> {
    if admin.operator {
        Ok(())
    } else {
        Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            "only the operator key (the server's DATA_DIR/admin.key) may create or list accounts",
        ))
    }
}

fn account_info(a: &Account) -> AccountInfo {
    AccountInfo {
        name: a.name.clone(),
        cidr: a.cidr,
        created_at: a.created_at,
    }
}

/// Liveness check.
#[utoipa::path(get, path = "/api/v1/health", tag = "meta",
    responses((status = 200, description = "The server is up: {\"ok\":true}")))]
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true }))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document of this API")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Creates an account (operator key only). The response holds the account's admin key, shown once.
#[utoipa::path(post, path = "/api/v1/accounts", tag = "accounts",
    request_body = CreateAccountRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = CreateAccountResponse),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_account(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<CreateAccountRequest>,
) -> Result<(StatusCode, Json<CreateAccountResponse>), ApiErr> {
    require_operator(&admin)?;
    validate_name("account", &req.name).map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    if let Some(c) = &req.cidr {
        validate_cidr(c).map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    }
    let (account, api_key) = st
        .store
        .create_account(&req.name, req.cidr, now(), &admin.actor)
        .await?;
    tracing::info!(account = %account.name, cidr = %account.cidr, "account created");
    Ok((
        StatusCode::CREATED,
        Json(CreateAccountResponse {
            account: account_info(&account),
            api_key,
        }),
    ))
}

/// Lists all accounts (operator key only).
#[utoipa::path(get, path = "/api/v1/accounts", tag = "accounts",
    security(("bearer" = [])),
    responses((status = 200, body = Vec<AccountInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_accounts(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<AccountInfo>>, ApiErr> {
    require_operator(&admin)?;
    let accounts = st.store.list_accounts().await?;
    Ok(Json(accounts.iter().map(account_info).collect()))
}

/// Creates a join token. The token is shown once.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    request_body = CreateTokenRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 201, body = CreateTokenResponse),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn create_token(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreateTokenResponse>), ApiErr> {
    let ttl = req.ttl_secs.unwrap_or(3600);
    let (id, token, expires_at) = st
        .store
        .create_token(
            admin.account.id,
            req.reusable,
            req.routes_auto_approve,
            ttl,
            &req.tags,
            now(),
            &admin.actor,
        )
        .await?;
    tracing::info!(
        account = %admin.account.name,
        reusable = req.reusable,
        routes_auto_approve = req.routes_auto_approve,
        "join token created"
    );
    Ok((
        StatusCode::CREATED,
        Json(CreateTokenResponse {
            token,
            id,
            account: admin.account.name,
            reusable: req.reusable,
            expires_at,
        }),
    ))
}

/// Lists the account's nodes.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<NodeInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_nodes(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<NodeInfo>>, ApiErr> {
    let nodes = st.store.list_nodes(admin.account.id).await?;
    let out = nodes
        .iter()
        .map(|n| node_info(&st, &admin.account, n))
        .collect();
    Ok(Json(out))
}

pub(crate) fn node_info(st: &AppState, account: &Account, n: &Node) -> NodeInfo {
    let online = st.hub.is_online(n.id);
    NodeInfo {
        id: n.id,
        name: n.name.clone(),
        account: account.name.clone(),
        ip: n.ip,
        public_key: n.public_key,
        online,
        // A connected node is being seen right now.
        last_seen: if online { Some(now()) } else { n.last_seen },
        created_at: n.created_at,
        os: n.os.clone(),
        version: n.version.clone(),
        tags: n.tags.clone(),
        disabled: n.disabled,
        endpoints: endpoints(n),
        peer_paths: if online {
            st.hub.peer_paths(n.id)
        } else {
            Vec::new()
        },
    }
}

/// Renames a node. The node gets its new name at once, its peers and
/// everyone's DNS names follow.
#[utoipa::path(patch, path = "/api/v1/nodes/{name}", tag = "nodes",
    request_body = RenameNodeRequest,
    params(("name" = String, Path, description = "Current node name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = NodeInfo),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn rename_node(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<RenameNodeRequest>,
) -> Result<Json<NodeInfo>, ApiErr> {
    validate_name("node", &req.name).map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    let node = st
        .store
        .rename_node(&admin.account, &name, &req.name, &admin.actor)
        .await?;
    if name != node.name {
        st.hub.notify(admin.account.id);
        tracing::info!(account = %admin.account.name, from = %name, to = %node.name, "node renamed");
    }
    Ok(Json(node_info(&st, &admin.account, &node)))
}

/// The routes of an account, with which node is primary for each subnet now.
async fn route_infos(st: &AppState, account: &Account) -> Result<Vec<RouteInfo>, ApiErr> {
    let routes = st.store.list_routes(account.id).await?;
    let approved = st.store.approved_routes(account.id).await?;
    let online = st.hub.online_in(account.id);
    let primaries = st.hub.primaries(account.id, &approved, &online);
    Ok(routes
        .into_iter()
        .map(|r| RouteInfo {
            primary: primaries.get(&r.cidr) == Some(&r.node_id),
            online: online.contains(&r.node_id),
            approved: r.approved_seq.is_some(),
            node: r.node_name,
            cidr: r.cidr,
        })
        .collect())
}

/// Lists the subnets the account's nodes advertise, approved or not. Of the
/// nodes with a subnet approved, the first approved that is online is primary
/// (it carries the subnet); when none is online the last primary stays.
#[utoipa::path(get, path = "/api/v1/routes", tag = "routes",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<RouteInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_routes(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<RouteInfo>>, ApiErr> {
    Ok(Json(route_infos(&st, &admin.account).await?))
}

/// Approves a subnet a node advertises: it is routed into the mesh through
/// that node (when it is primary). The approval survives re-advertisement.
#[utoipa::path(post, path = "/api/v1/routes/approve", tag = "routes",
    request_body = ApproveRouteRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = RouteInfo),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn approve_route(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<ApproveRouteRequest>,
) -> Result<Json<RouteInfo>, ApiErr> {
    if req.cidr.addr() != req.cidr.network() {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{} has host bits set; did you mean {}?",
                req.cidr,
                req.cidr.trunc()
            ),
        ));
    }
    let entry = st
        .store
        .approve_route(&admin.account, &req.node, &req.cidr, now(), &admin.actor)
        .await?;
    st.hub.notify(admin.account.id);
    tracing::info!(account = %admin.account.name, node = %req.node, cidr = %req.cidr, "route approved");
    let infos = route_infos(&st, &admin.account).await?;
    let info = infos
        .into_iter()
        .find(|r| r.cidr == entry.cidr && r.node == entry.node_name)
        .ok_or_else(|| {
            ApiErr::new(
                StatusCode::CONFLICT,
                format!(
                    "node {:?} stopped advertising {} while it was being approved; the approval is kept for when it advertises it again",
                    req.node, req.cidr
                ),
            )
        })?;
    Ok(Json(info))
}

/// Lists the account's extra DNS records (node names are always there too).
#[utoipa::path(get, path = "/api/v1/dns", tag = "dns",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<DnsRecordInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_dns(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<DnsRecordInfo>>, ApiErr> {
    let domain = account_domain(&admin.account.name, &st.dns_suffix);
    let records = st.store.dns_records(admin.account.id).await?;
    Ok(Json(
        records
            .into_iter()
            .map(|(name, addr)| DnsRecordInfo {
                fqdn: format!("{name}.{domain}"),
                name,
                addr,
            })
            .collect(),
    ))
}

/// Adds an extra DNS record: `name` (relative, e.g. `db` or `db.prod`)
/// answers as `NAME.ACCOUNT.SUFFIX` on every node of the account. `fqdn` is
/// ignored on input.
#[utoipa::path(post, path = "/api/v1/dns", tag = "dns",
    request_body = DnsRecordInfo,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 201, body = DnsRecordInfo),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 409, body = ApiError)))]
pub async fn add_dns(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<DnsRecordInfo>,
) -> Result<(StatusCode, Json<DnsRecordInfo>), ApiErr> {
    let bad = |e: String| ApiErr::new(StatusCode::BAD_REQUEST, e);
    validate_record_name(&req.name).map_err(bad)?;
    validate_record_addr(&req.addr).map_err(bad)?;
    let domain = account_domain(&admin.account.name, &st.dns_suffix);
    let fqdn = format!("{}.{domain}", req.name);
    if fqdn.len() > MAX_FQDN {
        return Err(bad(format!(
            "{fqdn} is {} characters long; a DNS name holds at most {MAX_FQDN}: use a shorter record name",
            fqdn.len()
        )));
    }
    st.store
        .add_dns_record(&admin.account, &req.name, req.addr, now(), &admin.actor)
        .await?;
    st.hub.notify(admin.account.id);
    tracing::info!(account = %admin.account.name, %fqdn, addr = %req.addr, "DNS record added");
    Ok((
        StatusCode::CREATED,
        Json(DnsRecordInfo {
            name: req.name,
            addr: req.addr,
            fqdn,
        }),
    ))
}

/// Removes an extra DNS record.
#[utoipa::path(delete, path = "/api/v1/dns/{name}", tag = "dns",
    params(("name" = String, Path, description = "Record name, relative to the account's domain"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 204, description = "Removed"),
        (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn delete_dns(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiErr> {
    st.store
        .delete_dns_record(&admin.account, &name, &admin.actor)
        .await?;
    st.hub.notify(admin.account.id);
    tracing::info!(account = %admin.account.name, record = %name, "DNS record removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a node. Its key is revoked for good; its peers and its own stream are told at once.
#[utoipa::path(delete, path = "/api/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "Node name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 204, description = "Deleted"),
        (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn delete_node(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiErr> {
    let node = st
        .store
        .delete_node(&admin.account, &name, now(), &admin.actor)
        .await?;
    st.relay.hub.revoke(&node.public_key.0);
    st.hub.kick(
        node.id,
        &format!("node {:?} was deleted by an admin", node.name),
    );
    st.hub.notify(admin.account.id);
    tracing::info!(account = %admin.account.name, node = %node.name, "node deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Enrolls a node with a join token (no header auth). The node secret is shown once.
#[utoipa::path(post, path = "/api/v1/enroll", tag = "nodes",
    request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn enroll(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiErr> {
    let advertise_routes = validate_routes(&req.advertise_routes)
        .map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    let enrollment = Enrollment {
        advertise_routes,
        token: req.token,
        public_key: req.public_key,
        name: req.name,
        hostname: req.hostname,
        os: req.os,
        version: req.version,
    };
    let done = st.store.enroll(&enrollment, now()).await?;
    st.hub.notify(done.account.id);
    tracing::info!(account = %done.account.name, node = %done.node.name, ip = %done.node.ip, "node enrolled");
    Ok(Json(EnrollResponse {
        node_id: done.node.id,
        name: done.node.name,
        account: done.account.name,
        ip: done.node.ip,
        cidr: done.account.cidr,
        node_secret: done.secret,
    }))
}

/// The node's control stream: a WebSocket of JSON `NodeMessage` (node → server)
/// and `ServerMessage` (server → node) text frames. Auth: `Bearer <node_secret>`.
#[utoipa::path(get, path = "/api/v1/node/stream", tag = "nodes",
    security(("bearer" = [])),
    responses((status = 101, description = "Switching to the WebSocket control stream"),
        (status = 401, body = ApiError)))]
pub async fn node_stream(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiErr> {
    let node = node_auth(&st, &headers).await?;
    let ws = upgrade(ws)?;
    let ended = StreamEnded::start(st.hub.clone());
    Ok(ws
        .max_message_size(MAX_STREAM_MESSAGE)
        .on_upgrade(move |socket| async move {
            let _ended = ended;
            stream::run(st, node, peer.ip(), socket).await;
        }))
}

/// The TCP relay for nodes whose UDP is blocked: a WebSocket of binary
/// messages, each one relay frame (`RELAY_SEND` from the node, `RELAY_RECV`
/// to it; see trellis_proto::frames). Auth: `Bearer <node_secret>`.
#[utoipa::path(get, path = "/api/v1/relay", tag = "nodes",
    security(("bearer" = [])),
    responses((status = 101, description = "Switching to the WebSocket relay"),
        (status = 401, body = ApiError)))]
pub async fn relay_ws(
    State(st): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiErr> {
    let node = node_auth(&st, &headers).await?;
    let ws = upgrade(ws)?;
    let ended = StreamEnded::start(st.hub.clone());
    Ok(ws
        .max_message_size(MAX_RELAY_MESSAGE)
        .on_upgrade(move |socket| async move {
            let _ended = ended;
            relay::run(st, node, socket).await;
        }))
}

/// Counts a WebSocket task from before the upgrade until it is dropped: at the
/// end of the task, or with the upgrade callback if the upgrade failed.
struct StreamEnded(Arc<Hub>);

impl StreamEnded {
    fn start(hub: Arc<Hub>) -> StreamEnded {
        hub.stream_started();
        StreamEnded(hub)
    }
}

impl Drop for StreamEnded {
    fn drop(&mut self) {
        self.0.stream_ended();
    }
}

fn upgrade(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, ApiErr> {
    ws.map_err(|e| {
        ApiErr::new(
            e.status(),
            format!("this endpoint needs a WebSocket upgrade: {}", e.body_text()),
        )
    })
}

/// The node presenting `Authorization: Bearer <node_secret>`.
async fn node_auth(st: &AppState, headers: &HeaderMap) -> Result<Node, ApiErr> {
    let secret = bearer(headers).ok_or_else(|| {
        ApiErr::new(
            StatusCode::UNAUTHORIZED,
            "missing node credential: send `Authorization: Bearer <node_secret>`",
        )
    })?;
    let node = st.store.node_by_secret(secret).await?.ok_or_else(|| {
        ApiErr::new(
            StatusCode::UNAUTHORIZED,
            "node credential not recognised: this node was removed or never enrolled; enroll again with a new join token",
        )
    })?;
    Ok(node)
}

/// Largest control-stream message a node may send: a full batch of flow
/// records (5,000 of them, a few hundred bytes each) fits.
const MAX_STREAM_MESSAGE: usize = 4 * 1024 * 1024;
/// Largest relay message: a relay header and a whole UDP payload.
const MAX_RELAY_MESSAGE: usize = trellis_proto::frames::RELAY_HEADER + 65_535;

async fn method_not_allowed() -> ApiErr {
    ApiErr::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not take that HTTP method; see /api/v1/openapi.json",
    )
}

async fn not_found() -> ApiErr {
    ApiErr::new(
        StatusCode::NOT_FOUND,
        "no such API endpoint; see /api/v1/openapi.json",
    )
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Trellis control plane", description = "Accounts, join tokens, nodes, subnet routes, DNS names, bindings (the fetch gateway's credentials) and the node control stream of a Trellis mesh."),
    paths(health, openapi_json, create_account, list_accounts, create_token, list_nodes,
        delete_node, rename_node, list_routes, approve_route, list_dns, add_dns, delete_dns,
        enroll, node_stream, relay_ws, crate::flows::list_flows, crate::flows::stream_flows,
        crate::flows::traffic,
        crate::tokens::list_tokens, crate::tokens::revoke_token, crate::tokens::set_node_tags,
        crate::tokens::disable_node, crate::tokens::enable_node,
        crate::keys::list_keys, crate::keys::create_key, crate::keys::revoke_key,
        crate::policy::get_policy, crate::policy::put_policy, crate::policy::policy_history,
        crate::policy::restore_policy, crate::policy::test_policy, crate::audit::list_audit,
        crate::probe::probe_node, crate::dashboard::create_admin, crate::dashboard::list_admins,
        crate::bindings::create_binding, crate::bindings::list_bindings,
        crate::bindings::get_binding, crate::bindings::revoke_binding,
        crate::bindings::list_requests),
    components(schemas(ApiError, AccountInfo, CreateAccountRequest, CreateAccountResponse,
        CreateTokenRequest, CreateTokenResponse, NodeInfo, trellis_proto::PeerPath, EnrollRequest, EnrollResponse,
        RouteInfo, ApproveRouteRequest, DnsRecordInfo, RenameNodeRequest,
        trellis_proto::FlowLogPage, trellis_proto::FlowLogRecord, trellis_proto::TrafficSummary,
        trellis_proto::TokenInfo, trellis_proto::SetTagsRequest, trellis_proto::PolicyInfo,
        trellis_proto::SetPolicyRequest, trellis_proto::SetPolicyResponse,
        trellis_proto::PolicyProblem, trellis_proto::PolicyRejected,
        trellis_proto::PolicyVersionInfo, trellis_proto::RestorePolicyRequest,
        trellis_proto::PolicyTestRequest, trellis_proto::PolicyTestResponse,
        trellis_proto::AuditEntry, trellis_proto::ApiKeyInfo,
        trellis_proto::CreateApiKeyRequest, trellis_proto::CreateApiKeyResponse,
        crate::probe::ProbeRequest, crate::probe::ProbeOutcome,
        crate::dashboard::CreateAdminRequest, crate::dashboard::AdminInfo,
        trellis_proto::CreateBindingRequest, trellis_proto::CreateBindingResponse,
        trellis_proto::BindingInfo, trellis_proto::RequestLogPage,
        trellis_proto::RequestLogRecord)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json))
        .route("/accounts", post(create_account).get(list_accounts))
        .route("/tokens", post(create_token))
        .route("/nodes", get(list_nodes))
        .route("/nodes/{name}", delete(delete_node).patch(rename_node))
        .route("/routes", get(list_routes))
        .route("/routes/approve", post(approve_route))
        .route("/dns", get(list_dns).post(add_dns))
        .route("/dns/{name}", delete(delete_dns))
        .route("/tokens", get(crate::tokens::list_tokens))
        .route(
            "/keys",
            get(crate::keys::list_keys).post(crate::keys::create_key),
        )
        .route("/keys/{id}", delete(crate::keys::revoke_key))
        .route("/tokens/{id}", delete(crate::tokens::revoke_token))
        .route("/nodes/{name}/tags", put(crate::tokens::set_node_tags))
        .route("/nodes/{name}/disable", post(crate::tokens::disable_node))
        .route("/nodes/{name}/enable", post(crate::tokens::enable_node))
        .route("/nodes/{name}/probe", post(crate::probe::probe_node))
        .route(
            "/policy",
            get(crate::policy::get_policy).put(crate::policy::put_policy),
        )
        .route("/policy/history", get(crate::policy::policy_history))
        .route("/policy/restore", post(crate::policy::restore_policy))
        .route("/policy/test", post(crate::policy::test_policy))
        .route("/audit", get(crate::audit::list_audit))
        .route(
            "/admins",
            get(crate::dashboard::list_admins).post(crate::dashboard::create_admin),
        )
        .route("/enroll", post(enroll))
        .route("/node/stream", get(node_stream))
        .route("/relay", get(relay_ws))
        .route("/logs/flows", get(crate::flows::list_flows))
        .route("/logs/flows/stream", get(crate::flows::stream_flows))
        .route("/logs/summary", get(crate::flows::traffic))
        .route("/logs/requests", get(crate::bindings::list_requests))
        .route(
            "/bindings",
            get(crate::bindings::list_bindings).post(crate::bindings::create_binding),
        )
        .route(
            "/bindings/{name}",
            get(crate::bindings::get_binding).delete(crate::bindings::revoke_binding),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/api/v1", api)
        .merge(crate::dashboard::router())
        .with_state(state)
}
