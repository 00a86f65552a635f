//! The bootstrap config file, in the original antnest's format:
//! `config/<hostname>-slave-config.json` (the original's name) or
//! `config/<hostname>-peer-config.json`, holding
//! `{"masters": [{"ip": "10.0.0.5", "hostname": "box", "port": 4001}]}`; a
//! master without a port is at [`DEFAULT_PORT`]. A
//! `"bootstrap": ["/ip4/…/tcp/…"]` list of multiaddrs may sit beside it.

use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConfigFile {
    /// Bootstrap peers in the original format.
    pub masters: Vec<Master>,
    /// Bootstrap peers as multiaddrs.
    pub bootstrap: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Master {
    /// An IPv4/IPv6 address; if absent, `hostname` is resolved by DNS.
    pub ip: Option<String>,
    pub hostname: Option<String>,
    /// `None`: antnest's well-known port, [`DEFAULT_PORT`].
    pub port: Option<u16>,
}

/// The port `antnest peer` listens on when it is free and no `--listen`
/// is given, and where a master listed without a port is looked for.
pub const DEFAULT_PORT: u16 = 4001;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The config files read when none is named, under the current directory:
/// `config/<hostname>-slave-config.json` (the original antnest's name for a
/// worker's file) and `config/<hostname>-peer-config.json`.
pub fn default_paths() -> [PathBuf; 2] {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    ["slave", "peer"].map(|role| PathBuf::from("config").join(format!("{host}-{role}-config.json")))
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Every bootstrap address the file names.
    pub fn bootstrap_addrs(&self, path: &Path) -> Result<Vec<Multiaddr>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let mut addrs = Vec::new();
        for m in &self.masters {
            let port = m.port.unwrap_or(DEFAULT_PORT);
            let addr = match (&m.ip, &m.hostname) {
                (Some(ip), _) => match ip.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(ip)) => format!("/ip4/{ip}/tcp/{port}"),
                    Ok(std::net::IpAddr::V6(ip)) => format!("/ip6/{ip}/tcp/{port}"),
                    Err(e) => return Err(invalid(format!("master ip {ip:?}: {e}"))),
                },
                (None, Some(host)) => format!("/dns/{host}/tcp/{port}"),
                (None, None) => return Err(invalid("a master needs an ip or a hostname".into())),
            };
            addrs.push(addr.parse().map_err(|e| invalid(format!("{addr}: {e}")))?);
        }
        for a in &self.bootstrap {
            addrs.push(a.parse().map_err(|e| invalid(format!("{a}: {e}")))?);
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_format_gives_multiaddrs() {
        let f: ConfigFile = serde_json::from_str(
            r#"{"masters":[{"ip":"127.0.0.1","hostname":"a","port":4001},{"hostname":"b","port":5}],
                "bootstrap":["/ip4/10.1.2.3/tcp/9"]}"#,
        )
        .unwrap();
        let addrs = f.bootstrap_addrs(Path::new("x.json")).unwrap();
        let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "/ip4/127.0.0.1/tcp/4001",
                "/dns/b/tcp/5",
                "/ip4/10.1.2.3/tcp/9"
            ]
        );
    }

    /// The original's slave config, verbatim: a master without a port.
    #[test]
    fn a_master_without_a_port_is_at_the_default_port() {
        let f: ConfigFile =
            serde_json::from_str(r#"{"masters": [{"ip": "192.168.0.1", "hostname": "master"}]}"#)
                .unwrap();
        let addrs = f.bootstrap_addrs(Path::new("x.json")).unwrap();
        assert_eq!(
            addrs[0].to_string(),
            format!("/ip4/192.168.0.1/tcp/{DEFAULT_PORT}")
        );
    }

    #[test]
    fn bad_ip_is_a_clear_error() {
        let f: ConfigFile =
            serde_json::from_str(r#"{"masters":[{"ip":"nope","port":1}]}"#).unwrap();
        let err = f
            .bootstrap_addrs(Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.json") && err.contains("nope"), "{err}");
    }
}
