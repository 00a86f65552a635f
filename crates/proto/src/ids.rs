//! Identities: of a module (its SHA-256), of a job (chosen by its master)
//! and of a peer (the bytes of its libp2p peer id, kept here without
//! libp2p so that the scheduler and the control socket need none).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// SHA-256 of a module's bytes: its identity everywhere in the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    pub fn of(bytes: &[u8]) -> Self {
        ModuleHash(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({})", &hex::encode(self.0)[..12])
    }
}

/// A job's id, chosen by its master.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl JobId {
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        JobId(h.finish())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl std::str::FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(JobId)
    }
}

/// A peer's identity: the bytes of its libp2p `PeerId` (a multihash of its
/// public key, at most 64 bytes of digest). `Copy`, so a master's book can
/// hold one per lease without allocating; displayed in base58, as libp2p
/// displays peer ids, so the text is the same everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    len: u8,
    bytes: [u8; PeerId::MAX_LEN],
}

impl PeerId {
    /// A multihash of up to 64 bytes of digest, with its code and length.
    pub const MAX_LEN: usize = 72;

    /// A peer id from its bytes (libp2p's `PeerId::to_bytes`); `None` if
    /// longer than any peer id.
    pub fn from_bytes(b: &[u8]) -> Option<PeerId> {
        if b.is_empty() || b.len() > Self::MAX_LEN {
            return None;
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Some(PeerId {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// A peer id for tests and examples, from a short name.
    pub fn named(name: &str) -> PeerId {
        PeerId::from_bytes(name.as_bytes()).expect("a short name")
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.as_bytes()).into_string())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl std::str::FromStr for PeerId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|e| format!("not a peer id: {e}"))?;
        PeerId::from_bytes(&bytes).ok_or_else(|| "not a peer id: too long".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_hash_is_sha256_hex() {
        assert_eq!(
            ModuleHash::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn job_id_parses_its_display() {
        let id = JobId::random();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
    }

    #[test]
    fn peer_id_parses_its_display() {
        let id = PeerId::named("worker-a");
        assert_eq!(id.to_string().parse::<PeerId>().unwrap(), id);
        assert!(PeerId::from_bytes(&[1; 73]).is_none());
    }
}
