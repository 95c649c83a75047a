//! Signed releases: the one message a release signature covers, and ed25519 keys in ferry's text
//! forms. The coordinator signs (`[signing] key` in fleet.toml); an agent with trusted keys
//! (`[signing] trusted_keys` in agent.toml) runs only releases one of them signed.
//!
//! - A public key file holds one line: `ferry-ed25519 <64 hex digits> <name>`.
//! - A private key file holds one line: `ferry-ed25519-private <hex of the PKCS#8 document>`
//!   (mode 0600).
//! - The message: the app, the version and the manifest hash (blake3 of the canonical manifest,
//!   which covers every file's content, mode and owner, the rendered templates and the vars).
use std::path::Path;

use ring::signature::{ED25519, UnparsedPublicKey};

pub const PUBLIC_PREFIX: &str = "ferry-ed25519";
pub const PRIVATE_PREFIX: &str = "ferry-ed25519-private";

/// What a release signature signs.
pub fn message(app: &str, version: &str, manifest_hash: &[u8]) -> Vec<u8> {
    format!("ferry release v1\napp {app}\nversion {version}\nmanifest {}\n", hex::encode(manifest_hash)).into_bytes()
}

/// A trusted public key and the name it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    pub key: [u8; 32],
}

impl PublicKey {
    /// Parses `ferry-ed25519 <hex> <name>`.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let mut words = text.split_whitespace();
        if words.next() != Some(PUBLIC_PREFIX) {
            return Err(format!("is not a ferry public key (a line \"{PUBLIC_PREFIX} <hex> <name>\")"));
        }
        let hex_key = words.next().ok_or("has no key after the prefix")?;
        let bytes = hex::decode(hex_key).map_err(|e| format!("key is not hex: {e}"))?;
        let key: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("key is {} bytes, an ed25519 key is 32", b.len()))?;
        let name = words.collect::<Vec<_>>().join(" ");
        Ok(PublicKey { name: if name.is_empty() { key_id(&key) } else { name }, key })
    }

    pub fn load(path: &Path) -> Result<PublicKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        PublicKey::parse(&text).map_err(|e| format!("{} {e}", path.display()))
    }

    pub fn to_line(&self) -> String {
        format!("{PUBLIC_PREFIX} {} {}\n", hex::encode(self.key), self.name)
    }

    /// A short id of the key, for messages (the first 8 bytes of its blake3, hex).
    pub fn id(&self) -> String {
        key_id(&self.key)
    }

    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.key).verify(message, signature).is_ok()
    }
}

fn key_id(key: &[u8]) -> String {
    hex::encode(&blake3::hash(key).as_bytes()[..8])
}

/// Why a signed release is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("release {version} of app {app} is not signed, and this host runs only releases signed by {trusted}")]
    Unsigned { app: String, version: String, trusted: String },
    #[error(
        "the signature of release {version} of app {app} does not verify with any key this host trusts ({trusted}): signed by another key, or the release changed after it was signed"
    )]
    Untrusted { app: String, version: String, trusted: String },
}

/// Checks `signature` of (app, version, manifest hash) against `trusted`; the key that verified.
pub fn check<'a>(
    trusted: &'a [PublicKey],
    app: &str,
    version: &str,
    manifest_hash: &[u8],
    signature: &[u8],
) -> Result<&'a PublicKey, Refusal> {
    let names = || trusted.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ");
    if signature.is_empty() || manifest_hash.is_empty() {
        return Err(Refusal::Unsigned { app: app.into(), version: version.into(), trusted: names() });
    }
    let msg = message(app, version, manifest_hash);
    trusted.iter().find(|k| k.verifies(&msg, signature)).ok_or_else(|| Refusal::Untrusted {
        app: app.into(),
        version: version.into(),
        trusted: names(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn pair() -> (Ed25519KeyPair, PublicKey) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("generate");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parse");
        let key: [u8; 32] = pair.public_key().as_ref().try_into().expect("32 bytes");
        (pair, PublicKey { name: "ci".into(), key })
    }

    #[test]
    fn a_signature_verifies_only_for_its_app_version_and_manifest() {
        let (signer, public) = pair();
        let (_, other) = pair();
        let hash = [7u8; 32];
        let sig = signer.sign(&message("web", "1.2", &hash));
        let trusted = [other.clone(), public.clone()];
        assert_eq!(check(&trusted, "web", "1.2", &hash, sig.as_ref()), Ok(&public));
        for (app, version, h) in [("api", "1.2", hash), ("web", "1.3", hash), ("web", "1.2", [8u8; 32])] {
            let e = check(&trusted, app, version, &h, sig.as_ref()).expect_err("another release");
            assert!(matches!(e, Refusal::Untrusted { .. }), "{e}");
        }
        let e = check(&[other], "web", "1.2", &hash, sig.as_ref()).expect_err("untrusted key");
        assert!(e.to_string().contains("does not verify with any key this host trusts (ci)"), "{e}");
        let e = check(&trusted, "web", "1.2", &hash, &[]).expect_err("unsigned");
        assert_eq!(
            e.to_string(),
            "release 1.2 of app web is not signed, and this host runs only releases signed by ci, ci"
        );
    }

    #[test]
    fn public_keys_round_trip_and_bad_ones_are_named() {
        let (_, public) = pair();
        assert_eq!(PublicKey::parse(&public.to_line()), Ok(public.clone()));
        assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err_and(|e| e.contains("not a ferry public key")));
        assert!(PublicKey::parse("ferry-ed25519 abcd x").is_err_and(|e| e.contains("2 bytes")));
        assert!(PublicKey::parse("ferry-ed25519 zz x").is_err_and(|e| e.contains("not hex")));
        let unnamed = PublicKey::parse(&format!("ferry-ed25519 {}", hex::encode(public.key))).expect("no name");
        assert_eq!(unnamed.name, public.id());
    }
}
