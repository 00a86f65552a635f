//! The bootstrap config file, in the original antnest's format:
//! `config/<hostname>-peer-config.json` holding
//! `{"masters": [{"ip": "10.0.0.5", "hostname": "box", "port": 4001}]}`.
//! A `"bootstrap": ["/ip4/…/tcp/…"]` list of multiaddrs may sit beside it.

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
    pub port: u16,
}

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

/// `config/<hostname>-peer-config.json` under the current directory.
pub fn default_path() -> PathBuf {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    PathBuf::from("config").join(format!("{host}-peer-config.json"))
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
            let addr = match (&m.ip, &m.hostname) {
                (Some(ip), _) => match ip.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(ip)) => format!("/ip4/{ip}/tcp/{}", m.port),
                    Ok(std::net::IpAddr::V6(ip)) => format!("/ip6/{ip}/tcp/{}", m.port),
                    Err(e) => return Err(invalid(format!("master ip {ip:?}: {e}"))),
                },
                (None, Some(host)) => format!("/dns/{host}/tcp/{}", m.port),
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
