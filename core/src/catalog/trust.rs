//! Checking what a catalog lists: the archive's sha256, and — when the server trusts some keys
//! — an ed25519 signature over that sha256, made by one of them.
//!
//! The signed message is the entry's `sha256`: its 64 lowercase hexadecimal characters, as
//! ASCII, nothing else. Signing the digest rather than the archive lets a sync tell which
//! entries are trusted without downloading them; the download is then checked against the
//! digest. An entry cannot be relabelled (a signed archive of 1.0 listed as 2.0, or under
//! another name): the install checks that the archive's own manifest names the entry's name and
//! version. Keys and signatures are base64 (standard alphabet; a public key may also be 64
//! hexadecimal digits).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::Digest;

/// The public keys whose signatures the server trusts. Empty: signatures are not required (and
/// not checked), only the sha256.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<VerifyingKey>);

/// Why an archive or an entry is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("the archive's sha256 is {actual}, the catalog lists {listed}")]
    Checksum { listed: String, actual: String },
    #[error("the entry is not signed, and this server requires a signature by one of its trusted keys")]
    Unsigned,
    #[error("the entry's signature is not valid for any of this server's trusted keys")]
    BadSignature,
}

impl TrustedKeys {
    /// Parses public keys (base64 or hex of the 32-byte key).
    pub fn parse(keys: &[String]) -> Result<Self, String> {
        keys.iter().map(|k| parse_key(k.trim())).collect::<Result<_, _>>().map(Self)
    }

    /// Whether signatures are required.
    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `signature` (base64) signs `sha256` by a trusted key. With no trusted keys,
    /// nothing is checked.
    pub fn check_signature(&self, sha256: &str, signature: Option<&str>) -> Result<(), Untrusted> {
        if !self.required() {
            return Ok(());
        }
        let signature = signature.ok_or(Untrusted::Unsigned)?;
        let signature = decode_signature(signature).map_err(|_| Untrusted::BadSignature)?;
        let message = sha256.to_ascii_lowercase();
        if self.0.iter().any(|k| k.verify_strict(message.as_bytes(), &signature).is_ok()) {
            Ok(())
        } else {
            Err(Untrusted::BadSignature)
        }
    }

    /// Checks downloaded `bytes` against the entry: their sha256, then its signature.
    pub fn check(&self, bytes: &[u8], sha256: &str, signature: Option<&str>) -> Result<(), Untrusted> {
        let actual = hex::encode(sha2::Sha256::digest(bytes));
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(Untrusted::Checksum { listed: sha256.to_string(), actual });
        }
        self.check_signature(sha256, signature)
    }
}

/// A base64 ed25519 signature.
pub fn decode_signature(text: &str) -> Result<Signature, String> {
    let bytes = STANDARD.decode(text.trim()).map_err(|e| format!("signature is not base64: {e}"))?;
    Signature::from_slice(&bytes).map_err(|_| format!("signature has {} bytes, not 64", bytes.len()))
}

fn parse_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|e| e.to_string())?
    } else {
        STANDARD.decode(text).map_err(|e| format!("trusted key {text:?} is neither base64 nor hex: {e}"))?
    };
    let bytes: [u8; 32] =
        bytes.try_into().map_err(|b: Vec<u8>| format!("trusted key {text:?} has {} bytes, not 32", b.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("trusted key {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn sign(k: &SigningKey, sha: &str) -> String {
        STANDARD.encode(k.sign(sha.as_bytes()).to_bytes())
    }

    #[test]
    fn a_signature_by_a_trusted_key_over_the_digest_is_required_once_keys_are_set() {
        let bytes = b"archive bytes";
        let sha = hex::encode(sha2::Sha256::digest(bytes));
        let (trusted, other) = (key(1), key(2));
        let keys = TrustedKeys::parse(&[STANDARD.encode(trusted.verifying_key().to_bytes())]).unwrap();
        assert_eq!(keys.check(bytes, &sha, Some(&sign(&trusted, &sha))), Ok(()));
        assert_eq!(keys.check(bytes, &sha.to_uppercase(), Some(&sign(&trusted, &sha))), Ok(()));
        assert_eq!(keys.check(bytes, &sha, None), Err(Untrusted::Unsigned));
        assert_eq!(keys.check(bytes, &sha, Some(&sign(&other, &sha))), Err(Untrusted::BadSignature));
        assert_eq!(keys.check(bytes, &sha, Some("garbage")), Err(Untrusted::BadSignature));
        let tampered = keys.check(b"other bytes", &sha, Some(&sign(&trusted, &sha)));
        assert!(matches!(tampered, Err(Untrusted::Checksum { .. })), "{tampered:?}");
        // No keys: only the digest.
        let none = TrustedKeys::default();
        assert_eq!(none.check(bytes, &sha, None), Ok(()));
        assert!(none.check(b"x", &sha, None).is_err());
    }

    #[test]
    fn the_readme_openssl_recipe_makes_a_signature_kiln_accepts() {
        // Made with the README's commands (OpenSSL 3.0), over an archive holding `archive`.
        let public = "X41NJWczddsyvOA8LNYTgKLeSNSMzmKvjPLMBdJhRqI=";
        let sig = "NLY++vvDkQiPVOcF9PNQdbK1ncVORm43SPxHIl3ZPNOUye6F+tQM5HxLwx1jhKUKfQLvhholRX1e4RYyqxQXBQ==";
        let sha = "0eb3e36bfb24dcd9bb1d1bece1531216b59539a8fde17ee80224af0653c92aa3";
        let keys = TrustedKeys::parse(&[public.to_string()]).unwrap();
        assert_eq!(keys.check(b"archive", sha, Some(sig)), Ok(()));
        assert_eq!(keys.check_signature(&sha.replace('0', "1"), Some(sig)), Err(Untrusted::BadSignature));
    }

    #[test]
    fn keys_are_base64_or_hex_of_32_bytes() {
        let public = key(3).verifying_key().to_bytes();
        assert!(TrustedKeys::parse(&[hex::encode(public)]).unwrap().required());
        assert!(TrustedKeys::parse(&[STANDARD.encode(public)]).is_ok());
        assert!(TrustedKeys::parse(&["c2hvcnQ=".into()]).is_err());
        assert!(TrustedKeys::parse(&["%%%".into()]).is_err());
        assert!(!TrustedKeys::parse(&[]).unwrap().required());
    }
}
