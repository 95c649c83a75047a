//! `ferry token new`: bearer tokens for `ferry serve`. Only a token's SHA-256 goes into
//! fleet.toml (`[[server.tokens]]`); the server compares digests.
use serde::Serialize;

/// A new token and what to add to fleet.toml.
#[derive(Debug, Serialize)]
pub struct NewToken {
    pub name: String,
    pub token: String,
    pub sha256: String,
    /// The `[[server.tokens]]` lines for fleet.toml.
    #[serde(skip)]
    pub config_lines: String,
}

pub fn sha256(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha256(s))
}

/// The fleet.toml lines that let `token` in as `name`.
pub fn config_lines(name: &str, token: &str) -> String {
    format!("[[server.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\n", sha256_hex(token))
}

/// A fresh random token for `name`: 32 bytes, hex.
pub fn new(name: &str) -> anyhow::Result<NewToken> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness from the system"))?;
    let token = format!("ferry_{}", hex::encode(bytes));
    Ok(NewToken { name: name.to_string(), sha256: sha256_hex(&token), config_lines: config_lines(name, &token), token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_coreutils_digest() {
        // printf %s abc | sha256sum
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn new_tokens_differ_and_are_long() {
        let (a, b) = (new("ci").expect("random"), new("ci").expect("random"));
        assert_ne!(a.token, b.token);
        assert_eq!(a.token.len(), "ferry_".len() + 64);
        assert!(a.config_lines.contains(&a.sha256));
    }
}
