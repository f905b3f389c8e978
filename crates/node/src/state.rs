//! What a node keeps on disk in its state directory: its identity (private key,
//! 0600, never sent anywhere), its enrollment, and the last network map (so
//! that a restart with the control plane down still brings the mesh back).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use trellis_proto::NetworkMap;
use trellis_tunnel::StaticSecret;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub server: String,
    pub node_id: i64,
    pub name: String,
    pub account: String,
    pub ip: Ipv4Addr,
    pub cidr: Ipv4Net,
    /// Credential for the control stream (the server keeps only its hash).
    pub node_secret: String,
    /// WireGuard UDP port, kept across restarts.
    pub listen_port: u16,
    /// Subnets this node advertises as a mesh node.
    #[serde(default)]
    pub advertise_routes: Vec<Ipv4Net>,
    /// Masquerade traffic into advertised subnets (off: site-to-site, the LAN
    /// sees overlay source addresses).
    #[serde(default = "yes")]
    pub snat: bool,
}

fn yes() -> bool {
    true
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn socket_path(&self) -> PathBuf {
        self.file("agent.sock")
    }

    pub fn is_enrolled(&self) -> bool {
        self.file("node.json").exists() && self.file("private.key").exists()
    }

    pub fn load(&self) -> anyhow::Result<(NodeState, StaticSecret)> {
        let raw = fs::read_to_string(self.file("node.json"))
            .with_context(|| format!("reading {}", self.file("node.json").display()))?;
        let state: NodeState = serde_json::from_str(&raw)
            .with_context(|| format!("{} is damaged", self.file("node.json").display()))?;
        let key = fs::read_to_string(self.file("private.key"))
            .with_context(|| format!("reading {}", self.file("private.key").display()))?;
        let bytes: [u8; 32] = B64
            .decode(key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{} is damaged", self.file("private.key").display()))?;
        Ok((state, StaticSecret::from(bytes)))
    }

    /// Writes the identity and enrollment. Called only after the server accepted us.
    pub fn save_new(&self, state: &NodeState, key: &StaticSecret) -> anyhow::Result<()> {
        self.ensure_dir()?;
        write_atomic(
            &self.file("private.key"),
            B64.encode(key.to_bytes()).as_bytes(),
        )?;
        self.save(state)
    }

    pub fn save(&self, state: &NodeState) -> anyhow::Result<()> {
        write_atomic(
            &self.file("node.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )
    }

    pub fn save_map(&self, map: &NetworkMap) -> anyhow::Result<()> {
        write_atomic(
            &self.file("map.json"),
            serde_json::to_string(map)?.as_bytes(),
        )
    }

    pub fn load_map(&self) -> Option<NetworkMap> {
        let raw = fs::read_to_string(self.file("map.json")).ok()?;
        serde_json::from_str(&raw).ok()
    }

    fn ensure_dir(&self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating state directory {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        Ok(())
    }
}

/// Writes `bytes` to `path` with mode 0600 so that a crash leaves either the
/// old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_with_private_files() {
        let tmp = std::env::temp_dir().join(format!("trellis-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let sd = StateDir::new(&tmp);
        assert!(!sd.is_enrolled());
        let st = NodeState {
            server: "http://198.18.0.1:8080".into(),
            node_id: 3,
            name: "db-1".into(),
            account: "default".into(),
            ip: "100.64.0.3".parse().unwrap(),
            cidr: "100.64.0.0/16".parse().unwrap(),
            node_secret: "tn_x".into(),
            listen_port: 51820,
            advertise_routes: vec![],
            snat: true,
        };
        let key = StaticSecret::from([9u8; 32]);
        sd.save_new(&st, &key).unwrap();
        assert!(sd.is_enrolled());
        let (back, k2) = sd.load().unwrap();
        assert_eq!(back.ip, st.ip);
        assert_eq!(k2.to_bytes(), key.to_bytes());
        let mode = fs::metadata(tmp.join("private.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(tmp.join("node.json"), "{garbage").unwrap();
        let err = sd
            .load()
            .err()
            .expect("damaged state is refused")
            .to_string();
        assert!(err.contains("damaged"), "{err}");
        fs::remove_dir_all(&tmp).unwrap();
    }
}
