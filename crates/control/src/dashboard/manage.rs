//! Management pages: devices, join tokens, subnet routes, admins and API
//! keys, settings. Every change goes through the same store functions as the
//! REST API, names the dashboard admin in the audit log (`admin:EMAIL`),
//! tells the account's nodes (like the API handler does) and acts only on the
//! session's account.

// Handlers pass finished pages (an error page, a redirect) up as `Err(Response)`.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use ipnet::Ipv4Net;
use serde::Deserialize;
use trellis_proto::validate_name;

use super::{
    auth, csrf_refused, form, join_command, message, need_session, render, store_failed, to,
    CsrfForm, Nav, Sess,
};
use crate::api::{node_info, now, ApiErr, AppState};
use crate::dashboard::db::{check_password, normalize_email};
use crate::store::{rfc3339, Account, Node, StoreError};

/// The join-token lifetimes the token form offers: (form value, label, seconds).
const TTLS: [(&str, &str, u64); 3] = [
    ("1h", "1 hour", 3600),
    ("24h", "24 hours", 24 * 3600),
    ("7d", "7 days", 7 * 24 * 3600),
];

/// The management pages' routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices", get(devices_page))
        .route("/devices/{name}", get(device_page))
        .route("/devices/{name}/rename", post(device_rename))
        .route("/devices/{name}/tags", post(device_tags))
        .route("/devices/{name}/disable", post(device_disable))
        .route("/devices/{name}/enable", post(device_enable))
        .route(
            "/devices/{name}/delete",
            get(device_delete_page).post(device_delete),
        )
        .route("/tokens", get(tokens_page).post(token_create))
        .route("/tokens/{id}/revoke", post(token_revoke))
        .route("/routes", get(routes_page))
        .route("/routes/approve", post(route_approve))
        .route("/access", get(access_page))
        .route("/access/keys", post(key_create))
        .route("/access/keys/{id}/revoke", post(key_revoke))
        .route("/access/admins", post(admin_create))
        .route("/settings", get(settings_page))
}

macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

/// Who acts, for the audit log.
/// The audit log's name for the signed-in admin (the same as the wizard's).
fn actor(s: &Sess) -> String {
    s.actor()
}

/// The session, the CSRF check and the parsed form of a POST.
pub(super) async fn posted<T: for<'de> Deserialize<'de>>(
    st: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Sess, T), Response> {
    let s = need_session(st, headers).await?;
    let c: CsrfForm = form(body)?;
    if !s.csrf_ok(&c.csrf) {
        return Err(csrf_refused());
    }
    let f: T = form(body)?;
    Ok((s, f))
}

/// A store error a person can act on becomes `Err(message)`; others a failure page.
fn readable(e: StoreError) -> Result<String, Response> {
    match e {
        StoreError::Invalid(m)
        | StoreError::Conflict(m)
        | StoreError::NotFound(m)
        | StoreError::Forbidden(m)
        | StoreError::Unauthorized(m) => Ok(m),
        e => Err(store_failed(e)),
    }
}

fn api_readable(e: ApiErr) -> Result<(StatusCode, String), Response> {
    if e.status.is_server_error() {
        tracing::error!(error = %e.message, "dashboard: action failed");
        return Err(message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            "The server's database failed; see the server log.",
            None,
        ));
    }
    Ok((e.status, e.message))
}

/// Splits "a, b,,c" into tags and checks each.
pub(super) fn parse_tags(raw: &str) -> Result<Vec<String>, String> {
    let mut tags: Vec<String> = Vec::new();
    for t in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let t = t.to_lowercase();
        validate_name("tag", &t).map_err(|e| format!("{e} (separate tags with commas)"))?;
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    Ok(tags)
}

/// "30 days", "12 hours", "45 minutes", "10 seconds".
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = if s >= 86_400 && s.is_multiple_of(86_400) {
        (s / 86_400, "day")
    } else if s >= 3600 && s.is_multiple_of(3600) {
        (s / 3600, "hour")
    } else if s >= 60 && s.is_multiple_of(60) {
        (s / 60, "minute")
    } else {
        (s, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// The sentence for `?done=CODE` after a change (a fixed set: nothing is echoed).
fn done_text(code: Option<&str>) -> Option<String> {
    let t = match code? {
        "renamed" => "The device was renamed. Its peers and DNS names follow within a second.",
        "tagged" => "The tags were saved. Policies that name them apply within a second.",
        "disabled" => "The device was disabled: no peer accepts its packets any more.",
        "enabled" => "The device was enabled again.",
        "deleted" => "The device was deleted and its key revoked.",
        "revoked" => "The join token was revoked: nothing can join with it any more.",
        "approved" => "The route was approved.",
        "key-revoked" => "The API key was revoked.",
        "admin-added" => "The admin was added. They can log in now.",
        _ => return None,
    };
    Some(t.to_string())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DoneQuery {
    done: Option<String>,
}

// ---- devices ----

/// One device row of the devices pages.
pub struct ManagedDevice {
    pub name: String,
    pub ip: String,
    pub online: bool,
    pub last_seen: String,
    pub last_seen_at: String,
    pub os: String,
    pub version: String,
    pub tags: String,
    pub disabled: bool,
    pub created: String,
    /// The device's last report of its path to each peer (online devices only).
    pub paths: Vec<PathRow>,
}

/// One row of a device's "Paths to peers" table.
pub struct PathRow {
    pub peer: String,
    /// The raw path kind: direct, relay-udp, relay-tcp or none.
    pub kind: String,
    /// The path in plain words.
    pub path: String,
    pub last_handshake: String,
}

/// A path kind as a node reports it, in plain words.
fn path_words(kind: &str) -> String {
    match kind {
        "direct" => "direct".to_string(),
        "relay-udp" => "through the relay (UDP)".to_string(),
        "relay-tcp" => "through the relay (TCP)".to_string(),
        "none" | "" => "no connection yet".to_string(),
        other => other.to_string(),
    }
}

fn handshake_words(secs: Option<u64>) -> String {
    match secs {
        None => "never".to_string(),
        Some(s) => super::ago(s.min(i64::MAX as u64) as i64, 0),
    }
}

fn managed(st: &AppState, account: &Account, n: &Node) -> ManagedDevice {
    let info = node_info(st, account, n);
    ManagedDevice {
        last_seen: match info.last_seen {
            _ if info.online => "now".to_string(),
            Some(t) => super::ago(now(), t),
            None => "never".to_string(),
        },
        last_seen_at: info.last_seen.map(rfc3339).unwrap_or_default(),
        name: info.name,
        ip: info.ip.to_string(),
        online: info.online,
        os: info.os,
        version: info.version,
        tags: info.tags.join(", "),
        disabled: info.disabled,
        created: rfc3339(info.created_at),
        paths: info
            .peer_paths
            .iter()
            .map(|p| PathRow {
                peer: p.name.clone(),
                kind: p.path.clone(),
                path: path_words(&p.path),
                last_handshake: handshake_words(p.last_handshake_secs),
            })
            .collect(),
    }
}

#[derive(Template)]
#[template(path = "manage_devices.html")]
pub struct DevicesListPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub devices: Vec<ManagedDevice>,
    pub online: usize,
    pub notice: Option<String>,
}

async fn devices_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DoneQuery>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let nodes = attempt!(st
        .store
        .list_nodes(s.account().id)
        .await
        .map_err(store_failed));
    let devices: Vec<ManagedDevice> = nodes.iter().map(|n| managed(&st, s.account(), n)).collect();
    render(
        StatusCode::OK,
        &DevicesListPage {
            nav: s.nav("devices"),
            csrf: s.row.csrf.clone(),
            online: devices.iter().filter(|d| d.online).count(),
            devices,
            notice: done_text(q.done.as_deref()),
        },
    )
}

#[derive(Template)]
#[template(path = "manage_device.html")]
pub struct DevicePage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub device: ManagedDevice,
    /// The rename field's value.
    pub new_name: String,
    /// The tags field's value.
    pub tags: String,
    pub error: Option<String>,
}

/// The session's node named `name`, or a 404 page.
async fn find_node(st: &AppState, s: &Sess, name: &str) -> Result<Node, Response> {
    let nodes = st
        .store
        .list_nodes(s.account().id)
        .await
        .map_err(store_failed)?;
    nodes.into_iter().find(|n| n.name == name).ok_or_else(|| {
        message(
            StatusCode::NOT_FOUND,
            "No such device",
            &format!(
                "There is no device named {name:?} in this network. It may have been renamed or deleted; see the devices page."
            ),
            s.nav("devices"),
        )
    })
}

fn device_render(
    st: &AppState,
    s: &Sess,
    node: &Node,
    status: StatusCode,
    new_name: Option<String>,
    tags: Option<String>,
    error: Option<String>,
) -> Response {
    let device = managed(st, s.account(), node);
    render(
        status,
        &DevicePage {
            nav: s.nav("devices"),
            csrf: s.row.csrf.clone(),
            new_name: new_name.unwrap_or_else(|| device.name.clone()),
            tags: tags.unwrap_or_else(|| device.tags.clone()),
            device,
            error,
        },
    )
}

async fn device_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let node = attempt!(find_node(&st, &s, &name).await);
    device_render(&st, &s, &node, StatusCode::OK, None, None, None)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RenameForm {
    name: String,
}

async fn device_rename(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let (s, f): (Sess, RenameForm) = attempt!(posted(&st, &headers, &body).await);
    let node = attempt!(find_node(&st, &s, &name).await);
    let new_name = f.name.trim();
    let again = |error: String| {
        device_render(
            &st,
            &s,
            &node,
            StatusCode::BAD_REQUEST,
            Some(f.name.clone()),
            None,
            Some(error),
        )
    };
    if new_name.is_empty() {
        return again("Enter the new name, e.g. laptop-2.".into());
    }
    if let Err(e) = validate_name("node", new_name) {
        return again(e);
    }
    match st
        .store
        .rename_node(s.account(), &name, new_name, &actor(&s))
        .await
    {
        Ok(renamed) => {
            if renamed.name != name {
                st.hub.notify(s.account().id);
                tracing::info!(account = %s.account().name, from = %name, to = %renamed.name, actor = %actor(&s), "node renamed");
            }
            to("/devices?done=renamed")
        }
        Err(e) => again(attempt!(readable(e))),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TagsForm {
    tags: String,
}

async fn device_tags(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let (s, f): (Sess, TagsForm) = attempt!(posted(&st, &headers, &body).await);
    let node = attempt!(find_node(&st, &s, &name).await);
    let again = |error: String| {
        device_render(
            &st,
            &s,
            &node,
            StatusCode::BAD_REQUEST,
            None,
            Some(f.tags.clone()),
            Some(error),
        )
    };
    let tags = match parse_tags(&f.tags) {
        Ok(t) => t,
        Err(e) => return again(e),
    };
    match st
        .store
        .set_node_tags(s.account(), &name, &tags, &actor(&s))
        .await
    {
        Ok((node, changed)) => {
            if changed {
                st.hub.notify(s.account().id);
                tracing::info!(account = %s.account().name, node = %name, tags = ?node.tags, actor = %actor(&s), "node tags set");
            }
            to("/devices?done=tagged")
        }
        Err(e) => again(attempt!(readable(e))),
    }
}

async fn device_disable(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    set_disabled(st, headers, name, body, true).await
}

async fn device_enable(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    set_disabled(st, headers, name, body, false).await
}

async fn set_disabled(
    st: AppState,
    headers: HeaderMap,
    name: String,
    body: Bytes,
    disabled: bool,
) -> Response {
    let (s, _): (Sess, CsrfForm) = attempt!(posted(&st, &headers, &body).await);
    let node = attempt!(find_node(&st, &s, &name).await);
    match st
        .store
        .set_node_disabled(s.account(), &node.name, disabled, &actor(&s), now())
        .await
    {
        Ok((_, changed)) => {
            if changed {
                st.hub.notify(s.account().id);
                tracing::info!(account = %s.account().name, node = %name, disabled, actor = %actor(&s), "node disabled or enabled");
            }
            to(if disabled {
                "/devices?done=disabled"
            } else {
                "/devices?done=enabled"
            })
        }
        Err(e) => {
            let m = attempt!(readable(e));
            device_render(&st, &s, &node, StatusCode::BAD_REQUEST, None, None, Some(m))
        }
    }
}

#[derive(Template)]
#[template(path = "manage_device_delete.html")]
pub struct DeleteDevicePage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub device: ManagedDevice,
}

async fn device_delete_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let node = attempt!(find_node(&st, &s, &name).await);
    render(
        StatusCode::OK,
        &DeleteDevicePage {
            nav: s.nav("devices"),
            csrf: s.row.csrf.clone(),
            device: managed(&st, s.account(), &node),
        },
    )
}

async fn device_delete(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let (s, _): (Sess, CsrfForm) = attempt!(posted(&st, &headers, &body).await);
    let node = attempt!(find_node(&st, &s, &name).await);
    match st
        .store
        .delete_node(s.account(), &node.name, now(), &actor(&s))
        .await
    {
        Ok(node) => {
            st.relay.hub.revoke(&node.public_key.0);
            st.hub.kick(
                node.id,
                &format!("node {:?} was deleted by an admin", node.name),
            );
            st.hub.notify(s.account().id);
            tracing::info!(account = %s.account().name, node = %node.name, actor = %actor(&s), "node deleted");
            to("/devices?done=deleted")
        }
        Err(e) => {
            let m = attempt!(readable(e));
            message(
                StatusCode::BAD_REQUEST,
                "The device was not deleted",
                &m,
                s.nav("devices"),
            )
        }
    }
}

// ---- join tokens ----

/// One join token row.
pub struct TokenRow {
    pub id: i64,
    pub kind: String,
    pub uses: i64,
    pub expires: String,
    pub tags: String,
    /// "active", "used", "expired", "revoked".
    pub state: &'static str,
    pub routes_auto_approve: bool,
}

/// A token just created: shown once.
pub struct NewToken {
    pub token: String,
    pub join_command: String,
    pub expires: String,
    pub reusable: bool,
}

#[derive(Template)]
#[template(path = "manage_tokens.html")]
pub struct TokensPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub tokens: Vec<TokenRow>,
    pub created: Option<NewToken>,
    pub notice: Option<String>,
    pub error: Option<String>,
    /// The form's values (kept after an error).
    pub form_reusable: bool,
    pub form_ttl: String,
    pub form_tags: String,
    pub form_routes: bool,
    pub ttls: Vec<(&'static str, &'static str)>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenForm {
    reusable: Option<String>,
    ttl: String,
    tags: String,
    routes_auto_approve: Option<String>,
}

impl TokenForm {
    fn fresh() -> TokenForm {
        TokenForm {
            ttl: "24h".into(),
            ..TokenForm::default()
        }
    }
}

async fn tokens_render(
    st: &AppState,
    s: &Sess,
    status: StatusCode,
    f: &TokenForm,
    created: Option<NewToken>,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let list = attempt!(st
        .store
        .list_tokens(s.account().id)
        .await
        .map_err(store_failed));
    let now = now();
    let tokens = list
        .into_iter()
        .map(|t| TokenRow {
            id: t.id,
            kind: if t.reusable { "reusable" } else { "single use" }.to_string(),
            uses: t.uses,
            expires: rfc3339(t.expires_at),
            tags: t.tags.join(", "),
            state: if t.revoked {
                "revoked"
            } else if t.expires_at <= now {
                "expired"
            } else if !t.reusable && t.uses > 0 {
                "used"
            } else {
                "active"
            },
            routes_auto_approve: t.routes_auto_approve,
        })
        .collect();
    render(
        status,
        &TokensPage {
            nav: s.nav("tokens"),
            csrf: s.row.csrf.clone(),
            tokens,
            created,
            notice,
            error,
            form_reusable: f.reusable.is_some(),
            form_ttl: f.ttl.clone(),
            form_tags: f.tags.clone(),
            form_routes: f.routes_auto_approve.is_some(),
            ttls: TTLS.iter().map(|(v, l, _)| (*v, *l)).collect(),
        },
    )
}

async fn tokens_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DoneQuery>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    tokens_render(
        &st,
        &s,
        StatusCode::OK,
        &TokenForm::fresh(),
        None,
        done_text(q.done.as_deref()),
        None,
    )
    .await
}

async fn token_create(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (s, f): (Sess, TokenForm) = attempt!(posted(&st, &headers, &body).await);
    let Some(&(_, _, ttl)) = TTLS.iter().find(|(v, _, _)| *v == f.ttl) else {
        let kept = TokenForm {
            ttl: TokenForm::fresh().ttl,
            ..f
        };
        return tokens_render(
            &st,
            &s,
            StatusCode::BAD_REQUEST,
            &kept,
            None,
            None,
            Some("Pick how long the token works: 1 hour, 24 hours or 7 days.".into()),
        )
        .await;
    };
    let tags = match parse_tags(&f.tags) {
        Ok(t) => t,
        Err(e) => {
            return tokens_render(&st, &s, StatusCode::BAD_REQUEST, &f, None, None, Some(e)).await
        }
    };
    let reusable = f.reusable.is_some();
    let routes = f.routes_auto_approve.is_some();
    match st
        .store
        .create_token(
            s.account().id,
            reusable,
            routes,
            ttl,
            &tags,
            now(),
            &actor(&s),
        )
        .await
    {
        Ok((id, token, expires_at)) => {
            tracing::info!(account = %s.account().name, token = id, reusable, routes_auto_approve = routes, actor = %actor(&s), "join token created");
            let created = NewToken {
                join_command: join_command(&st.dash.url, &token),
                token,
                expires: rfc3339(expires_at),
                reusable,
            };
            tokens_render(
                &st,
                &s,
                StatusCode::OK,
                &TokenForm::fresh(),
                Some(created),
                None,
                None,
            )
            .await
        }
        Err(e) => {
            let m = attempt!(readable(e));
            tokens_render(&st, &s, StatusCode::BAD_REQUEST, &f, None, None, Some(m)).await
        }
    }
}

async fn token_revoke(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (s, _): (Sess, CsrfForm) = attempt!(posted(&st, &headers, &body).await);
    let fail = |status, m: String| {
        let s = &s;
        let st = &st;
        async move { tokens_render(st, s, status, &TokenForm::fresh(), None, None, Some(m)).await }
    };
    let Ok(id) = id.parse::<i64>() else {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a token number."),
        )
        .await;
    };
    match st
        .store
        .revoke_token(s.account(), id, now(), &actor(&s))
        .await
    {
        Ok(()) => {
            tracing::info!(account = %s.account().name, token = id, actor = %actor(&s), "join token revoked");
            to("/tokens?done=revoked")
        }
        Err(e) => {
            let m = attempt!(readable(e));
            fail(StatusCode::NOT_FOUND, m).await
        }
    }
}

// ---- routes ----

/// One advertised subnet.
pub struct RouteRow {
    pub node: String,
    pub cidr: String,
    pub approved: bool,
    pub primary: bool,
    pub online: bool,
}

#[derive(Template)]
#[template(path = "manage_routes.html")]
pub struct RoutesPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub routes: Vec<RouteRow>,
    pub notice: Option<String>,
    pub error: Option<String>,
}

/// The account's routes and which node is primary for each (as the API shows them).
async fn route_rows(st: &AppState, account: &Account) -> Result<Vec<RouteRow>, StoreError> {
    let routes = st.store.list_routes(account.id).await?;
    let approved = st.store.approved_routes(account.id).await?;
    let online = st.hub.online_in(account.id);
    let primaries = st.hub.primaries(account.id, &approved, &online);
    Ok(routes
        .into_iter()
        .map(|r| RouteRow {
            primary: primaries.get(&r.cidr) == Some(&r.node_id),
            online: online.contains(&r.node_id),
            approved: r.approved_seq.is_some(),
            node: r.node_name,
            cidr: r.cidr.to_string(),
        })
        .collect())
}

async fn routes_render(
    st: &AppState,
    s: &Sess,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let routes = attempt!(route_rows(st, s.account()).await.map_err(store_failed));
    render(
        status,
        &RoutesPage {
            nav: s.nav("routes"),
            csrf: s.row.csrf.clone(),
            routes,
            notice,
            error,
        },
    )
}

async fn routes_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DoneQuery>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    routes_render(&st, &s, StatusCode::OK, done_text(q.done.as_deref()), None).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ApproveForm {
    node: String,
    cidr: String,
}

async fn route_approve(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (s, f): (Sess, ApproveForm) = attempt!(posted(&st, &headers, &body).await);
    let cidr: Ipv4Net = match f.cidr.trim().parse() {
        Ok(c) => c,
        Err(_) => {
            return routes_render(
                &st,
                &s,
                StatusCode::BAD_REQUEST,
                None,
                Some(format!(
                    "{:?} is not a subnet; write it like 192.168.1.0/24.",
                    f.cidr.trim()
                )),
            )
            .await
        }
    };
    if cidr.addr() != cidr.network() {
        return routes_render(
            &st,
            &s,
            StatusCode::BAD_REQUEST,
            None,
            Some(format!(
                "{cidr} has host bits set; did you mean {}?",
                cidr.trunc()
            )),
        )
        .await;
    }
    match st
        .store
        .approve_route(s.account(), f.node.trim(), &cidr, now(), &actor(&s))
        .await
    {
        Ok(_) => {
            st.hub.notify(s.account().id);
            tracing::info!(account = %s.account().name, node = %f.node.trim(), cidr = %cidr, actor = %actor(&s), "route approved");
            to("/routes?done=approved")
        }
        Err(e) => {
            let m = attempt!(readable(e));
            routes_render(&st, &s, StatusCode::BAD_REQUEST, None, Some(m)).await
        }
    }
}

// ---- admins and API keys ----

/// One API key row.
pub struct KeyRow {
    pub id: i64,
    pub name: String,
    pub operator: bool,
    pub created: String,
    pub revoked: Option<String>,
}

/// One dashboard admin.
pub struct AdminRow {
    pub email: String,
    pub created: String,
    pub you: bool,
}

/// A key just created: shown once.
pub struct NewKey {
    pub name: String,
    pub key: String,
}

#[derive(Template)]
#[template(path = "manage_access.html")]
pub struct AccessPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub keys: Vec<KeyRow>,
    pub admins: Vec<AdminRow>,
    pub created_key: Option<NewKey>,
    pub notice: Option<String>,
    pub key_error: Option<String>,
    pub admin_error: Option<String>,
    pub key_name: String,
    pub admin_email: String,
}

/// The dashboard admins of `account_id`: (email, created_at), oldest first.
pub(crate) async fn list_admins(
    st: &AppState,
    account_id: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT email, created_at FROM dashboard_admins WHERE account_id = ? ORDER BY id",
    )
    .bind(account_id)
    .fetch_all(&st.store.pool)
    .await?)
}

#[derive(Default)]
struct AccessExtra {
    created_key: Option<NewKey>,
    notice: Option<String>,
    key_error: Option<String>,
    admin_error: Option<String>,
    key_name: String,
    admin_email: String,
}

async fn access_render(st: &AppState, s: &Sess, status: StatusCode, x: AccessExtra) -> Response {
    let keys = attempt!(crate::keys::list(&st.store, s.account().id)
        .await
        .map_err(store_failed));
    let admins = attempt!(list_admins(st, s.account().id).await.map_err(store_failed));
    render(
        status,
        &AccessPage {
            nav: s.nav("access"),
            csrf: s.row.csrf.clone(),
            keys: keys
                .into_iter()
                .map(|k| KeyRow {
                    id: k.id,
                    name: k.name,
                    operator: k.operator,
                    created: rfc3339(k.created_at),
                    revoked: k.revoked_at.map(rfc3339),
                })
                .collect(),
            admins: admins
                .into_iter()
                .map(|(email, created)| AdminRow {
                    you: email == s.row.admin.email,
                    email,
                    created: rfc3339(created),
                })
                .collect(),
            created_key: x.created_key,
            notice: x.notice,
            key_error: x.key_error,
            admin_error: x.admin_error,
            key_name: x.key_name,
            admin_email: x.admin_email,
        },
    )
}

async fn access_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DoneQuery>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let x = AccessExtra {
        notice: done_text(q.done.as_deref()),
        ..AccessExtra::default()
    };
    access_render(&st, &s, StatusCode::OK, x).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct KeyForm {
    name: String,
}

async fn key_create(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (s, f): (Sess, KeyForm) = attempt!(posted(&st, &headers, &body).await);
    let name = f.name.trim();
    let again = |status: StatusCode, error: String| {
        AccessExtra {
            key_error: Some(error),
            key_name: f.name.clone(),
            ..AccessExtra::default()
        }
        .with_status(status)
    };
    if name.is_empty() {
        let (status, x) = again(
            StatusCode::BAD_REQUEST,
            "Give the key a name that says what uses it, e.g. backup-script.".into(),
        );
        return access_render(&st, &s, status, x).await;
    }
    match crate::keys::create(&st.store, s.account(), name, &actor(&s)).await {
        Ok(k) => {
            let x = AccessExtra {
                created_key: Some(NewKey {
                    name: k.name,
                    key: k.api_key,
                }),
                ..AccessExtra::default()
            };
            access_render(&st, &s, StatusCode::OK, x).await
        }
        Err(e) => {
            let (status, m) = attempt!(api_readable(e));
            let (status, x) = again(status, m);
            access_render(&st, &s, status, x).await
        }
    }
}

impl AccessExtra {
    fn with_status(self, status: StatusCode) -> (StatusCode, AccessExtra) {
        (status, self)
    }
}

async fn key_revoke(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (s, _): (Sess, CsrfForm) = attempt!(posted(&st, &headers, &body).await);
    let result = match id.parse::<i64>() {
        Ok(id) => crate::keys::revoke(&st.store, s.account(), id, &actor(&s)).await,
        Err(_) => Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a key number."),
        )),
    };
    match result {
        Ok(()) => to("/access?done=key-revoked"),
        Err(e) => {
            let (status, m) = attempt!(api_readable(e));
            let m = if status == StatusCode::FORBIDDEN {
                "The operator key cannot be revoked here: replace the key in the server's DATA_DIR/admin.key instead.".to_string()
            } else {
                m
            };
            let x = AccessExtra {
                key_error: Some(m),
                ..AccessExtra::default()
            };
            access_render(&st, &s, status, x).await
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AdminForm {
    email: String,
    password: String,
}

async fn admin_create(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (s, f): (Sess, AdminForm) = attempt!(posted(&st, &headers, &body).await);
    let again = |status: StatusCode, error: String| {
        AccessExtra {
            admin_error: Some(error),
            admin_email: f.email.trim().to_string(),
            ..AccessExtra::default()
        }
        .with_status(status)
    };
    let checked = normalize_email(&f.email).and_then(|e| check_password(&f.password).map(|()| e));
    let email = match checked {
        Ok(e) => e,
        Err(m) => {
            let (status, x) = again(StatusCode::BAD_REQUEST, capitalize(&m));
            return access_render(&st, &s, status, x).await;
        }
    };
    let password = f.password.clone();
    let hash = match tokio::task::spawn_blocking(move || auth::hash_password(&password)).await {
        Ok(Ok(h)) => h,
        _ => {
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "Hashing the password failed; see the server log.",
                s.nav("access"),
            )
        }
    };
    match st
        .store
        .create_admin(s.account(), &email, &hash, now(), &actor(&s))
        .await
    {
        Ok(created) => {
            tracing::info!(account = %s.account().name, email = %created.email, actor = %actor(&s), "dashboard admin created");
            to("/access?done=admin-added")
        }
        Err(e) => {
            let status = match e {
                StoreError::Conflict(_) => StatusCode::CONFLICT,
                _ => StatusCode::BAD_REQUEST,
            };
            let m = attempt!(readable(e));
            let (status, x) = again(status, capitalize(&m));
            access_render(&st, &s, status, x).await
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect::<String>() + ".",
        None => String::new(),
    }
}

// ---- settings ----

#[derive(Template)]
#[template(path = "manage_settings.html")]
pub struct SettingsPage {
    pub nav: Option<Nav>,
    pub network: String,
    pub cidr: String,
    pub domain: String,
    pub retention: String,
    pub url: String,
    pub created: String,
}

async fn settings_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let acc = s.account();
    render(
        StatusCode::OK,
        &SettingsPage {
            nav: s.nav("settings"),
            network: acc.name.clone(),
            cidr: acc.cidr.to_string(),
            domain: crate::mesh::account_domain(&acc.name, &st.dns_suffix),
            retention: human_duration(st.flow_retention),
            url: st.dash.url.clone(),
            created: rfc3339(acc.created_at),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_split_on_commas_and_checked() {
        assert_eq!(
            parse_tags(" web, DB ,,web ").unwrap(),
            vec!["web".to_string(), "db".to_string()]
        );
        assert!(parse_tags("").unwrap().is_empty());
        assert!(parse_tags("good, bad tag").is_err());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(human_duration(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 seconds");
    }

    #[test]
    fn only_known_done_codes_show_a_sentence() {
        assert!(done_text(Some("renamed")).is_some());
        assert!(done_text(Some("<script>")).is_none());
        assert!(done_text(None).is_none());
    }
}
