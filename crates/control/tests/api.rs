//! End-to-end tests of the control plane: real SQLite files in temp dirs, real
//! HTTP on 127.0.0.1, real WebSocket clients.

mod dash_support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dash_support::{next_msg, Ws};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use trellis_control::{Config, Server};
use trellis_edge::RelayHub;
use trellis_proto::{
    AccountInfo, CreateAccountResponse, CreateTokenResponse, EnrollResponse, NodeInfo, NodeKey,
    NodeMessage, ServerMessage,
};

/// The shared in-process server (with the edge on), with calls that take any API key.
struct Running {
    server: dash_support::Running,
    /// The operator's API key.
    admin: String,
    edge: SocketAddr,
    relay: Arc<RelayHub>,
    http: reqwest::Client,
}

impl Running {
    async fn start(dir: &Path) -> Running {
        let server = dash_support::Running::start_with(dir, |c| {
            c.edge_udp = Some("127.0.0.1:0".parse().unwrap())
        })
        .await;
        Running {
            admin: server.operator.clone(),
            edge: server.edge.expect("the edge runs"),
            relay: server.relay.clone(),
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
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, value)
    }

    async fn get(&self, key: Option<&str>, path: &str) -> (StatusCode, Value) {
        let mut req = self.http.get(self.api(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn delete(&self, key: &str, path: &str) -> (StatusCode, String) {
        let resp = self
            .http
            .delete(self.api(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn token(&self, key: &str, account: Option<&str>, body: Value) -> String {
        let path = match account {
            Some(a) => format!("/tokens?account={a}"),
            None => "/tokens".to_string(),
        };
        let (status, v) = self.post(Some(key), &path, body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let t: CreateTokenResponse = serde_json::from_value(v).unwrap();
        t.token
    }

    async fn enroll_raw(&self, token: &str, key: u8, name: Option<&str>) -> (StatusCode, Value) {
        let mut body = json!({
            "token": token,
            "public_key": NodeKey([key; 32]).to_string(),
            "hostname": format!("Host_{key}.local"),
            "os": "linux",
            "version": "test",
        });
        if let Some(n) = name {
            body["name"] = json!(n);
        }
        self.post(None, "/enroll", body).await
    }

    async fn enroll(&self, token: &str, key: u8, name: Option<&str>) -> EnrollResponse {
        let (status, v) = self.enroll_raw(token, key, name).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn nodes(&self, key: &str, account: Option<&str>) -> Vec<NodeInfo> {
        let path = match account {
            Some(a) => format!("/nodes?account={a}"),
            None => "/nodes".to_string(),
        };
        let (status, v) = self.get(Some(key), &path).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    fn ws_url(&self) -> String {
        format!(
            "{}/api/v1/node/stream",
            self.server.url.replacen("http://", "ws://", 1)
        )
    }

    async fn connect_raw(&self, secret: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = self.ws_url().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| ws)
    }

    /// Connects, says hello, and returns the stream with its first message (the full map).
    async fn connect(&self, secret: &str, port: u16, local: &[&str]) -> (Ws, ServerMessage) {
        let mut ws = self.connect_raw(secret).await.unwrap();
        hello(&mut ws, port, local).await;
        let first = next_msg(&mut ws, Duration::from_secs(2)).await;
        (ws, first)
    }
}

async fn hello(ws: &mut Ws, port: u16, local: &[&str]) {
    hello_reflexive(ws, port, local, None).await;
}

async fn hello_reflexive(ws: &mut Ws, port: u16, local: &[&str], reflexive: Option<&str>) {
    let hello = NodeMessage::Hello {
        listen_port: port,
        local_addrs: local.iter().map(|s| s.parse().unwrap()).collect(),
        reflexive: reflexive.map(|r| r.parse().unwrap()),
        advertise_routes: Vec::new(),
        os: "linux".into(),
        version: "test".into(),
    };
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .unwrap();
}

/// Reads deltas until one whose upserted peers satisfy `pred` (deltas are
/// ordered and eventually consistent: an earlier recomputation may be pushed
/// first), failing after `within`.
async fn delta_until(
    ws: &mut Ws,
    within: Duration,
    mut pred: impl FnMut(&[Peer]) -> bool,
) -> Vec<Peer> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_msg(ws, left).await {
            ServerMessage::Delta { upsert, .. } if pred(&upsert) => return upsert,
            ServerMessage::Delta { .. } => continue,
            other => panic!("expected a delta, got {other:?}"),
        }
    }
}

/// Asserts that nothing but pings arrives for `quiet`.
async fn expect_silence(ws: &mut Ws, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected message: {t}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("stream ended: {other:?}"),
        }
    }
}

/// Reads until the server closes the stream; returns the text messages seen before.
async fn until_closed(ws: &mut Ws) -> Vec<ServerMessage> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("the server closes the stream in time")
        {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return seen,
            Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => {}
        }
    }
}

fn map_of(msg: ServerMessage) -> trellis_proto::NetworkMap {
    match msg {
        ServerMessage::Map(m) => m,
        other => panic!("expected a full map, got {other:?}"),
    }
}

fn err_text(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field in {v}"))
}

#[tokio::test]
async fn first_start_writes_admin_key_and_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let srv = Running::start(&data).await;

    let dir_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let key_path = data.join("admin.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key_file = std::fs::read_to_string(&key_path).unwrap();
    assert_eq!(key_file.lines().count(), 1);
    assert!(data.join("trellis.db").exists());

    let (status, v) = srv.get(None, "/health").await;
    assert_eq!((status, v), (StatusCode::OK, json!({"ok": true})));

    let (status, v) = srv.get(Some(&srv.admin), "/accounts").await;
    assert_eq!(status, StatusCode::OK);
    let accounts: Vec<AccountInfo> = serde_json::from_value(v).unwrap();
    assert_eq!(accounts.len(), 1);
    assert_eq!(accounts[0].name, "default");
    assert_eq!(accounts[0].cidr.to_string(), "100.64.0.0/16");

    let (status, v) = srv
        .post(Some(&srv.admin), "/accounts", json!({"name": "acme"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let acme: CreateAccountResponse = serde_json::from_value(v).unwrap();
    assert_eq!(acme.account.cidr.to_string(), "100.65.0.0/16");

    let (status, v) = srv
        .post(Some(&srv.admin), "/accounts", json!({"name": "acme"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(err_text(&v).contains("already exists"));

    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("alpha")).await;
    let b = srv.enroll(&token, 2, None).await;
    assert_eq!(a.ip.to_string(), "100.64.0.2");
    assert_eq!(b.ip.to_string(), "100.64.0.3");
    assert_eq!(b.name, "host-2");
    let acme_token = srv.token(&acme.api_key, None, json!({})).await;
    let c = srv.enroll(&acme_token, 3, None).await;
    assert_eq!(c.ip.to_string(), "100.65.0.2");
    assert_eq!(c.account, "acme");
    srv.stop().await;

    // Restart: same key file, same accounts, keys, nodes and addresses.
    let srv = Running::start(&data).await;
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key_file);
    let (status, v) = srv.get(Some(&srv.admin), "/accounts").await;
    assert_eq!(status, StatusCode::OK);
    let accounts: Vec<AccountInfo> = serde_json::from_value(v).unwrap();
    let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["default", "acme"]);
    let nodes = srv.nodes(&srv.admin, None).await;
    let got: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.ip.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            ("alpha".to_string(), "100.64.0.2".to_string()),
            ("host-2".to_string(), "100.64.0.3".to_string())
        ]
    );
    assert!(nodes.iter().all(|n| !n.online));
    let acme_nodes = srv.nodes(&acme.api_key, None).await;
    assert_eq!(acme_nodes.len(), 1);
    // The token made before the restart still works.
    let d = srv.enroll(&token, 4, None).await;
    assert_eq!(d.ip.to_string(), "100.64.0.4");
    // The node secret made before the restart still opens a stream.
    let (_ws, first) = srv.connect(&a.node_secret, 51820, &[]).await;
    assert_eq!(map_of(first).peers.len(), 2);
    srv.stop().await;
}

#[tokio::test]
async fn single_use_expired_and_reusable_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();

    // Single use: works once, then a clear refusal and nothing stored.
    let once = srv.token(&admin, None, json!({})).await;
    let first = srv.enroll(&once, 1, Some("web")).await;
    assert_eq!(first.ip.to_string(), "100.64.0.2");
    let (status, v) = srv.enroll_raw(&once, 2, Some("web")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err_text(&v).contains("join token was already used"), "{v}");
    assert_eq!(srv.nodes(&admin, None).await.len(), 1);

    // Unknown token.
    let (status, v) = srv.enroll_raw("trj_garbage", 3, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err_text(&v).contains("not recognised"), "{v}");

    // Same key twice.
    let many = srv
        .token(&admin, None, json!({"reusable": true, "tags": ["prod"]}))
        .await;
    let (status, v) = srv.enroll_raw(&many, 1, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");

    // Bad requested name: 400, nothing stored, the single-use token not consumed.
    let fresh = srv.token(&admin, None, json!({})).await;
    let (status, v) = srv.enroll_raw(&fresh, 5, Some("Bad Name")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err_text(&v).contains("invalid node name"), "{v}");
    srv.enroll(&fresh, 5, Some("good")).await;

    // Reusable: many nodes, distinct names and consecutive addresses.
    let a = srv.enroll(&many, 10, Some("web")).await;
    let b = srv.enroll(&many, 11, Some("web")).await;
    assert_eq!((a.name.as_str(), b.name.as_str()), ("web-2", "web-3"));
    let nodes = srv.nodes(&admin, None).await;
    let ips: Vec<String> = nodes.iter().map(|n| n.ip.to_string()).collect();
    assert_eq!(
        ips,
        ["100.64.0.2", "100.64.0.3", "100.64.0.4", "100.64.0.5"]
    );
    assert_eq!(nodes[2].tags, ["prod"]);

    // ttl checks.
    let (status, v) = srv
        .post(Some(&admin), "/tokens", json!({"ttl_secs": 0}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err_text(&v).contains("ttl"), "{v}");
    let (status, _) = srv
        .post(Some(&admin), "/tokens", json!({"ttl_secs": 400 * 86400}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Expired.
    let short = srv
        .token(&admin, None, json!({"ttl_secs": 1, "reusable": true}))
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, v) = srv.enroll_raw(&short, 20, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err_text(&v).contains("join token expired at 20"), "{v}");
    assert_eq!(srv.nodes(&admin, None).await.len(), 4);
    srv.stop().await;
}

#[tokio::test]
async fn single_use_token_enrolls_exactly_one_node_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({})).await;
    let mut tasks = Vec::new();
    for k in 0..8u8 {
        let http = srv.http.clone();
        let url = srv.api("/enroll");
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"token": token, "public_key": NodeKey([k + 1; 32]).to_string()}))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let status = t.await.unwrap();
        if status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(srv.nodes(&srv.admin, None).await.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn keys_act_only_on_their_account() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let (_, v) = srv
        .post(Some(&admin), "/accounts", json!({"name": "acme"}))
        .await;
    let acme: CreateAccountResponse = serde_json::from_value(v).unwrap();
    let (_, v) = srv
        .post(Some(&admin), "/accounts", json!({"name": "beta"}))
        .await;
    let beta: CreateAccountResponse = serde_json::from_value(v).unwrap();
    assert_eq!(beta.account.cidr.to_string(), "100.66.0.0/16");

    // No key / unknown key.
    let (status, v) = srv.get(None, "/nodes").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err_text(&v).contains("missing API key"));
    let (status, v) = srv.get(Some("trk_nope"), "/nodes").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err_text(&v).contains("not recognised"));

    // An account key on another account.
    for path in ["/nodes?account=default", "/nodes?account=beta"] {
        let (status, v) = srv.get(Some(&acme.api_key), path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(err_text(&v).contains("cannot act on account"), "{v}");
    }
    let (status, _) = srv
        .post(Some(&acme.api_key), "/tokens?account=beta", json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = srv.delete(&acme.api_key, "/nodes/x?account=beta").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // ... and naming its own account is fine.
    let (status, _) = srv.get(Some(&acme.api_key), "/nodes?account=acme").await;
    assert_eq!(status, StatusCode::OK);

    // Only the operator creates and lists accounts.
    let (status, _) = srv
        .post(Some(&acme.api_key), "/accounts", json!({"name": "evil"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = srv.get(Some(&acme.api_key), "/accounts").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The operator acts on any account; tokens land in the named one.
    let t = srv.token(&admin, Some("beta"), json!({})).await;
    let n = srv.enroll(&t, 1, None).await;
    assert_eq!(
        (n.account.as_str(), n.ip.to_string().as_str()),
        ("beta", "100.66.0.2")
    );
    assert_eq!(srv.nodes(&admin, Some("beta")).await.len(), 1);
    assert_eq!(srv.nodes(&admin, None).await.len(), 0);
    assert_eq!(srv.nodes(&acme.api_key, None).await.len(), 0);
    let (status, v) = srv.get(Some(&admin), "/nodes?account=nosuch").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err_text(&v).contains("no account named"));

    // Account cidr checks.
    for (body, want) in [
        (
            json!({"name": "x1", "cidr": "10.0.0.0/16"}),
            "outside the overlay space",
        ),
        (
            json!({"name": "x2", "cidr": "100.64.0.0/30"}),
            "prefix length",
        ),
        (
            json!({"name": "x3", "cidr": "100.70.1.0/16"}),
            "not a network address",
        ),
        (json!({"name": "Bad_Name"}), "invalid account name"),
        (json!({"name": "x4", "cidr": "banana"}), "invalid JSON body"),
    ] {
        let (status, v) = srv.post(Some(&admin), "/accounts", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(err_text(&v).contains(want), "{v} lacks {want}");
    }
    // An explicit overlapping block is allowed.
    let (status, v) = srv
        .post(
            Some(&admin),
            "/accounts",
            json!({"name": "twin", "cidr": "100.64.0.0/16"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, v) = srv.get(Some(&admin), "/accounts").await;
    assert_eq!(v.as_array().unwrap().len(), 4);
    srv.stop().await;
}

#[tokio::test]
async fn bad_bodies_and_openapi() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;

    let resp = srv
        .http
        .post(srv.api("/enroll"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert!(err_text(&v).contains("invalid JSON body"), "{v}");

    let (status, v) = srv
        .post(
            None,
            "/enroll",
            json!({"token": "x", "public_key": "short"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err_text(&v).contains("not a WireGuard public key"), "{v}");

    let (status, v) = srv
        .post(Some(&srv.admin), "/tokens", json!({"ttl_secs": "soon"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err_text(&v).contains("invalid JSON body"), "{v}");
    let (status, v) = srv.post(Some(&srv.admin), "/accounts", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err_text(&v).contains("missing field `name`"), "{v}");

    let (status, v) = srv.get(None, "/no/such/thing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err_text(&v).contains("no such API endpoint"));

    let (status, v) = srv.delete(&srv.admin, "/nodes/ghost").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v.contains("no node named \\\"ghost\\\""), "{v}");

    let (status, doc) = srv.get(None, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/health",
        "/api/v1/accounts",
        "/api/v1/tokens",
        "/api/v1/nodes",
        "/api/v1/nodes/{name}",
        "/api/v1/enroll",
        "/api/v1/node/stream",
        "/api/v1/relay",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["EnrollRequest"].is_object());
    assert!(paths["/api/v1/accounts"]["post"].is_object());
    assert!(paths["/api/v1/accounts"]["get"].is_object());

    // Nothing was stored by any of it.
    assert_eq!(srv.nodes(&srv.admin, None).await.len(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn maps_of_two_accounts_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    // Same block on purpose: isolation must not depend on addresses.
    let (_, v) = srv
        .post(
            Some(&admin),
            "/accounts",
            json!({"name": "acme", "cidr": "100.64.0.0/16"}),
        )
        .await;
    let acme: CreateAccountResponse = serde_json::from_value(v).unwrap();

    let td = srv.token(&admin, None, json!({"reusable": true})).await;
    let ta = srv
        .token(&acme.api_key, None, json!({"reusable": true}))
        .await;
    let d1 = srv.enroll(&td, 1, Some("d1")).await;
    let d2 = srv.enroll(&td, 2, Some("d2")).await;
    let a1 = srv.enroll(&ta, 3, Some("a1")).await;
    let a2 = srv.enroll(&ta, 4, Some("a2")).await;
    assert_eq!(
        d1.ip, a1.ip,
        "overlapping blocks hand out the same addresses"
    );

    let (mut wd, first) = srv.connect(&d1.node_secret, 51820, &["198.18.0.1"]).await;
    let map = map_of(first);
    assert_eq!(map.self_node.name, "d1");
    assert_eq!(map.self_node.account, "default");
    let peers: Vec<&str> = map.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(peers, ["d2"]);
    assert_eq!(map.peers[0].public_key, NodeKey([2; 32]));
    assert_eq!(map.peers[0].allowed_ips[0].to_string(), "100.64.0.3/32");

    let (mut wa, first) = srv.connect(&a1.node_secret, 51820, &["198.18.0.3"]).await;
    let map = map_of(first);
    let peers: Vec<&str> = map.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(peers, ["a2"]);
    assert_eq!(map.self_node.account, "acme");

    // Activity in acme is never pushed to default's streams.
    let (mut wa2, _) = srv.connect(&a2.node_secret, 51821, &["198.18.0.4"]).await;
    let upsert = delta_until(&mut wa, Duration::from_secs(2), |u| {
        u.first()
            .is_some_and(|p| p.online && !p.endpoints.is_empty())
    })
    .await;
    assert_eq!(upsert.len(), 1);
    assert_eq!(upsert[0].name, "a2");
    assert_eq!(upsert[0].endpoints[0].to_string(), "198.18.0.4:51821");
    expect_silence(&mut wd, Duration::from_millis(500)).await;
    let _ = wa2.close(None).await;
    let _ = d2;
    srv.stop().await;
}

#[tokio::test]
async fn stream_gets_map_then_deltas_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let token = srv.token(&admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;

    // Unknown secret: 401 before upgrading.
    match srv.connect_raw("trn_nope").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body = resp.body().clone().unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert!(err_text(&v).contains("not recognised"), "{v}");
        }
        Err(e) => panic!("expected an HTTP 401, got {e}"),
        Ok(_) => panic!("expected an HTTP 401, got a stream"),
    }

    let (mut wa, first) = srv
        .connect(
            &a.node_secret,
            51820,
            &["198.18.0.1", "127.0.0.1", "100.64.0.2"],
        )
        .await;
    let map = map_of(first);
    assert_eq!(map.self_node.ip.to_string(), "100.64.0.2");
    assert_eq!(map.self_node.cidr.to_string(), "100.64.0.0/16");
    assert!(map.peers.is_empty());
    expect_silence(&mut wa, Duration::from_millis(300)).await;

    // A new node: pushed within 1 s of its enrollment.
    let started = std::time::Instant::now();
    let b = srv.enroll(&token, 2, Some("b")).await;
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta {
            self_node,
            upsert,
            remove,
            relay,
            dns,
            ..
        } => {
            assert!(relay.is_none());
            assert!(self_node.is_none());
            let dns = dns.expect("the new node's name is pushed");
            assert!(dns
                .records
                .iter()
                .any(|r| r.name == "b.default.mesh" && r.addr == std::net::IpAddr::V4(b.ip)));
            assert!(remove.is_empty());
            assert_eq!(upsert.len(), 1);
            assert_eq!(upsert[0].name, "b");
            assert_eq!(upsert[0].ip, b.ip);
            assert!(!upsert[0].online);
            assert!(upsert[0].endpoints.is_empty());
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));

    // b connects: a sees it online with its endpoints; b's map holds a.
    let (mut wb, first) = srv.connect(&b.node_secret, 41000, &["198.18.0.2"]).await;
    let map = map_of(first);
    assert_eq!(map.peers.len(), 1);
    assert_eq!(map.peers[0].name, "a");
    assert!(map.peers[0].online);
    let eps: Vec<String> = map.peers[0]
        .endpoints
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        eps,
        ["198.18.0.1:51820"],
        "loopback and overlay addresses are dropped"
    );
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, .. } => {
            assert!(upsert[0].online);
            assert_eq!(upsert[0].endpoints[0].to_string(), "198.18.0.2:41000");
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    let nodes = srv.nodes(&admin, None).await;
    assert!(nodes.iter().all(|n| n.online));
    assert!(nodes.iter().all(|n| n.last_seen.is_some()));

    // A changed hello updates endpoints.
    hello(&mut wb, 41001, &["198.18.0.9"]).await;
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, .. } => {
            assert_eq!(upsert[0].endpoints[0].to_string(), "198.18.0.9:41001");
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    // The same hello again changes nothing, so nothing is sent.
    hello(&mut wb, 41001, &["198.18.0.9"]).await;
    expect_silence(&mut wa, Duration::from_millis(300)).await;

    // Delete b: a gets the removal within 1 s, b gets Removed and is closed.
    let started = std::time::Instant::now();
    let (status, _) = srv.delete(&admin, "/nodes/b").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, remove, .. } => {
            assert!(upsert.is_empty());
            assert_eq!(remove, [NodeKey([2; 32])]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    let seen = until_closed(&mut wb).await;
    assert!(
        matches!(seen.last(), Some(ServerMessage::Removed { .. })),
        "{seen:?}"
    );

    // Its secret no longer opens a stream, and its key cannot enroll again.
    match srv.connect_raw(&b.node_secret).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected an HTTP 401, got {:?}", other.map(|_| ())),
    }
    let (status, v) = srv.enroll_raw(&token, 2, Some("b")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(err_text(&v).contains("removed from the network"), "{v}");
    let (status, _) = srv.delete(&admin, "/nodes/b").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The next node reuses the freed address.
    let c = srv.enroll(&token, 3, None).await;
    assert_eq!(c.ip.to_string(), "100.64.0.3");
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, .. } => assert_eq!(upsert[0].name, "host-3"),
        other => panic!("expected a delta, got {other:?}"),
    }
    srv.stop().await;
}

#[tokio::test]
async fn newer_connection_replaces_older_and_disconnect_goes_offline() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let b = srv.enroll(&token, 2, Some("b")).await;

    let (mut wa, _) = srv.connect(&a.node_secret, 1000, &["198.18.0.1"]).await;
    let (mut wb1, _) = srv.connect(&b.node_secret, 2000, &["198.18.0.2"]).await;
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, .. } => assert!(upsert[0].online),
        other => panic!("expected a delta, got {other:?}"),
    }
    let (_wb2, first) = srv.connect(&b.node_secret, 2001, &["198.18.0.2"]).await;
    assert_eq!(map_of(first).peers.len(), 1);
    let seen = until_closed(&mut wb1).await;
    assert!(seen.is_empty(), "{seen:?}");
    // a sees the port change; b never went offline.
    let upsert = delta_until(&mut wa, Duration::from_secs(2), |u| {
        u.first()
            .is_some_and(|p| p.endpoints.first().is_some_and(|e| e.port() == 2001))
    })
    .await;
    assert!(upsert[0].online);
    expect_silence(&mut wa, Duration::from_millis(300)).await;
    assert!(srv.nodes(&srv.admin, None).await.iter().all(|n| n.online));

    drop(_wb2);
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, .. } => assert!(!upsert[0].online),
        other => panic!("expected a delta, got {other:?}"),
    }
    let nodes = srv.nodes(&srv.admin, None).await;
    let b_info = nodes.iter().find(|n| n.name == "b").unwrap();
    assert!(!b_info.online);
    // Endpoints persist while offline.
    assert_eq!(b_info.endpoints[0].to_string(), "198.18.0.2:2001");
    srv.stop().await;
}

#[tokio::test]
async fn stream_without_hello_is_closed_after_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let mut ws = srv.connect_raw(&a.node_secret).await.unwrap();
    // Garbage is ignored, not fatal.
    ws.send(Message::Text("{\"type\":\"nonsense\"}".into()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!srv.nodes(&srv.admin, None).await[0].online);
    let closed = tokio::time::timeout(Duration::from_secs(12), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(f))) => return f,
                Some(Ok(Message::Text(t))) => panic!("unexpected message before hello: {t}"),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("closed within 12 s");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(9), "{elapsed:?}");
    let frame = closed.expect("a close frame with a reason");
    assert!(frame.reason.contains("hello"), "{frame:?}");

    // Wrong method on a known path: JSON 405.
    let resp = srv.http.put(srv.api("/enroll")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = resp.json().await.unwrap();
    assert!(err_text(&v).contains("HTTP method"), "{v}");
    srv.stop().await;
}

/// Takes ~10 s: a node that stops answering pings goes offline within 9-10 s.
#[tokio::test]
async fn silent_stream_is_closed_after_nine_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let (mut ws, _) = srv.connect(&a.node_secret, 1, &[]).await;
    let started = std::time::Instant::now();
    // Not reading means not answering pings; the hello was the last thing heard.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(srv.nodes(&srv.admin, None).await[0].online);
    let offline = loop {
        if !srv.nodes(&srv.admin, None).await[0].online {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(11), "still online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(offline >= Duration::from_secs(8), "{offline:?}");
    assert!(offline <= Duration::from_millis(10_500), "{offline:?}");
    let seen = until_closed(&mut ws).await;
    assert!(seen.is_empty(), "{seen:?}");
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Relay: credentials in maps, reflexive endpoints, the WebSocket and UDP relay
// ---------------------------------------------------------------------------

use tokio::net::UdpSocket;
use trellis_proto::frames::{
    decode_registered, FRAME_REFUSED, FRAME_REGISTER, FRAME_REGISTERED, FRAME_RELAY_RECV,
    FRAME_RELAY_SEND,
};

impl Running {
    async fn relay_raw(&self, secret: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let url = format!(
            "{}/api/v1/relay",
            self.server.url.replacen("http://", "ws://", 1)
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| ws)
    }

    /// Opens the relay WebSocket of node `key` and waits until the hub has attached it.
    async fn relay_ws(&self, secret: &str, key: u8) -> Ws {
        let ws = self.relay_raw(secret).await.unwrap();
        let started = std::time::Instant::now();
        while !self.relay.has_ws(&[key; 32]) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "relay attached in time"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ws
    }
}

fn relay_send(dst: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![FRAME_RELAY_SEND];
    f.extend_from_slice(&[dst; 32]);
    f.extend_from_slice(payload);
    f
}

fn relay_recv(src: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![FRAME_RELAY_RECV];
    f.extend_from_slice(&[src; 32]);
    f.extend_from_slice(payload);
    f
}

/// The next binary message, skipping pings; panics after 2 s or on close.
async fn next_binary(ws: &mut Ws) -> Vec<u8> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("a relay frame in time")
            .expect("relay still open")
            .expect("no websocket error");
        match msg {
            Message::Binary(b) => return b.to_vec(),
            Message::Close(f) => panic!("relay closed: {f:?}"),
            _ => {}
        }
    }
}

/// Asserts that no binary message arrives for `quiet`.
async fn no_binary(ws: &mut Ws, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Binary(b)))) => panic!("unexpected relay frame: {b:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("relay ended: {other:?}"),
        }
    }
}

async fn udp_recv(sock: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(within, sock.recv_from(&mut buf)).await {
        Err(_) => None,
        Ok(r) => Some(buf[..r.unwrap().0].to_vec()),
    }
}

/// Sends `FRAME_REGISTER` with `token` from `sock` and returns the edge's answer.
async fn udp_register(sock: &UdpSocket, edge: SocketAddr, token: &str) -> Vec<u8> {
    let mut frame = vec![FRAME_REGISTER];
    frame.extend_from_slice(token.as_bytes());
    sock.send_to(&frame, edge).await.unwrap();
    udp_recv(sock, Duration::from_secs(2))
        .await
        .expect("the edge answers a registration")
}

fn relay_of(map: &trellis_proto::NetworkMap) -> trellis_proto::RelayInfo {
    map.relay
        .clone()
        .expect("the map carries relay information")
}

#[tokio::test]
async fn map_carries_a_relay_token_the_edge_accepts_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let (ws, first) = srv.connect(&a.node_secret, 51820, &[]).await;
    let relay = relay_of(&map_of(first));
    assert_eq!(relay.udp, srv.edge.to_string());
    assert_eq!(relay.ws_path, "/api/v1/relay");
    let now = trellis_control::api::now();
    assert!(
        (now + 86_400 - 5..=now + 86_400 + 5).contains(&relay.expires_at),
        "valid for 24 h: {}",
        relay.expires_at
    );

    let secret_path = dir.path().join("relay.secret");
    let mode = std::fs::metadata(&secret_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let secret = std::fs::read(&secret_path).unwrap();
    assert_eq!(secret.len(), 32);

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = udp_register(&sock, relay.udp.parse().unwrap(), &relay.token).await;
    assert_eq!(answer[0], FRAME_REGISTERED);
    assert_eq!(decode_registered(&answer), Some(sock.local_addr().unwrap()));
    drop(ws);
    srv.stop().await;

    // Same secret after a restart: the token still works on the new edge.
    let srv = Running::start(dir.path()).await;
    assert_eq!(std::fs::read(&secret_path).unwrap(), secret);
    let answer = udp_register(&sock, srv.edge, &relay.token).await;
    assert_eq!(answer[0], FRAME_REGISTERED, "{answer:?}");
    // A forged token is refused with a reason.
    let (head, last) = relay.token.split_at(relay.token.len() - 1);
    let forged = format!("{head}{}", if last == "0" { "1" } else { "0" });
    let answer = udp_register(&sock, srv.edge, &forged).await;
    assert_eq!(answer[0], FRAME_REFUSED);
    assert!(String::from_utf8_lossy(&answer[1..]).contains("token"));
    srv.stop().await;
}

#[tokio::test]
async fn reflexive_address_comes_first_and_its_changes_are_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let b = srv.enroll(&token, 2, Some("b")).await;
    let (mut wa, _) = srv.connect(&a.node_secret, 1000, &["198.18.0.1"]).await;

    let mut wb = srv.connect_raw(&b.node_secret).await.unwrap();
    hello_reflexive(&mut wb, 2000, &["198.18.0.2"], Some("198.18.5.5:40000")).await;
    let map_b = map_of(next_msg(&mut wb, Duration::from_secs(2)).await);
    assert!(map_b.relay.is_some());
    // observed_ip is 127.0.0.1 here, which is filtered out.
    let upsert = delta_until(&mut wa, Duration::from_secs(2), |u| {
        u.first().is_some_and(|p| !p.endpoints.is_empty())
    })
    .await;
    let eps: Vec<String> = upsert[0].endpoints.iter().map(|e| e.to_string()).collect();
    assert_eq!(eps, ["198.18.5.5:40000", "198.18.0.2:2000"]);
    // The NAT gave a new mapping: pushed as a delta.
    hello_reflexive(&mut wb, 2000, &["198.18.0.2"], Some("198.18.5.5:40001")).await;
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, relay, .. } => {
            assert!(relay.is_none());
            assert_eq!(upsert[0].endpoints[0].to_string(), "198.18.5.5:40001");
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    // A reflexive address equal to a local one is listed once; loopback never.
    hello_reflexive(&mut wb, 2000, &["198.18.0.2"], Some("198.18.0.2:2000")).await;
    match next_msg(&mut wa, Duration::from_secs(2)).await {
        ServerMessage::Delta { upsert, .. } => {
            let eps: Vec<String> = upsert[0].endpoints.iter().map(|e| e.to_string()).collect();
            assert_eq!(eps, ["198.18.0.2:2000"]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    hello_reflexive(&mut wb, 2000, &["198.18.0.2"], Some("127.0.0.1:9")).await;
    expect_silence(&mut wa, Duration::from_millis(300)).await;
    let nodes = srv.nodes(&srv.admin, None).await;
    assert_eq!(nodes[1].endpoints[0].to_string(), "198.18.0.2:2000");
    srv.stop().await;
}

#[tokio::test]
async fn nodes_relay_over_websockets_and_udp() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let b = srv.enroll(&token, 2, Some("b")).await;
    let c = srv.enroll(&token, 3, Some("c")).await;

    // No credential, or a bad one: JSON 401 before upgrading.
    match srv.relay_raw("trn_nope").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body = resp.body().clone().unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert!(err_text(&v).contains("not recognised"), "{v}");
        }
        other => panic!("expected an HTTP 401, got {:?}", other.map(|_| ())),
    }

    let mut ra = srv.relay_ws(&a.node_secret, 1).await;
    let mut rb = srv.relay_ws(&b.node_secret, 2).await;
    ra.send(Message::Binary(relay_send(2, b"wireguard bytes").into()))
        .await
        .unwrap();
    assert_eq!(
        next_binary(&mut rb).await,
        relay_recv(1, b"wireguard bytes")
    );
    rb.send(Message::Binary(relay_send(1, b"back").into()))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut ra).await, relay_recv(2, b"back"));
    // Junk is dropped, not fatal.
    ra.send(Message::Binary(vec![0x99u8; 3].into()))
        .await
        .unwrap();
    ra.send(Message::Text("hi".into())).await.unwrap();

    // c is on UDP with the token from its map.
    let (_wc, first) = srv.connect(&c.node_secret, 3000, &[]).await;
    let relay = relay_of(&map_of(first));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let edge: SocketAddr = relay.udp.parse().unwrap();
    assert_eq!(
        udp_register(&sock, edge, &relay.token).await[0],
        FRAME_REGISTERED
    );
    ra.send(Message::Binary(relay_send(3, b"to udp").into()))
        .await
        .unwrap();
    assert_eq!(
        udp_recv(&sock, Duration::from_secs(2)).await.unwrap(),
        relay_recv(1, b"to udp")
    );
    sock.send_to(&relay_send(1, b"to ws"), edge).await.unwrap();
    assert_eq!(next_binary(&mut ra).await, relay_recv(3, b"to ws"));
    let stats = srv.relay.stats();
    assert_eq!(stats.relayed_packets, 4);
    assert_eq!(stats.dropped_malformed, 1);

    // A second relay connection of a replaces the first, which is closed.
    let mut ra2 = srv.relay_raw(&a.node_secret).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ra.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the replaced relay connection is closed");
    rb.send(Message::Binary(relay_send(1, b"new").into()))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut ra2).await, relay_recv(2, b"new"));
    srv.stop().await;
}

#[tokio::test]
async fn a_deleted_node_is_refused_by_the_relay_and_its_websocket_closed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let b = srv.enroll(&token, 2, Some("b")).await;
    let (_wb, first) = srv.connect(&b.node_secret, 2000, &[]).await;
    let relay = relay_of(&map_of(first));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(
        udp_register(&sock, srv.edge, &relay.token).await[0],
        FRAME_REGISTERED
    );
    let mut ra = srv.relay_ws(&a.node_secret, 1).await;
    let mut rb = srv.relay_ws(&b.node_secret, 2).await;

    let (status, _) = srv.delete(&srv.admin, "/nodes/b").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match rb.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(f))) => return f,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("b's relay closed within 1 s");
    assert!(closed.is_some_and(|f| f.reason.contains("removed")));

    // Its unexpired token is refused, frames to it go nowhere, its secret opens nothing.
    let answer = udp_register(&sock, srv.edge, &relay.token).await;
    assert_eq!(answer[0], FRAME_REFUSED);
    assert!(String::from_utf8_lossy(&answer[1..]).contains("removed"));
    sock.send_to(&relay_send(1, b"still here?"), srv.edge)
        .await
        .unwrap();
    no_binary(&mut ra, Duration::from_millis(300)).await;
    ra.send(Message::Binary(relay_send(2, b"hello?").into()))
        .await
        .unwrap();
    assert!(udp_recv(&sock, Duration::from_millis(300)).await.is_none());
    match srv.relay_raw(&b.node_secret).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected an HTTP 401, got {:?}", other.map(|_| ())),
    }
    drop(ra);
    srv.stop().await;

    // Still refused after a restart.
    let srv = Running::start(dir.path()).await;
    let answer = udp_register(&sock, srv.edge, &relay.token).await;
    assert_eq!(answer[0], FRAME_REFUSED, "{answer:?}");
    srv.stop().await;
}

#[tokio::test]
async fn relay_never_crosses_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let (_, v) = srv
        .post(Some(&srv.admin), "/accounts", json!({"name": "acme"}))
        .await;
    let acme: CreateAccountResponse = serde_json::from_value(v).unwrap();
    let td = srv.token(&srv.admin, None, json!({})).await;
    let ta = srv.token(&acme.api_key, None, json!({})).await;
    let d = srv.enroll(&td, 1, Some("d")).await;
    let x = srv.enroll(&ta, 2, Some("x")).await;

    let mut rd = srv.relay_ws(&d.node_secret, 1).await;
    let mut rx = srv.relay_ws(&x.node_secret, 2).await;
    rd.send(Message::Binary(relay_send(2, b"over the wall").into()))
        .await
        .unwrap();
    rx.send(Message::Binary(relay_send(1, b"over the wall").into()))
        .await
        .unwrap();

    // Over UDP too.
    let (_wd, first) = srv.connect(&d.node_secret, 1000, &[]).await;
    let token = relay_of(&map_of(first)).token;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(
        udp_register(&sock, srv.edge, &token).await[0],
        FRAME_REGISTERED
    );
    sock.send_to(&relay_send(2, b"over the wall"), srv.edge)
        .await
        .unwrap();
    rx.send(Message::Binary(relay_send(1, b"over the wall").into()))
        .await
        .unwrap();

    no_binary(&mut rx, Duration::from_millis(400)).await;
    no_binary(&mut rd, Duration::from_millis(100)).await;
    assert!(udp_recv(&sock, Duration::from_millis(100)).await.is_none());
    let stats = srv.relay.stats();
    assert_eq!(stats.relayed_packets, 0);
    assert_eq!(stats.dropped_cross_account, 4);
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Mesh nodes (subnet routes) and names
// ---------------------------------------------------------------------------

use ipnet::Ipv4Net;
use std::net::IpAddr;
use trellis_proto::{DnsConfig, NetworkMap, Peer, RouteInfo};

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

async fn hello_routes(ws: &mut Ws, port: u16, routes: &[&str]) {
    let hello = NodeMessage::Hello {
        listen_port: port,
        local_addrs: Vec::new(),
        reflexive: None,
        advertise_routes: routes.iter().map(|r| net(r)).collect(),
        os: "linux".into(),
        version: "test".into(),
    };
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .unwrap();
}

impl Running {
    async fn enroll_routes(
        &self,
        token: &str,
        key: u8,
        name: &str,
        routes: &[&str],
    ) -> (StatusCode, Value) {
        self.post(
            None,
            "/enroll",
            json!({
                "token": token,
                "public_key": NodeKey([key; 32]).to_string(),
                "name": name,
                "advertise_routes": routes,
            }),
        )
        .await
    }

    /// Connects a node that advertises `routes`; returns its first map.
    async fn connect_routes(&self, secret: &str, port: u16, routes: &[&str]) -> (Ws, NetworkMap) {
        let mut ws = self.connect_raw(secret).await.unwrap();
        hello_routes(&mut ws, port, routes).await;
        let first = map_of(next_msg(&mut ws, Duration::from_secs(2)).await);
        (ws, first)
    }

    async fn routes(&self, key: &str) -> Vec<RouteInfo> {
        let (status, v) = self.get(Some(key), "/routes").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn approve(&self, node: &str, cidr: &str) -> (StatusCode, Value) {
        self.post(
            Some(&self.admin),
            "/routes/approve",
            json!({"node": node, "cidr": cidr}),
        )
        .await
    }

    async fn patch(&self, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .patch(self.api(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }
}

/// The next delta, as (self_node, upsert, remove, dns); panics on anything else.
async fn next_delta(
    ws: &mut Ws,
    within: Duration,
) -> (
    Option<trellis_proto::SelfNode>,
    Vec<Peer>,
    Vec<NodeKey>,
    Option<DnsConfig>,
) {
    match next_msg(ws, within).await {
        ServerMessage::Delta {
            self_node,
            upsert,
            remove,
            dns,
            ..
        } => (self_node, upsert, remove, dns),
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// Reads deltas until `done` holds for the latest state of `peer`; returns how long it took.
async fn until_peer(
    ws: &mut Ws,
    peer: &str,
    within: Duration,
    done: impl Fn(&Peer) -> bool,
) -> Duration {
    let started = std::time::Instant::now();
    let deadline = started + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (_, upsert, _, _) = next_delta(ws, left).await;
        if upsert.iter().any(|p| p.name == peer && done(p)) {
            return started.elapsed();
        }
    }
}

fn names(dns: &DnsConfig) -> Vec<&str> {
    dns.records.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn invalid_routes_are_refused_at_enrollment_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({})).await;
    for (routes, message) in [
        (
            vec!["198.19.10.5/24"],
            "198.19.10.5/24 has host bits set; did you mean 198.19.10.0/24?",
        ),
        (
            vec!["198.19.10.0/24", "100.64.5.0/24"],
            "100.64.5.0/24 overlaps the overlay block 100.64.0.0/10",
        ),
        (
            vec!["100.0.0.0/8"],
            "100.0.0.0/8 overlaps the overlay block 100.64.0.0/10",
        ),
        (vec!["0.0.0.0/0"], "exit nodes are not supported yet"),
        (vec!["10.0.0.0/7"], "too wide"),
    ] {
        let (status, v) = srv.enroll_routes(&token, 1, "gw", &routes).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{routes:?}: {v}");
        assert!(err_text(&v).contains(message), "{routes:?}: {v}");
    }
    let (status, v) = srv.enroll_routes(&token, 1, "gw", &["fd00::/64"]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // Nothing was stored, and the single-use token is still unused.
    assert!(srv.nodes(&srv.admin, None).await.is_empty());
    assert!(srv.routes(&srv.admin).await.is_empty());
    let (status, v) = srv
        .enroll_routes(&token, 1, "gw", &["198.19.10.0/24", "198.19.10.0/24"])
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let routes = srv.routes(&srv.admin).await;
    assert_eq!(routes.len(), 1, "duplicates are dropped");
    assert_eq!(routes[0].cidr, net("198.19.10.0/24"));
    assert!(!routes[0].approved && !routes[0].primary && !routes[0].online);
    srv.stop().await;
}

#[tokio::test]
async fn approved_routes_reach_allowed_ips_and_self_node() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let cidr = "198.19.10.0/24";
    let (status, v) = srv.enroll_routes(&token, 1, "gw", &[cidr]).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let gw: EnrollResponse = serde_json::from_value(v).unwrap();
    let c = srv.enroll(&token, 2, Some("c")).await;

    let (mut wc, map_c) = srv.connect_routes(&c.node_secret, 2000, &[]).await;
    assert_eq!(map_c.peers[0].allowed_ips, [net(&format!("{}/32", gw.ip))]);
    // An invalid route in a hello is ignored, the valid one kept.
    let (mut wg, map_g) = srv
        .connect_routes(&gw.node_secret, 1000, &[cidr, "198.19.11.5/24"])
        .await;
    assert!(
        map_g.self_node.routes.is_empty(),
        "advertised, not approved"
    );
    let (_, upsert, _, _) = next_delta(&mut wc, Duration::from_secs(1)).await;
    assert_eq!(upsert[0].allowed_ips.len(), 1, "not approved: not routed");
    let routes = srv.routes(&srv.admin).await;
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert!(!routes[0].approved && !routes[0].primary && routes[0].online);

    // Approve: both sides hear within 1 s.
    let started = std::time::Instant::now();
    let (status, v) = srv.approve("gw", cidr).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let info: RouteInfo = serde_json::from_value(v).unwrap();
    assert!(info.approved && info.primary && info.online);
    assert_eq!(info.node, "gw");
    let (_, upsert, _, _) = next_delta(&mut wc, Duration::from_secs(1)).await;
    assert_eq!(
        upsert[0].allowed_ips,
        [net(&format!("{}/32", gw.ip)), net(cidr)]
    );
    let (self_node, upsert, _, _) = next_delta(&mut wg, Duration::from_secs(1)).await;
    assert_eq!(self_node.expect("self_node").routes, [net(cidr)]);
    assert!(upsert.is_empty());
    assert!(started.elapsed() < Duration::from_secs(1));
    // Approving again changes nothing.
    let (status, _) = srv.approve("gw", cidr).await;
    assert_eq!(status, StatusCode::OK);
    expect_silence(&mut wc, Duration::from_millis(300)).await;

    // What is not advertised cannot be approved.
    let (status, v) = srv.approve("gw", "198.19.99.0/24").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        err_text(&v).contains("node \"gw\" does not advertise 198.19.99.0/24"),
        "{v}"
    );
    let (status, v) = srv.approve("ghost", cidr).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err_text(&v).contains("no node named \"ghost\""), "{v}");
    let (status, v) = srv.approve("c", cidr).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    // Withdrawn: unrouted at once; advertised again: routed again, no new approval needed.
    hello_routes(&mut wg, 1000, &[]).await;
    let (_, upsert, _, _) = next_delta(&mut wc, Duration::from_secs(1)).await;
    assert_eq!(upsert[0].allowed_ips.len(), 1);
    let (self_node, _, _, _) = next_delta(&mut wg, Duration::from_secs(1)).await;
    assert!(self_node.unwrap().routes.is_empty());
    assert!(srv.routes(&srv.admin).await.is_empty());
    hello_routes(&mut wg, 1000, &[cidr]).await;
    let (_, upsert, _, _) = next_delta(&mut wc, Duration::from_secs(1)).await;
    assert_eq!(upsert[0].allowed_ips[1], net(cidr));
    let routes = srv.routes(&srv.admin).await;
    assert!(routes[0].approved && routes[0].primary);
    srv.stop().await;
}

#[tokio::test]
async fn auto_approve_tokens_approve_at_enrollment_and_later() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let auto = srv
        .token(&srv.admin, None, json!({"routes_auto_approve": true}))
        .await;
    let plain = srv.token(&srv.admin, None, json!({})).await;
    let (status, v) = srv.enroll_routes(&auto, 1, "gw", &["198.19.20.0/24"]).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let gw: EnrollResponse = serde_json::from_value(v).unwrap();
    let (status, _) = srv
        .enroll_routes(&plain, 2, "other", &["198.19.30.0/24"])
        .await;
    assert_eq!(status, StatusCode::OK);
    let routes = srv.routes(&srv.admin).await;
    let approved: Vec<(String, bool)> = routes
        .iter()
        .map(|r| (r.cidr.to_string(), r.approved))
        .collect();
    assert_eq!(
        approved,
        [
            ("198.19.20.0/24".to_string(), true),
            ("198.19.30.0/24".to_string(), false)
        ]
    );
    // Later advertisements of that node are approved too.
    let (_ws, map) = srv
        .connect_routes(&gw.node_secret, 1000, &["198.19.20.0/24", "198.19.21.0/24"])
        .await;
    assert_eq!(
        map.self_node.routes,
        [net("198.19.20.0/24"), net("198.19.21.0/24")]
    );
    assert!(srv
        .routes(&srv.admin)
        .await
        .iter()
        .filter(|r| r.node == "gw")
        .all(|r| r.approved && r.primary));
    srv.stop().await;
}

#[tokio::test]
async fn the_first_approved_online_router_is_primary_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let cidr = "198.19.10.0/24";
    let a: EnrollResponse =
        serde_json::from_value(srv.enroll_routes(&token, 1, "a", &[cidr]).await.1).unwrap();
    let b: EnrollResponse =
        serde_json::from_value(srv.enroll_routes(&token, 2, "b", &[cidr]).await.1).unwrap();
    let c = srv.enroll(&token, 3, Some("c")).await;
    // b is approved first (and has the higher id): it is primary.
    assert_eq!(srv.approve("b", cidr).await.0, StatusCode::OK);
    assert_eq!(srv.approve("a", cidr).await.0, StatusCode::OK);

    let (mut wc, _) = srv.connect_routes(&c.node_secret, 3000, &[]).await;
    let (mut wb, map_b) = srv.connect_routes(&b.node_secret, 2000, &[cidr]).await;
    assert_eq!(map_b.self_node.routes, [net(cidr)]);
    let (mut wa, map_a) = srv.connect_routes(&a.node_secret, 1000, &[cidr]).await;
    assert!(map_a.self_node.routes.is_empty(), "a is not primary");
    let b_peer = map_a.peers.iter().find(|p| p.name == "b").unwrap();
    assert_eq!(b_peer.allowed_ips[1], net(cidr));
    until_peer(&mut wc, "a", Duration::from_secs(1), |p| p.online).await;
    // b was told a came online.
    let (_, upsert, _, _) = next_delta(&mut wb, Duration::from_secs(1)).await;
    assert_eq!(upsert[0].allowed_ips.len(), 1);
    let routes = srv.routes(&srv.admin).await;
    let primary: Vec<(&str, bool)> = routes
        .iter()
        .map(|r| (r.node.as_str(), r.primary))
        .collect();
    assert_eq!(primary, [("a", false), ("b", true)]);
    let (mut wc2, map_c) = srv.connect_routes(&c.node_secret, 3001, &[]).await;
    drop(wc);
    let peer = |m: &NetworkMap, n: &str| m.peers.iter().find(|p| p.name == n).unwrap().clone();
    assert_eq!(peer(&map_c, "b").allowed_ips[1], net(cidr));
    assert_eq!(peer(&map_c, "a").allowed_ips.len(), 1);

    // b's stream closes cleanly: a takes over within 1 s.
    let _ = wb.close(None).await;
    drop(wb);
    let took = until_peer(&mut wc2, "a", Duration::from_secs(1), |p| {
        p.allowed_ips.contains(&net(cidr))
    })
    .await;
    assert!(took < Duration::from_secs(1));
    let (self_node, upsert, _, _) = next_delta(&mut wa, Duration::from_secs(1)).await;
    assert_eq!(self_node.expect("a's self_node").routes, [net(cidr)]);
    let b_peer = upsert.iter().find(|p| p.name == "b").unwrap();
    assert!(!b_peer.online);
    assert_eq!(b_peer.allowed_ips.len(), 1);

    // a goes too: nobody is online, so a stays primary.
    let _ = wa.close(None).await;
    drop(wa);
    until_peer(&mut wc2, "a", Duration::from_secs(1), |p| !p.online).await;
    let routes = srv.routes(&srv.admin).await;
    let primary: Vec<(&str, bool)> = routes
        .iter()
        .map(|r| (r.node.as_str(), r.primary))
        .collect();
    assert_eq!(primary, [("a", true), ("b", false)]);
    expect_silence(&mut wc2, Duration::from_millis(300)).await;

    // b comes back: the first approved online router is primary again.
    let (_wb, map_b) = srv.connect_routes(&b.node_secret, 2000, &[cidr]).await;
    assert_eq!(map_b.self_node.routes, [net(cidr)]);
    until_peer(&mut wc2, "b", Duration::from_secs(1), |p| {
        p.online && p.allowed_ips.contains(&net(cidr))
    })
    .await;
    srv.stop().await;
}

/// Takes ~10 s: the primary stops answering pings (a dead machine, no TCP
/// close); the other router takes over within 10 s while live streams stay.
#[tokio::test]
async fn a_router_that_stops_answering_pings_fails_over_within_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv
        .token(
            &srv.admin,
            None,
            json!({"reusable": true, "routes_auto_approve": true}),
        )
        .await;
    let cidr = "198.19.10.0/24";
    let a: EnrollResponse =
        serde_json::from_value(srv.enroll_routes(&token, 1, "a", &[cidr]).await.1).unwrap();
    let b: EnrollResponse =
        serde_json::from_value(srv.enroll_routes(&token, 2, "b", &[cidr]).await.1).unwrap();
    let c = srv.enroll(&token, 3, Some("c")).await;
    let (mut wa, map_a) = srv.connect_routes(&a.node_secret, 1000, &[cidr]).await;
    assert_eq!(map_a.self_node.routes, [net(cidr)]);
    let (mut wb, _) = srv.connect_routes(&b.node_secret, 2000, &[cidr]).await;
    let (mut wc, map_c) = srv.connect_routes(&c.node_secret, 3000, &[]).await;
    assert!(map_c
        .peers
        .iter()
        .any(|p| p.name == "a" && p.allowed_ips.contains(&net(cidr))));
    // Drain a's pending delta (b came online), then stop reading: a's pongs stop.
    let _ = next_msg(&mut wa, Duration::from_secs(2)).await;
    let _ = next_msg(&mut wa, Duration::from_secs(2)).await;
    let silent_since = std::time::Instant::now();

    // b and c keep reading (and so answer pings) while they wait.
    let (took_c, b_self) = tokio::join!(
        until_peer(&mut wc, "b", Duration::from_secs(12), |p| {
            p.allowed_ips.contains(&net(cidr))
        }),
        async {
            loop {
                let (self_node, _, _, _) = next_delta(&mut wb, Duration::from_secs(12)).await;
                if let Some(s) = self_node {
                    return (silent_since.elapsed(), s);
                }
            }
        }
    );
    let failover = silent_since.elapsed();
    assert!(failover <= Duration::from_secs(10), "{failover:?}");
    assert!(
        failover >= Duration::from_secs(5),
        "too early: {failover:?}"
    );
    assert!(took_c <= Duration::from_secs(10));
    assert_eq!(b_self.1.routes, [net(cidr)]);
    let nodes = srv.nodes(&srv.admin, None).await;
    let online: Vec<(&str, bool)> = nodes.iter().map(|n| (n.name.as_str(), n.online)).collect();
    assert_eq!(online, [("a", false), ("b", true), ("c", true)]);
    let seen = until_closed(&mut wa).await;
    assert!(seen.is_empty(), "{seen:?}");
    srv.stop().await;
}

#[tokio::test]
async fn dns_names_records_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let admin = srv.admin.clone();
    let (_, v) = srv
        .post(Some(&admin), "/accounts", json!({"name": "acme"}))
        .await;
    let acme: CreateAccountResponse = serde_json::from_value(v).unwrap();
    let token = srv.token(&admin, None, json!({"reusable": true})).await;
    let ta = srv.token(&acme.api_key, None, json!({})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let b = srv.enroll(&token, 2, Some("b")).await;
    let x = srv.enroll(&ta, 3, Some("x")).await;

    let (mut wa, map_a) = srv.connect_routes(&a.node_secret, 1000, &[]).await;
    let dns = map_a.dns.expect("names in the map");
    assert_eq!(dns.domain, "default.mesh");
    assert_eq!(names(&dns), ["a.default.mesh", "b.default.mesh"]);
    assert_eq!(dns.records[1].addr, IpAddr::V4(b.ip));
    let (mut wx, map_x) = srv.connect_routes(&x.node_secret, 3000, &[]).await;
    let dns_x = map_x.dns.unwrap();
    assert_eq!(dns_x.domain, "acme.mesh");
    assert_eq!(names(&dns_x), ["x.acme.mesh"]);

    // An extra record: 201 with its fqdn, pushed within 1 s, only to its account.
    let started = std::time::Instant::now();
    let (status, v) = srv
        .post(
            Some(&admin),
            "/dns",
            json!({"name": "db.prod", "addr": "198.19.10.5", "fqdn": "ignored"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["fqdn"], "db.prod.default.mesh");
    let (_, upsert, _, dns) = next_delta(&mut wa, Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(upsert.is_empty());
    let dns = dns.unwrap();
    assert_eq!(
        names(&dns),
        ["a.default.mesh", "b.default.mesh", "db.prod.default.mesh"]
    );
    assert_eq!(
        dns.records[2].addr,
        "198.19.10.5".parse::<IpAddr>().unwrap()
    );
    expect_silence(&mut wx, Duration::from_millis(300)).await;

    for (body, status, message) in [
        (
            json!({"name": "b", "addr": "198.19.10.6"}),
            StatusCode::CONFLICT,
            "name of a node",
        ),
        (
            json!({"name": "db.prod", "addr": "198.19.10.6"}),
            StatusCode::CONFLICT,
            "already exists",
        ),
        (
            json!({"name": "Bad_Name", "addr": "198.19.10.6"}),
            StatusCode::BAD_REQUEST,
            "invalid record name",
        ),
        (
            json!({"name": "ok", "addr": "0.0.0.0"}),
            StatusCode::BAD_REQUEST,
            "cannot be a record's address",
        ),
        (
            json!({"name": "ok", "addr": "nope"}),
            StatusCode::BAD_REQUEST,
            "invalid JSON body",
        ),
        (
            json!({"name": "a.".repeat(101), "addr": "198.19.10.6"}),
            StatusCode::BAD_REQUEST,
            "invalid record name",
        ),
    ] {
        let (got, v) = srv.post(Some(&admin), "/dns", body.clone()).await;
        assert_eq!(got, status, "{body}: {v}");
        assert!(err_text(&v).contains(message), "{body}: {v}");
    }
    let (status, v) = srv.get(Some(&admin), "/dns").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v,
        json!([{"name": "db.prod", "addr": "198.19.10.5", "fqdn": "db.prod.default.mesh"}])
    );
    let (_, v) = srv.get(Some(&acme.api_key), "/dns").await;
    assert_eq!(v, json!([]));
    expect_silence(&mut wa, Duration::from_millis(200)).await;

    // Rename b (offline): a sees the new name as a peer and in its names within 1 s.
    let started = std::time::Instant::now();
    let (status, v) = srv.patch(&admin, "/nodes/b", json!({"name": "db2"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let info: NodeInfo = serde_json::from_value(v).unwrap();
    assert_eq!((info.name.as_str(), info.ip), ("db2", b.ip));
    let (_, upsert, remove, dns) = next_delta(&mut wa, Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(remove.is_empty());
    assert_eq!(upsert[0].name, "db2");
    let dns = dns.unwrap();
    assert_eq!(
        names(&dns),
        ["a.default.mesh", "db.prod.default.mesh", "db2.default.mesh"]
    );
    expect_silence(&mut wx, Duration::from_millis(200)).await;

    // Renaming a connected node tells it its new name.
    let (status, _) = srv
        .patch(&admin, "/nodes/a", json!({"name": "alpha"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (self_node, _, _, dns) = next_delta(&mut wa, Duration::from_secs(1)).await;
    assert_eq!(self_node.unwrap().name, "alpha");
    assert!(names(&dns.unwrap()).contains(&"alpha.default.mesh"));

    let (status, _) = srv
        .post(
            Some(&admin),
            "/dns",
            json!({"name": "web", "addr": "198.19.10.7"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let _ = next_delta(&mut wa, Duration::from_secs(1)).await;
    for (path, body, status, message) in [
        (
            "/nodes/db2",
            json!({"name": "alpha"}),
            StatusCode::CONFLICT,
            "already named",
        ),
        (
            "/nodes/db2",
            json!({"name": "web"}),
            StatusCode::CONFLICT,
            "already a DNS record",
        ),
        (
            "/nodes/db2",
            json!({"name": "Bad"}),
            StatusCode::BAD_REQUEST,
            "invalid node name",
        ),
        (
            "/nodes/ghost",
            json!({"name": "g"}),
            StatusCode::NOT_FOUND,
            "no node named",
        ),
        (
            "/nodes/x",
            json!({"name": "y"}),
            StatusCode::NOT_FOUND,
            "no node named",
        ),
    ] {
        let (got, v) = srv.patch(&admin, path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        assert!(err_text(&v).contains(message), "{path} {body}: {v}");
    }
    // A name taken by a record is skipped at enrollment.
    let w = srv.enroll(&token, 4, Some("web")).await;
    assert_eq!(w.name, "web-2");
    let _ = next_delta(&mut wa, Duration::from_secs(1)).await;

    // Removing a record: 204, pushed; again: 404.
    let (status, _) = srv.delete(&admin, "/dns/db.prod").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, _, _, dns) = next_delta(&mut wa, Duration::from_secs(1)).await;
    assert!(!names(&dns.unwrap()).contains(&"db.prod.default.mesh"));
    let (status, v) = srv.delete(&admin, "/dns/db.prod").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v.contains("no DNS record named"), "{v}");

    // acme never saw any of default's names.
    expect_silence(&mut wx, Duration::from_millis(200)).await;
    let (_, map_x) = srv.connect_routes(&x.node_secret, 3001, &[]).await;
    assert_eq!(names(&map_x.dns.unwrap()), ["x.acme.mesh"]);
    srv.stop().await;
}

#[tokio::test]
async fn mesh_endpoints_are_in_the_openapi_document_and_a_bad_suffix_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let (_, doc) = srv.get(None, "/openapi.json").await;
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths["/api/v1/routes"]["get"].is_object());
    assert!(paths["/api/v1/routes/approve"]["post"].is_object());
    assert!(paths["/api/v1/dns"]["get"].is_object());
    assert!(paths["/api/v1/dns"]["post"].is_object());
    assert!(paths["/api/v1/dns/{name}"]["delete"].is_object());
    assert!(paths["/api/v1/nodes/{name}"]["patch"].is_object());
    for s in [
        "RouteInfo",
        "ApproveRouteRequest",
        "DnsRecordInfo",
        "RenameNodeRequest",
    ] {
        assert!(doc["components"]["schemas"][s].is_object(), "{s}");
    }
    srv.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let err = Server::start(Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        public_url: None,
        edge_udp: None,
        dns_suffix: "Not A Suffix".into(),
        flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
        gateway_listen: None,
        gateway_tls: None,
    })
    .await
    .err()
    .expect("a bad suffix is refused");
    assert!(format!("{err:#}").contains("invalid DNS suffix"), "{err:#}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written"
    );
}

impl Running {
    async fn put_policy(&self, text: &str) {
        let r = self
            .http
            .put(self.api("/policy"))
            .bearer_auth(&self.admin)
            .json(&json!({ "text": text }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

/// Sends `payload` from `from` to node 2 until it arrives on `to` (or fails
/// after `within`).
async fn relayed_within(from: &mut Ws, to: &mut Ws, payload: &[u8], within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        from.send(Message::Binary(relay_send(2, payload).into()))
            .await
            .unwrap();
        if let Ok(Some(Ok(Message::Binary(b)))) =
            tokio::time::timeout(Duration::from_millis(100), to.next()).await
        {
            if b.as_ref() == relay_recv(1, payload).as_slice() {
                return true;
            }
        }
    }
    false
}

#[tokio::test]
async fn the_relay_keeps_apart_nodes_the_policy_keeps_apart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let token = srv.token(&srv.admin, None, json!({"reusable": true})).await;
    let a = srv.enroll(&token, 1, Some("a")).await;
    let b = srv.enroll(&token, 2, Some("b")).await;
    let mut ra = srv.relay_ws(&a.node_secret, 1).await;
    let mut rb = srv.relay_ws(&b.node_secret, 2).await;
    assert!(relayed_within(&mut ra, &mut rb, b"before", Duration::from_secs(2)).await);

    // Neither may reach the other: the relay stops carrying their frames
    // within a second.
    srv.put_policy("default = \"deny\"\n").await;
    let t0 = std::time::Instant::now();
    loop {
        ra.send(Message::Binary(relay_send(2, b"probe").into()))
            .await
            .unwrap();
        if srv.relay.stats().dropped_policy > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the relay still carries a pair the policy keeps apart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Drain what passed before the change, then nothing more arrives.
    while tokio::time::timeout(Duration::from_millis(200), rb.next())
        .await
        .is_ok()
    {}
    ra.send(Message::Binary(relay_send(2, b"denied").into()))
        .await
        .unwrap();
    no_binary(&mut rb, Duration::from_millis(300)).await;

    // One direction allowed on one port is enough for the relay (the nodes
    // enforce the rest).
    srv.put_policy(
        "default = \"deny\"\n[[rules]]\nname = \"db\"\naction = \"allow\"\nfrom = [\"a\"]\nto = [\"b\"]\nports = [\"tcp:5432\"]\n",
    )
    .await;
    assert!(
        relayed_within(&mut ra, &mut rb, b"after", Duration::from_secs(1)).await,
        "the relay did not carry the pair again after an allow rule"
    );
    srv.stop().await;
}
