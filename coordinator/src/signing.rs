//! Release signing: `ferry key new`'s ed25519 key pair, and the signer a deployment uses
//! (fleet.toml's `[signing] key`). Formats and the signed message: [`ferry_proto::signing`].
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ferry_proto::durable::{self, Existing};
use ferry_proto::signing::{PRIVATE_PREFIX, PublicKey};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;

/// A new key pair on disk.
#[derive(Debug, Serialize)]
pub struct NewKey {
    pub name: String,
    pub id: String,
    /// The private key (mode 0600): `[signing] key` in fleet.toml.
    pub private: PathBuf,
    /// The public key: `[signing] trusted_keys` in every agent.toml.
    pub public: PathBuf,
}

/// Writes OUT/NAME.key (0600) and OUT/NAME.pub; an existing key is kept unless `force`.
pub fn new(name: &str, out: &Path, force: bool) -> anyhow::Result<NewKey> {
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || name.starts_with('.')
    {
        anyhow::bail!("--name {name:?}: use letters, digits, '-', '_' and '.' (it names the files)");
    }
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("no randomness from the system"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("generated key: {e}"))?;
    let key: [u8; 32] =
        pair.public_key().as_ref().try_into().map_err(|_| anyhow::anyhow!("an ed25519 public key is 32 bytes"))?;
    let public = PublicKey { name: name.to_string(), key };
    let (private_path, public_path) = (out.join(format!("{name}.key")), out.join(format!("{name}.pub")));
    let existing = if force { Existing::Replace } else { Existing::Keep };
    let text = format!("{PRIVATE_PREFIX} {}\n", hex::encode(pkcs8.as_ref()));
    durable::write(&private_path, text.as_bytes(), 0o600, existing).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} exists: pass --force to replace it (agents trusting it will refuse new releases)",
                private_path.display()
            )
        } else {
            anyhow::anyhow!("{}: {e}", private_path.display())
        }
    })?;
    durable::write(&public_path, public.to_line().as_bytes(), 0o644, Existing::Replace)
        .map_err(|e| anyhow::anyhow!("{}: {e}", public_path.display()))?;
    Ok(NewKey { name: name.to_string(), id: public.id(), private: private_path, public: public_path })
}

/// The key a coordinator signs releases with.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl Signer {
    /// Reads a private key file `ferry key new` wrote; refuses one others may read.
    pub fn load(path: &Path) -> Result<Signer, String> {
        let what = |e: String| format!("[signing] key {}: {e}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| what(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(what(format!(
                "mode {:o} lets others read it; chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| what(e.to_string()))?;
        let hex_der = text
            .trim()
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or_else(|| what(format!("is not a ferry private key (a line \"{PRIVATE_PREFIX} <hex>\")")))?;
        let der = hex::decode(hex_der.trim()).map_err(|e| what(format!("is not hex: {e}")))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| what(format!("is not an ed25519 key: {e}")))?;
        Ok(Signer { pair })
    }

    /// The signature of release (app, version, manifest hash).
    pub fn sign(&self, app: &str, version: &str, manifest_hash: &[u8]) -> Vec<u8> {
        self.pair.sign(&ferry_proto::signing::message(app, version, manifest_hash)).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_signs_what_its_public_half_verifies_and_is_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = new("release", dir.path(), false).expect("new key");
        let mode = std::fs::metadata(&k.private).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let signer = Signer::load(&k.private).expect("load");
        let public = PublicKey::load(&k.public).expect("public");
        assert_eq!((public.name.as_str(), public.id()), ("release", k.id.clone()));
        let sig = signer.sign("web", "1.0", &[1; 32]);
        assert!(ferry_proto::signing::check(&[public], "web", "1.0", &[1; 32], &sig).is_ok());
        let e = new("release", dir.path(), false).expect_err("exists");
        assert!(e.to_string().contains("pass --force"), "{e}");
        new("release", dir.path(), true).expect("forced");
        std::fs::set_permissions(&k.private, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Signer::load(&k.private).err().unwrap_or_default();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(new("../x", dir.path(), false).is_err());
    }
}
