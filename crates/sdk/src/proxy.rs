//! A local plain-HTTP proxy (no TLS, no authentication) that sends
//! everything through the binding's gateway — for tools that cannot
//! authenticate to a proxy or speak TLS to one:
//! `HTTP_PROXY=http://127.0.0.1:8118 HTTPS_PROXY=http://127.0.0.1:8118 tool ...`.
//!
//! - `CONNECT HOST:PORT` opens a tunnel with [`Mesh::connect`] and splices
//!   bytes both ways.
//! - Absolute-form `http://` requests are forwarded through the gateway;
//!   bodies stream both ways and client connections are kept alive.
//! - Refusals of the gateway reach the client as the gateway sent them:
//!   status, `Trellis-Error` header and sentence.
//!
//! Listen on loopback only: whoever can reach the port uses the binding.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{Error, Mesh};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Serves the proxy on `listener` until the task is dropped. Returns only if
/// the HTTP client cannot be set up.
pub async fn serve(mesh: Mesh, listener: TcpListener) -> Result<(), Error> {
    // A proxy passes redirects to its client rather than following them.
    let client = mesh.client_with_redirects(reqwest::redirect::Policy::none())?;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!(error = %e, "proxy: accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let mesh = mesh.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let mesh = mesh.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(handle(mesh, client, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .preserve_header_case(true)
                .title_case_headers(true)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "proxy: client connection ended");
            }
        });
    }
}

async fn handle(mesh: Mesh, client: reqwest::Client, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return tunnel(mesh, req).await;
    }
    let uri = req.uri();
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        let why = if uri.scheme_str() == Some("https") {
            "https:// URLs go through CONNECT (set HTTPS_PROXY to this proxy)."
        } else {
            "This is a Trellis proxy: send absolute-form requests (GET http://HOST/PATH) or CONNECT HOST:PORT."
        };
        return text(StatusCode::BAD_REQUEST, why);
    }
    forward(client, req).await
}

async fn tunnel(mesh: Mesh, req: Request<Incoming>) -> Response<Body> {
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs HOST:PORT.");
    };
    let mut upstream = match mesh.connect(&authority).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(%authority, error = %e, "proxy: tunnel ended");
                }
            }
            Err(e) => tracing::debug!(%authority, error = %e, "proxy: CONNECT upgrade failed"),
        }
    });
    Response::new(empty())
}

/// Headers that belong to one hop, not to the request or the response.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

async fn forward(client: reqwest::Client, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let url = parts.uri.to_string();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    // reqwest writes Host from the URL, which is where the request goes.
    headers.remove(header::HOST);
    let body = if hyper::body::Body::is_end_stream(&body) {
        reqwest::Body::from(Bytes::new())
    } else {
        reqwest::Body::wrap(body)
    };
    let result = client
        .request(parts.method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    match result {
        Ok(resp) => {
            let resp: http::Response<reqwest::Body> = resp.into();
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
        }
        Err(e) => error_response(Error::Http(e)),
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The gateway's refusal as it sent it; a local failure as 502.
fn error_response(e: Error) -> Response<Body> {
    match e {
        Error::Gateway {
            status,
            code,
            message,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut resp = text(status, &message);
            if let Some(v) = code.and_then(|c| HeaderValue::from_str(&c).ok()) {
                resp.headers_mut().insert("trellis-error", v);
            }
            resp
        }
        Error::InvalidTarget(m) => text(StatusCode::BAD_REQUEST, &m),
        other => text(StatusCode::BAD_GATEWAY, &format!("trellis proxy: {other}")),
    }
}
