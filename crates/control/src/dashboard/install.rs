//! `/install.sh` and `/download/trellis`: everything a new machine needs comes
//! from this server.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::AppState;

/// Env var naming the file `/download/trellis` serves instead of this
/// server's own executable (tests; a server built for another architecture).
pub const DOWNLOAD_BINARY_ENV: &str = "TRELLIS_DOWNLOAD_BINARY";

const SCRIPT: &str = include_str!("install.sh");

/// Quotes `s` for POSIX sh (single quotes).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The install script for a server reached at `url`.
pub fn script_for(url: &str) -> String {
    SCRIPT
        .replace("__SERVER_QUOTED__", &sh_quote(url))
        .replace("__SERVER__", url)
}

pub async fn script(State(st): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        script_for(&st.dash.url),
    )
        .into_response()
}

/// The file `/download/trellis` serves.
pub fn binary_path() -> std::io::Result<PathBuf> {
    match std::env::var_os(DOWNLOAD_BINARY_ENV) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => std::env::current_exe(),
    }
}

pub async fn download() -> Response {
    let path = match binary_path() {
        Ok(p) => p,
        Err(e) => return unavailable(format!("cannot tell where the server's executable is: {e}")),
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return unavailable(format!("cannot read {}: {e}", path.display())),
    };
    let len = file.metadata().await.ok().map(|m| m.len());
    let stream = tokio_util_stream(file);
    let mut resp = (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"trellis\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    if let Some(len) = len {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, len.into());
    }
    resp
}

fn unavailable(msg: String) -> Response {
    tracing::error!("{msg}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the server cannot hand out its binary: {msg}\n"),
    )
        .into_response()
}

/// Reads a file as a stream of chunks.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_this_server_quoted() {
        let s = script_for("http://127.0.0.1:8080");
        assert!(s.contains("SERVER='http://127.0.0.1:8080'\n"), "{s}");
        assert!(s.contains("curl -fsSL http://127.0.0.1:8080/install.sh"));
        assert!(!s.contains("__SERVER"));
        assert!(s.starts_with("#!/bin/sh\n"));
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
