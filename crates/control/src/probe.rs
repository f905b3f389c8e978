//! "Test the connection": the control plane asks one node to reach another
//! through the mesh (a data-plane ping over whatever path the two use) and
//! reports the outcome in plain words.
//!
//! The request goes down the asking node's open control stream as
//! [`ServerMessage::Probe`](trellis_proto::ServerMessage::Probe); the node
//! answers with [`NodeMessage::ProbeResult`](trellis_proto::NodeMessage::ProbeResult)
//! carrying the same id, which [`Pending`] hands back to the waiting call.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use trellis_proto::ApiError;
use utoipa::ToSchema;

use crate::api::{Admin, ApiErr, ApiJson, AppState};
use crate::map::Control;
use crate::store::Node;
use trellis_policy::{Filter, PROTO_ICMP};

/// How long the control plane waits for the node's answer. The node itself
/// gives up after about 3 s, so this only fires when the node is stuck.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection test found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProbeOutcome {
    /// The target answered.
    pub ok: bool,
    /// Round-trip time, when it answered.
    pub rtt_ms: Option<f64>,
    /// `direct`, `relay-udp` or `relay-tcp`, when it answered.
    pub path: Option<String>,
    /// The outcome in plain words, e.g. `laptop reached db-server in 3 ms, directly`.
    pub message: String,
}

/// Body of `POST /api/v1/nodes/{name}/probe`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProbeRequest {
    /// Name of the node to reach.
    pub to: String,
}

/// What a node answered to one probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReply {
    pub ok: bool,
    pub rtt_ms: Option<f64>,
    pub path: Option<String>,
    pub error: Option<String>,
}

/// Probes sent and not answered yet: id → (node asked, who waits).
#[derive(Default)]
pub struct Pending {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, (i64, oneshot::Sender<ProbeReply>)>>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (i64, oneshot::Sender<ProbeReply>)>> {
        // A panic while holding this lock leaves a plain map behind; keep using it.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new probe id for `node_id` and the receiver its answer arrives on.
    pub fn open(&self, node_id: i64) -> (u64, oneshot::Receiver<ProbeReply>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (node_id, tx));
        (id, rx)
    }

    /// Forgets a probe (answered elsewhere, timed out, or never sent).
    pub fn cancel(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// The stream of `node_id` closed: its unanswered probes never will be.
    pub fn node_gone(&self, node_id: i64) {
        self.lock().retain(|_, (n, _)| *n != node_id);
    }

    /// Node `node_id` answered probe `id`. An answer from any other node than
    /// the one asked is ignored (a node cannot answer for another).
    pub fn complete(&self, node_id: i64, id: u64, reply: ProbeReply) {
        let mut waiting = self.lock();
        if waiting.get(&id).map(|(n, _)| *n) != Some(node_id) {
            tracing::debug!(
                node_id,
                id,
                "ignoring an answer to a probe this node was not sent"
            );
            return;
        }
        if let Some((_, tx)) = waiting.remove(&id) {
            // The caller may have given up already.
            let _ = tx.send(reply);
        }
    }
}

/// The message for a probe's answer.
fn describe(from: &str, to: &str, reply: &ProbeReply) -> String {
    if reply.ok {
        let rtt = match reply.rtt_ms {
            Some(ms) if ms < 1.0 => " in less than 1 ms".to_string(),
            Some(ms) => format!(" in {} ms", ms.round() as u64),
            None => String::new(),
        };
        let how = match reply.path.as_deref() {
            Some("direct") => ", directly".to_string(),
            Some("relay-udp") => " through the relay".to_string(),
            Some("relay-tcp") => " through the relay (over TCP: UDP seems blocked)".to_string(),
            Some(other) => format!(" (path {other})"),
            None => String::new(),
        };
        format!("{from} reached {to}{rtt}{how}")
    } else {
        let why = reply
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("no answer");
        format!("{from} could not reach {to}: {why}")
    }
}

/// Asks node `from` of the account to reach node `to` through the mesh.
/// `Err` for a request that cannot be made (unknown node, the same node
/// twice, `from` offline); a test that ran and failed is `Ok` with `ok: false`.
pub async fn probe(
    state: &AppState,
    account_id: i64,
    from: &str,
    to: &str,
) -> Result<ProbeOutcome, String> {
    if from == to {
        return Err(format!(
            "pick two different devices: {from} would be testing itself"
        ));
    }
    let nodes = state
        .store
        .list_nodes(account_id)
        .await
        .map_err(|e| format!("could not load the devices: {e}"))?;
    let find = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| format!("no device named {name:?} in this network"))
    };
    let source = find(from)?;
    let target = find(to)?;
    let target_ip: Ipv4Addr = target.ip;

    let (id, rx) = state.hub.probes.open(source.id);
    if !state.hub.send_control(
        source.id,
        Control::Probe {
            id,
            target: target_ip,
        },
    ) {
        state.hub.probes.cancel(id);
        return Err(format!(
            "{from} is offline: start its agent (`trellis join` or its service) and try again"
        ));
    }
    let reply = match tokio::time::timeout(PROBE_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => {
            // The sender was dropped: the stream closed before the answer.
            return Ok(failed(
                from,
                to,
                &format!("{from} disconnected before answering"),
            ));
        }
        Err(_) => {
            state.hub.probes.cancel(id);
            return Ok(failed(
                from,
                to,
                &format!(
                    "{from} did not answer within {} s (is its agent up to date?)",
                    PROBE_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let mut reply = reply;
    if !reply.ok && !state.hub.is_online(target.id) {
        // The likeliest reason first.
        let why = reply.error.take().unwrap_or_else(|| "no answer".into());
        reply.error = Some(format!("{to} is offline ({why})"));
    }
    let mut message = describe(from, to, &reply);
    if reply.ok {
        // The test travels beside the packet filter (it checks the path, not
        // the policy); say so when the policy would stop a real ping.
        if let Some(note) = policy_note(state, account_id, &nodes, source, target).await {
            message.push_str(&note);
        }
    }
    Ok(ProbeOutcome {
        ok: reply.ok,
        rtt_ms: reply.rtt_ms.filter(|_| reply.ok),
        path: reply.path.clone().filter(|_| reply.ok),
        message,
    })
}

/// `"; note: ..."` when the account's policy denies ICMP from `from` to `to`.
async fn policy_note(
    state: &AppState,
    account_id: i64,
    nodes: &[Node],
    from: &Node,
    to: &Node,
) -> Option<String> {
    let account = state.store.account_by_id(account_id).await.ok()??;
    let (_, spec) = crate::policy::effective_filter(&state.store, &account, nodes)
        .await
        .ok()??;
    let decision = Filter::compile(&spec).decide(from.ip, to.ip, PROTO_ICMP, 0);
    (!decision.allow).then(|| {
        format!(
            "; note: the policy does not let {} ping {} (other traffic may be allowed: see `trellis policy test`)",
            from.name, to.name
        )
    })
}

fn failed(from: &str, to: &str, why: &str) -> ProbeOutcome {
    let reply = ProbeReply {
        ok: false,
        rtt_ms: None,
        path: None,
        error: Some(why.to_string()),
    };
    ProbeOutcome {
        ok: false,
        rtt_ms: None,
        path: None,
        message: describe(from, to, &reply),
    }
}

/// Tests the connection from one node to another: the first node pings the
/// second through the mesh and reports the round-trip time and the path.
/// A test that ran but failed is a 200 with `ok: false`.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/probe", tag = "nodes",
    request_body = ProbeRequest,
    params(("name" = String, Path, description = "Node that sends the ping"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = ProbeOutcome),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn probe_node(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ProbeRequest>,
) -> Result<Json<ProbeOutcome>, ApiErr> {
    if req.to.is_empty() {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            "say which node to reach: {\"to\": \"NODE\"}",
        ));
    }
    match probe(&st, admin.account.id, &name, &req.to).await {
        Ok(outcome) => Ok(Json(outcome)),
        Err(e) => {
            let status = if e.starts_with("no device named") {
                StatusCode::NOT_FOUND
            } else if e.contains("is offline") {
                StatusCode::CONFLICT
            } else if e.starts_with("could not load") {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::BAD_REQUEST
            };
            Err(ApiErr::new(status, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(ok: bool, rtt: Option<f64>, path: Option<&str>, error: Option<&str>) -> ProbeReply {
        ProbeReply {
            ok,
            rtt_ms: rtt,
            path: path.map(Into::into),
            error: error.map(Into::into),
        }
    }

    #[test]
    fn messages_read_as_sentences() {
        assert_eq!(
            describe(
                "laptop",
                "db-server",
                &reply(true, Some(3.2), Some("direct"), None)
            ),
            "laptop reached db-server in 3 ms, directly"
        );
        assert_eq!(
            describe(
                "laptop",
                "db-server",
                &reply(true, Some(0.3), Some("relay-udp"), None)
            ),
            "laptop reached db-server in less than 1 ms through the relay"
        );
        assert!(
            describe("a", "b", &reply(true, Some(12.0), Some("relay-tcp"), None))
                .starts_with("a reached b in 12 ms through the relay")
        );
        assert_eq!(
            describe(
                "laptop",
                "db-server",
                &reply(false, None, None, Some("no answer within 3 s"))
            ),
            "laptop could not reach db-server: no answer within 3 s"
        );
        assert_eq!(
            describe("a", "b", &reply(false, None, None, None)),
            "a could not reach b: no answer"
        );
    }

    #[test]
    fn only_the_node_asked_may_answer() {
        let p = Pending::default();
        let (id, mut rx) = p.open(7);
        p.complete(8, id, reply(true, None, None, None));
        assert!(rx.try_recv().is_err(), "another node's answer was taken");
        p.complete(7, id, reply(true, Some(1.0), Some("direct"), None));
        assert_eq!(rx.try_recv().unwrap().path.as_deref(), Some("direct"));
        let (id2, _rx2) = p.open(7);
        assert_ne!(id, id2);
        p.cancel(id2);
        assert!(p.lock().is_empty());
    }
}
