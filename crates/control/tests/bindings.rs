//! Bindings end to end: a real control plane on 127.0.0.1 running a fetch
//! gateway (its listener bound; its HTTP front is not exercised here), the
//! REST API, fake nodes on real control streams, and the gateway's account
//! snapshots and request-record channel.

mod dash_support;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use dash_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use trellis_edge::gateway::{gateway_ip, hash_secret};
use trellis_policy::{Filter, FilterSpec, PROTO_TCP};
use trellis_proto::{
    AuditEntry, BindingInfo, CreateBindingResponse, NetworkMap, NodeKey, Peer, RequestLogPage,
    ServerMessage,
};

/// The product's promise: a change reaches nodes and the gateway within 1 s.
const PUSH: Duration = Duration::from_secs(1);
/// The default account is the first one.
const DEFAULT_ACCOUNT: i64 = 1;

async fn start(dir: &std::path::Path) -> Running {
    Running::start_with(dir, |c| {
        c.gateway_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

async fn create(r: &Running, body: Value) -> CreateBindingResponse {
    let (status, v) = r.api(Method::POST, "/bindings", body).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    serde_json::from_value(v).unwrap()
}

async fn list(r: &Running) -> Vec<BindingInfo> {
    let (status, v) = r.api(Method::GET, "/bindings", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).unwrap()
}

async fn audit(r: &Running) -> Vec<AuditEntry> {
    let (status, v) = r.api(Method::GET, "/audit", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).unwrap()
}

/// A reusable join token.
async fn token(r: &Running) -> String {
    let (status, v) = r
        .api(Method::POST, "/tokens", json!({"reusable": true}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["token"].as_str().unwrap().to_string()
}

fn ip_of(v: &Value) -> Ipv4Addr {
    v["ip"].as_str().unwrap().parse().unwrap()
}

/// `(public_id, secret, host:port)` of a binding URL, checking its shape.
fn parts(url: &str, scheme: &str) -> (String, String, String) {
    let rest = url
        .strip_prefix(&format!("{scheme}://b_"))
        .unwrap_or_else(|| panic!("{url} is not {scheme}://b_..."));
    let (user, host) = rest.split_once('@').expect("credentials@host");
    let (id, secret) = user.split_once(':').expect("id:secret");
    assert_eq!(id.len(), 16, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
        "public id {id} is lower-case base32"
    );
    assert_eq!(secret.len(), 32, "{secret}");
    assert!(
        secret.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret}"
    );
    (id.to_string(), secret.to_string(), host.to_string())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn create_list_revoke_and_the_secret_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let gw_url = r.gateway_url.clone().expect("the gateway runs");
    assert!(gw_url.starts_with("http://127.0.0.1:"), "{gw_url}");

    let made = create(
        &r,
        json!({"name": "ci-runner", "tags": ["agents", "ci", "agents"], "ttl_secs": 3600}),
    )
    .await;
    let (public_id, secret, host) = parts(&made.url, "http");
    assert_eq!(
        format!("http://{host}"),
        gw_url,
        "the URL names the gateway"
    );
    assert_eq!(made.binding.public_id, public_id);
    assert_eq!(made.binding.name, "ci-runner");
    assert_eq!(made.binding.tags, ["agents", "ci"]);
    assert_eq!(made.binding.account, "default");
    let expires = made.binding.expires_at.expect("a ttl gives an expiry");
    assert!((expires - made.binding.created_at - 3600).abs() <= 1);
    assert_eq!(made.binding.ip, Ipv4Addr::new(100, 64, 0, 2));

    let all = list(&r).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0], made.binding);
    assert_eq!(all[0].requests, 0);
    let (status, one) = r.api(Method::GET, "/bindings/ci-runner", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["public_id"], public_id.as_str());
    assert!(one.get("secret").is_none() && !one.to_string().contains(&secret));

    let entries = audit(&r).await;
    let created = entries
        .iter()
        .find(|e| e.action == "binding.create")
        .expect("an audit entry for the creation");
    assert_eq!(created.target, "ci-runner");
    assert_eq!(created.actor, "operator");
    assert!(!created.detail.contains(&secret));

    // The secret is nowhere on disk (database and its write-ahead log).
    let mut disk = Vec::new();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            disk.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(contains(&disk, public_id.as_bytes()), "the id is stored");
    assert!(
        !contains(&disk, secret.as_bytes()),
        "the secret must not be stored"
    );
    assert!(contains(&disk, &hash_secret(&secret)), "its hash is");

    // Revoke: gone from the live set, kept in the list as revoked.
    let (status, v) = r
        .api(Method::DELETE, "/bindings/ci-runner", Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].as_i64().is_some(), "{v}");
    let (status, v) = r
        .api(Method::DELETE, "/bindings/ci-runner", Value::Null)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not revoked"), "{v}");
    let all = list(&r).await;
    assert_eq!(all.len(), 1);
    assert!(all[0].revoked_at.is_some());
    assert_eq!(all[0].state(i64::MAX / 2), "revoked");
    let revoked = audit(&r).await;
    assert!(revoked
        .iter()
        .any(|e| e.action == "binding.revoke" && e.target == "ci-runner"));

    // The name is free again; the revoked binding's address is not.
    let again = create(&r, json!({"name": "ci-runner"})).await;
    assert_ne!(again.binding.ip, made.binding.ip);
    assert_eq!(again.binding.expires_at, None);
    assert_ne!(parts(&again.url, "http").1, secret);
    let (status, v) = r.api(Method::GET, "/bindings/ci-runner", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["revoked_at"], Value::Null, "GET shows the live one: {v}");
    let (status, _) = r.api(Method::GET, "/bindings/nope", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    r.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    create(&r, json!({"name": "agent"})).await;
    let before = audit(&r).await.len();
    let long = "a".repeat(64);
    for (body, status, words) in [
        (
            json!({"name": "Agent"}),
            StatusCode::BAD_REQUEST,
            "invalid binding name",
        ),
        (
            json!({"name": "-x"}),
            StatusCode::BAD_REQUEST,
            "invalid binding name",
        ),
        (
            json!({"name": ""}),
            StatusCode::BAD_REQUEST,
            "invalid binding name",
        ),
        (
            json!({"name": long}),
            StatusCode::BAD_REQUEST,
            "invalid binding name",
        ),
        (
            json!({"name": "a.b"}),
            StatusCode::BAD_REQUEST,
            "invalid binding name",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "name"),
        (
            json!({"name": "x", "tags": ["Bad Tag"]}),
            StatusCode::BAD_REQUEST,
            "invalid tag name",
        ),
        (
            json!({"name": "x", "ttl_secs": 0}),
            StatusCode::BAD_REQUEST,
            "at least 1 second",
        ),
        (
            json!({"name": "x", "ttl_secs": 999_999_999_999u64}),
            StatusCode::BAD_REQUEST,
            "ten years",
        ),
        (
            json!({"name": "x", "ttl_secs": -5}),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            json!({"name": "agent"}),
            StatusCode::CONFLICT,
            "already has a binding named",
        ),
    ] {
        let (got, v) = r.api(Method::POST, "/bindings", body.clone()).await;
        assert_eq!(got, status, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(words), "{body}: {msg}");
    }
    let (status, _) = r
        .api(Method::DELETE, "/bindings/Not_A_Name", Value::Null)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(list(&r).await.len(), 1, "nothing was created");
    assert_eq!(audit(&r).await.len(), before, "nothing was audited");
    r.stop().await;

    // A server without a gateway refuses bindings and says how to fix it.
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    assert!(r.gateway.is_none() && r.gateway_url.is_none());
    let (status, v) = r
        .api(Method::POST, "/bindings", json!({"name": "agent"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("--gateway-listen"),
        "{v}"
    );
    assert!(list(&r).await.is_empty());
    r.stop().await;
}

#[tokio::test]
async fn node_and_binding_addresses_never_collide() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let t = token(&r).await;
    let mut seen: HashSet<Ipv4Addr> = HashSet::new();
    let mut fresh = |ip: Ipv4Addr| {
        assert!(seen.insert(ip), "{ip} handed out twice");
        assert_ne!(ip, Ipv4Addr::new(100, 64, 0, 1), "the gateway's own");
        ip
    };
    fresh(ip_of(&r.enroll(&t, 1, "n1").await));
    let b1 = fresh(create(&r, json!({"name": "b1"})).await.binding.ip);
    fresh(ip_of(&r.enroll(&t, 2, "n2").await));
    fresh(create(&r, json!({"name": "b2"})).await.binding.ip);
    // A revoked binding's address stays taken.
    let (status, _) = r.api(Method::DELETE, "/bindings/b1", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let n3 = fresh(ip_of(&r.enroll(&t, 3, "n3").await));
    assert_ne!(n3, b1);
    fresh(create(&r, json!({"name": "b1"})).await.binding.ip);
    fresh(ip_of(&r.enroll(&t, 4, "n4").await));
    assert_eq!(seen.len(), 7);
    r.stop().await;
}

/// Reads messages until a delta satisfies `pred`, within `within`.
async fn delta_until(
    ws: &mut Ws,
    within: Duration,
    mut pred: impl FnMut(&[Peer], &[NodeKey], Option<&FilterSpec>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_msg(ws, left).await {
            ServerMessage::Delta {
                upsert,
                remove,
                filter,
                ..
            } if pred(&upsert, &remove, filter.as_ref()) => return,
            _ => continue,
        }
    }
}

fn gateway_peer(map: &NetworkMap) -> Option<&Peer> {
    map.peers.iter().find(|p| p.id == 0)
}

#[tokio::test]
async fn node_maps_carry_the_gateway_with_binding_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let gw = r.gateway.clone().unwrap();
    let t = token(&r).await;
    let node = r.enroll(&t, 7, "db").await;
    r.enroll(&t, 8, "web").await;
    let (mut ws, map) = r.connect(node["node_secret"].as_str().unwrap()).await;
    assert!(
        gateway_peer(&map).is_none(),
        "no bindings, no gateway peer: {map:?}"
    );
    assert_eq!(map.peers.len(), 1);
    let member = NodeKey(gw.member_public_key(DEFAULT_ACCOUNT));

    let a = create(&r, json!({"name": "a"})).await.binding.ip;
    delta_until(&mut ws, PUSH, |up, _, _| {
        up.iter().any(|p| {
            p.id == 0
                && p.name == "gateway"
                && p.public_key == member
                && p.ip == gateway_ip(&"100.64.0.0/16".parse().unwrap())
                && p.allowed_ips == [a.into()]
                && p.endpoints.is_empty()
                && p.online
        })
    })
    .await;
    let b = create(&r, json!({"name": "b"})).await.binding.ip;
    delta_until(&mut ws, PUSH, |up, _, _| {
        up.iter()
            .any(|p| p.id == 0 && p.allowed_ips == [a.into(), b.into()])
    })
    .await;
    let (status, _) = r.api(Method::DELETE, "/bindings/a", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    delta_until(&mut ws, PUSH, |up, _, _| {
        up.iter().any(|p| p.id == 0 && p.allowed_ips == [b.into()])
    })
    .await;
    let (status, _) = r.api(Method::DELETE, "/bindings/b", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    delta_until(&mut ws, PUSH, |_, rm, _| rm.contains(&member)).await;

    // A binding that expires leaves the map by itself.
    create(&r, json!({"name": "short", "ttl_secs": 1})).await;
    delta_until(&mut ws, PUSH, |up, _, _| up.iter().any(|p| p.id == 0)).await;
    delta_until(&mut ws, Duration::from_secs(4), |_, rm, _| {
        rm.contains(&member)
    })
    .await;
    r.stop().await;
}

fn decide(spec: &FilterSpec, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> (bool, Option<String>) {
    let f = Filter::compile(spec);
    let d = f.decide(src, dst, PROTO_TCP, port);
    (d.allow, d.rule.map(|i| f.rule_name(i).to_string()))
}

const AGENTS: &str = r#"default = "deny"

[[rules]]
name = "ci-db"
action = "allow"
from = ["binding:ci"]
to = ["db"]
ports = ["tcp:5432"]

[[rules]]
name = "agents-web"
action = "allow"
from = ["tag:agents"]
to = ["db"]
ports = ["tcp:80"]
"#;

#[tokio::test]
async fn policies_name_bindings_and_their_tags() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let t = token(&r).await;
    let node = r.enroll(&t, 7, "db").await;
    let db = ip_of(&node);
    let (status, v) = r.api(Method::PUT, "/policy", json!({"text": AGENTS})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("binding `ci`"), "{warnings}");
    let (mut ws, _) = r.connect(node["node_secret"].as_str().unwrap()).await;

    let ci = create(&r, json!({"name": "ci"})).await.binding.ip;
    let agent = create(&r, json!({"name": "bot", "tags": ["agents"]}))
        .await
        .binding
        .ip;
    let mut spec = None;
    delta_until(&mut ws, PUSH, |_, _, f| {
        if let Some(f) = f.filter(|f| decide(f, agent, db, 80).0) {
            spec = Some(f.clone());
            return true;
        }
        false
    })
    .await;
    let spec = spec.unwrap();
    assert_eq!(decide(&spec, ci, db, 5432), (true, Some("ci-db".into())));
    assert_eq!(
        decide(&spec, agent, db, 80),
        (true, Some("agents-web".into()))
    );
    assert!(
        !decide(&spec, agent, db, 5432).0,
        "the tag rule is port 80 only"
    );
    assert!(!decide(&spec, ci, db, 80).0);

    let (status, v) = r
        .api(
            Method::POST,
            "/policy/test",
            json!({"from": "binding:ci", "to": "db", "port": "tcp:5432"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["allow"], true);
    assert_eq!(v["rule"], "ci-db");
    assert_eq!(v["from_ip"], ci.to_string());

    // Revoked: the name resolves to nothing again, in the maps and the test.
    let (status, _) = r.api(Method::DELETE, "/bindings/ci", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    delta_until(&mut ws, PUSH, |_, _, f| {
        f.is_some_and(|f| !decide(f, ci, db, 5432).0)
    })
    .await;
    let (status, v) = r
        .api(
            Method::POST,
            "/policy/test",
            json!({"from": "binding:ci", "to": "db", "port": "tcp:5432"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    r.stop().await;
}

#[tokio::test]
async fn the_gateway_snapshot_follows_bindings() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let gw = r.gateway.clone().unwrap();
    let t = token(&r).await;
    let node = ip_of(&r.enroll(&t, 7, "db").await);
    let (status, _) = r
        .api(
            Method::POST,
            "/dns",
            json!({"name": "pg", "addr": "100.64.0.2"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let made = create(&r, json!({"name": "agent"})).await;
    let (public_id, secret, _) = parts(&made.url, "http");
    assert!(
        eventually(PUSH, || gw
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| s.bindings.iter().any(|b| b.name == "agent")))
        .await,
        "the gateway learns of the binding within 1 s"
    );
    let snap = gw.account(DEFAULT_ACCOUNT).unwrap();
    assert_eq!(snap.name, "default");
    assert_eq!(snap.domain.as_deref(), Some("default.mesh"));
    let b = &snap.bindings[0];
    assert_eq!(b.public_id, public_id);
    assert_eq!(b.secret_hash, hash_secret(&secret));
    assert_eq!(b.ip, made.binding.ip);
    assert_eq!(b.expires_at, None);
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(snap.peers[0].name, "db");
    assert_eq!(snap.peers[0].ip, node);
    assert_eq!(snap.peers[0].allowed_ips, [node.into()]);
    assert!(!snap.peers[0].online);
    assert!(snap.names.contains(&("db.default.mesh".into(), node)));
    assert!(snap
        .names
        .contains(&("pg.default.mesh".into(), Ipv4Addr::new(100, 64, 0, 2))));
    assert!(snap.filter.is_some());

    let (status, _) = r.api(Method::DELETE, "/bindings/agent", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        eventually(PUSH, || gw
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| s.bindings.is_empty()))
        .await,
        "a revoked binding leaves the gateway within 1 s"
    );

    create(&r, json!({"name": "brief", "ttl_secs": 1})).await;
    assert!(
        eventually(PUSH, || gw
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| s.bindings.len() == 1))
        .await
    );
    assert!(
        eventually(Duration::from_secs(4), || gw
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| s.bindings.is_empty()))
        .await,
        "an expired binding leaves the gateway within seconds"
    );
    r.stop().await;
}

#[tokio::test]
async fn request_records_reach_the_log_and_count_as_usage() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let gw = r.gateway.clone().unwrap();
    create(&r, json!({"name": "ci"})).await;
    assert!(
        eventually(PUSH, || gw
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| !s.bindings.is_empty()))
        .await
    );
    let id = gw.account(DEFAULT_ACCOUNT).unwrap().bindings[0].id;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    gw.record(request_record(Some(id), "ci", now_ms - 30_000, "/health"));
    gw.record(request_record(Some(id), "ci", now_ms - 20_000, "/items"));
    let mut denied = request_record(None, "b_unknown", now_ms - 1000, "/");
    denied.status = 407;
    denied.decision = "deny".into();
    denied.rule = None;
    denied.error = Some("bad_credentials".into());
    denied.dst_ip = None;
    denied.node = None;
    gw.record(denied);

    let mut page = None;
    for _ in 0..40 {
        let (status, v) = r.api(Method::GET, "/logs/requests", Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let p: RequestLogPage = serde_json::from_value(v).unwrap();
        if p.records.len() == 3 {
            page = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = page.expect("the records are stored within 2 s");
    assert_eq!(page.next_before_id, None);
    let newest = &page.records[0];
    assert_eq!(newest.binding, "b_unknown");
    assert_eq!(newest.status, 407);
    assert_eq!(newest.error.as_deref(), Some("bad_credentials"));
    let first = &page.records[2];
    assert_eq!(first.path.as_deref(), Some("/health"));
    assert_eq!(first.method, "GET");
    assert_eq!(first.target, "db.default.mesh:8080");
    assert_eq!(first.dst_ip, Some(Ipv4Addr::new(100, 64, 0, 3)));
    assert_eq!((first.bytes_up, first.bytes_down), (100, 2048));
    assert_eq!(first.rule.as_deref(), Some("ci-db"));
    assert_eq!(first.duration_ms, 42);
    assert_eq!(first.start_ms, now_ms - 30_000);

    // Filters and pages.
    let (_, v) = r
        .api(Method::GET, "/logs/requests?binding=ci", Value::Null)
        .await;
    let p: RequestLogPage = serde_json::from_value(v).unwrap();
    assert_eq!(p.records.len(), 2);
    let (_, v) = r
        .api(
            Method::GET,
            "/logs/requests?binding=ci&limit=1",
            Value::Null,
        )
        .await;
    let p1: RequestLogPage = serde_json::from_value(v).unwrap();
    assert_eq!(p1.records[0].path.as_deref(), Some("/items"));
    let before = p1.next_before_id.expect("a next page");
    let (_, v) = r
        .api(
            Method::GET,
            &format!("/logs/requests?binding=ci&limit=1&before_id={before}"),
            Value::Null,
        )
        .await;
    let p2: RequestLogPage = serde_json::from_value(v).unwrap();
    assert_eq!(p2.records[0].path.as_deref(), Some("/health"));
    let (_, v) = r
        .api(Method::GET, "/logs/requests?since=10s", Value::Null)
        .await;
    let recent: RequestLogPage = serde_json::from_value(v).unwrap();
    assert_eq!(recent.records.len(), 1, "only the newest is within 10 s");
    for bad in [
        "limit=0",
        "binding=Bad_Name",
        "before_id=x",
        "since=yesterday",
        "nope=1",
    ] {
        let (status, v) = r
            .api(Method::GET, &format!("/logs/requests?{bad}"), Value::Null)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }

    // Usage.
    let b = &list(&r).await[0];
    assert_eq!(b.requests, 2);
    let last = b.last_used_at.expect("last use recorded");
    assert_eq!(last, (now_ms - 20_000 + 42) / 1000);
    r.stop().await;
}
