//! The SDK, the local proxy and the MCP server against a fake gateway on
//! loopback (tests/fake).

mod fake;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use trellis_sdk::{Error, Mesh};

const T: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

#[test]
fn binding_url_errors_name_the_problem_and_never_the_secret() {
    let var = "TRELLIS_SDK_TEST_UNSET_VAR";
    std::env::remove_var(var);
    let e = Mesh::from_env(var).unwrap_err().to_string();
    assert!(e.contains(var) && e.contains("is not set"), "{e}");
    assert!(e.contains("b_<id>:<secret>@HOST:PORT"), "{e}");

    let secret = "TopSecretValue123";
    for (raw, want) in [
        (
            format!("ftp://b_abc:{secret}@edge:8443"),
            "has scheme \"ftp\"",
        ),
        (format!("b_abc:{secret}@edge:8443"), "has no scheme"),
        (
            "http://b_abc@edge:8443".to_string(),
            "has no secret after the binding id b_abc",
        ),
        ("http://b_abc:@edge:8443".to_string(), "has no secret"),
        (
            format!("http://ci:{secret}@edge:8443"),
            "binding ids start with b_",
        ),
        (
            format!("http://{secret}@edge:8443"),
            "binding ids start with b_",
        ),
        (format!("http://:{secret}@edge:8443"), "has no binding id"),
        (format!("http://b_abc:{secret}@edge:99999"), "invalid port"),
        (
            format!("http://b_abc:{secret}@edge:8443/fetch"),
            "has a path",
        ),
        (format!("https://b_abc:{secret}@:8443"), "not a valid URL"),
        (String::new(), "is empty"),
    ] {
        let var = "TRELLIS_SDK_TEST_BAD_VAR";
        std::env::set_var(var, &raw);
        let e = Mesh::from_env(var).expect_err(&raw);
        std::env::remove_var(var);
        assert!(matches!(e, Error::Config(_)), "{raw}: {e:?}");
        let text = e.to_string();
        assert!(text.starts_with(var), "{raw}: {text}");
        assert!(text.contains(want), "{raw}: {text} (wanted {want:?})");
        assert!(!text.contains(secret), "{raw}: the secret leaked: {text}");
        assert!(
            !format!("{e:?}").contains(secret),
            "{raw}: the secret leaked in Debug"
        );
        // Mesh::parse names "the binding URL" instead of a variable.
        if !raw.is_empty() {
            let p = Mesh::parse(&raw).unwrap_err().to_string();
            assert!(p.starts_with("the binding URL") && p.contains(want), "{p}");
        }
    }

    let mesh = Mesh::parse(&format!("https://b_abc:{secret}@edge.example.com")).unwrap();
    assert_eq!(mesh.gateway_url(), "https://edge.example.com:443");
    assert_eq!(mesh.binding_id(), "b_abc");
    assert!(!format!("{mesh:?}").contains(secret));
    let mesh = Mesh::parse(&format!(" http://b_abc:{secret}@[::1]:8443/\n")).unwrap();
    assert_eq!(mesh.gateway_url(), "http://[::1]:8443");
    // A PEM without a certificate is refused.
    let e = mesh.with_root_certificate("not a pem").unwrap_err();
    assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
}

#[tokio::test]
async fn fetch_goes_through_the_gateway_with_the_binding() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();

    let resp = within(mesh.get("http://web.prod.mesh/hello?x=1"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-target"], "web");
    assert_eq!(
        resp.text().await.unwrap(),
        "hello from web.prod.mesh: GET /hello?x=1 body="
    );

    let req = mesh
        .client()
        .post("http://web.prod.mesh/items")
        .body("{\"n\":1}")
        .build()
        .unwrap();
    let resp = within(mesh.fetch(req)).await.unwrap();
    assert_eq!(
        resp.text().await.unwrap(),
        "hello from web.prod.mesh: POST /items body={\"n\":1}"
    );

    let seen = gw.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "http://web.prod.mesh/hello?x=1");
    for s in &seen {
        assert_eq!(s.proxy_auth.as_deref(), Some(fake::basic().as_str()));
    }
}

#[tokio::test]
async fn gateway_refusals_become_errors_with_code_and_sentence() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();

    let e = within(mesh.connect("denied.prod.mesh:5432"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert_eq!(e.code(), Some("policy_denied"));
    match &e {
        Error::Gateway { message, .. } => assert_eq!(message, fake::DENIED),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!("the gateway answered 403 policy_denied: {}", fake::DENIED)
    );

    // The same refusal for an http:// fetch (the gateway answered it)...
    let e = within(mesh.get("http://denied.prod.mesh/x"))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("policy_denied")));
    assert!(e.to_string().contains(fake::DENIED), "{e}");
    // ... and for https://, which goes through CONNECT.
    let e = within(mesh.get("https://denied.prod.mesh:5432/x"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(403), Some("policy_denied")),
        "{e}"
    );

    let e = within(mesh.connect("nowhere.prod.mesh:80"))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("unknown_host")));

    // A wrong secret: 407 bad_credentials.
    let wrong = Mesh::parse(&format!("http://{}:wrong@{}", fake::ID, gw.addr)).unwrap();
    let e = within(wrong.connect("echo.prod.mesh:7")).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(407), Some("bad_credentials")));
    let e = within(wrong.services()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(401), Some("bad_credentials")));

    // A bad target is refused before anything is sent.
    let before = gw.seen().len();
    let e = mesh.connect("db.prod.mesh").await.unwrap_err();
    assert!(matches!(e, Error::InvalidTarget(_)), "{e:?}");
    let e = mesh
        .connect("db:80 HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET / HTTP/1.1")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidTarget(_)), "{e:?}");
    assert_eq!(gw.seen().len(), before);

    // No gateway at all: the error names the gateway, not the secret.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let nobody = Mesh::parse(&format!("http://b_x:TopSecret@{dead}")).unwrap();
    let e = within(nobody.connect("db:5432")).await.unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&dead.to_string()), "{e}");
    assert!(!e.to_string().contains("TopSecret"), "{e}");
}

#[tokio::test]
async fn connect_tunnels_bytes_exactly_including_the_first_ones() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();
    let mut s = within(mesh.connect("echo.prod.mesh:7")).await.unwrap();
    // The service's greeting came in the same packet as the 200.
    let mut greeting = vec![0u8; fake::BANNER.len()];
    within(s.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(greeting, fake::BANNER);

    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(s);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.flush().await.unwrap();
        w
    });
    let mut back = vec![0u8; data.len()];
    within(r.read_exact(&mut back)).await.unwrap();
    assert!(back == data, "the echoed bytes differ");
    let mut w = writer.await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(r.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "{} extra bytes", rest.len());

    let seen = gw.seen();
    assert_eq!(seen[0].method, "CONNECT");
    assert_eq!(seen[0].target, "echo.prod.mesh:7");
    assert_eq!(seen[0].proxy_auth.as_deref(), Some(fake::basic().as_str()));
}

#[tokio::test]
async fn services_lists_what_the_binding_may_reach() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();
    let s = within(mesh.services()).await.unwrap();
    assert_eq!(
        (s.binding.as_str(), s.account.as_str()),
        ("ci-runner", "prod")
    );
    assert_eq!(s.address, "100.64.0.9");
    assert_eq!(s.services.len(), 2);
    assert_eq!(s.services[0].name, "db.prod.mesh");
    assert_eq!(s.services[0].ports, ["tcp:5432"]);
    assert!(!s.services[1].online);
    let seen = gw.seen();
    assert_eq!(seen[0].target, "/.trellis/services");
    assert_eq!(
        seen[0].binding.as_deref(),
        Some(format!("{}:{}", fake::ID, fake::SECRET).as_str())
    );
}

/// Reads one HTTP/1.1 response with Content-Length: (status line, headers, body).
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> (String, HashMap<String, String>, Vec<u8>) {
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let n: usize = headers
        .get("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.unwrap();
    (status.trim_end().to_string(), headers, body)
}

#[tokio::test]
async fn local_proxy_serves_absolute_form_with_keep_alive_and_connect() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(trellis_sdk::proxy::serve(mesh, listener));

    // What curl --proxy http://127.0.0.1:PORT sends: no Proxy-Authorization.
    let conn = TcpStream::connect(proxy).await.unwrap();
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"GET http://web.prod.mesh/one HTTP/1.1\r\nHost: web.prod.mesh\r\nUser-Agent: curl/8\r\nAccept: */*\r\nProxy-Connection: Keep-Alive\r\n\r\n")
        .await
        .unwrap();
    let (status, headers, body) = within(read_response(&mut r)).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(headers["x-target"], "web");
    assert_eq!(body, b"hello from web.prod.mesh: GET /one body=");
    // A second request, with a body, on the same connection.
    w.write_all(b"POST http://web.prod.mesh/two HTTP/1.1\r\nHost: web.prod.mesh\r\nContent-Length: 5\r\n\r\nabcde")
        .await
        .unwrap();
    let (status, _, body) = within(read_response(&mut r)).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, b"hello from web.prod.mesh: POST /two body=abcde");
    // A refusal of the gateway reaches the client as the gateway sent it.
    w.write_all(b"GET http://denied.prod.mesh/ HTTP/1.1\r\nHost: denied.prod.mesh\r\n\r\n")
        .await
        .unwrap();
    let (status, headers, body) = within(read_response(&mut r)).await;
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    assert_eq!(headers["trellis-error"], "policy_denied");
    assert_eq!(String::from_utf8_lossy(&body).trim(), fake::DENIED);

    let seen = gw.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[1].target, "http://web.prod.mesh/two");
    assert_eq!(seen[1].body, b"abcde");
    for s in &seen {
        assert_eq!(s.proxy_auth.as_deref(), Some(fake::basic().as_str()));
    }

    // An origin-form request is not for a proxy.
    w.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = within(read_response(&mut r)).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(String::from_utf8_lossy(&body).contains("absolute-form"));

    // CONNECT: a tunnel through the gateway, greeting included.
    let mut c = TcpStream::connect(proxy).await.unwrap();
    c.write_all(b"CONNECT echo.prod.mesh:7 HTTP/1.1\r\nHost: echo.prod.mesh:7\r\n\r\n")
        .await
        .unwrap();
    let mut c = BufReader::new(c);
    let (status, _, _) = within(read_response(&mut c)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut greeting = vec![0u8; fake::BANNER.len()];
    within(c.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(greeting, fake::BANNER);
    c.get_mut()
        .write_all(b"ping through the tunnel")
        .await
        .unwrap();
    let mut back = [0u8; 23];
    within(c.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"ping through the tunnel");

    // CONNECT refused by the gateway: its status, code and sentence.
    let mut c = TcpStream::connect(proxy).await.unwrap();
    c.write_all(b"CONNECT denied.prod.mesh:5432 HTTP/1.1\r\nHost: denied.prod.mesh:5432\r\n\r\n")
        .await
        .unwrap();
    let mut c = BufReader::new(c);
    let (status, headers, body) = within(read_response(&mut c)).await;
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    assert_eq!(headers["trellis-error"], "policy_denied");
    assert_eq!(String::from_utf8_lossy(&body).trim(), fake::DENIED);
}

#[tokio::test]
async fn local_proxy_works_for_an_http_client_configured_with_it() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(trellis_sdk::proxy::serve(mesh, listener));
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{proxy}")).unwrap())
        .build()
        .unwrap();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let stream = futures_util::stream::iter(
        body.chunks(10_000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = within(
        client
            .put("http://web.prod.mesh/upload")
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.bytes().await.unwrap();
    assert!(text.starts_with(b"hello from web.prod.mesh: PUT /upload body="));
    let seen = gw.seen();
    assert_eq!(seen[0].body, body, "the streamed body arrived intact");
    let resp = within(client.get("http://big.prod.mesh/").send())
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 128 * 1024);
}

struct McpClient {
    w: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    r: tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>,
}

impl McpClient {
    async fn send(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.w.write_all(&line).await.unwrap();
    }

    async fn recv(&mut self) -> Value {
        let line = within(self.r.next_line()).await.unwrap().expect("a line");
        serde_json::from_str(&line).expect("only JSON on the output")
    }

    async fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        let v = self.recv().await;
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], id, "{v}");
        v
    }
}

fn start_mcp(mesh: Mesh) -> (McpClient, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (sr, sw) = tokio::io::split(server);
    let task = tokio::spawn(trellis_sdk::mcp::serve(mesh, sr, sw));
    let (cr, cw) = tokio::io::split(client);
    (
        McpClient {
            w: cw,
            r: BufReader::new(cr).lines(),
        },
        task,
    )
}

#[tokio::test]
async fn mcp_server_initializes_lists_and_fetches_through_the_gateway() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();
    let (mut c, task) = start_mcp(mesh);

    let init = c
        .call(
            1,
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "0"}}),
        )
        .await;
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "trellis");
    // A notification gets no answer: the next line answers the ping.
    c.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    let pong = c.call(2, "ping", json!({})).await;
    assert_eq!(pong["result"], json!({}));

    let list = c.call(3, "tools/list", json!({})).await;
    let tools = list["result"]["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fetch", "list_services"]);
    assert_eq!(tools[0]["inputSchema"]["required"], json!(["url"]));

    let r = c
        .call(
            4,
            "tools/call",
            json!({"name": "fetch", "arguments": {"url": "http://web.prod.mesh/mcp",
                   "method": "post", "headers": {"X-Agent": "yes"}, "body": "hi"}}),
        )
        .await;
    let res = &r["result"];
    assert_eq!(res["isError"], false, "{r}");
    let text = res["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\n"), "{text}");
    assert!(text.contains("x-target: web\n"), "{text}");
    assert!(
        text.ends_with("\n\nhello from web.prod.mesh: POST /mcp body=hi"),
        "{text}"
    );
    let seen = gw.seen();
    assert_eq!(seen.last().unwrap().target, "http://web.prod.mesh/mcp");
    assert_eq!(
        seen.last().unwrap().proxy_auth.as_deref(),
        Some(fake::basic().as_str())
    );

    // A refusal of the gateway: isError, with its sentence.
    let r = c
        .call(
            5,
            "tools/call",
            json!({"name": "fetch", "arguments": {"url": "http://denied.prod.mesh/"}}),
        )
        .await;
    assert_eq!(r["result"]["isError"], true, "{r}");
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("403 policy_denied") && text.contains(fake::DENIED),
        "{text}"
    );

    // Long bodies are cut at 64 KiB with a note; binary ones summarized.
    let r = c
        .call(
            6,
            "tools/call",
            json!({"name": "fetch", "arguments": {"url": "http://big.prod.mesh/"}}),
        )
        .await;
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.ends_with(
            "[body truncated: showing the first 65536 bytes of 131072 bytes (first 65536 read)]"
        ),
        "{}",
        &text[text.len() - 200..]
    );
    assert!(text.len() < 66_000 + 500);
    let r = c
        .call(
            7,
            "tools/call",
            json!({"name": "fetch", "arguments": {"url": "http://png.prod.mesh/"}}),
        )
        .await;
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.ends_with("[binary body: 14 bytes of image/png; not shown]"),
        "{text}"
    );

    let r = c
        .call(
            8,
            "tools/call",
            json!({"name": "list_services", "arguments": {}}),
        )
        .await;
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["services"][0]["name"],
        "db.prod.mesh"
    );
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("- db.prod.mesh (100.64.0.3, node db, online): tcp:5432"),
        "{text}"
    );
    assert!(
        text.contains("- 198.19.10.0/24 (node office-router, offline): *"),
        "{text}"
    );

    // Protocol errors.
    let r = c.call(9, "resources/list", json!({})).await;
    assert_eq!(r["error"]["code"], -32601, "{r}");
    let r = c
        .call(10, "tools/call", json!({"name": "fetch", "arguments": {}}))
        .await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = c
        .call(11, "tools/call", json!({"name": "rm_rf", "arguments": {}}))
        .await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    c.w.write_all(b"{not json\n").await.unwrap();
    let r = c.recv().await;
    assert_eq!(r["error"]["code"], -32700, "{r}");
    assert_eq!(r["id"], Value::Null);
    c.w.write_all(b"\xff\xfe{\n").await.unwrap();
    assert_eq!(c.recv().await["error"]["code"], -32700);
    let pong = c.call(12, "ping", json!({})).await;
    assert_eq!(pong["result"], json!({}), "still serving after bad input");

    // End of input ends the server, with nothing more on its output.
    c.w.shutdown().await.unwrap();
    within(task).await.unwrap().unwrap();
    assert!(within(c.r.next_line()).await.unwrap().is_none());
}

#[tokio::test]
async fn https_targets_go_through_connect_with_tls_end_to_end() {
    let gw = fake::start().await;
    let mesh = Mesh::parse(&gw.url()).unwrap();
    // The target's certificate is from a private CA: refused until trusted.
    let e = within(mesh.get("https://tls.prod.mesh/"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Http(_)), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    let mesh = mesh.with_root_certificate(&gw.ca_pem).unwrap();
    let resp = within(mesh.get("https://tls.prod.mesh/")).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "hello over tls");
    let seen = gw.seen();
    let connect = seen.last().unwrap();
    assert_eq!(
        (connect.method.as_str(), connect.target.as_str()),
        ("CONNECT", "tls.prod.mesh:443")
    );
    assert_eq!(connect.proxy_auth.as_deref(), Some(fake::basic().as_str()));
}

#[tokio::test]
async fn an_https_gateway_with_a_private_ca() {
    let gw = fake::start_https().await;
    assert!(gw.url().starts_with("https://"));
    let untrusting = Mesh::parse(&gw.url()).unwrap();
    let e = within(untrusting.connect("echo.prod.mesh:7"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("TLS"), "{e}");
    let e = within(untrusting.get("http://web.prod.mesh/"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");

    let mesh = untrusting.with_root_certificate(&gw.ca_pem).unwrap();
    // CONNECT over TLS, greeting included.
    let mut s = within(mesh.connect("echo.prod.mesh:7")).await.unwrap();
    let mut greeting = vec![0u8; fake::BANNER.len()];
    within(s.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(greeting, fake::BANNER);
    s.write_all(b"over tls").await.unwrap();
    s.flush().await.unwrap();
    let mut back = [0u8; 8];
    within(s.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"over tls");
    // Forward proxy over TLS, TLS inside TLS, the services list, a refusal.
    let resp = within(mesh.get("http://web.prod.mesh/a")).await.unwrap();
    assert_eq!(
        resp.text().await.unwrap(),
        "hello from web.prod.mesh: GET /a body="
    );
    let resp = within(mesh.get("https://tls.prod.mesh/")).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "hello over tls");
    assert_eq!(within(mesh.services()).await.unwrap().account, "prod");
    let e = within(mesh.connect("denied.prod.mesh:5432"))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("policy_denied")));
}
