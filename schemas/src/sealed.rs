//! Provider secrets at rest: AES-256-GCM under `SLUICE_SECRET_KEY` (32 bytes, base64).
//! A sealed value is `v1:` + base64(nonce ‖ ciphertext), so the format can change later.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("SLUICE_SECRET_KEY must be 32 bytes encoded as base64 (generate one with `openssl rand -base64 32`)")]
    BadKey,
    #[error("a sealed secret is corrupt or was sealed with another SLUICE_SECRET_KEY")]
    Corrupt,
}

/// The key that seals provider secrets. `Debug` never shows it.
#[derive(Clone)]
pub struct SecretKey(Key<Aes256Gcm>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl SecretKey {
    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| SealError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        Ok(Self(*Key::<Aes256Gcm>::from_slice(&bytes)))
    }

    /// A fresh random key, base64-encoded (what `sluice up` keeps under `.sluice/`).
    pub fn generate_base64() -> String {
        STANDARD.encode(Aes256Gcm::generate_key(OsRng))
    }

    pub fn seal(&self, plaintext: &str) -> String {
        let cipher = Aes256Gcm::new(&self.0);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encryption with a valid key and a fresh nonce cannot fail for in-memory data.
        let ct = cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("v1:{}", STANDARD.encode(out))
    }

    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let b64 = sealed.strip_prefix("v1:").ok_or(SealError::Corrupt)?;
        let raw = STANDARD.decode(b64).map_err(|_| SealError::Corrupt)?;
        if raw.len() < 12 {
            return Err(SealError::Corrupt);
        }
        let (nonce, ct) = raw.split_at(12);
        let plain = Aes256Gcm::new(&self.0)
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| SealError::Corrupt)?;
        String::from_utf8(plain).map_err(|_| SealError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens() {
        let key = SecretKey::from_base64(&SecretKey::generate_base64()).expect("key");
        let sealed = key.seal("sk-provider-secret");
        assert!(!sealed.contains("sk-provider"));
        assert_eq!(key.open(&sealed).expect("open"), "sk-provider-secret");
        let other = SecretKey::from_base64(&SecretKey::generate_base64()).expect("key");
        assert_eq!(other.open(&sealed), Err(SealError::Corrupt));
        assert_eq!(
            SecretKey::from_base64("short").map(|_| ()),
            Err(SealError::BadKey)
        );
    }
}
