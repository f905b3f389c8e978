//! A Model Context Protocol server over stdio (JSON-RPC 2.0, one message per
//! line) that lets an AI agent use a binding: the `fetch` tool sends HTTP
//! requests to services of the mesh, `list_services` tells what it may reach.
//!
//! Only JSON-RPC goes to the output; logs go to stderr (tracing).

use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::{Error, Mesh, Services};

/// The protocol revision this server implements.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// Older revisions a client may ask for; the tools work the same.
const ALSO_SUPPORTED: &[&str] = &["2025-03-26", "2024-11-05"];
/// Bodies longer than this are cut in `fetch` results.
pub const MAX_BODY: usize = 64 * 1024;
/// How long one `fetch` call may take, body included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INVALID_REQUEST: i64 = -32600;
const PARSE_ERROR: i64 = -32700;

/// Serves MCP on the process's stdin and stdout until stdin closes.
pub async fn serve_stdio(mesh: Mesh) -> std::io::Result<()> {
    serve(mesh, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serves MCP on `input`/`output` until `input` ends and every request
/// received has been answered. Requests run concurrently (a slow `fetch`
/// does not hold up `ping`).
pub async fn serve<R, W>(mesh: Mesh, input: R, mut output: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let mut input = BufReader::new(input);
    let mut raw = Vec::new();
    let mut reading = Some(tx);
    loop {
        tokio::select! {
            n = input.read_until(b'\n', &mut raw), if reading.is_some() => {
                // Not UTF-8 is a parse error for that line, not the end.
                let line = String::from_utf8_lossy(&raw).into_owned();
                raw.clear();
                match n? {
                    0 => reading = None,
                    _ if line.trim().is_empty() => {}
                    _ => {
                        let tx = reading.clone().expect("reading");
                        let mesh = mesh.clone();
                        tokio::spawn(async move {
                            if let Some(answer) = handle_line(&mesh, &line).await {
                                let _ = tx.send(answer);
                            }
                        });
                    }
                }
            }
            answer = rx.recv() => {
                let Some(answer) = answer else { break };
                let mut line = serde_json::to_vec(&answer).expect("JSON values serialize");
                line.push(b'\n');
                output.write_all(&line).await?;
                output.flush().await?;
            }
        }
    }
    Ok(())
}

fn error(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// The answer to one line, or none (notifications, responses).
async fn handle_line(mesh: &Mesh, line: &str) -> Option<Value> {
    let msg: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Some(error(Value::Null, PARSE_ERROR, format!("Parse error: {e}"))),
    };
    let Value::Object(msg) = msg else {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "Invalid Request: expected one JSON-RPC object per line (batches are not supported)",
        ));
    };
    let id = msg.get("id").cloned();
    let Some(method) = msg.get("method").and_then(Value::as_str) else {
        // A response to a request of ours (we send none), or garbage.
        if msg.contains_key("result") || msg.contains_key("error") {
            return None;
        }
        return Some(error(
            id.unwrap_or(Value::Null),
            INVALID_REQUEST,
            "Invalid Request: no method",
        ));
    };
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let Some(id) = id else {
        // Notifications (notifications/initialized, cancelled, ...) need no answer.
        tracing::debug!(method, "mcp: notification");
        return None;
    };
    Some(match method {
        "initialize" => result(id, initialize(&params)),
        "ping" => result(id, json!({})),
        "tools/list" => result(id, json!({ "tools": tools() })),
        "tools/call" => match call(mesh, &params).await {
            Ok(r) => result(id, r),
            Err(m) => error(id, INVALID_PARAMS, m),
        },
        other => error(id, METHOD_NOT_FOUND, format!("Method not found: {other}")),
    })
}

fn initialize(params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = match asked {
        Some(v) if v == PROTOCOL_VERSION || ALSO_SUPPORTED.contains(&v) => v,
        _ => PROTOCOL_VERSION,
    };
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": "trellis", "title": "Trellis mesh", "version": env!("CARGO_PKG_VERSION")},
        "instructions": "Reach services on a private Trellis network through a binding. \
            Call list_services to see what you may reach (names like db.prod.mesh and the allowed ports), \
            then fetch http:// or https:// URLs on them."
    })
}

fn tools() -> Value {
    json!([
        {
            "name": "fetch",
            "title": "Fetch through the mesh",
            "description": "Send an HTTP request to a service on the private network (through the Trellis gateway, as this binding). \
                Use http:// or https:// URLs with names from list_services (e.g. http://db.prod.mesh:8080/health), node names or overlay addresses. \
                Returns the status line, the response headers and the body (text up to 64 KiB; binary bodies are summarized). \
                A refusal of the gateway (policy, unknown host, node offline) is an error result with the gateway's explanation.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "url": {"type": "string", "description": "http:// or https:// URL of the target"},
                    "method": {"type": "string", "description": "HTTP method (default GET)"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}, "description": "request headers"},
                    "body": {"type": "string", "description": "request body (text)"}
                },
                "required": ["url"]
            }
        },
        {
            "name": "list_services",
            "title": "List reachable services",
            "description": "List the nodes, DNS names and routed subnets this binding may reach, the ports the policy allows (* for any) and whether each is online.",
            "inputSchema": {"type": "object", "properties": {}},
            "outputSchema": {
                "type": "object",
                "properties": {
                    "binding": {"type": "string"},
                    "account": {"type": "string"},
                    "address": {"type": "string"},
                    "services": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "address": {"type": "string"},
                                "node": {"type": "string"},
                                "online": {"type": "boolean"},
                                "ports": {"type": "array", "items": {"type": "string"}}
                            },
                            "required": ["name", "address", "node", "online", "ports"]
                        }
                    }
                },
                "required": ["binding", "account", "address", "services"]
            }
        }
    ])
}

fn tool_text(text: String, is_error: bool) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": is_error})
}

/// `tools/call`: Ok is a tool result (possibly `isError`), Err a message
/// for a JSON-RPC "invalid params" error.
async fn call(mesh: &Mesh, params: &Value) -> Result<Value, String> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or("tools/call needs a tool name")?;
    let empty = Map::new();
    let args = match params.get("arguments") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err("the arguments must be an object".into()),
    };
    match name {
        "fetch" => fetch(mesh, args).await,
        "list_services" => Ok(list_services(mesh).await),
        other => Err(format!("Unknown tool: {other}")),
    }
}

async fn fetch(mesh: &Mesh, args: &Map<String, Value>) -> Result<Value, String> {
    let url = args
        .get("url")
        .and_then(Value::as_str)
        .ok_or("fetch needs a url (a string)")?;
    let method = match args.get("method") {
        None | Some(Value::Null) => reqwest::Method::GET,
        Some(Value::String(m)) => reqwest::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("{m:?} is not an HTTP method"))?,
        Some(_) => return Err("method must be a string".into()),
    };
    let mut headers = reqwest::header::HeaderMap::new();
    match args.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("header {k:?} must have a string value"))?;
                let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("{k:?} is not a valid header name"))?;
                let value = reqwest::header::HeaderValue::from_str(v)
                    .map_err(|_| format!("the value of header {k:?} is not valid"))?;
                headers.append(name, value);
            }
        }
        Some(_) => return Err("headers must be an object of strings".into()),
    }
    let body = match args.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::String(b)) => Some(b.clone()),
        Some(_) => return Err("body must be a string".into()),
    };
    let mut request = mesh.client().request(method, url).headers(headers);
    if let Some(body) = body {
        request = request.body(body);
    }
    let request = match request.build() {
        Ok(r) => r,
        Err(e) => {
            return Ok(tool_text(
                format!("Cannot fetch {url}: {}", Error::from(e)),
                true,
            ))
        }
    };
    let work = async {
        let resp = mesh.fetch(request).await?;
        describe(resp).await
    };
    Ok(match tokio::time::timeout(FETCH_TIMEOUT, work).await {
        Ok(Ok(text)) => tool_text(text, false),
        Ok(Err(e @ Error::Gateway { .. })) => tool_text(
            format!("The Trellis gateway refused the request to {url}: {e}"),
            true,
        ),
        Ok(Err(e)) => tool_text(format!("Fetching {url} failed: {e}"), true),
        Err(_) => tool_text(
            format!("Fetching {url} took longer than {FETCH_TIMEOUT:?} and was abandoned."),
            true,
        ),
    })
}

/// Status line, headers, blank line, body (text up to [`MAX_BODY`]).
async fn describe(mut resp: reqwest::Response) -> Result<String, Error> {
    let mut out = format!("{:?} {}\n", resp.version(), resp.status());
    for (name, value) in resp.headers() {
        out.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    out.push('\n');
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let length = resp.content_length();
    let mut body = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = resp.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            truncated = true;
            body.truncate(MAX_BODY);
            break;
        }
    }
    let of = match (truncated, length) {
        (false, _) => format!("{} bytes", body.len()),
        (true, Some(n)) => format!("{n} bytes (first {MAX_BODY} read)"),
        (true, None) => format!("more than {MAX_BODY} bytes"),
    };
    let binary_type = content_type.as_deref().is_some_and(|t| {
        let t = t.to_ascii_lowercase();
        ["image/", "audio/", "video/", "font/"]
            .iter()
            .any(|p| t.starts_with(p))
            || [
                "application/octet-stream",
                "application/zip",
                "application/gzip",
                "application/pdf",
                "application/wasm",
            ]
            .iter()
            .any(|p| t.starts_with(p))
    });
    let text = match std::str::from_utf8(&body) {
        Ok(s) => Some(s),
        // A character cut by the truncation is not binary.
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&body[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text {
        Some(t) if !binary_type && !t.contains('\0') => {
            out.push_str(t);
            if truncated {
                out.push_str(&format!(
                    "\n\n[body truncated: showing the first {MAX_BODY} bytes of {of}]"
                ));
            }
        }
        _ => out.push_str(&format!(
            "[binary body: {of} of {}; not shown]",
            content_type.as_deref().unwrap_or("unknown type")
        )),
    }
    Ok(out)
}

async fn list_services(mesh: &Mesh) -> Value {
    match mesh.services().await {
        Ok(s) => {
            let mut v = tool_text(services_text(&s), false);
            v["structuredContent"] = serde_json::to_value(&s).expect("services serialize");
            v
        }
        Err(e) => tool_text(format!("Cannot list the services: {e}"), true),
    }
}

fn services_text(s: &Services) -> String {
    let mut out = format!(
        "Binding {} (account {}, address {}) ",
        s.binding, s.account, s.address
    );
    if s.services.is_empty() {
        out.push_str("may reach nothing: the account's policy allows it no destination.");
        return out;
    }
    out.push_str("may reach:\n");
    for svc in &s.services {
        let mut what = Vec::new();
        if !svc.address.is_empty() && svc.address != svc.name {
            what.push(svc.address.clone());
        }
        if !svc.node.is_empty() && svc.node != svc.name {
            what.push(format!("node {}", svc.node));
        }
        what.push(if svc.online { "online" } else { "offline" }.to_string());
        let ports = if svc.ports.is_empty() {
            "no ports".to_string()
        } else {
            svc.ports.join(", ")
        };
        out.push_str(&format!("- {} ({}): {ports}\n", svc.name, what.join(", ")));
    }
    out
}
