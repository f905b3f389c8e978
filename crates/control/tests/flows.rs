//! Flow logs end to end: a fake node sends batches over its control stream,
//! an admin reads them back through /api/v1/logs/flows (pages, the JSON-lines
//! export and the live SSE stream). Real SQLite in temp dirs, real HTTP and
//! WebSockets on 127.0.0.1.

mod dash_support;

use std::path::Path;
use std::time::Duration;

use dash_support::{next_msg, Ws};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use trellis_control::flows::{now_ms, DEFAULT_FLOW_RETENTION};
use trellis_control::{Config, Server};
use trellis_proto::{
    CreateAccountResponse, CreateTokenResponse, EnrollResponse, FlowLogPage, FlowLogRecord,
    FlowRecord, NodeKey, NodeMessage, ServerMessage,
};

/// The shared in-process server, with calls that take any API key.
struct Running {
    server: dash_support::Running,
    /// The operator's API key.
    admin: String,
    http: reqwest::Client,
}

impl Running {
    async fn start(dir: &Path) -> Running {
        Running::start_with(dir, DEFAULT_FLOW_RETENTION).await
    }

    async fn start_with(dir: &Path, flow_retention: Duration) -> Running {
        let server =
            dash_support::Running::start_with(dir, |c| c.flow_retention = flow_retention).await;
        Running {
            admin: server.operator.clone(),
            http: reqwest::Client::new(),
            server,
        }
    }

    async fn stop(self) {
        self.server.stop().await;
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server.url)
    }

    async fn post(&self, key: Option<&str>, path: &str, body: Value) -> (StatusCode, Value) {
        let mut req = self.http.post(self.api(path)).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn get(&self, key: &str, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(self.api(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// A page of flow records (asserting 200).
    async fn flows(&self, key: &str, query: &str) -> FlowLogPage {
        let (status, v) = self.get(key, &format!("/logs/flows{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {v}");
        serde_json::from_value(v).unwrap()
    }

    async fn token(&self, key: &str) -> String {
        let (status, v) = self
            .post(Some(key), "/tokens", json!({"reusable": true}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let t: CreateTokenResponse = serde_json::from_value(v).unwrap();
        t.token
    }

    async fn enroll(&self, token: &str, key: u8, name: &str) -> EnrollResponse {
        let (status, v) = self
            .post(
                None,
                "/enroll",
                json!({
                    "token": token,
                    "public_key": NodeKey([key; 32]).to_string(),
                    "name": name,
                    "hostname": "h",
                    "os": "linux",
                    "version": "test",
                }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// Connects a node's control stream, says hello and reads its map.
    async fn connect(&self, secret: &str) -> Ws {
        self.server.connect(secret).await.0
    }

    /// Opens the live stream; returns once the server has answered (subscribed).
    async fn live(&self, key: &str, query: &str) -> reqwest::Response {
        let resp = self
            .http
            .get(self.api(&format!("/logs/flows/stream{query}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        resp
    }
}

async fn send_json<T: serde::Serialize>(ws: &mut Ws, msg: &T) {
    ws.send(Message::Text(serde_json::to_string(msg).unwrap().into()))
        .await
        .unwrap();
}

/// Sends batch `seq` and waits for its ack (skipping map deltas).
async fn send_batch(ws: &mut Ws, seq: u64, records: Vec<FlowRecord>) {
    send_json(ws, &NodeMessage::Flows { seq, records }).await;
    expect_ack(ws, seq).await;
}

/// Waits for the ack of `seq`.
async fn expect_ack(ws: &mut Ws, seq: u64) {
    loop {
        match next_msg(ws, Duration::from_secs(5)).await {
            ServerMessage::FlowsAck { seq: s } => {
                assert_eq!(s, seq);
                return;
            }
            ServerMessage::Delta { .. } => continue,
            other => panic!("expected FlowsAck {seq}, got {other:?}"),
        }
    }
}

/// Asserts that no ack (nor anything else but deltas and pings) comes for `quiet`.
async fn expect_no_ack(ws: &mut Ws, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(t)))) => {
                let m: ServerMessage = serde_json::from_str(&t).unwrap();
                assert!(matches!(m, ServerMessage::Delta { .. }), "unexpected {m:?}");
            }
            Ok(Some(Ok(Message::Close(f)))) => panic!("stream closed: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("stream ended: {other:?}"),
        }
    }
}

fn flow(src: &str, dst: &str, dport: u16, decision: &str, end_ms: i64) -> FlowRecord {
    FlowRecord {
        start_ms: end_ms - 1000,
        end_ms,
        proto: "tcp".into(),
        src_ip: src.parse().unwrap(),
        src_port: 40000,
        dst_ip: dst.parse().unwrap(),
        dst_port: dport,
        direction: "out".into(),
        packets_out: 10,
        bytes_out: 1500,
        packets_in: 8,
        bytes_in: 9000,
        path: "direct".into(),
        via: String::new(),
        decision: decision.into(),
        rule: if decision == "deny" {
            "no-ssh".into()
        } else {
            String::new()
        },
        count: 1,
        end_reason: if decision == "deny" {
            "denied".into()
        } else {
            "closed".into()
        },
    }
}

/// The next SSE event (name, data) from a live response, within `within`.
async fn next_event(
    resp: &mut reqwest::Response,
    buf: &mut String,
    within: Duration,
) -> (String, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v.to_string());
                }
            }
            if let Some(d) = data {
                return (event, d);
            }
        }
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("an SSE event in time")
            .unwrap()
            .expect("the SSE stream stays open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

const A: &str = "100.64.0.2";
const B: &str = "100.64.0.3";
const STRANGER: &str = "100.64.9.9";

#[tokio::test]
async fn batches_are_acked_stored_once_named_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let token = srv.token(&admin).await;
    let a = srv.enroll(&token, 1, "alpha").await;
    let b = srv.enroll(&token, 2, "beta").await;
    assert_eq!(
        (a.ip.to_string().as_str(), b.ip.to_string().as_str()),
        (A, B)
    );

    let mut ws = srv.connect(&a.node_secret).await;
    let t = now_ms();
    send_batch(
        &mut ws,
        1,
        vec![
            flow(A, B, 443, "allow", t),
            flow(A, STRANGER, 22, "deny", t),
        ],
    )
    .await;
    let page = srv.flows(&admin, "").await;
    assert_eq!(page.records.len(), 2);
    assert_eq!(page.next_before_id, None);
    // Newest first.
    let (deny, allow) = (&page.records[0], &page.records[1]);
    assert!(deny.id > allow.id);
    assert_eq!(
        (
            allow.node.as_str(),
            allow.src_node.as_str(),
            allow.dst_node.as_str()
        ),
        ("alpha", "alpha", "beta")
    );
    assert_eq!(allow.bytes_in, 9000);
    assert_eq!(allow.dst_port, 443);
    assert_eq!(deny.dst_node, "", "an address of no node has no name");
    assert_eq!(deny.decision, "deny");
    assert_eq!(deny.rule, "no-ssh");

    // A resend (the ack was lost) is acked again and stored once.
    send_batch(
        &mut ws,
        1,
        vec![
            flow(A, B, 443, "allow", t),
            flow(A, STRANGER, 22, "deny", t),
        ],
    )
    .await;
    assert_eq!(srv.flows(&admin, "").await.records.len(), 2);
    send_batch(&mut ws, 2, vec![flow(B, A, 80, "allow", t)]).await;
    assert_eq!(srv.flows(&admin, "").await.records.len(), 3);
    drop(ws);
    srv.stop().await;

    // After a restart the records and the last seq are still there.
    let srv = Running::start(dir.path()).await;
    let before = srv.flows(&admin, "").await;
    assert_eq!(before.records.len(), 3);
    let mut ws = srv.connect(&a.node_secret).await;
    send_batch(&mut ws, 2, vec![flow(B, A, 80, "allow", t)]).await;
    send_batch(&mut ws, 1, vec![flow(B, A, 80, "allow", t)]).await;
    assert_eq!(srv.flows(&admin, "").await, before, "resends store nothing");
    send_batch(&mut ws, 3, vec![flow(B, A, 81, "allow", t)]).await;
    let after = srv.flows(&admin, "").await;
    assert_eq!(after.records.len(), 4);
    assert_eq!(after.records[0].dst_port, 81);
    assert_eq!(after.records[0].src_node, "beta");
    srv.stop().await;
}

#[tokio::test]
async fn filters_pagination_and_jsonl_export() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let token = srv.token(&admin).await;
    let a = srv.enroll(&token, 1, "alpha").await;
    let b = srv.enroll(&token, 2, "beta").await;
    let _c = srv.enroll(&token, 3, "gamma").await;
    let t = now_ms();
    let three_hours_ago = t - 3 * 3600 * 1000;

    // alpha: 1200 allowed flows to beta 3 h ago, then 5 denied to a stranger now.
    let mut ws = srv.connect(&a.node_secret).await;
    let old: Vec<FlowRecord> = (0..1200)
        .map(|i| {
            flow(
                A,
                B,
                1000 + i,
                "allow",
                three_hours_ago + i64::from(i) * 1000,
            )
        })
        .collect();
    send_batch(&mut ws, 1, old).await;
    let denied: Vec<FlowRecord> = (0..5)
        .map(|i| flow(A, STRANGER, 22, "deny", t + i))
        .collect();
    send_batch(&mut ws, 2, denied).await;
    // beta reports one UDP flow from a stranger, now.
    let mut wb = srv.connect(&b.node_secret).await;
    let mut udp = flow(STRANGER, B, 53, "allow", t);
    udp.proto = "udp".into();
    udp.direction = "in".into();
    send_batch(&mut wb, 1, vec![udp]).await;

    // Default page: the newest 100, newest first, with a cursor.
    let page = srv.flows(&admin, "").await;
    assert_eq!(page.records.len(), 100);
    assert_eq!(page.records[0].node, "beta");
    assert!(page.records.windows(2).all(|w| w[0].id > w[1].id));
    // Paging through everything with the cursor sees each record once.
    let mut seen = Vec::new();
    let mut query = "?limit=1000".to_string();
    loop {
        let p = srv.flows(&admin, &query).await;
        seen.extend(p.records.iter().map(|r| r.id));
        match p.next_before_id {
            Some(id) => query = format!("?limit=1000&before_id={id}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 1206);
    assert!(seen.windows(2).all(|w| w[0] > w[1]));

    let count = |q: &'static str| {
        let srv = &srv;
        let admin = admin.clone();
        async move { srv.flows(&admin, q).await.records.len() }
    };
    assert_eq!(count("?decision=deny").await, 5);
    assert_eq!(count("?since=1h").await, 6);
    assert_eq!(count("?since=1h&decision=allow").await, 1);
    assert_eq!(count("?proto=udp").await, 1);
    assert_eq!(count("?proto=UDP").await, 1);
    // node= is the reporting node or either end: beta is the destination of
    // alpha's 1200 and reported one itself.
    assert_eq!(count("?node=beta&limit=1000&since=1h").await, 1);
    assert_eq!(count("?node=gamma").await, 0);
    let since_secs = (three_hours_ago + 600_000) / 1000;
    let until_secs = (t - 3600 * 1000) / 1000;
    let q = format!("?since={since_secs}&until={until_secs}&limit=1000");
    let p = srv.flows(&admin, &q).await;
    assert!(p
        .records
        .iter()
        .all(|r| r.end_ms >= since_secs * 1000 && r.end_ms <= until_secs * 1000));
    assert!(!p.records.is_empty() && p.records.len() < 1200);

    // Bad parameters: 400 with a message naming the problem.
    for (q, needle) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?decision=maybe", "decision"),
        ("?since=yesterday", "since"),
        ("?before_id=-3", "before_id"),
        ("?proto=t%20cp", "proto"),
        ("?node=Not_A_Name", "node"),
        ("?format=xml", "format"),
        ("?colour=red", "colour"),
        ("?since=1h&until=2h", "since is after until"),
    ] {
        let (status, v) = srv.get(&admin, &format!("/logs/flows{q}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{q}: {msg}");
    }

    // JSON lines: every matching record, oldest first (more than one database page).
    let resp = srv
        .http
        .get(srv.api("/logs/flows?format=jsonl"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.text().await.unwrap();
    let lines: Vec<FlowLogRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1206);
    assert!(lines.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(lines[0].dst_port, 1000);
    assert_eq!(lines[1205].node, "beta");
    // The Accept header asks for the same, with filters.
    let resp = srv
        .http
        .get(srv.api("/logs/flows?decision=deny"))
        .header("accept", "application/x-ndjson")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(text.lines().all(|l| l.contains("\"decision\":\"deny\"")));

    // The endpoints are documented.
    let (_, doc) = srv.get(&admin, "/openapi.json").await;
    assert!(doc["paths"]["/api/v1/logs/flows"]["get"].is_object());
    assert!(doc["paths"]["/api/v1/logs/flows/stream"]["get"].is_object());
    assert!(doc["components"]["schemas"]["FlowLogRecord"].is_object());
    srv.stop().await;
}

#[tokio::test]
async fn live_stream_delivers_new_records_of_its_account_only() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let (status, v) = srv
        .post(Some(&admin), "/accounts", json!({"name": "acme"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let acme: CreateAccountResponse = serde_json::from_value(v).unwrap();

    let token = srv.token(&admin).await;
    let a = srv.enroll(&token, 1, "alpha").await;
    let acme_token = srv.token(&acme.api_key).await;
    let x = srv.enroll(&acme_token, 9, "xray").await;
    let mut wa = srv.connect(&a.node_secret).await;
    let mut wx = srv.connect(&x.node_secret).await;

    let mut live = srv.live(&admin, "?decision=deny").await;
    let mut acme_live = srv.live(&acme.api_key, "").await;
    let t = now_ms();
    send_batch(
        &mut wa,
        1,
        vec![flow(A, B, 443, "allow", t), flow(A, B, 22, "deny", t)],
    )
    .await;
    let mut buf = String::new();
    let (event, data) = next_event(&mut live, &mut buf, Duration::from_secs(5)).await;
    assert_eq!(event, "");
    let r: FlowLogRecord = serde_json::from_str(&data).unwrap();
    assert_eq!(
        (r.node.as_str(), r.decision.as_str(), r.dst_port),
        ("alpha", "deny", 22)
    );

    // acme's stream skips the default account's records: its first event is its own.
    let xip = x.ip.to_string();
    send_batch(&mut wx, 1, vec![flow(&xip, "100.65.0.9", 8080, "allow", t)]).await;
    let mut abuf = String::new();
    let (_, data) = next_event(&mut acme_live, &mut abuf, Duration::from_secs(5)).await;
    let r: FlowLogRecord = serde_json::from_str(&data).unwrap();
    assert_eq!((r.node.as_str(), r.dst_port), ("xray", 8080));

    // And acme's key cannot read the default account's records.
    let p = srv.flows(&acme.api_key, "").await;
    assert_eq!(p.records.len(), 1);
    assert_eq!(p.records[0].node, "xray");
    let (status, _) = srv.get(&acme.api_key, "/logs/flows?account=default").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let resp = srv
        .http
        .get(srv.api("/logs/flows/stream?account=default"))
        .bearer_auth(&acme.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (status, _) = srv
        .get(&acme.api_key, "/logs/flows?format=jsonl&account=default")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The operator may read acme's on purpose.
    assert_eq!(srv.flows(&admin, "?account=acme").await.records.len(), 1);

    // A server shutdown ends live streams (it does not hang on them).
    drop((wa, wx));
    srv.stop().await;
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = live.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the live stream ends with the server");
}

#[tokio::test]
async fn retention_deletes_records_that_ended_too_long_ago() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start_with(dir.path(), Duration::from_secs(3600)).await;
    let admin = srv.admin.clone();
    let token = srv.token(&admin).await;
    let a = srv.enroll(&token, 1, "alpha").await;
    let mut ws = srv.connect(&a.node_secret).await;
    let t = now_ms();
    send_batch(
        &mut ws,
        1,
        vec![
            flow(A, B, 1, "allow", t - 2 * 3600 * 1000),
            flow(A, B, 2, "allow", t - 10 * 60 * 1000),
        ],
    )
    .await;
    assert_eq!(srv.flows(&admin, "").await.records.len(), 2);
    drop(ws);
    srv.stop().await;

    // The sweep runs at start (and hourly).
    let srv = Running::start_with(dir.path(), Duration::from_secs(3600)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let p = srv.flows(&admin, "").await;
        if p.records.len() == 1 {
            assert_eq!(p.records[0].dst_port, 2, "the recent record is kept");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 2 h old record was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.stop().await;

    // A zero retention is refused with a clear error.
    let err = Server::start(Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        public_url: None,
        edge_udp: None,
        dns_suffix: "mesh".into(),
        flow_retention: Duration::ZERO,
        gateway_listen: None,
        gateway_tls: None,
    })
    .await
    .err()
    .expect("zero retention is refused");
    assert!(format!("{err:#}").contains("retention"), "{err:#}");
}

#[tokio::test]
async fn malformed_batches_are_dropped_and_the_stream_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let token = srv.token(&admin).await;
    let a = srv.enroll(&token, 1, "alpha").await;
    let mut ws = srv.connect(&a.node_secret).await;
    let t = now_ms();

    // A record with a decision that is neither allow nor deny spoils its batch.
    let mut bad = flow(A, B, 22, "allow", t);
    bad.decision = "maybe".into();
    send_json(
        &mut ws,
        &NodeMessage::Flows {
            seq: 5,
            records: vec![flow(A, B, 80, "allow", t), bad],
        },
    )
    .await;
    // Refused for its content: acknowledged (a resend cannot fix it; it must
    // not block the node's queue), nothing stored.
    expect_ack(&mut ws, 5).await;
    // Times running backwards.
    let mut bad = flow(A, B, 22, "allow", t);
    bad.end_ms = bad.start_ms - 1;
    send_json(
        &mut ws,
        &NodeMessage::Flows {
            seq: 6,
            records: vec![bad],
        },
    )
    .await;
    expect_ack(&mut ws, 6).await;
    // Too many records.
    send_json(
        &mut ws,
        &NodeMessage::Flows {
            seq: 7,
            records: vec![flow(A, B, 80, "allow", t); 5001],
        },
    )
    .await;
    expect_ack(&mut ws, 7).await;
    // Not a message at all, and a flows message with a record missing fields.
    ws.send(Message::Text("{not json".into())).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "flows", "seq": 8, "records": [{"start_ms": 1}]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    expect_no_ack(&mut ws, Duration::from_millis(700)).await;
    assert!(
        srv.flows(&admin, "").await.records.is_empty(),
        "nothing stored"
    );

    // The stream still works, and the refused seqs were not recorded as stored:
    // a good batch numbered below them is taken.
    send_batch(&mut ws, 2, vec![flow(A, B, 443, "allow", t)]).await;
    let p = srv.flows(&admin, "").await;
    assert_eq!(p.records.len(), 1);
    assert_eq!(p.records[0].dst_port, 443);
    // Long strings are cut, control characters dropped.
    let mut long = flow(A, B, 8443, "deny", t);
    long.rule = format!("r\u{1b}[31m{}", "x".repeat(500));
    send_batch(&mut ws, 3, vec![long]).await;
    let p = srv.flows(&admin, "?decision=deny").await;
    assert_eq!(p.records[0].rule.chars().count(), 128);
    assert!(!p.records[0].rule.contains('\u{1b}'));
    srv.stop().await;
}

#[tokio::test]
async fn traffic_summary_counts_each_connection_once_and_denied_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let token = srv.token(&admin).await;
    let a = srv.enroll(&token, 1, "alpha").await;
    let b = srv.enroll(&token, 2, "beta").await;
    let t = now_ms();
    // One connection a -> b seen from both ends, one older than a day, and
    // denied attempts summarised with a count.
    let mut inbound = flow(A, B, 443, "allow", t);
    inbound.direction = "in".into();
    let mut denied = flow(A, STRANGER, 22, "deny", t);
    denied.count = 5;
    let old = flow(A, B, 80, "allow", t - 2 * 24 * 3600 * 1000);
    let mut wa = srv.connect(&a.node_secret).await;
    send_batch(&mut wa, 1, vec![flow(A, B, 443, "allow", t), denied, old]).await;
    let mut wb = srv.connect(&b.node_secret).await;
    send_batch(&mut wb, 1, vec![inbound]).await;

    let (status, v) = srv.get(&admin, "/logs/summary").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["connections"], 1, "{v}");
    assert_eq!(v["bytes"], 1500 + 9000, "{v}");
    assert_eq!(v["denied"], 5, "{v}");
    let (_, v) = srv.get(&admin, "/logs/summary?since=7d").await;
    assert_eq!(v["connections"], 2, "{v}");
    let (status, v) = srv.get(&admin, "/logs/summary?since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    srv.stop().await;
}
