//! What the dashboard's tests share: an in-process server on 127.0.0.1
//! (`Running`) and a cookie-keeping client that signs in and posts forms
//! with the session's CSRF token (`Browser`).

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use reqwest::header::LOCATION;
use reqwest::redirect::Policy;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use trellis_control::{Config, Server};
use trellis_edge::gateway::RequestRecord;
use trellis_proto::NodeKey;

/// Polls `check` every 20 ms until it holds, for at most `within`.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const EMAIL: &str = "alex@example.com";
pub const PASSWORD: &str = "correct horse battery";

pub struct Running {
    pub url: String,
    /// The SQLite file.
    pub db: std::path::PathBuf,
    /// The fetch gateway, when the server runs one.
    pub gateway: Option<std::sync::Arc<trellis_edge::gateway::Gateway>>,
    /// `SCHEME://HOST:PORT` of the gateway.
    pub gateway_url: Option<String>,
    pub setup_url: Option<String>,
    /// The edge's UDP address, when the server runs the edge.
    pub edge: Option<std::net::SocketAddr>,
    pub relay: std::sync::Arc<trellis_edge::RelayHub>,
    pub line: String,
    pub operator: String,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub async fn start(dir: &Path) -> Running {
        Running::start_with(dir, |_| {}).await
    }

    /// Starts a server whose configuration `tweak` adjusts first.
    pub async fn start_with(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Running {
        let mut config = Config {
            data_dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: None,
            edge_udp: None,
            dns_suffix: "mesh".into(),
            flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
            gateway_listen: None,
            gateway_tls: None,
        };
        tweak(&mut config);
        let server = Server::start(config).await.unwrap();
        let url = server.url();
        let gateway = server.gateway();
        let gateway_url = server.gateway_url();
        let setup_url = server.setup_url();
        let edge = server.edge_udp_addr();
        let relay = server.relay_hub();
        let line = server.dashboard_line();
        let operator = std::fs::read_to_string(server.admin_key_path())
            .unwrap()
            .trim()
            .to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Running {
            url,
            db: dir.join(trellis_control::DB_FILE),
            gateway,
            gateway_url,
            setup_url,
            edge,
            relay,
            line,
            operator,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .unwrap()
                .unwrap();
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Calls the REST API with the operator key.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let resp = Client::new()
            .request(method, self.at(&format!("/api/v1{path}")))
            .bearer_auth(&self.operator)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// POSTs `body` to the REST API with the operator key.
    pub async fn post_api(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.api(reqwest::Method::POST, path, body).await
    }

    /// Enrolls a fake node `name` with key `[key; 32]` using a fresh token.
    pub async fn enroll_fresh(&self, key: u8, name: &str) -> trellis_proto::EnrollResponse {
        let (status, v) = self.post_api("/tokens", json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let token = v["token"].as_str().expect("a token").to_string();
        let (status, v) = self
            .post_api(
                "/enroll",
                json!({
                    "token": token,
                    "public_key": NodeKey([key; 32]).to_string(),
                    "name": name,
                    "os": "linux",
                    "version": "test",
                }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// GET /api/v1/nodes: the account's nodes.
    pub async fn nodes(&self) -> Vec<Value> {
        let (status, v) = self.api(reqwest::Method::GET, "/nodes", Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Enrolls a fake node with `token` (no control stream: it stays offline).
    pub async fn enroll(&self, token: &str, key: u8, name: &str) -> Value {
        let resp = Client::new()
            .post(self.at("/api/v1/enroll"))
            .json(&json!({"token": token, "public_key": NodeKey([key; 32]).to_string(), "name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// Connects a fake node's control stream with its node secret, says
    /// hello, and returns the stream and its first map.
    pub async fn connect(&self, secret: &str) -> (Ws, trellis_proto::NetworkMap) {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!(
            "{}/api/v1/node/stream",
            self.url.replacen("http://", "ws://", 1)
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let hello = trellis_proto::NodeMessage::Hello {
            listen_port: 51820,
            local_addrs: vec!["198.18.0.10".parse().unwrap()],
            reflexive: None,
            advertise_routes: Vec::new(),
            os: "linux".into(),
            version: "test".into(),
        };
        ws.send(WsMessage::Text(
            serde_json::to_string(&hello).unwrap().into(),
        ))
        .await
        .unwrap();
        match next_msg(&mut ws, Duration::from_secs(2)).await {
            trellis_proto::ServerMessage::Map(m) => (ws, m),
            other => panic!("expected the map first, got {other:?}"),
        }
    }

    /// Creates the first admin through the setup link; returns the logged-in browser.
    pub async fn setup_admin(&self) -> Browser {
        let b = Browser::new();
        let page = b
            .get(self.setup_url.as_deref().expect("a setup link"))
            .await;
        assert_eq!(page.0, StatusCode::OK, "{}", page.1);
        let token = field(&page.1, "token");
        let resp = b
            .post(
                &self.at("/setup"),
                &[
                    ("csrf", &field(&page.1, "csrf")),
                    ("token", &token),
                    ("email", EMAIL),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&resp), "/setup/network");
        b
    }

    /// Logs in a new browser.
    pub async fn login(&self, email: &str, password: &str) -> Browser {
        let b = Browser::new();
        let resp = b.login(self, email, password).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "login of {email}");
        b
    }
}

/// A fake node's control stream.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The next message the server sends on a control stream, within `within`.
pub async fn next_msg(ws: &mut Ws, within: Duration) -> trellis_proto::ServerMessage {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a server message in time")
            .expect("stream still open")
            .expect("no websocket error");
        match msg {
            WsMessage::Text(t) => return serde_json::from_str(&t).unwrap(),
            WsMessage::Close(f) => panic!("stream closed: {f:?}"),
            _ => {}
        }
    }
}

/// A browser: a cookie jar, no automatic redirects.
pub struct Browser {
    pub http: Client,
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            http: Client::builder()
                .cookie_store(true)
                .redirect(Policy::none())
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, url: &str) -> (StatusCode, String) {
        let resp = self.http.get(url).send().await.unwrap();
        let status = resp.status();
        (status, resp.text().await.unwrap())
    }

    pub async fn get_json(&self, url: &str) -> (StatusCode, Value) {
        let resp = self.http.get(url).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    pub async fn post(&self, url: &str, form: &[(&str, &str)]) -> Response {
        self.http.post(url).form(form).send().await.unwrap()
    }

    pub async fn login(&self, r: &Running, email: &str, password: &str) -> Response {
        let (status, page) = self.get(&r.at("/login")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains(r#"<form id="login""#), "{page}");
        self.post(
            &r.at("/login"),
            &[
                ("csrf", &field(&page, "csrf")),
                ("email", email),
                ("password", password),
            ],
        )
        .await
    }

    /// The session's CSRF token, read from a logged-in page.
    pub async fn csrf(&self, r: &Running) -> String {
        let (status, page) = self.get(&r.at("/setup/network")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        field(&page, "csrf")
    }
}

/// The value of the first `<input name="NAME" value="...">` in a page.
pub fn field(page: &str, name: &str) -> String {
    let at = page
        .find(&format!(r#"name="{name}""#))
        .unwrap_or_else(|| panic!("no input {name} in {page}"));
    let rest = &page[at..];
    let v = rest.find(r#"value=""#).expect("the input has a value") + 7;
    let end = rest[v..].find('"').unwrap();
    rest[v..v + end].to_string()
}

/// The text inside the element with id `id` (up to its first `<`).
pub fn text_of(page: &str, id: &str) -> String {
    let at = page
        .find(&format!(r#"id="{id}""#))
        .unwrap_or_else(|| panic!("no #{id} in {page}"));
    let start = at + page[at..].find('>').unwrap() + 1;
    let end = start + page[start..].find('<').unwrap();
    page[start..end].to_string()
}

pub fn location(resp: &Response) -> String {
    resp.headers()
        .get(LOCATION)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A request record of the default account, as the gateway would send it.
pub fn request_record(
    binding_id: Option<i64>,
    binding: &str,
    start_ms: i64,
    path: &str,
) -> RequestRecord {
    RequestRecord {
        account_id: 1,
        binding_id,
        binding: binding.into(),
        start_ms,
        duration_ms: 42,
        form: "proxy".into(),
        method: "GET".into(),
        target: "db.default.mesh:8080".into(),
        dst_ip: Some(Ipv4Addr::new(100, 64, 0, 3)),
        dst_port: 8080,
        node: Some("db".into()),
        path: Some(path.into()),
        status: 200,
        bytes_up: 100,
        bytes_down: 2048,
        decision: "allow".into(),
        rule: Some("ci-db".into()),
        error: None,
    }
}
