//! `CONNECT` tunnels through the gateway.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::{Error, Mesh, GATEWAY_CONNECT_TIMEOUT, MAX_ERROR_BODY};

/// The largest response head accepted from the gateway.
const MAX_HEAD: usize = 16 * 1024;
/// How long the gateway may take to answer a CONNECT (it gives up on the
/// node after 10 s itself).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A TCP tunnel through the gateway to a service of the mesh: the target's
/// bytes both ways, nothing else. Closing (or dropping) it closes the tunnel.
pub struct MeshStream {
    io: Io,
    /// Bytes of the tunnel that arrived together with the gateway's answer.
    early: Bytes,
}

impl std::fmt::Debug for MeshStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStream")
            .field("tls", &matches!(self.io, Io::Tls(_)))
            .finish_non_exhaustive()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Checks a CONNECT target: `HOST:PORT` with nothing that could break the
/// request line.
fn check_authority(authority: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Error::InvalidTarget(format!(
            "cannot connect to {authority:?}: {why}; expected HOST:PORT such as db.prod.mesh:5432"
        ))
    };
    if authority.is_empty() {
        return Err(bad("it is empty"));
    }
    if authority
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"/?#@".contains(&b))
    {
        return Err(bad("it holds characters a host name cannot have"));
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(bad("it has no port"));
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("it has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("an IPv6 address must be in brackets"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("its port is not a number from 1 to 65535")),
    }
}

async fn open(mesh: &Mesh) -> Result<Io, Error> {
    let b = &mesh.inner.binding;
    let unreachable = |reason: String| Error::Unreachable {
        gateway: b.gateway_url(),
        reason,
    };
    let tcp = match &b.host {
        url::Host::Domain(d) => TcpStream::connect((d.as_str(), b.port)).await,
        url::Host::Ipv4(ip) => TcpStream::connect((*ip, b.port)).await,
        url::Host::Ipv6(ip) => TcpStream::connect((*ip, b.port)).await,
    };
    let tcp = tcp.map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = &mesh.inner.tls else {
        return Ok(Io::Plain(tcp));
    };
    let name = match &b.host {
        url::Host::Domain(d) => rustls::pki_types::ServerName::try_from(d.clone())
            .map_err(|e| unreachable(format!("invalid TLS server name: {e}")))?,
        url::Host::Ipv4(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
        url::Host::Ipv6(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
    };
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
    Ok(Io::Tls(Box::new(tls)))
}

pub(crate) async fn connect(mesh: &Mesh, authority: &str) -> Result<MeshStream, Error> {
    check_authority(authority)?;
    let b = &mesh.inner.binding;
    let mut io = tokio::time::timeout(GATEWAY_CONNECT_TIMEOUT, open(mesh))
        .await
        .map_err(|_| Error::Unreachable {
            gateway: b.gateway_url(),
            reason: format!("no connection within {GATEWAY_CONNECT_TIMEOUT:?}"),
        })??;
    let request = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {}\r\n\r\n",
        b.basic_auth()
    );
    let answer = async {
        write_all(&mut io, request.as_bytes()).await?;
        read_head(&mut io).await
    };
    let (head, rest) = tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| {
            Error::Protocol(format!(
                "no answer to CONNECT {authority} within {ANSWER_TIMEOUT:?}"
            ))
        })??;
    let (status, reason, headers) = parse_head(&head)?;
    if (200..300).contains(&status) {
        return Ok(MeshStream { io, early: rest });
    }
    let code = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("trellis-error"))
        .map(|(_, v)| v.trim().to_string());
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let mut body = BytesMut::from(&rest[..]);
    let limit = length.unwrap_or(MAX_ERROR_BODY).min(MAX_ERROR_BODY);
    let read_body = async {
        let mut chunk = [0u8; 1024];
        while body.len() < limit {
            match read_some(&mut io, &mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read_body).await;
    Err(Error::Gateway {
        status,
        code,
        message: crate::sentence(&body[..body.len().min(limit)], &reason),
    })
}

async fn write_all(io: &mut Io, data: &[u8]) -> Result<(), Error> {
    match io {
        Io::Plain(s) => s.write_all(data).await?,
        Io::Tls(s) => {
            s.write_all(data).await?;
            s.flush().await?
        }
    }
    Ok(())
}

async fn read_some(io: &mut Io, buf: &mut [u8]) -> io::Result<usize> {
    match io {
        Io::Plain(s) => s.read(buf).await,
        Io::Tls(s) => s.read(buf).await,
    }
}

/// Reads until the end of the response head; returns the head and whatever
/// arrived after it (already the tunnel's bytes, or the error's body).
async fn read_head(io: &mut Io) -> Result<(Bytes, Bytes), Error> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut scanned: usize = 0;
    loop {
        let n = read_some(io, &mut chunk).await?;
        if n == 0 {
            return Err(Error::Protocol(if buf.is_empty() {
                "the connection closed without an answer to CONNECT".into()
            } else {
                "the connection closed in the middle of the answer to CONNECT".into()
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
        let from = scanned.saturating_sub(3);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + i + 4;
            let mut head = buf;
            let rest = head.split_off(end);
            return Ok((head.freeze(), rest.freeze()));
        }
        scanned = buf.len();
        if buf.len() > MAX_HEAD {
            return Err(Error::Protocol(format!(
                "the answer to CONNECT has a head longer than {MAX_HEAD} bytes"
            )));
        }
    }
}

type Head = (u16, String, Vec<(String, String)>);

fn parse_head(head: &[u8]) -> Result<Head, Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Error::Protocol("incomplete response head".into()))
        }
        Err(e) => {
            return Err(Error::Protocol(format!(
                "the answer to CONNECT is not HTTP ({e})"
            )))
        }
    }
    let status = resp.code.unwrap_or(0);
    let reason = resp.reason.unwrap_or("").to_string();
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok((status, reason, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in ["db.prod.mesh:5432", "100.64.0.3:22", "[fd00::1]:80", "db:1"] {
            assert!(check_authority(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "db.prod.mesh",
            "db.prod.mesh:",
            ":80",
            "db:0",
            "db:65536",
            "db:80\r\nX: y",
            "http://db:80",
            "fd00::1:80",
            "a b:80",
        ] {
            let e = check_authority(bad).unwrap_err();
            assert!(e.to_string().contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn heads() {
        let (s, r, h) =
            parse_head(b"HTTP/1.1 403 Forbidden\r\nTrellis-Error: policy_denied\r\n\r\n").unwrap();
        assert_eq!((s, r.as_str()), (403, "Forbidden"));
        assert_eq!(h[0].1, "policy_denied");
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
