//! Admin commands: thin clients of the REST API under /api/v1.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use trellis_proto::{
    AccountInfo, ApiError, ApproveRouteRequest, AuditEntry, CreateAccountRequest,
    CreateAccountResponse, CreateTokenRequest, CreateTokenResponse, DnsRecordInfo, FlowLogPage,
    FlowLogRecord, NodeInfo, PolicyInfo, PolicyRejected, PolicyTestRequest, PolicyTestResponse,
    PolicyVersionInfo, RenameNodeRequest, RestorePolicyRequest, RouteInfo, SetPolicyRequest,
    SetPolicyResponse, SetTagsRequest, TokenInfo,
};

use crate::{
    AccountCmd, AdminOpts, AdminsCmd, BindingCmd, DnsCmd, FlowsArgs, KeysCmd, LogsCmd, NodesCmd,
    PolicyCmd, RoutesCmd, TokenCmd,
};

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

    async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let r = self
            .send(self.http.patch(self.url(path)).json(body))
            .await?;
        r.json()
            .await
            .context("the server's answer was not understood")
    }

    async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let r = self.send(self.http.put(self.url(path)).json(body)).await?;
        r.json()
            .await
            .context("the server's answer was not understood")
    }

    /// Sends a policy change; a refused policy comes back as its problems.
    async fn policy_change(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<Result<SetPolicyResponse, PolicyRejected>> {
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the Trellis server at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            return serde_json::from_str(&text)
                .map(Ok)
                .context("the server's answer was not understood");
        }
        if status == reqwest::StatusCode::BAD_REQUEST {
            if let Ok(rej) = serde_json::from_str::<PolicyRejected>(&text) {
                return Ok(Err(rej));
            }
        }
        let msg = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.error)
            .unwrap_or(text);
        bail!("{msg} ({status})")
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
            routes_auto_approve,
        } => {
            let ttl_secs = parse_duration(&ttl)?;
            let r: CreateTokenResponse = c
                .post(
                    "/tokens",
                    &CreateTokenRequest {
                        reusable,
                        routes_auto_approve,
                        ttl_secs: Some(ttl_secs),
                        tags,
                    },
                )
                .await?;
            eprintln!(
                "{} join token {} for account {} (expires in {ttl}; revoke with `trellis token revoke {}`); join with:\n  trellis join --server {} --token <TOKEN>",
                if r.reusable { "reusable" } else { "single-use" },
                r.id,
                r.account,
                r.id,
                c.base
            );
            println!("{}", r.token);
        }
        TokenCmd::List { json } => {
            let v: Vec<TokenInfo> = c.get("/tokens").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if v.is_empty() {
                eprintln!("no join tokens (create one with `trellis token create`)");
                return Ok(());
            }
            let now = unix_now();
            println!(
                "{:<6} {:<11} {:<5} {:<22} {:<9} TAGS",
                "ID", "KIND", "USES", "EXPIRES", "STATE"
            );
            for t in v {
                let state = if t.revoked {
                    "revoked"
                } else if t.expires_at <= now {
                    "expired"
                } else if !t.reusable && t.uses > 0 {
                    "used"
                } else {
                    "usable"
                };
                println!(
                    "{:<6} {:<11} {:<5} {:<22} {:<9} {}",
                    t.id,
                    if t.reusable { "reusable" } else { "single-use" },
                    t.uses,
                    trellis_control::store::rfc3339(t.expires_at),
                    state,
                    t.tags.join(",")
                );
            }
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/tokens/{id}")).await?;
            eprintln!("join token {id} revoked: it enrolls nothing from now on (nodes already enrolled stay; remove them with `trellis nodes delete`)");
        }
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub async fn admins(opts: &AdminOpts, cmd: AdminsCmd) -> anyhow::Result<()> {
    use trellis_control::dashboard::{AdminInfo, CreateAdminRequest};
    let c = Client::new(opts)?;
    match cmd {
        AdminsCmd::Add { email } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!(
                    "password for {email} (at least 10 characters; it is shown as you type):"
                );
            }
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']).to_string();
            let a: AdminInfo = c
                .post("/admins", &CreateAdminRequest { email, password })
                .await?;
            eprintln!(
                "{} can now sign in to the dashboard of {}",
                a.email, a.account
            );
        }
        AdminsCmd::List { json } => {
            let v: Vec<AdminInfo> = c.get("/admins").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            for a in v {
                println!("{}", a.email);
            }
        }
    }
    Ok(())
}

pub async fn keys(opts: &AdminOpts, cmd: KeysCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        KeysCmd::Create { name } => {
            let r: trellis_proto::CreateApiKeyResponse = c
                .post("/keys", &trellis_proto::CreateApiKeyRequest { name })
                .await?;
            eprintln!(
                "API key {} created; it is shown only this once (revoke it with `trellis keys revoke {}`)",
                r.id, r.id
            );
            println!("{}", r.api_key);
        }
        KeysCmd::List { json } => {
            let v: Vec<trellis_proto::ApiKeyInfo> = c.get("/keys").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<6} {:<22} {:<24} STATE", "ID", "CREATED", "NAME");
            for k in v {
                let state = match (k.operator, k.revoked_at) {
                    (true, _) => "operator".to_string(),
                    (false, Some(t)) => format!("revoked {}", trellis_control::store::rfc3339(t)),
                    (false, None) => "active".to_string(),
                };
                println!(
                    "{:<6} {:<22} {:<24} {}",
                    k.id,
                    trellis_control::store::rfc3339(k.created_at),
                    k.name,
                    state
                );
            }
        }
        KeysCmd::Revoke { id } => {
            c.delete(&format!("/keys/{id}")).await?;
            eprintln!("API key {id} revoked: it is refused from its next request on");
        }
    }
    Ok(())
}

async fn set_disabled(c: &Client, name: &str, disable: bool) -> anyhow::Result<()> {
    trellis_proto::validate_name("node", name).map_err(|e| anyhow!(e))?;
    let verb = if disable { "disable" } else { "enable" };
    let n: NodeInfo = c
        .post(&format!("/nodes/{name}/{verb}"), &serde_json::json!({}))
        .await?;
    if disable {
        eprintln!(
            "node {} is disabled: no peer accepts its packets (`trellis nodes enable {}` lets it back)",
            n.name, n.name
        );
    } else {
        eprintln!("node {} is enabled again", n.name);
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
                "{:<24} {:<16} {:<8} {:<20} TAGS",
                "NAME", "IP", "ONLINE", "LAST SEEN"
            );
            let now = unix_now();
            for n in v {
                let seen = match (n.online, n.last_seen) {
                    (true, _) => "now".to_string(),
                    (false, Some(t)) => format!("{}s ago", (now - t).max(0)),
                    (false, None) => "never".to_string(),
                };
                println!(
                    "{:<24} {:<16} {:<8} {:<20} {}",
                    n.name,
                    n.ip.to_string(),
                    if n.disabled {
                        "disabled"
                    } else if n.online {
                        "yes"
                    } else {
                        "no"
                    },
                    seen,
                    n.tags.join(",")
                );
            }
        }
        NodesCmd::Disable { name } => set_disabled(&c, &name, true).await?,
        NodesCmd::Enable { name } => set_disabled(&c, &name, false).await?,
        NodesCmd::Delete { name } => {
            trellis_proto::validate_name("node", &name).map_err(|e| anyhow!(e))?;
            c.delete(&format!("/nodes/{name}")).await?;
            eprintln!("node {name} removed; its key is revoked");
        }
        NodesCmd::Rename { name, new_name } => {
            trellis_proto::validate_name("node", &name).map_err(|e| anyhow!(e))?;
            trellis_proto::validate_name("node", &new_name).map_err(|e| anyhow!(e))?;
            let n: NodeInfo = c
                .patch(
                    &format!("/nodes/{name}"),
                    &RenameNodeRequest { name: new_name },
                )
                .await?;
            eprintln!("node {name} is now {} ({})", n.name, n.ip);
        }
        NodesCmd::Tag { name, tags, clear } => {
            trellis_proto::validate_name("node", &name).map_err(|e| anyhow!(e))?;
            let tags = if clear { Vec::new() } else { tags };
            for t in &tags {
                trellis_proto::validate_name("tag", t).map_err(|e| anyhow!(e))?;
            }
            let n: NodeInfo = c
                .put(&format!("/nodes/{name}/tags"), &SetTagsRequest { tags })
                .await?;
            if n.tags.is_empty() {
                eprintln!("node {} has no tags now", n.name);
            } else {
                eprintln!("node {} is tagged {}", n.name, n.tags.join(", "));
            }
        }
        NodesCmd::Probe { from, to, json } => {
            trellis_proto::validate_name("node", &from).map_err(|e| anyhow!(e))?;
            trellis_proto::validate_name("node", &to).map_err(|e| anyhow!(e))?;
            let out: trellis_control::probe::ProbeOutcome = c
                .post(
                    &format!("/nodes/{from}/probe"),
                    &trellis_control::probe::ProbeRequest { to },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("{}", out.message);
            }
            if !out.ok {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// `FILE: line 7, rules[1].ports[0]: message`, one problem per line.
pub fn policy_problems(file: &str, rej: &PolicyRejected) -> String {
    if rej.errors.is_empty() {
        return format!("{file}: {}", rej.error);
    }
    rej.errors
        .iter()
        .map(|e| format!("{file}: line {}, {}: {}", e.line, e.field, e.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints the outcome of a policy change; a refused policy is an error.
fn report_change(file: &str, r: Result<SetPolicyResponse, PolicyRejected>) -> anyhow::Result<()> {
    match r {
        Ok(r) => {
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if r.changed {
                eprintln!(
                    "policy version {} is in force; every node has it within a second",
                    r.version
                );
            } else {
                eprintln!("unchanged: this is already policy version {}", r.version);
            }
            println!("{}", r.version);
            Ok(())
        }
        Err(rej) => {
            eprintln!("{}", policy_problems(file, &rej));
            bail!(
                "the policy was refused ({} problem{}); nothing changed",
                rej.errors.len(),
                if rej.errors.len() == 1 { "" } else { "s" }
            )
        }
    }
}

pub async fn policy(opts: &AdminOpts, cmd: PolicyCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        PolicyCmd::Get { json } => {
            let p: PolicyInfo = c.get("/policy").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
                return Ok(());
            }
            eprintln!(
                "policy version {}, set by {} at {}",
                p.version,
                p.author,
                trellis_control::store::rfc3339(p.created_at)
            );
            print!("{}", p.text);
            if !p.text.ends_with('\n') {
                println!();
            }
        }
        PolicyCmd::Set { file } => {
            let shown = file.display().to_string();
            let text = if shown == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("reading the policy from stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {shown}"))?
            };
            let r = c
                .policy_change(
                    c.http
                        .put(c.url("/policy"))
                        .json(&SetPolicyRequest { text }),
                )
                .await?;
            report_change(&shown, r)?;
        }
        PolicyCmd::Test {
            from,
            to,
            port,
            json,
        } => {
            let r: PolicyTestResponse = c
                .post(
                    "/policy/test",
                    &PolicyTestRequest {
                        from: from.clone(),
                        to: to.clone(),
                        port: port.clone(),
                    },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!("{}", policy_verdict(&r));
            eprintln!("{from} ({}) -> {to} ({}) {port}", r.from_ip, r.to_ip);
        }
        PolicyCmd::History { json } => {
            let v: Vec<PolicyVersionInfo> = c.get("/policy/history").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<8} {:<22} {:<6} AUTHOR", "VERSION", "CREATED", "RULES");
            for (i, p) in v.iter().enumerate() {
                println!(
                    "{:<8} {:<22} {:<6} {}{}",
                    p.version,
                    trellis_control::store::rfc3339(p.created_at),
                    p.rules,
                    p.author,
                    if i == 0 { "  (in force)" } else { "" }
                );
            }
        }
        PolicyCmd::Restore { version } => {
            let r = c
                .policy_change(
                    c.http
                        .post(c.url("/policy/restore"))
                        .json(&RestorePolicyRequest { version }),
                )
                .await?;
            report_change(&format!("version {version}"), r)?;
        }
    }
    Ok(())
}

/// `allow (rule "web", policy v3)` or `deny (default, policy v3)`.
pub fn policy_verdict(r: &PolicyTestResponse) -> String {
    let verdict = if r.allow { "allow" } else { "deny" };
    match &r.rule {
        Some(rule) => format!("{verdict} (rule {rule:?}, policy v{})", r.version),
        None => format!("{verdict} (default, policy v{})", r.version),
    }
}

async fn audit_log(
    c: &Client,
    since: Option<String>,
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    let mut path = format!("/audit?limit={limit}");
    if let Some(s) = &since {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("invalid --since {s:?}: use e.g. 10m, 2h, 7d or unix seconds");
        }
        path.push_str(&format!("&since={s}"));
    }
    let v: Vec<AuditEntry> = c.get(&path).await?;
    if json {
        // JSON lines, oldest first, like `logs flows --json`.
        for e in v.iter().rev() {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(());
    }
    if v.is_empty() {
        eprintln!(
            "no audit entries{}",
            if since.is_some() { " in that time" } else { "" }
        );
        return Ok(());
    }
    println!(
        "{:<24} {:<24} {:<15} {:<24} DETAIL",
        "TIME", "ACTOR", "ACTION", "TARGET"
    );
    // Oldest first, like a log.
    for e in v.iter().rev() {
        println!(
            "{:<24} {:<24} {:<15} {:<24} {}",
            rfc3339_ms(e.at_ms),
            e.actor,
            e.action,
            e.target,
            e.detail
        );
    }
    Ok(())
}

/// Unix milliseconds → "2024-05-01T12:00:00.123Z".
fn rfc3339_ms(ms: i64) -> String {
    let secs = trellis_control::store::rfc3339(ms.div_euclid(1000));
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms.rem_euclid(1000))
}

pub async fn routes(opts: &AdminOpts, cmd: RoutesCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        RoutesCmd::List { json } => {
            let v: Vec<RouteInfo> = c.get("/routes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if v.is_empty() {
                eprintln!("no node advertises a subnet (trellis join --advertise-routes CIDR,...)");
                return Ok(());
            }
            println!(
                "{:<20} {:<24} {:<9} {:<8} {:<7}",
                "SUBNET", "NODE", "APPROVED", "PRIMARY", "ONLINE"
            );
            let yes = |b: bool| if b { "yes" } else { "no" };
            for r in v {
                println!(
                    "{:<20} {:<24} {:<9} {:<8} {:<7}",
                    r.cidr.to_string(),
                    r.node,
                    yes(r.approved),
                    yes(r.primary),
                    yes(r.online)
                );
            }
        }
        RoutesCmd::Approve { node, cidr } => {
            let cidr = cidr.parse().map_err(|_| {
                anyhow!("invalid subnet {cidr:?}: expected an IPv4 CIDR such as 198.19.10.0/24")
            })?;
            let r: RouteInfo = c
                .post("/routes/approve", &ApproveRouteRequest { node, cidr })
                .await?;
            let state = if r.primary {
                "it routes the subnet now"
            } else {
                "another node is primary for it; this one takes over if that one goes offline"
            };
            eprintln!("{} approved on node {}: {state}", r.cidr, r.node);
        }
    }
    Ok(())
}

pub async fn dns(opts: &AdminOpts, cmd: DnsCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        DnsCmd::Add { name, addr } => {
            let addr = addr.parse().map_err(|_| {
                anyhow!("invalid address {addr:?}: expected an IP address such as 198.19.10.5")
            })?;
            let r: DnsRecordInfo = c
                .post(
                    "/dns",
                    &DnsRecordInfo {
                        name,
                        addr,
                        fqdn: String::new(),
                    },
                )
                .await?;
            eprintln!("{} → {} on every node of the account", r.fqdn, r.addr);
        }
        DnsCmd::List { json } => {
            let v: Vec<DnsRecordInfo> = c.get("/dns").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<48} {:<40}", "NAME", "ADDRESS");
            for r in v {
                println!("{:<48} {:<40}", r.fqdn, r.addr.to_string());
            }
        }
        DnsCmd::Remove { name } => {
            if name.is_empty() || name.contains('/') {
                bail!("invalid record name {name:?}");
            }
            c.delete(&format!("/dns/{name}")).await?;
            eprintln!("record {name} removed");
        }
    }
    Ok(())
}

pub async fn logs(opts: &AdminOpts, cmd: LogsCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        LogsCmd::Flows(args) => flows(&c, &args, &mut std::io::stdout()).await,
        LogsCmd::Audit { since, limit, json } => audit_log(&c, since, limit, json).await,
        LogsCmd::Requests {
            binding,
            since,
            limit,
            json,
        } => requests_log(&c, binding, since, limit, json, &mut std::io::stdout()).await,
    }
}

pub async fn binding(opts: &AdminOpts, cmd: BindingCmd) -> anyhow::Result<()> {
    let c = Client::new(opts)?;
    match cmd {
        BindingCmd::Create { name, tags, ttl } => {
            trellis_proto::validate_name("binding", &name).map_err(|e| anyhow!(e))?;
            let ttl_secs = ttl.as_deref().map(parse_duration).transpose()?;
            let r: trellis_proto::CreateBindingResponse = c
                .post(
                    "/bindings",
                    &trellis_proto::CreateBindingRequest {
                        name,
                        tags,
                        ttl_secs,
                    },
                )
                .await?;
            eprintln!(
                "binding {} ({}) created{}; its URL below is shown only this once — use it as a proxy (HTTP_PROXY/HTTPS_PROXY) or see docs/gateway.md",
                r.binding.name,
                r.binding.ip,
                match r.binding.expires_at {
                    Some(t) => format!(", expires {}", trellis_control::store::rfc3339(t)),
                    None => String::new(),
                }
            );
            println!("{}", r.url);
        }
        BindingCmd::List { json } => {
            let v: Vec<trellis_proto::BindingInfo> = c.get("/bindings").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if v.is_empty() {
                eprintln!("no bindings (create one with `trellis binding create NAME`)");
                return Ok(());
            }
            let now = unix_now();
            println!(
                "{:<24} {:<16} {:<8} {:>8} {:<22} {:<22} TAGS",
                "NAME", "IP", "STATE", "REQUESTS", "LAST USED", "EXPIRES"
            );
            for b in v {
                let when = |t: Option<i64>, none: &str| {
                    t.map(trellis_control::store::rfc3339)
                        .unwrap_or_else(|| none.to_string())
                };
                println!(
                    "{:<24} {:<16} {:<8} {:>8} {:<22} {:<22} {}",
                    b.name,
                    b.ip.to_string(),
                    b.state(now),
                    b.requests,
                    when(b.last_used_at, "never"),
                    when(b.expires_at, "never"),
                    b.tags.join(",")
                );
            }
        }
        BindingCmd::Revoke { name } => {
            trellis_proto::validate_name("binding", &name).map_err(|e| anyhow!(e))?;
            c.delete(&format!("/bindings/{name}")).await?;
            eprintln!("binding {name} revoked: the gateway refuses it from now on and closes its open streams");
        }
    }
    Ok(())
}

async fn requests_log(
    c: &Client,
    binding: Option<String>,
    since: Option<String>,
    limit: u32,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if !(1..=1000).contains(&limit) {
        bail!("invalid --limit {limit}: give a number from 1 to 1000");
    }
    let mut path = format!("/logs/requests?limit={limit}");
    if let Some(b) = &binding {
        trellis_proto::validate_name("binding", b)
            .map_err(|e| anyhow!("invalid --binding: {e}"))?;
        path.push_str(&format!("&binding={b}"));
    }
    if let Some(s) = &since {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("invalid --since {s:?}: give a time ago such as 10m, 2h or 7d, or unix seconds");
        }
        path.push_str(&format!("&since={s}"));
    }
    let page: trellis_proto::RequestLogPage = c.get(&path).await?;
    if json {
        for r in page.records.iter().rev() {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    if page.records.is_empty() {
        eprintln!("no request records match");
        return Ok(());
    }
    writeln!(out, "{}", request_header())?;
    // Oldest first, like a log.
    for r in page.records.iter().rev() {
        writeln!(out, "{}", request_line(r))?;
    }
    Ok(())
}

fn request_header() -> String {
    format!(
        "{:<24} {:<20} {:<7} {:<28} {:<24} {:>6} {:>15} {:>8} DECISION",
        "TIME", "BINDING", "METHOD", "TARGET", "PATH", "STATUS", "BYTES UP/DOWN", "DURATION"
    )
}

fn request_line(r: &trellis_proto::RequestLogRecord) -> String {
    let decision = match (&r.rule, &r.error) {
        (Some(rule), Some(e)) => format!("{} {rule} ({e})", r.decision),
        (Some(rule), None) => format!("{} {rule}", r.decision),
        (None, Some(e)) => format!("{} (default) ({e})", r.decision),
        (None, None) => format!("{} (default)", r.decision),
    };
    format!(
        "{:<24} {:<20} {:<7} {:<28} {:<24} {:>6} {:>15} {:>8} {}",
        rfc3339_ms(r.start_ms),
        r.binding,
        r.method,
        r.target,
        r.path.as_deref().unwrap_or("-"),
        r.status,
        format!("{}/{}", human_bytes(r.bytes_up), human_bytes(r.bytes_down)),
        format!("{}ms", r.duration_ms),
        decision
    )
}

/// The query string of `args`' filters (checked here, so nothing needs escaping).
fn flow_query(args: &FlowsArgs) -> anyhow::Result<String> {
    let mut q = Vec::new();
    if let Some(s) = &args.since {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("invalid --since {s:?}: give a time ago such as 10m, 2h or 7d, or unix seconds");
        }
        q.push(format!("since={s}"));
    }
    if let Some(n) = &args.node {
        trellis_proto::validate_name("node", n).map_err(|e| anyhow!("invalid --node: {e}"))?;
        q.push(format!("node={n}"));
    }
    if let Some(d) = &args.decision {
        if d != "allow" && d != "deny" {
            bail!("invalid --decision {d:?}: use allow or deny");
        }
        q.push(format!("decision={d}"));
    }
    if let Some(p) = &args.proto {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("invalid --proto {p:?}: use tcp, udp, icmp or an IP protocol number");
        }
        q.push(format!("proto={p}"));
    }
    Ok(q.join("&"))
}

fn with_query(path: &str, q: &str) -> String {
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{q}")
    }
}

async fn flows(c: &Client, args: &FlowsArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    if !(1..=1000).contains(&args.limit) {
        bail!(
            "invalid --limit {}: give a number from 1 to 1000",
            args.limit
        );
    }
    let q = flow_query(args)?;
    // Subscribe before reading the history, so nothing falls between the two.
    let live = if args.follow {
        let http = reqwest::Client::builder().build()?;
        let req = http
            .get(c.url(&with_query("/logs/flows/stream", &q)))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        Some(c.send(req).await?)
    } else {
        None
    };
    let page_q = if q.is_empty() {
        format!("limit={}", args.limit)
    } else {
        format!("{q}&limit={}", args.limit)
    };
    let page: FlowLogPage = c.get(&with_query("/logs/flows", &page_q)).await?;
    if !args.json {
        writeln!(out, "{}", flow_header())?;
    }
    let mut last_id = 0;
    for r in page.records.iter().rev() {
        print_flow(out, r, args.json)?;
        last_id = last_id.max(r.id);
    }
    if page.records.is_empty() && !args.follow {
        eprintln!("no flow records match");
    }
    let Some(mut resp) = live else {
        return Ok(());
    };
    let mut sse = SseParser::default();
    while let Some(chunk) = resp.chunk().await.context("reading the live flow stream")? {
        for (event, data) in sse.push(&chunk) {
            match event.as_str() {
                "lagged" => eprintln!(
                    "warning: this client fell behind; some records were skipped ({data})"
                ),
                "" | "message" => {
                    let r: FlowLogRecord = serde_json::from_str(&data)
                        .context("the server sent a flow record that was not understood")?;
                    if r.id > last_id {
                        last_id = r.id;
                        print_flow(out, &r, args.json)?;
                    }
                }
                _ => {}
            }
        }
    }
    bail!("the server closed the live flow stream")
}

/// Splits a Server-Sent-Events byte stream into (event, data) pairs.
#[derive(Default)]
struct SseParser {
    buf: String,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut events = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let (mut event, mut data) = (String::new(), Vec::new());
            for line in block.lines() {
                let line = line.trim_end_matches('\r');
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim_start().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            if !data.is_empty() {
                events.push((event, data.join("\n")));
            }
        }
        events
    }
}

fn print_flow(out: &mut impl std::io::Write, r: &FlowLogRecord, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
    } else {
        writeln!(out, "{}", flow_line(r))?;
    }
    out.flush()?;
    Ok(())
}

fn flow_header() -> String {
    format!(
        "{:<20} {:<16} {:<34}   {:<34} {:<5} {:<9} {:<20} {:>15} {}",
        "TIME", "NODE", "SOURCE", "DESTINATION", "PROTO", "PATH", "DECISION", "BYTES OUT/IN", "END"
    )
}

fn flow_line(r: &FlowLogRecord) -> String {
    let end = |node: &str, ip: std::net::Ipv4Addr, port: u16| {
        if node.is_empty() {
            format!("{ip}:{port}")
        } else {
            format!("{node} {ip}:{port}")
        }
    };
    let decision = if r.rule.is_empty() {
        format!("{} (default)", r.decision)
    } else {
        format!("{} {}", r.decision, r.rule)
    };
    let decision = if r.count > 1 {
        format!("{decision} ×{}", r.count)
    } else {
        decision
    };
    format!(
        "{:<20} {:<16} {:<34} → {:<34} {:<5} {:<9} {:<20} {:>15} {}",
        trellis_control::store::rfc3339(r.start_ms.div_euclid(1000)),
        r.node,
        end(&r.src_node, r.src_ip, r.src_port),
        end(&r.dst_node, r.dst_ip, r.dst_port),
        r.proto,
        if r.via.is_empty() {
            r.path.clone()
        } else {
            format!("{} via {}", r.path, r.via)
        },
        decision,
        format!("{}/{}", human_bytes(r.bytes_out), human_bytes(r.bytes_in)),
        r.end_reason
    )
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1}{}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::{EnrollRequest, EnrollResponse, NodeKey};

    /// Runs the admin commands against a real control plane and checks, through
    /// the API, that each did what it says.
    #[tokio::test]
    async fn admin_commands_map_to_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let server = trellis_control::Server::start(trellis_control::Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: None,
            edge_udp: None,
            dns_suffix: "corp".into(),
            flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
            gateway_listen: None,
            gateway_tls: None,
        })
        .await
        .unwrap();
        let url = server.url();
        let key = std::fs::read_to_string(server.admin_key_path()).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        let opts = AdminOpts {
            server: url.clone(),
            api_key: Some(key),
            account: None,
        };
        let c = Client::new(&opts).unwrap();

        token(
            &opts,
            TokenCmd::Create {
                reusable: true,
                ttl: "1h".into(),
                tags: vec![],
                routes_auto_approve: true,
            },
        )
        .await
        .unwrap();
        let t: CreateTokenResponse = c
            .post(
                "/tokens",
                &CreateTokenRequest {
                    reusable: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let enrolled: EnrollResponse = reqwest::Client::new()
            .post(format!("{url}/api/v1/enroll"))
            .json(&EnrollRequest {
                token: t.token,
                public_key: NodeKey([9; 32]),
                name: Some("gw".into()),
                hostname: String::new(),
                os: String::new(),
                version: String::new(),
                advertise_routes: vec!["198.19.10.0/24".parse().unwrap()],
            })
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(enrolled.name, "gw");

        routes(&opts, RoutesCmd::List { json: false })
            .await
            .unwrap();
        routes(
            &opts,
            RoutesCmd::Approve {
                node: "gw".into(),
                cidr: "198.19.10.0/24".into(),
            },
        )
        .await
        .unwrap();
        let v: Vec<RouteInfo> = c.get("/routes").await.unwrap();
        assert!(v[0].approved && v[0].primary);
        let e = routes(
            &opts,
            RoutesCmd::Approve {
                node: "gw".into(),
                cidr: "198.19.10.0/33".into(),
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("invalid subnet"), "{e}");
        let e = routes(
            &opts,
            RoutesCmd::Approve {
                node: "gw".into(),
                cidr: "198.19.11.0/24".into(),
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("does not advertise"), "{e}");

        dns(
            &opts,
            DnsCmd::Add {
                name: "db".into(),
                addr: "198.19.10.5".into(),
            },
        )
        .await
        .unwrap();
        dns(&opts, DnsCmd::List { json: true }).await.unwrap();
        let v: Vec<DnsRecordInfo> = c.get("/dns").await.unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].fqdn, "db.default.corp");

        nodes(
            &opts,
            NodesCmd::Rename {
                name: "gw".into(),
                new_name: "router".into(),
            },
        )
        .await
        .unwrap();
        let v: Vec<NodeInfo> = c.get("/nodes").await.unwrap();
        assert_eq!(v[0].name, "router");
        let e = nodes(
            &opts,
            NodesCmd::Rename {
                name: "router".into(),
                new_name: "db".into(),
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("409"), "{e}");

        dns(&opts, DnsCmd::Remove { name: "db".into() })
            .await
            .unwrap();
        let e = dns(&opts, DnsCmd::Remove { name: "db".into() })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no DNS record named"), "{e}");

        // Flow logs: an empty table, and bad filters refused (here or by the server).
        let args = FlowsArgs {
            since: Some("10m".into()),
            node: Some("router".into()),
            decision: Some("deny".into()),
            proto: None,
            limit: 100,
            json: false,
            follow: false,
        };
        let mut out = Vec::new();
        flows(&c, &args, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("TIME"), "{text}");
        let e = flows(
            &c,
            &FlowsArgs {
                decision: Some("maybe".into()),
                ..args.clone()
            },
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("--decision"), "{e}");
        let e = flows(
            &c,
            &FlowsArgs {
                since: Some("yesterday".into()),
                ..args.clone()
            },
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("invalid since"), "{e}");

        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    /// The policy, token, tag and audit commands against a real control plane.
    #[tokio::test]
    async fn policy_token_tag_and_audit_commands() {
        let dir = tempfile::tempdir().unwrap();
        let server = trellis_control::Server::start(trellis_control::Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: None,
            edge_udp: None,
            dns_suffix: "mesh".into(),
            flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
            gateway_listen: None,
            gateway_tls: None,
        })
        .await
        .unwrap();
        let url = server.url();
        let key = std::fs::read_to_string(server.admin_key_path()).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        let opts = AdminOpts {
            server: url.clone(),
            api_key: Some(key),
            account: None,
        };
        let c = Client::new(&opts).unwrap();
        let t: CreateTokenResponse = c
            .post(
                "/tokens",
                &CreateTokenRequest {
                    reusable: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        for (k, name) in [(1u8, "db-1"), (2, "laptop")] {
            let r = reqwest::Client::new()
                .post(format!("{url}/api/v1/enroll"))
                .json(&EnrollRequest {
                    token: t.token.clone(),
                    public_key: NodeKey([k; 32]),
                    name: Some(name.into()),
                    hostname: String::new(),
                    os: String::new(),
                    version: String::new(),
                    advertise_routes: vec![],
                })
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        nodes(
            &opts,
            NodesCmd::Tag {
                name: "db-1".into(),
                tags: vec!["db".into()],
                clear: false,
            },
        )
        .await
        .unwrap();
        let e = nodes(
            &opts,
            NodesCmd::Tag {
                name: "db-1".into(),
                tags: vec!["Bad Tag".into()],
                clear: false,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("invalid tag name"), "{e}");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "default = \"deny\"\n[[rules]]\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"tag:db\"]\nports = [\"tcp:99999\"]\n").unwrap();
        let e = policy(&opts, PolicyCmd::Set { file: bad.clone() })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nothing changed"), "{e}");
        let rej = c
            .policy_change(c.http.put(c.url("/policy")).json(&SetPolicyRequest {
                text: std::fs::read_to_string(&bad).unwrap(),
            }))
            .await
            .unwrap()
            .unwrap_err();
        let shown = policy_problems("bad.toml", &rej);
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("bad.toml: line 6, rules[0].ports[0]: ")),
            "{shown}"
        );

        let good = dir.path().join("good.toml");
        std::fs::write(&good, "default = \"deny\"\n[[rules]]\nname = \"pg\"\naction = \"allow\"\nfrom = [\"laptop\"]\nto = [\"tag:db\"]\nports = [\"tcp:5432\"]\n").unwrap();
        policy(&opts, PolicyCmd::Set { file: good }).await.unwrap();
        let probe = |port: &str| PolicyTestRequest {
            from: "laptop".into(),
            to: "db-1".into(),
            port: port.into(),
        };
        let r: PolicyTestResponse = c.post("/policy/test", &probe("tcp:5432")).await.unwrap();
        assert_eq!(policy_verdict(&r), "allow (rule \"pg\", policy v2)");
        let r: PolicyTestResponse = c.post("/policy/test", &probe("tcp:22")).await.unwrap();
        assert_eq!(policy_verdict(&r), "deny (default, policy v2)");
        policy(
            &opts,
            PolicyCmd::Test {
                from: "laptop".into(),
                to: "db-1".into(),
                port: "tcp:5432".into(),
                json: false,
            },
        )
        .await
        .unwrap();
        policy(&opts, PolicyCmd::History { json: false })
            .await
            .unwrap();
        policy(&opts, PolicyCmd::Restore { version: 1 })
            .await
            .unwrap();
        let p: PolicyInfo = c.get("/policy").await.unwrap();
        assert_eq!(p.version, 3);
        let e = policy(&opts, PolicyCmd::Restore { version: 9 })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no policy version 9"), "{e}");
        policy(&opts, PolicyCmd::Get { json: false }).await.unwrap();

        token(&opts, TokenCmd::List { json: false }).await.unwrap();
        token(&opts, TokenCmd::Revoke { id: t.id }).await.unwrap();
        let v: Vec<TokenInfo> = c.get("/tokens").await.unwrap();
        assert!(v[0].revoked);
        let e = token(&opts, TokenCmd::Revoke { id: 999 })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no join token with id 999"), "{e}");

        logs(
            &opts,
            LogsCmd::Audit {
                since: Some("10m".into()),
                limit: 100,
                json: false,
            },
        )
        .await
        .unwrap();
        let e = logs(
            &opts,
            LogsCmd::Audit {
                since: Some("10 minutes".into()),
                limit: 100,
                json: false,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("invalid --since"), "{e}");
        let v: Vec<AuditEntry> = c.get("/audit").await.unwrap();
        let actions: Vec<&str> = v.iter().rev().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "token.create",
                "node.tag",
                "policy.set",
                "policy.restore",
                "token.revoke"
            ]
        );

        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    #[test]
    fn audit_times_have_milliseconds() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn flow_lines_and_sse_events() {
        let r = FlowLogRecord {
            id: 7,
            node: "web".into(),
            start_ms: 1_700_000_000_123,
            end_ms: 1_700_000_005_000,
            proto: "tcp".into(),
            src_ip: "100.64.0.2".parse().unwrap(),
            src_port: 51000,
            src_node: "web".into(),
            dst_ip: "198.19.10.5".parse().unwrap(),
            dst_port: 5432,
            dst_node: String::new(),
            direction: "out".into(),
            packets_out: 3,
            bytes_out: 300,
            packets_in: 4,
            bytes_in: 3 * 1024 * 1024,
            path: "relay-udp".into(),
            via: String::new(),
            decision: "deny".into(),
            rule: "no-db".into(),
            count: 4,
            end_reason: "denied".into(),
        };
        let line = flow_line(&r);
        for part in [
            "2023-11-14T22:13:20Z",
            "web 100.64.0.2:51000",
            "→ 198.19.10.5:5432",
            "relay-udp",
            "deny no-db ×4",
            "300B/3.0M",
            "denied",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line}");
        }
        let mut out = Vec::new();
        print_flow(&mut out, &r, true).unwrap();
        let back: FlowLogRecord = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, r);

        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\ndata: {\"a\"").is_empty());
        let ev = p.push(b":1}\n\nevent: lagged\ndata: {\"missed_batches\":3}\n\n");
        assert_eq!(
            ev,
            vec![
                (String::new(), "{\"a\":1}".to_string()),
                ("lagged".to_string(), "{\"missed_batches\":3}".to_string())
            ]
        );
    }

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

    /// `trellis binding create/list/revoke` and `trellis logs requests`
    /// against a real control plane running a gateway.
    #[tokio::test]
    async fn binding_commands_map_to_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let server = trellis_control::Server::start(trellis_control::Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: None,
            edge_udp: None,
            dns_suffix: "mesh".into(),
            flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
            gateway_listen: Some("127.0.0.1:0".parse().unwrap()),
            gateway_tls: None,
        })
        .await
        .unwrap();
        let url = server.url();
        let gw = server.gateway().unwrap();
        let key = std::fs::read_to_string(server.admin_key_path()).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        let opts = AdminOpts {
            server: url,
            api_key: Some(key),
            account: None,
        };
        let c = Client::new(&opts).unwrap();

        binding(
            &opts,
            BindingCmd::Create {
                name: "ci".into(),
                tags: vec!["agents".into()],
                ttl: Some("30d".into()),
            },
        )
        .await
        .unwrap();
        let v: Vec<trellis_proto::BindingInfo> = c.get("/bindings").await.unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].tags, ["agents"]);
        let ttl = v[0].expires_at.unwrap() - v[0].created_at;
        assert!((ttl - 30 * 86_400).abs() <= 1, "{ttl}");
        let e = binding(
            &opts,
            BindingCmd::Create {
                name: "ci".into(),
                tags: vec![],
                ttl: Some("1w".into()),
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("invalid duration"), "{e}");
        let e = binding(
            &opts,
            BindingCmd::Create {
                name: "ci".into(),
                tags: vec![],
                ttl: None,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("409"), "{e}");
        binding(&opts, BindingCmd::List { json: false })
            .await
            .unwrap();

        gw.record(trellis_edge::gateway::RequestRecord {
            account_id: 1,
            binding_id: Some(1),
            binding: "ci".into(),
            start_ms: 1_700_000_000_000,
            duration_ms: 12,
            form: "connect".into(),
            method: "CONNECT".into(),
            target: "db.default.mesh:5432".into(),
            dst_ip: Some("100.64.0.3".parse().unwrap()),
            dst_port: 5432,
            node: Some("db".into()),
            path: None,
            status: 200,
            bytes_up: 3000,
            bytes_down: 10,
            decision: "allow".into(),
            rule: Some("ci-db".into()),
            error: None,
        });
        let mut out = Vec::new();
        for _ in 0..40 {
            out.clear();
            requests_log(&c, Some("ci".into()), None, 10, false, &mut out)
                .await
                .unwrap();
            if !out.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("TIME"), "{text}");
        for word in [
            "2023-11-14T22:13:20.000Z",
            "ci",
            "CONNECT",
            "db.default.mesh:5432",
            " - ",
            "200",
            "2.9K/10B",
            "12ms",
            "allow ci-db",
        ] {
            assert!(lines[1].contains(word), "{word:?} in {text}");
        }
        let mut json = Vec::new();
        requests_log(&c, None, Some("10m".into()), 10, true, &mut json)
            .await
            .unwrap();
        assert!(json.is_empty(), "the record is from 2023");
        assert!(
            requests_log(&c, Some("Bad".into()), None, 10, false, &mut json)
                .await
                .is_err()
        );

        binding(&opts, BindingCmd::Revoke { name: "ci".into() })
            .await
            .unwrap();
        let v: Vec<trellis_proto::BindingInfo> = c.get("/bindings").await.unwrap();
        assert!(v[0].revoked_at.is_some());
        assert_eq!(v[0].requests, 1);
        let e = binding(&opts, BindingCmd::Revoke { name: "ci".into() })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");

        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }
}
