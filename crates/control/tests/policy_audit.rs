//! Policies, node tags, join-token revocation and the audit log, end to end:
//! a real control plane on 127.0.0.1 with its SQLite file in a temp dir, and
//! fake nodes on real WebSocket control streams.

mod dash_support;

use std::path::Path;
use std::time::Duration;

use dash_support::{next_msg, Ws};
use reqwest::StatusCode;
use serde_json::{json, Value};
use trellis_policy::{Filter, FilterSpec, PROTO_TCP};
use trellis_proto::{
    AuditEntry, CreateAccountResponse, CreateTokenResponse, EnrollResponse, NodeKey, PolicyInfo,
    PolicyRejected, PolicyTestResponse, PolicyVersionInfo, ServerMessage, SetPolicyResponse,
    TokenInfo,
};

/// The product's promise: a change reaches every node within 1 s.
const PUSH: Duration = Duration::from_secs(1);

/// The shared in-process server, with calls that take any API key.
struct Running {
    server: dash_support::Running,
    /// The operator's API key.
    admin: String,
    http: reqwest::Client,
}

impl Running {
    async fn start(dir: &Path) -> Running {
        let server = dash_support::Running::start(dir).await;
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

    async fn call(
        &self,
        method: reqwest::Method,
        key: Option<&str>,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.api(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
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

    async fn get(&self, key: &str, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, Some(key), path, None).await
    }

    async fn post(&self, key: Option<&str>, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, key, path, Some(body))
            .await
    }

    async fn put(&self, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, Some(key), path, Some(body))
            .await
    }

    async fn delete(&self, key: &str, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, Some(key), path, None)
            .await
    }

    /// Creates a token; returns (id, token).
    async fn token(&self, key: &str, body: Value) -> (i64, String) {
        let (status, v) = self.post(Some(key), "/tokens", body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let t: CreateTokenResponse = serde_json::from_value(v).unwrap();
        assert!(t.id > 0, "the token's id is in the create answer");
        (t.id, t.token)
    }

    async fn enroll_raw(&self, token: &str, key: u8, name: &str) -> (StatusCode, Value) {
        let body = json!({
            "token": token,
            "public_key": NodeKey([key; 32]).to_string(),
            "name": name,
            "hostname": name,
            "os": "linux",
            "version": "test",
        });
        self.post(None, "/enroll", body).await
    }

    async fn enroll(&self, token: &str, key: u8, name: &str) -> EnrollResponse {
        let (status, v) = self.enroll_raw(token, key, name).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn set_policy(&self, key: &str, text: &str) -> (StatusCode, Value) {
        self.put(key, "/policy", json!({ "text": text })).await
    }

    async fn set_policy_ok(&self, key: &str, text: &str) -> SetPolicyResponse {
        let (status, v) = self.set_policy(key, text).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn policy(&self, key: &str) -> PolicyInfo {
        let (status, v) = self.get(key, "/policy").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn probe(&self, key: &str, from: &str, to: &str, port: &str) -> (StatusCode, Value) {
        self.post(
            Some(key),
            "/policy/test",
            json!({ "from": from, "to": to, "port": port }),
        )
        .await
    }

    async fn probe_ok(&self, key: &str, from: &str, to: &str, port: &str) -> PolicyTestResponse {
        let (status, v) = self.probe(key, from, to, port).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn audit(&self, key: &str, query: &str) -> Vec<AuditEntry> {
        let (status, v) = self.get(key, &format!("/audit{query}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// Connects a fake node, says hello, returns the stream and its first map.
    async fn connect(&self, secret: &str) -> (Ws, trellis_proto::NetworkMap) {
        self.server.connect(secret).await
    }
}

/// Reads deltas until one carries a filter satisfying `pred`, within `within`.
async fn filter_until(
    ws: &mut Ws,
    within: Duration,
    mut pred: impl FnMut(&FilterSpec) -> bool,
) -> FilterSpec {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_msg(ws, left).await {
            ServerMessage::Delta {
                filter: Some(f), ..
            } if pred(&f) => return f,
            ServerMessage::Delta { .. } => continue,
            other => panic!("expected a delta, got {other:?}"),
        }
    }
}

fn decide(spec: &FilterSpec, src: &str, dst: &str, port: u16) -> (bool, Option<String>) {
    let f = Filter::compile(spec);
    let d = f.decide(src.parse().unwrap(), dst.parse().unwrap(), PROTO_TCP, port);
    (d.allow, d.rule.map(|i| f.rule_name(i).to_string()))
}

fn err_text(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"))
}

const WEB_ONLY: &str = r#"default = "deny"

[[rules]]
name = "web"
action = "allow"
from = ["*"]
to = ["tag:web"]
ports = ["tcp:80"]
"#;

/// Like WEB_ONLY with a second rule whose port (line 15) is out of range.
const BAD: &str = r#"default = "deny"

[[rules]]
name = "web"
action = "allow"
from = ["*"]
to = ["tag:web"]
ports = ["tcp:80"]

[[rules]]
name = "db"
action = "allow"
from = ["*"]
to = ["db-1"]
ports = ["tcp:99999"]
"#;

#[tokio::test]
async fn policy_set_get_history_restore_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();

    // Every account starts with version 1: the default, allow all.
    let p = srv.policy(&k).await;
    assert_eq!(p.version, 1);
    assert_eq!(p.text, trellis_policy::DEFAULT_POLICY);
    assert_eq!(p.author, "system");

    let r = srv.set_policy_ok(&k, WEB_ONLY).await;
    assert_eq!(r.version, 2);
    assert!(r.changed);
    assert!(
        r.warnings.iter().any(|w| w.contains("web")),
        "tag web matches no node yet: {:?}",
        r.warnings
    );
    let p = srv.policy(&k).await;
    assert_eq!((p.version, p.text.as_str()), (2, WEB_ONLY));
    assert_eq!(p.author, "operator");

    // The same text again changes nothing.
    let r = srv.set_policy_ok(&k, WEB_ONLY).await;
    assert_eq!((r.version, r.changed), (2, false));

    let (status, v) = srv.get(&k, "/policy/history").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let h: Vec<PolicyVersionInfo> = serde_json::from_value(v).unwrap();
    let versions: Vec<(i64, i64)> = h.iter().map(|x| (x.version, x.rules)).collect();
    assert_eq!(versions, [(2, 1), (1, 0)], "newest first, with rule counts");

    // Restoring v1 stores its text as v3; v2 stays in the history.
    let (status, v) = srv
        .post(Some(&k), "/policy/restore", json!({ "version": 1 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let r: SetPolicyResponse = serde_json::from_value(v).unwrap();
    assert_eq!((r.version, r.changed), (3, true));
    let p = srv.policy(&k).await;
    assert_eq!(
        (p.version, p.text.as_str()),
        (3, trellis_policy::DEFAULT_POLICY)
    );
    let (_, v) = srv.get(&k, "/policy/history").await;
    let h: Vec<PolicyVersionInfo> = serde_json::from_value(v).unwrap();
    assert_eq!(h.iter().map(|x| x.version).collect::<Vec<_>>(), [3, 2, 1]);

    let (status, v) = srv
        .post(Some(&k), "/policy/restore", json!({ "version": 42 }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(err_text(&v).contains("no policy version 42"), "{v}");
    assert_eq!(srv.policy(&k).await.version, 3, "nothing changed");

    // Versions survive a restart.
    srv.stop().await;
    let srv = Running::start(dir.path()).await;
    let p = srv.policy(&k).await;
    assert_eq!(p.version, 3);
    srv.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_is_refused_with_its_lines_and_the_old_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();
    let (_, tok) = srv
        .token(&k, json!({"reusable": true, "tags": ["web"]}))
        .await;
    let web = srv.enroll(&tok, 1, "web-1").await;
    let (_, tok) = srv.token(&k, json!({"reusable": true})).await;
    let laptop = srv.enroll(&tok, 2, "laptop").await;
    srv.set_policy_ok(&k, WEB_ONLY).await;
    let (mut ws, _) = srv.connect(&laptop.node_secret).await;

    let (status, v) = srv.set_policy(&k, BAD).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let rej: PolicyRejected = serde_json::from_value(v).unwrap();
    assert!(!rej.errors.is_empty());
    let port = rej
        .errors
        .iter()
        .find(|e| e.field == "rules[1].ports[0]")
        .unwrap_or_else(|| panic!("the bad port is named: {:?}", rej.errors));
    assert_eq!(port.line, 15, "{port:?}");
    assert!(rej.error.contains("line 15"), "{}", rej.error);
    assert!(rej.error.contains("nothing was changed"), "{}", rej.error);

    // Not TOML at all.
    let (status, v) = srv.set_policy(&k, "default = \n[[rules]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let rej: PolicyRejected = serde_json::from_value(v).unwrap();
    assert!(rej.errors.iter().all(|e| e.line >= 1), "{:?}", rej.errors);

    let p = srv.policy(&k).await;
    assert_eq!(
        (p.version, p.text.as_str()),
        (2, WEB_ONLY),
        "old policy still in force"
    );
    let (_, v) = srv.get(&k, "/policy/history").await;
    assert_eq!(v.as_array().unwrap().len(), 2, "no version was added");
    let a = srv.probe_ok(&k, "laptop", "web-1", "tcp:80").await;
    assert!(a.allow);
    assert_eq!(a.rule.as_deref(), Some("web"));
    // No node was told anything.
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let ServerMessage::Delta {
                filter: Some(f), ..
            } = next_msg(&mut ws, Duration::from_secs(5)).await
            {
                return f;
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "a refused policy pushed a filter: {quiet:?}"
    );
    let _ = web;
    srv.stop().await;
}

#[tokio::test]
async fn policy_test_answers_with_the_rule_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();
    let (_, tok) = srv
        .token(&k, json!({"reusable": true, "tags": ["web"]}))
        .await;
    let web = srv.enroll(&tok, 1, "web-1").await;
    let (_, tok) = srv.token(&k, json!({"reusable": true})).await;
    let laptop = srv.enroll(&tok, 2, "laptop").await;

    // The default policy allows everything, with no rule.
    let a = srv.probe_ok(&k, "laptop", "web-1", "tcp:5432").await;
    assert_eq!((a.allow, a.rule.as_deref(), a.version), (true, None, 1));

    let text = r#"default = "deny"

[[rules]]
name = "no-ssh"
action = "deny"
from = ["*"]
to = ["*"]
ports = ["tcp:22"]

[[rules]]
name = "web"
action = "allow"
from = ["*"]
to = ["tag:web", "198.19.10.0/24"]
ports = ["tcp:80", "icmp"]
"#;
    let r = srv.set_policy_ok(&k, text).await;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let a = srv.probe_ok(&k, "laptop", "web-1", "tcp:80").await;
    assert_eq!(
        (a.allow, a.rule.as_deref(), a.version),
        (true, Some("web"), 2)
    );
    assert_eq!((a.from_ip, a.to_ip), (laptop.ip, web.ip));
    let a = srv.probe_ok(&k, "laptop", "web-1", "tcp:22").await;
    assert_eq!((a.allow, a.rule.as_deref()), (false, Some("no-ssh")));
    let a = srv.probe_ok(&k, "laptop", "web-1", "udp:53").await;
    assert_eq!(
        (a.allow, a.rule.as_deref()),
        (false, None),
        "the default decided"
    );
    let a = srv.probe_ok(&k, "web-1", "laptop", "tcp:80").await;
    assert!(!a.allow, "laptop carries no tag web");
    // Addresses work on both sides, subnet addresses too.
    let a = srv
        .probe_ok(&k, &laptop.ip.to_string(), "198.19.10.7", "icmp")
        .await;
    assert_eq!((a.allow, a.rule.as_deref()), (true, Some("web")));

    let (status, v) = srv.probe(&k, "nobody", "web-1", "tcp:80").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(err_text(&v).contains("no node named \"nobody\""), "{v}");
    let (status, v) = srv.probe(&k, "laptop", "web-1", "tcp:http").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("invalid port"), "{v}");
    let (status, v) = srv.probe(&k, "binding:ci", "web-1", "tcp:80").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(err_text(&v).contains("no binding named"), "{v}");
    srv.stop().await;
}

#[tokio::test]
async fn nodes_get_the_new_filter_within_a_second_of_a_policy_or_tag_change() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();
    let (_, tok) = srv.token(&k, json!({"reusable": true})).await;
    let a = srv.enroll(&tok, 1, "a").await;
    let b = srv.enroll(&tok, 2, "b").await;
    let (a_ip, b_ip) = (a.ip.to_string(), b.ip.to_string());

    let (mut ws, map) = srv.connect(&a.node_secret).await;
    let first = map.filter.expect("the first map carries the filter");
    assert_eq!(
        decide(&first, &a_ip, &b_ip, 80),
        (true, None),
        "default: allow all"
    );

    // A policy change: both nodes' filters follow.
    srv.set_policy_ok(&k, WEB_ONLY).await;
    let f = filter_until(&mut ws, PUSH, |f| !f.default_allow).await;
    assert_eq!(
        decide(&f, &a_ip, &b_ip, 80),
        (false, None),
        "b is not tagged web yet"
    );

    // A tag change: the same policy now lets a reach b on tcp/80.
    let (status, v) = srv
        .put(&k, "/nodes/b/tags", json!({ "tags": ["web", "db", "web"] }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["tags"], json!(["web", "db"]), "duplicates dropped");
    let f = filter_until(&mut ws, PUSH, |f| decide(f, &a_ip, &b_ip, 80).0).await;
    assert_eq!(
        decide(&f, &a_ip, &b_ip, 80),
        (true, Some("web".to_string()))
    );
    assert_eq!(decide(&f, &a_ip, &b_ip, 443), (false, None));
    let (_, v) = srv.get(&k, "/nodes").await;
    let b_info = v
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "b")
        .unwrap();
    assert_eq!(b_info["tags"], json!(["web", "db"]));

    // Bad tags are refused and change nothing.
    let (status, v) = srv
        .put(&k, "/nodes/b/tags", json!({ "tags": ["Web Servers"] }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("invalid tag name"), "{v}");
    let (status, v) = srv.put(&k, "/nodes/zz/tags", json!({ "tags": [] })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    // A restore is a change too.
    let (status, v) = srv
        .post(Some(&k), "/policy/restore", json!({ "version": 1 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let f = filter_until(&mut ws, PUSH, |f| f.default_allow).await;
    assert_eq!(decide(&f, &a_ip, &b_ip, 443), (true, None));
    srv.stop().await;
}

#[tokio::test]
async fn a_revoked_token_enrolls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();
    let (id, tok) = srv
        .token(
            &k,
            json!({"reusable": true, "tags": ["ci"], "ttl_secs": 600}),
        )
        .await;
    let (other_id, _) = srv.token(&k, json!({})).await;
    srv.enroll(&tok, 1, "first").await;

    let (status, v) = srv.get(&k, "/tokens").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let list: Vec<TokenInfo> = serde_json::from_value(v).unwrap();
    assert_eq!(
        list.iter().map(|t| t.id).collect::<Vec<_>>(),
        [other_id, id],
        "newest first"
    );
    let t = &list[1];
    assert!(t.reusable && !t.revoked);
    assert_eq!((t.uses, t.tags.clone()), (1, vec!["ci".to_string()]));
    assert!(v_has_no_secret(&list, &tok));

    let (status, v) = srv.delete(&k, &format!("/tokens/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, v) = srv.enroll_raw(&tok, 2, "second").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert!(err_text(&v).contains("revoked"), "{v}");
    let (_, v) = srv.get(&k, "/nodes").await;
    assert_eq!(v.as_array().unwrap().len(), 1, "nothing was enrolled");
    let (_, v) = srv.get(&k, "/tokens").await;
    let list: Vec<TokenInfo> = serde_json::from_value(v).unwrap();
    assert!(list.iter().find(|t| t.id == id).unwrap().revoked);
    assert!(!list.iter().find(|t| t.id == other_id).unwrap().revoked);

    // Revoking again is harmless; unknown and malformed ids are refused.
    let (status, _) = srv.delete(&k, &format!("/tokens/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = srv.delete(&k, "/tokens/9999").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, v) = srv.delete(&k, "/tokens/abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("invalid token id"), "{v}");
    let revokes = srv
        .audit(&k, "")
        .await
        .into_iter()
        .filter(|e| e.action == "token.revoke")
        .count();
    assert_eq!(revokes, 1, "only the real revocation is logged");
    srv.stop().await;
}

fn v_has_no_secret(list: &[TokenInfo], token: &str) -> bool {
    !serde_json::to_string(list).unwrap().contains(token)
}

#[tokio::test]
async fn every_admin_change_is_in_the_audit_log_with_its_actor() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let op = srv.admin.clone();

    let (status, v) = srv
        .post(Some(&op), "/accounts", json!({ "name": "blue" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let blue: CreateAccountResponse = serde_json::from_value(v).unwrap();
    let bk = blue.api_key;

    let (tid, tok) = srv.token(&bk, json!({ "reusable": true })).await;
    let n = srv.enroll(&tok, 7, "gw").await;
    let _ = n;
    let (status, v) = srv
        .call(
            reqwest::Method::PATCH,
            Some(&bk),
            "/nodes/gw",
            Some(json!({ "name": "router" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = srv
        .put(&bk, "/nodes/router/tags", json!({ "tags": ["edge"] }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = srv
        .post(
            Some(&bk),
            "/dns",
            json!({ "name": "db", "addr": "198.19.10.5" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, _) = srv.delete(&bk, "/dns/db").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    srv.set_policy_ok(&bk, WEB_ONLY).await;
    // The operator acts on blue too.
    let (status, v) = srv
        .post(
            Some(&op),
            "/policy/restore?account=blue",
            json!({ "version": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = srv.delete(&bk, &format!("/tokens/{tid}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = srv.delete(&bk, "/nodes/router").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Refused changes leave no entry.
    srv.set_policy(&bk, BAD).await;
    srv.delete(&bk, "/dns/nothing").await;

    let log = srv.audit(&bk, "").await;
    let got: Vec<(&str, &str, &str, &str)> = log
        .iter()
        .rev()
        .map(|e| {
            (
                // An account key acts as `account-key:ACCOUNT#KEY_ID`.
                e.actor.split('#').next().unwrap_or(""),
                e.action.as_str(),
                e.target.as_str(),
                e.detail.as_str(),
            )
        })
        .collect();
    assert!(
        log.iter()
            .filter(|e| e.actor.starts_with("account-key:"))
            .all(|e| e.actor.starts_with("account-key:blue#")),
        "{log:?}"
    );
    let key = "account-key:blue";
    let tok_target = format!("token {tid}");
    let expected: Vec<(&str, &str, &str)> = vec![
        ("operator", "account.create", "blue"),
        (key, "token.create", &tok_target),
        (key, "node.rename", "router"),
        (key, "node.tag", "router"),
        (key, "dns.add", "db"),
        (key, "dns.remove", "db"),
        (key, "policy.set", "policy v2"),
        ("operator", "policy.restore", "policy v3"),
        (key, "token.revoke", &tok_target),
        (key, "node.delete", "router"),
    ];
    assert_eq!(
        got.iter().map(|g| (g.0, g.1, g.2)).collect::<Vec<_>>(),
        expected,
        "{log:#?}"
    );
    assert_eq!(got[2].3, "gw -> router");
    assert_eq!(got[3].3, r#"[] -> ["edge"]"#);
    assert_eq!(got[6].3, "v1 -> v2");
    assert_eq!(got[7].3, "v2 -> v3 (the text of v1)");
    assert!(log.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(log.iter().all(|e| (now_ms - e.at_ms).abs() < 60_000));

    // Paging and time filters.
    let page = srv.audit(&bk, "?limit=3").await;
    assert_eq!(page, log[..3]);
    let next = srv
        .audit(&bk, &format!("?limit=3&before_id={}", page[2].id))
        .await;
    assert_eq!(next, log[3..6]);
    assert_eq!(srv.audit(&bk, "?since=10m").await, log);
    let future = now_ms / 1000 + 3600;
    assert!(srv.audit(&bk, &format!("?since={future}")).await.is_empty());
    let (status, v) = srv.get(&bk, "/audit?since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("invalid since"), "{v}");
    let (status, v) = srv.get(&bk, "/audit?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // Route approval is audited too (the default account, operator key).
    let (_, tok) = srv.token(&op, json!({})).await;
    let (status, v) = srv
        .post(
            None,
            "/enroll",
            json!({
                "token": tok,
                "public_key": NodeKey([9; 32]).to_string(),
                "name": "mesh-gw",
                "advertise_routes": ["198.19.10.0/24"],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for _ in 0..2 {
        let (status, v) = srv
            .post(
                Some(&op),
                "/routes/approve",
                json!({ "node": "mesh-gw", "cidr": "198.19.10.0/24" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let log = srv.audit(&op, "").await;
    let approvals: Vec<_> = log.iter().filter(|e| e.action == "route.approve").collect();
    assert_eq!(
        approvals.len(),
        1,
        "approving twice is one change: {log:#?}"
    );
    assert_eq!(
        (approvals[0].actor.as_str(), approvals[0].target.as_str()),
        ("operator", "198.19.10.0/24")
    );
    assert!(
        log.iter().all(|e| e.action != "node.rename"),
        "blue's entries are not in default's log"
    );
    srv.stop().await;
}

#[tokio::test]
async fn audit_rows_cannot_be_updated_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();
    srv.token(&k, json!({})).await;
    srv.set_policy_ok(&k, WEB_ONLY).await;
    assert_eq!(srv.audit(&k, "").await.len(), 2);

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", srv.server.db.display()))
        .await
        .unwrap();
    let e = sqlx::query("UPDATE audit_log SET actor = 'nobody'")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("the audit log is append-only"),
        "{e}"
    );
    let e = sqlx::query("DELETE FROM audit_log")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("the audit log is append-only"),
        "{e}"
    );
    let actors: Vec<String> = sqlx::query_scalar("SELECT actor FROM audit_log")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(actors, ["operator", "operator"]);
    pool.close().await;
    assert_eq!(srv.audit(&k, "").await.len(), 2);
    srv.stop().await;
}

#[tokio::test]
async fn accounts_never_read_or_set_each_others_policy_or_audit() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let op = srv.admin.clone();
    let mut keys = Vec::new();
    for name in ["red", "blue"] {
        let (status, v) = srv
            .post(Some(&op), "/accounts", json!({ "name": name }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let r: CreateAccountResponse = serde_json::from_value(v).unwrap();
        keys.push(r.api_key);
    }
    let (red, blue) = (&keys[0], &keys[1]);
    srv.set_policy_ok(red, WEB_ONLY).await;

    // Blue sees its own untouched policy and log, and cannot name red.
    let p = srv.policy(blue).await;
    assert_eq!(
        (p.version, p.text.as_str()),
        (1, trellis_policy::DEFAULT_POLICY)
    );
    assert!(srv
        .audit(blue, "")
        .await
        .iter()
        .all(|e| e.action == "account.create" && e.target == "blue"));
    for (status, v) in [
        srv.get(blue, "/policy?account=red").await,
        srv.get(blue, "/audit?account=red").await,
        srv.get(blue, "/policy/history?account=red").await,
        srv.put(
            blue,
            "/policy?account=red",
            json!({ "text": "default = \"deny\"" }),
        )
        .await,
        srv.post(
            Some(blue),
            "/policy/restore?account=red",
            json!({ "version": 1 }),
        )
        .await,
        srv.get(blue, "/tokens?account=red").await,
    ] {
        assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    }
    let p = srv.policy(red).await;
    assert_eq!(p.version, 2, "red's policy is untouched");
    // The operator reads red's.
    let (status, v) = srv.get(&op, "/policy?account=red").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 2);
    let (status, v) = srv.get(&op, "/policy").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1, "default's own policy");
    // Nobody without a key.
    let (status, _) = srv.call(reqwest::Method::GET, None, "/audit", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    srv.stop().await;
}

#[tokio::test]
async fn new_endpoints_are_in_the_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let (status, doc) = srv
        .call(reqwest::Method::GET, None, "/openapi.json", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let paths = &doc["paths"];
    for (path, method) in [
        ("/api/v1/policy", "get"),
        ("/api/v1/policy", "put"),
        ("/api/v1/policy/history", "get"),
        ("/api/v1/policy/restore", "post"),
        ("/api/v1/policy/test", "post"),
        ("/api/v1/audit", "get"),
        ("/api/v1/tokens", "get"),
        ("/api/v1/tokens", "post"),
        ("/api/v1/tokens/{id}", "delete"),
        ("/api/v1/nodes/{name}/tags", "put"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    assert!(doc["components"]["schemas"]["PolicyRejected"].is_object());
    srv.stop().await;
}

/// A stored version that no longer parses (say, after a stricter parser) is
/// not enforced: nodes keep getting the newest version that parses, resolved
/// against the current nodes — never allow-all, never a crash.
#[tokio::test]
async fn an_unparsable_stored_policy_falls_back_to_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let k = srv.admin.clone();
    let (_, tok) = srv.token(&k, json!({"reusable": true})).await;
    let a = srv.enroll(&tok, 1, "a").await;
    let b = srv.enroll(&tok, 2, "b").await;
    let (a_ip, b_ip) = (a.ip.to_string(), b.ip.to_string());
    srv.set_policy_ok(&k, WEB_ONLY).await;
    let (status, v) = srv
        .put(&k, "/nodes/b/tags", json!({ "tags": ["web"] }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (mut ws, map) = srv.connect(&a.node_secret).await;
    let f = map.filter.unwrap();
    assert_eq!(decide(&f, &a_ip, &b_ip, 80), (true, Some("web".into())));

    // Version 3 slips in behind the API's back and does not parse.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", srv.server.db.display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO policies (account_id, version, text, rules, created_at, author) \
         SELECT id, 3, 'default = \"maybe\"', 0, 0, 'test' FROM accounts WHERE name = 'default'",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    // A tag change recomputes the filter: from v2, with b no longer tagged web.
    let (status, v) = srv.put(&k, "/nodes/b/tags", json!({ "tags": [] })).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let f = filter_until(&mut ws, PUSH, |f| !decide(f, &a_ip, &b_ip, 80).0).await;
    assert!(!f.default_allow, "v2's default deny still holds");
    let t = srv.probe_ok(&k, "a", "b", "tcp:80").await;
    assert_eq!((t.allow, t.version), (false, 2));

    // A new valid version takes over again.
    srv.set_policy_ok(&k, trellis_policy::DEFAULT_POLICY).await;
    let f = filter_until(&mut ws, PUSH, |f| f.default_allow).await;
    assert_eq!(decide(&f, &a_ip, &b_ip, 443), (true, None));
    assert_eq!(srv.probe_ok(&k, "a", "b", "tcp:80").await.version, 4);
    srv.stop().await;
}

#[tokio::test]
async fn api_keys_are_created_listed_and_revoked_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path()).await;
    let op = srv.admin.clone();
    let (status, v) = srv
        .post(Some(&op), "/accounts", json!({ "name": "blue" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let blue: CreateAccountResponse = serde_json::from_value(v).unwrap();
    let (status, v) = srv
        .post(
            Some(&blue.api_key),
            "/keys",
            json!({ "name": "ci deploys" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new_key = v["api_key"].as_str().unwrap().to_string();
    let id = v["id"].as_i64().unwrap();
    // The new key acts on blue.
    let (status, v) = srv.get(&new_key, "/policy").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = srv.get(&blue.api_key, "/keys").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    assert!(list
        .iter()
        .all(|k| k.get("api_key").is_none() && !v.to_string().contains(&new_key)));

    // Another account cannot revoke it; the operator key cannot be revoked.
    let (status, _) = srv
        .post(Some(&op), "/accounts", json!({ "name": "red" }))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, v) = srv.get(&op, "/keys").await;
    let op_id = v
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["operator"] == true)
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let (status2, v2) = srv.delete(&op, &format!("/keys/{op_id}")).await;
    assert_eq!(
        (status, status2),
        (StatusCode::OK, StatusCode::FORBIDDEN),
        "{v2}"
    );
    let (status, _) = srv.delete(&op, &format!("/keys/{id}?account=red")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Revoked: the very next request with it is refused, saying why.
    let (status, _) = srv.delete(&blue.api_key, &format!("/keys/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = srv.get(&new_key, "/policy").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err_text(&v).contains("revoked"), "{v}");
    let log = srv.audit(&blue.api_key, "").await;
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"key.create") && actions.contains(&"key.revoke"),
        "{actions:?}"
    );
    srv.stop().await;
}
