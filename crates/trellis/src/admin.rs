//! Admin commands: thin clients of the REST API under /api/v1.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use trellis_proto::{
    AccountInfo, ApiError, CreateAccountRequest, CreateAccountResponse, CreateTokenRequest,
    CreateTokenResponse, NodeInfo,
};

use crate::{AccountCmd, AdminOpts, NodesCmd, TokenCmd};

const DEFAULT_KEY_FILE: &str = "trellis-data/admin.key";

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    account: Option<String>,
}

impl Client {
    fn new(opts: &AdminOpts) -> anyhow::Result<Client> {
        let key = match &opts.api_key {
            Some(k) => k.trim().to_string(),
            None => std::fs::read_to_string(DEFAULT_KEY_FILE)
                .map(|s| s.trim().to_string())
                .map_err(|_| {
                    anyhow!(
                        "no API key: pass --api-key KEY or set TRELLIS_API_KEY \
                         (the operator key is in the server's DATA_DIR/admin.key)"
                    )
                })?,
        };
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            base: opts.server.trim_end_matches('/').to_string(),
            key,
            account: opts.account.clone(),
        })
    }

    fn url(&self, path: &str) -> String {
        let mut u = format!("{}/api/v1{path}", self.base);
        if let Some(a) = &self.account {
            u.push_str(if u.contains('?') { "&" } else { "?" });
            u.push_str("account=");
            u.push_str(a);
        }
        u
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the Trellis server at {}", self.base))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.error)
            .unwrap_or(text);
        bail!("{msg} ({status})")
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self.send(self.http.get(self.url(path))).await?;
        r.json()
            .await
            .context("the server's answer was not understood")
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let r = self.send(self.http.post(self.url(path)).json(body)).await?;
        r.json()
            .await
            .context("the server's answer was not understood")
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }
}

/// Parses a lifetime such as `90s`, `30m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("invalid duration {s:?}: use a number with s, m, h or d, e.g. 1h"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("invalid duration {s:?}: use a number with s, m, h or d, e.g. 1h"),
    };
    n.checked_mul(mult).context("duration too long")
}

pub async fn account(opts: &AdminOpts, cmd: AccountCmd) -> anyhow::Result<()> {
    let mut opts = opts.clone();
    // The account named on the command line is the subject, not a scope.
    opts.account = None;
    let c = Client::new(&opts)?;
    match cmd {
        AccountCmd::Create { name, cidr } => {
            let cidr = cidr
                .map(|c| {
                    c.parse()
                        .map_err(|_| anyhow!("invalid --cidr {c:?}: expected e.g. 100.65.0.0/16"))
                })
                .transpose()?;
            let r: CreateAccountResponse = c
                .post("/accounts", &CreateAccountRequest { name, cidr })
                .await?;
            eprintln!(
                "account {} created with block {}; its admin API key (shown once):",
                r.account.name, r.account.cidr
            );
            println!("{}", r.api_key);
        }
        AccountCmd::List { json } => {
            let v: Vec<AccountInfo> = c.get("/accounts").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<18}", "ACCOUNT", "BLOCK");
                for a in v {
                    println!("{:<24} {:<18}", a.name, a.cidr.to_string());
                }
            }
        }
    }
    Ok(())
}

pub async fn token(opts: &AdminOpts, cmd: TokenCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        TokenCmd::Create {
            reusable,
            ttl,
            tags,
        } => {
            let ttl_secs = parse_duration(&ttl)?;
            let r: CreateTokenResponse = c
                .post(
                    "/tokens",
                    &CreateTokenRequest {
                        reusable,
                        ttl_secs: Some(ttl_secs),
                        tags,
                    },
                )
                .await?;
            eprintln!(
                "{} join token for account {} (expires in {ttl}); join with:\n  trellis join --server {} --token <TOKEN>",
                if r.reusable { "reusable" } else { "single-use" },
                r.account,
                c.base
            );
            println!("{}", r.token);
        }
    }
    Ok(())
}

pub async fn nodes(opts: &AdminOpts, cmd: NodesCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        NodesCmd::List { json } => {
            let v: Vec<NodeInfo> = c.get("/nodes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:<8} {:<20}",
                "NAME", "IP", "ONLINE", "LAST SEEN"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            for n in v {
                let seen = match (n.online, n.last_seen) {
                    (true, _) => "now".to_string(),
                    (false, Some(t)) => format!("{}s ago", (now - t).max(0)),
                    (false, None) => "never".to_string(),
                };
                println!(
                    "{:<24} {:<16} {:<8} {:<20}",
                    n.name,
                    n.ip.to_string(),
                    if n.online { "yes" } else { "no" },
                    seen
                );
            }
        }
        NodesCmd::Delete { name } => {
            trellis_proto::validate_name("node", &name).map_err(|e| anyhow!(e))?;
            c.delete(&format!("/nodes/{name}")).await?;
            eprintln!("node {name} removed; its key is revoked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }
}
