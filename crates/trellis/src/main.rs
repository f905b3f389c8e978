//! `trellis`: one binary for the server (control plane + edge), the node agent
//! and the admin CLI. Parsing only; the work is in the crates below.

mod admin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: a self-hosted private mesh network"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct AdminOpts {
    /// URL of the Trellis server.
    #[arg(
        long,
        env = "TRELLIS_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// Admin API key (default: the operator key in ./trellis-data/admin.key, if readable).
    #[arg(long, env = "TRELLIS_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Act on this account (operator key only; default: the key's own account, or `default`).
    #[arg(long, global = true)]
    pub account: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane and the edge in one process.
    Server {
        /// Where the SQLite database and admin.key live.
        #[arg(long, default_value = "trellis-data")]
        data_dir: PathBuf,
        /// HTTP address of the API and the dashboard.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// UDP address of the edge (endpoint discovery).
        #[arg(long, default_value = "0.0.0.0:3478")]
        edge_udp: SocketAddr,
        /// The URL nodes and browsers use to reach this server, if not the listen address.
        #[arg(long)]
        public_url: Option<String>,
        /// Suffix of the names nodes resolve: NODE.ACCOUNT.SUFFIX.
        #[arg(long, default_value = trellis_control::DEFAULT_DNS_SUFFIX)]
        dns_suffix: String,
        /// How long flow logs (and the gateway's request logs) are kept, e.g. 30d, 12h, 10m.
        #[arg(long, default_value = "30d", value_parser = trellis_control::flows::parse_duration)]
        flow_retention: std::time::Duration,
        /// TCP address of the fetch gateway that bindings use (`off` runs none).
        #[arg(long, default_value = trellis_control::DEFAULT_GATEWAY_LISTEN, value_parser = parse_gateway_listen)]
        gateway_listen: GatewayListen,
        /// PEM certificate chain of the gateway (serves https; needs --gateway-tls-key).
        #[arg(long, requires = "gateway_tls_key")]
        gateway_tls_cert: Option<PathBuf>,
        /// PEM private key of the gateway's certificate.
        #[arg(long, requires = "gateway_tls_cert")]
        gateway_tls_key: Option<PathBuf>,
    },
    /// Enroll this machine (first run, with --token) and run the node agent in the foreground.
    Join {
        #[arg(long, env = "TRELLIS_SERVER")]
        server: Option<String>,
        /// Join token from `trellis token create`. Not needed once enrolled.
        #[arg(long, env = "TRELLIS_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Name of this node (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        /// Where the node keeps its identity and state.
        #[arg(long, default_value = "/var/lib/trellis")]
        state_dir: PathBuf,
        /// Name of the TUN interface.
        #[arg(long, default_value = "trellis0")]
        interface: String,
        /// WireGuard UDP port (0: keep the one used before, or pick a free one).
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
        /// Subnets this node routes into the mesh (a mesh node), e.g.
        /// 198.19.10.0/24,10.1.0.0/16; an admin approves them (`trellis routes
        /// approve`). Given empty ("") it stops advertising; absent keeps what
        /// was advertised before.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        advertise_routes: Option<Vec<String>>,
        /// Masquerade mesh traffic forwarded into advertised subnets (default
        /// true; false needs return routes to the mesh on that LAN). Absent
        /// keeps the earlier choice.
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        snat: Option<bool>,
        /// Point the system resolver at the agent for NODE.ACCOUNT.SUFFIX names
        /// (default true; `--accept-dns=false` leaves the resolver alone).
        #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
        accept_dns: bool,
    },
    /// Show this node and its peers, as the running agent sees them.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/var/lib/trellis")]
        state_dir: PathBuf,
    },
    /// Ping a peer through the mesh: each reply with its round-trip time and path.
    Ping {
        /// Peer name or overlay IP.
        peer: String,
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        #[arg(long, default_value = "/var/lib/trellis")]
        state_dir: PathBuf,
    },
    /// Accounts: separate private networks on one server (operator key).
    Account {
        #[command(subcommand)]
        cmd: AccountCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Dashboard admins of an account (email and password).
    Admins {
        #[command(subcommand)]
        cmd: AdminsCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// API keys of an account: create more, list, revoke.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Nodes of an account.
    Nodes {
        #[command(subcommand)]
        cmd: NodesCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Subnets that mesh nodes advertise, and their approval.
    Routes {
        #[command(subcommand)]
        cmd: RoutesCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Extra names of an account (NAME.ACCOUNT.SUFFIX); node names are always there.
    Dns {
        #[command(subcommand)]
        cmd: DnsCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Who may reach what: the account's policy (TOML), its versions, and what it decides.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Bindings: one URL that lets code without a VPN client (agents,
    /// serverless functions, CI jobs) reach the network through the gateway.
    Binding {
        #[command(subcommand)]
        cmd: BindingCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Logs of the account.
    Logs {
        #[command(subcommand)]
        cmd: LogsCmd,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// A local HTTP proxy (no TLS, no auth) that sends everything through a
    /// binding's gateway: HTTP_PROXY/HTTPS_PROXY=http://127.0.0.1:8118.
    Proxy {
        #[command(flatten)]
        binding: BindingOpts,
        /// Where to listen (keep it on loopback: anyone who reaches it uses the binding).
        #[arg(long, default_value = "127.0.0.1:8118")]
        listen: SocketAddr,
    },
    /// A Model Context Protocol server on stdin/stdout: tools `fetch` and
    /// `list_services` through a binding, for AI agents.
    Mcp {
        #[command(flatten)]
        binding: BindingOpts,
    },
}

#[derive(clap::Args, Clone)]
pub struct BindingOpts {
    /// Binding URL http(s)://b_<id>:<secret>@HOST:PORT from `trellis binding
    /// create` (default: the environment variable MESH).
    #[arg(long)]
    pub binding: Option<String>,
    /// PEM file of a CA to trust for an https:// gateway with a private certificate.
    #[arg(long)]
    pub gateway_ca: Option<PathBuf>,
}

impl BindingOpts {
    fn mesh(&self) -> anyhow::Result<trellis_sdk::Mesh> {
        let mesh = match &self.binding {
            Some(url) => trellis_sdk::Mesh::parse(url)?,
            None => trellis_sdk::Mesh::from_env("MESH")?,
        };
        Ok(match &self.gateway_ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading --gateway-ca {}", path.display()))?;
                mesh.with_root_certificate(pem)
                    .with_context(|| format!("--gateway-ca {}", path.display()))?
            }
            None => mesh,
        })
    }
}

async fn proxy(binding: &BindingOpts, listen: SocketAddr) -> anyhow::Result<()> {
    let mesh = binding.mesh()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "proxy listening on {} (through the gateway {} as {})",
        listener.local_addr()?,
        mesh.gateway_url(),
        mesh.binding_id()
    );
    tokio::select! {
        r = trellis_sdk::proxy::serve(mesh, listener) => Ok(r?),
        _ = shutdown_signal() => Ok(()),
    }
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Print the policy in force (its version goes to stderr).
    Get {
        /// Print version, author and text as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the policy with the TOML in FILE (`-` reads stdin). Nothing
    /// changes if it has any problem; each is printed with its line.
    Set { file: PathBuf },
    /// Ask whether a connection would be allowed, and which rule decides.
    Test {
        /// A node name, an IPv4 address or binding:NAME.
        #[arg(long)]
        from: String,
        /// A node name or an IPv4 address (subnets behind mesh nodes too).
        #[arg(long)]
        to: String,
        /// tcp:PORT, udp:PORT or icmp.
        #[arg(long)]
        port: String,
        #[arg(long)]
        json: bool,
    },
    /// List the stored versions, newest first.
    History {
        #[arg(long)]
        json: bool,
    },
    /// Put version N back in force (stored as a new version).
    Restore { version: i64 },
}

/// `--gateway-listen`: an address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayListen(pub Option<SocketAddr>);

fn parse_gateway_listen(s: &str) -> Result<GatewayListen, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(GatewayListen(None));
    }
    s.trim()
        .parse()
        .map(|a| GatewayListen(Some(a)))
        .map_err(|_| {
            format!("invalid gateway address {s:?}: give ADDR:PORT such as 0.0.0.0:8443, or off")
        })
}

#[derive(Subcommand)]
pub enum BindingCmd {
    /// Create a binding; prints its URL alone on stdout (shown once), e.g.
    /// `MESH=$(trellis binding create ci-runner --tag agents --ttl 30d)`.
    Create {
        name: String,
        /// Tags policies can name it by (tag:T); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Lifetime, e.g. 12h, 30d (default: never expires).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List the bindings with their address, tags, state and usage.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a binding: the gateway refuses it within a second and closes its open streams.
    Revoke { name: String },
}

#[derive(Subcommand)]
pub enum LogsCmd {
    /// Connections the nodes saw (allowed and denied), oldest first.
    Flows(FlowsArgs),
    /// Requests through the fetch gateway, oldest first.
    Requests {
        /// Only requests of this binding.
        #[arg(long)]
        binding: Option<String>,
        /// Only requests this recent, e.g. 10m, 2h, 7d (or unix seconds).
        #[arg(long)]
        since: Option<String>,
        /// How many of the newest matching records to show (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON lines, one record per line.
        #[arg(long)]
        json: bool,
    },
    /// Every admin change: who, when, what (append-only).
    Audit {
        /// Only entries this recent, e.g. 10m, 2h, 7d (or unix seconds).
        #[arg(long)]
        since: Option<String>,
        /// At most this many entries, newest (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct FlowsArgs {
    /// Only flows that ended this long ago or later (10m, 2h, 7d) or since unix seconds.
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows reported by this node or with it at either end.
    #[arg(long)]
    pub node: Option<String>,
    /// Only `allow` or `deny`.
    #[arg(long)]
    pub decision: Option<String>,
    /// Only this protocol: tcp, udp, icmp or a number.
    #[arg(long)]
    pub proto: Option<String>,
    /// How many of the newest matching records to show (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// JSON lines, one record per line.
    #[arg(long)]
    pub json: bool,
    /// After the history, print new records as they arrive, until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account; prints its admin API key (shown once).
    Create {
        name: String,
        /// Its overlay block inside 100.64.0.0/10 (default: the next free /16).
        #[arg(long)]
        cidr: Option<String>,
    },
    /// List accounts.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AdminsCmd {
    /// Add a dashboard admin. The password is read from standard input
    /// (one line; at least 10 characters), so it stays out of the shell history.
    Add { email: String },
    /// The account's dashboard admins.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make a new API key for the account (printed once, alone on stdout).
    Create {
        /// What it is for (shown in `keys list` and the audit log).
        #[arg(default_value = "")]
        name: String,
    },
    /// The account's keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Refuse a key from its next request on.
    Revoke { id: i64 },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token; prints it (shown once).
    Create {
        /// Let the token enroll any number of nodes until it expires.
        #[arg(long)]
        reusable: bool,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Tags for nodes that enroll with it (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Approve the subnets its nodes advertise (now and later) without an admin.
        #[arg(long)]
        routes_auto_approve: bool,
    },
    /// List the join tokens (ids, uses, expiry, tags; never the secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a join token: enrolling with it fails from now on.
    Revoke {
        /// The id shown by `trellis token list` (and by `token create`).
        id: i64,
    },
}

#[derive(Subcommand)]
pub enum NodesCmd {
    /// List the nodes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a node: its key is revoked and every peer drops it within seconds.
    Delete { name: String },
    /// Rename a node; its peers and everyone's DNS names follow at once.
    Rename { name: String, new_name: String },
    /// Cut a node off from every peer (open connections too) without removing it.
    Disable { name: String },
    /// Let a disabled node back in.
    Enable { name: String },
    /// Set a node's tags (replaces them), e.g. `trellis nodes tag db-1 db prod`.
    Tag {
        name: String,
        /// The tags from now on.
        #[arg(required_unless_present = "clear")]
        tags: Vec<String>,
        /// Remove all of the node's tags.
        #[arg(long, conflicts_with = "tags")]
        clear: bool,
    },
    /// Test the connection: node FROM pings node TO through the mesh and
    /// reports the round-trip time and the path (exits 1 if it fails).
    Probe {
        from: String,
        to: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum RoutesCmd {
    /// List advertised subnets: approved or not, and which node is primary.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Approve a subnet a node advertises, e.g. `trellis routes approve gw 198.19.10.0/24`.
    Approve { node: String, cidr: String },
}

#[derive(Subcommand)]
pub enum DnsCmd {
    /// Add NAME.ACCOUNT.SUFFIX → ADDR, e.g. `trellis dns add db.prod 198.19.10.5`.
    Add { name: String, addr: String },
    /// List the extra records.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an extra record.
    Remove { name: String },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

async fn run_server(config: trellis_control::Config) -> anyhow::Result<()> {
    let server = trellis_control::Server::start(config).await?;
    let edge_addr = server
        .edge_udp_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "off".into());
    let url = server.url();
    println!("Trellis server is running at {url}");
    println!("{}", server.dashboard_line());
    println!("  API:            {url}/api/v1 (OpenAPI: {url}/api/v1/openapi.json)");
    println!("  Edge UDP:       {edge_addr} (endpoint discovery and relay; TCP relay at {url}/api/v1/relay)");
    match server.gateway_url() {
        Some(g) => println!("  Fetch gateway:  {g} (bindings: `trellis binding create NAME`)"),
        None => println!("  Fetch gateway:  off (start with --gateway-listen ADDR for bindings)"),
    }
    println!("  Operator key:   {}", server.admin_key_path().display());
    println!("Add a machine:");
    println!(
        "  trellis token create --server {url} --api-key \"$(cat {})\"",
        server.admin_key_path().display()
    );
    println!("  trellis join --server {url} --token <TOKEN>     # on the machine, as root");
    server.serve(shutdown_signal()).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // One TLS crypto provider, chosen explicitly (rustls panics at run time when
    // it has to guess between several).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.cmd {
        Cmd::Server {
            data_dir,
            listen,
            edge_udp,
            public_url,
            dns_suffix,
            flow_retention,
            gateway_listen,
            gateway_tls_cert,
            gateway_tls_key,
        } => {
            run_server(trellis_control::Config {
                data_dir,
                listen,
                public_url,
                edge_udp: Some(edge_udp),
                dns_suffix,
                flow_retention,
                gateway_listen: gateway_listen.0,
                gateway_tls: gateway_tls_cert.zip(gateway_tls_key),
            })
            .await
        }
        Cmd::Join {
            server,
            token,
            name,
            state_dir,
            interface,
            listen_port,
            advertise_routes,
            snat,
            accept_dns,
        } => match advertise_routes.map(|r| parse_routes(&r)).transpose() {
            Err(e) => Err(e),
            Ok(advertise_routes) => {
                trellis_node::run(
                    trellis_node::JoinOptions {
                        server,
                        token,
                        name,
                        state_dir,
                        ifname: interface,
                        listen_port,
                        advertise_routes,
                        snat,
                        accept_dns,
                    },
                    shutdown_signal(),
                )
                .await
            }
        },
        Cmd::Status { json, state_dir } => status(json, &state_dir).await,
        Cmd::Ping {
            peer,
            count,
            state_dir,
        } => ping(&peer, count, &state_dir).await,
        Cmd::Account { cmd, admin } => admin::account(&admin, cmd).await,
        Cmd::Token { cmd, admin } => admin::token(&admin, cmd).await,
        Cmd::Keys { cmd, admin } => admin::keys(&admin, cmd).await,
        Cmd::Admins { cmd, admin } => admin::admins(&admin, cmd).await,
        Cmd::Nodes { cmd, admin } => admin::nodes(&admin, cmd).await,
        Cmd::Routes { cmd, admin } => admin::routes(&admin, cmd).await,
        Cmd::Dns { cmd, admin } => admin::dns(&admin, cmd).await,
        Cmd::Policy { cmd, admin } => admin::policy(&admin, cmd).await,
        Cmd::Logs { cmd, admin } => admin::logs(&admin, cmd).await,
        Cmd::Binding { cmd, admin } => admin::binding(&admin, cmd).await,
        Cmd::Proxy { binding, listen } => proxy(&binding, listen).await,
        Cmd::Mcp { binding } => match binding.mesh() {
            Ok(mesh) => trellis_sdk::mcp::serve_stdio(mesh)
                .await
                .context("MCP on stdio"),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `--advertise-routes` values (empty entries are skipped).
fn parse_routes(raw: &[String]) -> anyhow::Result<Vec<ipnet::Ipv4Net>> {
    raw.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                anyhow::anyhow!(
                    "invalid --advertise-routes entry {s:?}: expected IPv4 subnets such as 198.19.10.0/24, separated by commas"
                )
            })
        })
        .collect()
}

async fn ping(peer: &str, count: u32, state_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut answered = 0;
    let mut sent = 0;
    trellis_node::query_ping(state_dir, peer, count, |v| {
        sent += 1;
        let name = v["peer"].as_str().unwrap_or("");
        let ip = v["ip"].as_str().unwrap_or("");
        match v["rtt_ms"].as_f64() {
            Some(rtt) => {
                answered += 1;
                let path = v["path"].as_str().unwrap_or("");
                let via = v["endpoint"]
                    .as_str()
                    .map(|e| format!(" via {e}"))
                    .unwrap_or_default();
                println!(
                    "reply from {name} ({ip}): seq={} time={rtt:.2} ms path={path}{via}",
                    v["seq"]
                );
            }
            None => println!(
                "no reply from {name} ({ip}): seq={} {}",
                v["seq"],
                v["error"].as_str().unwrap_or("")
            ),
        }
    })
    .await?;
    println!("{sent} probes sent, {answered} answered");
    if answered == 0 {
        anyhow::bail!("{peer} did not answer");
    }
    Ok(())
}

async fn status(json: bool, state_dir: &std::path::Path) -> anyhow::Result<()> {
    let v = trellis_node::query_status(state_dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string()
    };
    println!(
        "{} {} (account {}, control plane {}, relay {})",
        s(&v, "name"),
        s(&v, "ip"),
        s(&v, "account"),
        s(&v, "control"),
        s(&v, "relay")
    );
    let peers = v
        .get("peers")
        .and_then(|p| p.as_array())
        .context("no peers in status")?;
    if peers.is_empty() {
        println!("no peers yet");
        return Ok(());
    }
    println!(
        "{:<20} {:<16} {:<8} {:<22} {:>10} {:>12} {:>12}",
        "PEER", "IP", "PATH", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    );
    for p in peers {
        let hs = p
            .get("last_handshake_secs")
            .and_then(|x| x.as_u64())
            .map(|x| format!("{x}s ago"))
            .unwrap_or_else(|| "never".into());
        println!(
            "{:<20} {:<16} {:<8} {:<22} {:>10} {:>12} {:>12}",
            s(p, "name"),
            s(p, "ip"),
            s(p, "path"),
            s(p, "endpoint"),
            hs,
            p.get("rx_bytes").and_then(|x| x.as_u64()).unwrap_or(0),
            p.get("tx_bytes").and_then(|x| x.as_u64()).unwrap_or(0),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_commands_parse() {
        for args in [
            &["trellis", "routes", "list", "--json"][..],
            &["trellis", "routes", "approve", "gw", "198.19.10.0/24"],
            &["trellis", "dns", "add", "db.prod", "198.19.10.5"],
            &["trellis", "dns", "list"],
            &["trellis", "dns", "remove", "db.prod"],
            &["trellis", "nodes", "rename", "a", "b"],
            &["trellis", "token", "create", "--routes-auto-approve"],
            &["trellis", "server", "--dns-suffix", "corp.example"],
            &["trellis", "server", "--flow-retention", "7d"],
            &["trellis", "logs", "flows"],
            &[
                "trellis",
                "logs",
                "flows",
                "--since",
                "10m",
                "--node",
                "db",
                "--decision",
                "deny",
                "--json",
                "--follow",
            ],
            &["trellis", "token", "list", "--json"],
            &["trellis", "token", "revoke", "7"],
            &["trellis", "nodes", "tag", "db-1", "db", "prod"],
            &["trellis", "nodes", "tag", "db-1", "--clear"],
            &["trellis", "policy", "get"],
            &["trellis", "policy", "set", "policy.toml"],
            &[
                "trellis",
                "policy",
                "test",
                "--from",
                "a",
                "--to",
                "100.64.0.3",
                "--port",
                "tcp:5432",
            ],
            &["trellis", "policy", "history"],
            &["trellis", "policy", "restore", "3"],
            &["trellis", "logs", "audit", "--since", "10m", "--json"],
            &[
                "trellis", "binding", "create", "ci", "--tag", "a", "--tag", "b", "--ttl", "30d",
            ],
            &["trellis", "binding", "list", "--json"],
            &["trellis", "binding", "revoke", "ci"],
            &[
                "trellis",
                "logs",
                "requests",
                "--binding",
                "ci",
                "--limit",
                "5",
                "--json",
            ],
            &["trellis", "server", "--gateway-listen", "off"],
            &[
                "trellis",
                "server",
                "--gateway-tls-cert",
                "c.pem",
                "--gateway-tls-key",
                "k.pem",
            ],
            &["trellis", "proxy", "--binding", "http://b_x:y@edge:8443"],
            &["trellis", "proxy", "--listen", "127.0.0.1:9000"],
            &["trellis", "mcp", "--binding", "http://b_x:y@edge:8443"],
            &["trellis", "mcp", "--gateway-ca", "ca.pem"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        match Cli::try_parse_from([
            "trellis",
            "join",
            "--advertise-routes",
            "198.19.10.0/24,10.1.0.0/16",
        ]) {
            Ok(Cli {
                cmd:
                    Cmd::Join {
                        advertise_routes: Some(r),
                        ..
                    },
            }) => {
                let parsed = parse_routes(&r).unwrap();
                assert_eq!(parsed.len(), 2);
                assert_eq!(parsed[1].to_string(), "10.1.0.0/16");
            }
            _ => panic!("join --advertise-routes did not parse"),
        }
        for bad in [
            &["trellis", "nodes", "tag", "db-1"][..],
            &["trellis", "nodes", "tag", "db-1", "x", "--clear"],
            &["trellis", "token", "revoke", "abc"],
            &["trellis", "policy", "restore"],
            &["trellis", "policy", "test", "--from", "a", "--to", "b"],
            &["trellis", "binding", "create"],
            &["trellis", "server", "--gateway-listen", "8443"],
            &["trellis", "server", "--gateway-tls-cert", "c.pem"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        assert!(parse_routes(&["nope".into()]).is_err());
        assert!(parse_routes(&[String::new()]).unwrap().is_empty());
    }

    #[test]
    fn gateway_flags() {
        let listen = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(Cli {
                cmd: Cmd::Server { gateway_listen, .. },
            }) => gateway_listen.0,
            _ => panic!("{args:?} did not parse"),
        };
        assert_eq!(
            listen(&["trellis", "server"]),
            Some("0.0.0.0:8443".parse().unwrap())
        );
        assert_eq!(
            listen(&["trellis", "server", "--gateway-listen", "off"]),
            None
        );
        assert_eq!(
            listen(&["trellis", "server", "--gateway-listen", "127.0.0.1:9443"]),
            Some("127.0.0.1:9443".parse().unwrap())
        );
    }

    #[test]
    fn flow_retention_and_logs_flags() {
        match Cli::try_parse_from(["trellis", "server", "--flow-retention", "12h"]) {
            Ok(Cli {
                cmd: Cmd::Server { flow_retention, .. },
            }) => assert_eq!(flow_retention.as_secs(), 12 * 3600),
            _ => panic!("server --flow-retention did not parse"),
        }
        let err = Cli::try_parse_from(["trellis", "server", "--flow-retention", "1w"])
            .err()
            .expect("1w is refused");
        assert!(err.to_string().contains("invalid duration"), "{err}");
        match Cli::try_parse_from(["trellis", "logs", "flows", "--decision", "deny", "-f"]) {
            Ok(Cli {
                cmd:
                    Cmd::Logs {
                        cmd: LogsCmd::Flows(a),
                        ..
                    },
            }) => {
                assert_eq!(a.decision.as_deref(), Some("deny"));
                assert!(a.follow && !a.json);
                assert_eq!(a.limit, 100);
            }
            _ => panic!("logs flows did not parse"),
        }
    }
}
