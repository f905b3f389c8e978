//! Dashboard pages to watch and steer the network: the policy (edit, test,
//! history, restore), the flow logs (filters, pages, live tail), the audit log,
//! and the live device list of the overview (Server-Sent Events).
//!
//! Every page acts only on the session's account and calls the same functions
//! as the REST API (`crate::policy`, `crate::flows`, `crate::audit`).

use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use trellis_proto::{ApiError, AuditEntry, FlowLogRecord, PolicyTestRequest};

use super::pages::Nav;
use super::{
    csrf_refused, devices, form, need_session, render, session, store_failed, NodesJson, Sess,
};
use crate::api::{now, Admin, AppState};
use crate::flows::{Cursor, FlowParams};
use crate::policy::PolicyErr;
use crate::store::{rfc3339, Account};

/// Flow records one page shows.
pub const FLOW_PAGE: i64 = 50;
/// Audit entries one page shows.
pub const AUDIT_PAGE: i64 = 50;
/// How often the live device list is resent even without a change (so "12 s
/// ago" stays current); only sent when it differs.
const EVENTS_REFRESH: Duration = Duration::from_secs(10);

/// The routes of these pages.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/policy", get(policy_page).post(policy_save))
        .route("/policy/test", post(policy_test))
        .route("/policy/restore", post(policy_restore))
        .route("/policy/default-deny", get(default_deny_page))
        .route("/logs", get(logs_page))
        .route("/audit", get(audit_page))
        .route("/dash/api/flows/stream", get(flows_stream))
        .route("/dash/api/events", get(events_stream))
}

/// "2026-11-26T01:02:03Z" of unix milliseconds.
fn time_ms(ms: i64) -> String {
    rfc3339(ms.div_euclid(1000))
}

fn not_logged_in() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(ApiError {
            error: "not logged in: log in to the dashboard first".into(),
        }),
    )
        .into_response()
}

/// The `Admin` the policy functions act as: the session's account and admin.
fn as_admin(s: &Sess) -> Admin {
    Admin {
        account: s.account().clone(),
        operator: false,
        actor: s.actor(),
    }
}

// ---- the policy ----

/// One stored version in the history list.
pub struct VersionView {
    pub version: i64,
    pub created: String,
    pub author: String,
    pub rules: i64,
    pub current: bool,
}

/// One problem of a refused text.
pub struct ProblemView {
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// What the last action on the page did.
#[derive(Default)]
pub struct Outcome {
    /// A success sentence.
    pub ok: Option<String>,
    /// A failure sentence.
    pub error: Option<String>,
    pub problems: Vec<ProblemView>,
    pub warnings: Vec<String>,
}

/// The answer of the "Can A reach B?" form.
pub struct TestAnswer {
    pub allow: bool,
    pub sentence: String,
}

#[derive(Template)]
#[template(path = "observe_policy.html")]
pub struct PolicyPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    /// The version in force.
    pub version: i64,
    pub author: String,
    pub created: String,
    /// The text in the editor (the submitted one after a refusal).
    pub text: String,
    pub outcome: Outcome,
    pub history: Vec<VersionView>,
    pub nodes: Vec<String>,
    pub test_from: String,
    pub test_to: String,
    pub test_port: String,
    pub test: Option<TestAnswer>,
    pub test_error: Option<String>,
    /// Shown above the editor on the default-deny preview.
    pub preview: Option<String>,
}

struct PolicyExtras {
    text: Option<String>,
    outcome: Outcome,
    test: (String, String, String),
    answer: Option<TestAnswer>,
    test_error: Option<String>,
    preview: Option<String>,
}

impl Default for PolicyExtras {
    fn default() -> PolicyExtras {
        PolicyExtras {
            text: None,
            outcome: Outcome::default(),
            test: (String::new(), String::new(), "tcp:22".to_string()),
            answer: None,
            test_error: None,
            preview: None,
        }
    }
}

async fn policy_render(st: &AppState, s: &Sess, status: StatusCode, x: PolicyExtras) -> Response {
    let account = s.account();
    let current = match st.store.current_policy(account.id).await {
        Ok(p) => p,
        Err(e) => return store_failed(e),
    };
    let history = match st.store.policy_history(account.id).await {
        Ok(h) => h,
        Err(e) => return store_failed(e),
    };
    let nodes = match st.store.list_nodes(account.id).await {
        Ok(n) => n.into_iter().map(|n| n.name).collect(),
        Err(e) => return store_failed(e),
    };
    let (test_from, test_to, test_port) = x.test;
    render(
        status,
        &PolicyPage {
            nav: s.nav("policy"),
            csrf: s.row.csrf.clone(),
            version: current.version,
            author: current.author.clone(),
            created: rfc3339(current.created_at),
            text: x.text.unwrap_or(current.text),
            outcome: x.outcome,
            history: history
                .into_iter()
                .map(|p| VersionView {
                    current: p.version == current.version,
                    version: p.version,
                    created: rfc3339(p.created_at),
                    author: p.author,
                    rules: p.rules,
                })
                .collect(),
            nodes,
            test_from,
            test_to,
            test_port,
            test: x.answer,
            test_error: x.test_error,
            preview: x.preview,
        },
    )
}

async fn policy_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    policy_render(&st, &s, StatusCode::OK, PolicyExtras::default()).await
}

/// The outcome of a refused change.
fn refused(e: PolicyErr) -> (StatusCode, Outcome) {
    match e {
        PolicyErr::Rejected(r) => {
            let n = r.errors.len();
            (
                StatusCode::BAD_REQUEST,
                Outcome {
                    error: Some(format!(
                        "The policy was not saved: {n} problem{} (nothing was changed).",
                        if n == 1 { "" } else { "s" }
                    )),
                    problems: r
                        .errors
                        .into_iter()
                        .map(|p| ProblemView {
                            line: p.line,
                            field: p.field,
                            message: p.message,
                        })
                        .collect(),
                    ..Outcome::default()
                },
            )
        }
        PolicyErr::Api(e) => (
            e.status,
            Outcome {
                error: Some(format!("Nothing was changed: {}.", e.message)),
                ..Outcome::default()
            },
        ),
    }
}

fn saved(r: trellis_proto::SetPolicyResponse, what: &str) -> Outcome {
    Outcome {
        ok: Some(if r.changed {
            format!(
                "{what} Version {} is now in force; devices get it within a second.",
                r.version
            )
        } else {
            format!(
                "Nothing changed: this text is already in force as version {}.",
                r.version
            )
        }),
        warnings: r.warnings,
        ..Outcome::default()
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PolicyForm {
    text: String,
    csrf: String,
}

async fn policy_save(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let f: PolicyForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    // Browsers send textarea lines with CRLF.
    let text = f.text.replace("\r\n", "\n");
    let result = match crate::policy::validate(&text, "the policy was refused") {
        Ok(policy) => crate::policy::apply(&st, &as_admin(&s), &policy, &text, None)
            .await
            .map_err(PolicyErr::Api),
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => {
            let x = PolicyExtras {
                outcome: saved(r, "Saved."),
                ..PolicyExtras::default()
            };
            policy_render(&st, &s, StatusCode::OK, x).await
        }
        Err(e) => {
            let (status, outcome) = refused(e);
            let x = PolicyExtras {
                text: Some(f.text),
                outcome,
                ..PolicyExtras::default()
            };
            policy_render(&st, &s, status, x).await
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RestoreForm {
    version: String,
    csrf: String,
}

async fn policy_restore(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let f: RestoreForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let Ok(version) = f.version.trim().parse::<i64>() else {
        let x = PolicyExtras {
            outcome: Outcome {
                error: Some(format!(
                    "{:?} is not a version number; pick one from the history.",
                    f.version
                )),
                ..Outcome::default()
            },
            ..PolicyExtras::default()
        };
        return policy_render(&st, &s, StatusCode::BAD_REQUEST, x).await;
    };
    let (status, outcome) = match crate::policy::restore(&st, &as_admin(&s), version).await {
        Ok(r) => (
            StatusCode::OK,
            saved(r, &format!("Restored the text of version {version}.")),
        ),
        Err(e) => refused(e),
    };
    let x = PolicyExtras {
        outcome,
        ..PolicyExtras::default()
    };
    policy_render(&st, &s, status, x).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TestForm {
    from: String,
    to: String,
    port: String,
    csrf: String,
}

/// The plain sentence of a policy test.
fn test_sentence(f: &PolicyTestRequest, r: &trellis_proto::PolicyTestResponse) -> String {
    let from = f.from.trim();
    let to = f.to.trim();
    let port = f.port.trim().to_ascii_lowercase();
    let named = |name: &str, ip: std::net::Ipv4Addr| {
        if name == ip.to_string() {
            name.to_string()
        } else {
            format!("{name} ({ip})")
        }
    };
    let (from, to) = (named(from, r.from_ip), named(to, r.to_ip));
    let verdict = if r.allow {
        format!("Yes: {from} can reach {to} on {port}")
    } else {
        format!("No: {from} cannot reach {to} on {port}")
    };
    let why = match &r.rule {
        Some(rule) => format!("rule \"{rule}\" decides"),
        None => format!(
            "no rule matches, so the default ({}) decides",
            if r.allow { "allow" } else { "deny" }
        ),
    };
    format!("{verdict}: {why} (policy version {}).", r.version)
}

async fn policy_test(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let f: TestForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let req = PolicyTestRequest {
        from: f.from.trim().to_string(),
        to: f.to.trim().to_string(),
        port: f.port.trim().to_string(),
    };
    let mut x = PolicyExtras {
        test: (f.from.clone(), f.to.clone(), f.port.clone()),
        ..PolicyExtras::default()
    };
    let status = if req.from.is_empty() || req.to.is_empty() || req.port.is_empty() {
        x.test_error = Some(
            "Fill in all three: from (a device name or IP), to (a device name or IP) and a port such as tcp:5432."
                .into(),
        );
        StatusCode::BAD_REQUEST
    } else {
        match crate::policy::decide(&st, s.account(), &req).await {
            Ok(r) => {
                x.answer = Some(TestAnswer {
                    allow: r.allow,
                    sentence: test_sentence(&req, &r),
                });
                StatusCode::OK
            }
            Err(e) => {
                x.test_error = Some(format!("{}.", e.message));
                e.status
            }
        }
    };
    policy_render(&st, &s, status, x).await
}

/// `text` with the default set to deny (None when it already denies).
pub fn default_deny_text(text: &str) -> Option<String> {
    let mut found = false;
    let mut already = false;
    let mut in_table = false;
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_table = true;
        }
        if !in_table && !found {
            if let Some(rest) = t.strip_prefix("default") {
                if let Some(v) = rest.trim_start().strip_prefix('=') {
                    found = true;
                    let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
                    if v.starts_with("deny") {
                        already = true;
                    }
                    out.push("default = \"deny\"".to_string());
                    continue;
                }
            }
        }
        out.push(line.to_string());
    }
    if already {
        return None;
    }
    let mut s = out.join("\n");
    if !found {
        s = format!("default = \"deny\"\n{s}");
    }
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Some(s)
}

async fn default_deny_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let current = match st.store.current_policy(s.account().id).await {
        Ok(p) => p,
        Err(e) => return store_failed(e),
    };
    let x = match default_deny_text(&current.text) {
        None => PolicyExtras {
            outcome: Outcome {
                ok: Some(format!(
                    "The policy in force (version {}) already denies what no rule allows.",
                    current.version
                )),
                ..Outcome::default()
            },
            ..PolicyExtras::default()
        },
        Some(text) => PolicyExtras {
            text: Some(text),
            preview: Some(
                "Preview, not saved yet: the editor below now holds the policy in force with its default set to \"deny\". \
                 Then only connections a rule allows get through; everything else is blocked. \
                 Add allow rules for what must keep working, then press Save."
                    .into(),
            ),
            ..PolicyExtras::default()
        },
    };
    policy_render(&st, &s, StatusCode::OK, x).await
}

// ---- the flow logs ----

/// One flow record as the page shows it.
pub struct FlowView {
    pub id: i64,
    pub time: String,
    pub node: String,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub path: String,
    pub decision: String,
    pub rule: String,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub end_reason: String,
}

fn endpoint(ip: std::net::Ipv4Addr, port: u16, node: &str, proto: &str) -> String {
    let addr = if port == 0 || proto == "icmp" {
        ip.to_string()
    } else {
        format!("{ip}:{port}")
    };
    if node.is_empty() {
        addr
    } else {
        format!("{node} {addr}")
    }
}

fn flow_view(r: &FlowLogRecord) -> FlowView {
    FlowView {
        id: r.id,
        time: time_ms(r.end_ms),
        node: r.node.clone(),
        src: endpoint(r.src_ip, r.src_port, &r.src_node, &r.proto),
        dst: endpoint(r.dst_ip, r.dst_port, &r.dst_node, &r.proto),
        proto: r.proto.clone(),
        path: if r.via.is_empty() {
            r.path.clone()
        } else {
            format!("{} via {}", r.path, r.via)
        },
        decision: r.decision.clone(),
        rule: r.rule.clone(),
        bytes_out: r.bytes_out,
        bytes_in: r.bytes_in,
        end_reason: r.end_reason.clone(),
    }
}

#[derive(Template)]
#[template(path = "observe_logs.html")]
pub struct LogsPage {
    pub nav: Option<Nav>,
    pub since: String,
    pub node: String,
    pub decision: String,
    pub proto: String,
    pub nodes: Vec<String>,
    pub error: Option<String>,
    pub records: Vec<FlowView>,
    /// The query of the next (older) page, if any.
    pub older: Option<String>,
    /// Whether this is the newest page (the live tail runs only there).
    pub newest: bool,
    /// The live stream's URL with the filters.
    pub stream: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LogsQuery {
    since: String,
    node: String,
    decision: String,
    proto: String,
    before_id: String,
}

fn query_string(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(
        pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default()
}

/// The filters of the flow pages and stream, checked as the API checks them.
fn flow_params(q: &LogsQuery) -> Result<FlowParams, String> {
    let qs = query_string(&[
        ("since", q.since.trim()),
        ("node", q.node.trim()),
        ("decision", q.decision.trim()),
        ("proto", q.proto.trim()),
        ("before_id", q.before_id.trim()),
    ]);
    serde_urlencoded::from_str(&qs).map_err(|e| format!("bad filters: {e}"))
}

async fn logs_page(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let q: LogsQuery = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let account = s.account();
    let nodes = match st.store.list_nodes(account.id).await {
        Ok(n) => n.into_iter().map(|n| n.name).collect(),
        Err(e) => return store_failed(e),
    };
    let filters = [
        ("node", q.node.trim()),
        ("decision", q.decision.trim()),
        ("proto", q.proto.trim()),
    ];
    let mut page = LogsPage {
        nav: s.nav("logs"),
        since: q.since.clone(),
        node: q.node.clone(),
        decision: q.decision.clone(),
        proto: q.proto.clone(),
        nodes,
        error: None,
        records: Vec::new(),
        older: None,
        newest: q.before_id.trim().is_empty(),
        stream: format!("/dash/api/flows/stream?{}", query_string(&filters)),
    };
    let parsed = flow_params(&q).and_then(|p| {
        let filter = p.filter(crate::flows::now_ms()).map_err(|e| e.message)?;
        let before = p.before_id().map_err(|e| e.message)?;
        Ok((filter, before))
    });
    let (filter, before) = match parsed {
        Ok(x) => x,
        Err(m) => {
            page.error = Some(format!("{}.", m.trim_end_matches('.')));
            page.newest = false;
            return render(StatusCode::BAD_REQUEST, &page);
        }
    };
    let records = match st
        .store
        .query_flows(account.id, &filter, Cursor::Before(before), FLOW_PAGE)
        .await
    {
        Ok(r) => r,
        Err(e) => return store_failed(e),
    };
    if records.len() as i64 == FLOW_PAGE {
        if let Some(last) = records.last() {
            let id = last.id.to_string();
            let mut pairs = vec![("since", q.since.trim())];
            pairs.extend_from_slice(&filters);
            pairs.push(("before_id", &id));
            page.older = Some(query_string(&pairs));
        }
    }
    page.records = records.iter().map(flow_view).collect();
    render(StatusCode::OK, &page)
}

/// Newly stored flow records of the session's account as Server-Sent Events
/// (one FlowLogRecord in JSON per event), filtered like `/logs`.
async fn flows_stream(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let s = match session(&st, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return not_logged_in(),
        Err(r) => return r,
    };
    let q: LogsQuery = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let filter = match flow_params(&q)
        .and_then(|p| p.filter(crate::flows::now_ms()).map_err(|e| e.message))
    {
        Ok(f) => f,
        Err(m) => return (StatusCode::BAD_REQUEST, Json(ApiError { error: m })).into_response(),
    };
    Sse::new(crate::flows::live_events(&st, s.account().id, filter))
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ---- the audit log ----

pub struct AuditView {
    pub time: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Template)]
#[template(path = "observe_audit.html")]
pub struct AuditPage {
    pub nav: Option<Nav>,
    pub since: String,
    pub error: Option<String>,
    pub entries: Vec<AuditView>,
    pub older: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuditQuery {
    since: String,
    before_id: String,
}

async fn audit_page(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let q: AuditQuery = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let mut page = AuditPage {
        nav: s.nav("audit"),
        since: q.since.clone(),
        error: None,
        entries: Vec::new(),
        older: None,
    };
    let since = match q.since.trim() {
        "" => None,
        t => match crate::audit::parse_since(t, now()) {
            Ok(v) => Some(v),
            Err(m) => {
                page.error = Some(format!("{m}."));
                return render(StatusCode::BAD_REQUEST, &page);
            }
        },
    };
    let before = match q.before_id.trim() {
        "" => None,
        t => match t.parse::<i64>() {
            Ok(v) if v > 0 => Some(v),
            _ => {
                page.error = Some(format!(
                    "invalid before_id {t:?}: follow the \"Older\" link instead."
                ));
                return render(StatusCode::BAD_REQUEST, &page);
            }
        },
    };
    let entries: Vec<AuditEntry> = match st
        .store
        .audit_entries(s.account().id, since, before, AUDIT_PAGE)
        .await
    {
        Ok(e) => e,
        Err(e) => return store_failed(e),
    };
    if entries.len() as i64 == AUDIT_PAGE {
        if let Some(last) = entries.last() {
            let id = last.id.to_string();
            page.older = Some(query_string(&[
                ("since", q.since.trim()),
                ("before_id", &id),
            ]));
        }
    }
    page.entries = entries
        .into_iter()
        .map(|e| AuditView {
            time: time_ms(e.at_ms),
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: e.detail,
        })
        .collect();
    render(StatusCode::OK, &page)
}

// ---- the overview's live device list ----

async fn nodes_event(st: &AppState, account: &Account) -> Option<String> {
    match devices(st, account).await {
        Ok(list) => serde_json::to_string(&NodesJson {
            network: account.name.clone(),
            online: list.iter().filter(|d| d.online).count(),
            total: list.len(),
            devices: list,
        })
        .ok(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard events: listing devices failed");
            None
        }
    }
}

struct EventsState {
    st: AppState,
    account: Account,
    rx: tokio::sync::broadcast::Receiver<i64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    tick: tokio::time::Interval,
    last: String,
    first: bool,
}

/// The account's device list (the JSON of `/dash/api/nodes`) as Server-Sent
/// Events named `nodes`: once at the start, then whenever the account changes.
async fn events_stream(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match session(&st, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return not_logged_in(),
        Err(r) => return r,
    };
    let mut tick = tokio::time::interval(EVENTS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = EventsState {
        rx: st.hub.subscribe(),
        shutdown: st.hub.shutdown_signal(),
        account: s.account().clone(),
        st,
        tick,
        last: String::new(),
        first: true,
    };
    let events = futures_util::stream::unfold(state, |mut e| async move {
        loop {
            if !e.first {
                if *e.shutdown.borrow() {
                    return None;
                }
                tokio::select! {
                    r = e.rx.recv() => match r {
                        Ok(id) if id == e.account.id => {}
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return None,
                    },
                    _ = e.tick.tick() => {}
                    r = e.shutdown.changed() => {
                        if r.is_err() {
                            return None;
                        }
                        continue;
                    }
                }
            }
            e.first = false;
            let Some(json) = nodes_event(&e.st, &e.account).await else {
                continue;
            };
            if json == e.last {
                continue;
            }
            e.last = json.clone();
            let ev = Event::default().event("nodes").data(json);
            return Some((Ok::<_, Infallible>(ev), e));
        }
    });
    (
        [(header::CACHE_CONTROL, "no-store")],
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_deny_replaces_or_adds_the_default() {
        let t = default_deny_text(trellis_policy::DEFAULT_POLICY).unwrap();
        assert!(t.contains("\ndefault = \"deny\"\n"));
        assert!(!t.contains("default = \"allow\""));
        assert!(trellis_policy::parse(&t).is_ok());
        assert_eq!(
            default_deny_text("[[rules]]\nname = \"a\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\n")
                .unwrap(),
            "default = \"deny\"\n[[rules]]\nname = \"a\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\n"
        );
        assert_eq!(default_deny_text("default = \"deny\"\n"), None);
    }
}
