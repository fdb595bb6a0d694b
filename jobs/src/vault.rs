//! AES-SIV token encryption at rest.
//!
//! Every secret column (access token, refresh token, PKCE code verifier) is stored as
//!
//! ```text
//! version (1 byte) | key id length (1 byte) | key id | nonce (16 bytes) | SIV tag + ciphertext
//! ```
//!
//! SIV without a nonce is deterministic, so a fresh random nonce makes two encryptions of the
//! same token differ. The associated data binds a ciphertext to its tenant, its owner row and its
//! column, so a value copied into another row or column does not decrypt. The key id makes key
//! rotation possible: old ciphertexts keep decrypting while their key stays in the ring, and
//! [`TokenVault::needs_reencrypt`] finds the rows to rewrite under the current key.

use std::collections::HashMap;
use std::fmt;

use aes_siv::aead::{Aead, KeyInit, Payload};
use aes_siv::{Aes256SivAead, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use zeroize::Zeroizing;

use crate::ids::{AccountId, TenantId};

const VERSION: u8 = 1;
const KEY_LEN: usize = 64;
const NONCE_LEN: usize = 16;
const TAG_LEN: usize = 16;
const MAX_KEY_ID_LEN: usize = 32;
/// Domain separation: associated data of this vault can never collide with another use of
/// the same key.
const AD_CONTEXT: &[u8] = b"graphdesk-token-vault";

/// Which secret column a ciphertext belongs to; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column {
    AccessToken,
    RefreshToken,
    CodeVerifier,
}

impl Column {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AccessToken => "access_token",
            Self::RefreshToken => "refresh_token",
            Self::CodeVerifier => "code_verifier",
        }
    }
}

/// What a ciphertext is bound to: tenant, owner row and column. Decrypting with any other
/// associated data fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociatedData {
    tenant: TenantId,
    owner: String,
    column: Column,
}

impl AssociatedData {
    /// A token column of a connected account.
    #[must_use]
    pub fn for_account(tenant: TenantId, account: AccountId, column: Column) -> Self {
        Self {
            tenant,
            owner: format!("account:{account}"),
            column,
        }
    }

    /// A secret owned by another kind of row (e.g. a pending OAuth state holding a PKCE
    /// verifier). `owner` must be unique and stable for that row, e.g. `oauth_state:<id>`.
    #[must_use]
    pub fn for_owner(tenant: TenantId, owner: impl Into<String>, column: Column) -> Self {
        Self {
            tenant,
            owner: owner.into(),
            column,
        }
    }

    /// Length-prefixed so that no two different (tenant, owner, column, key id) tuples encode
    /// to the same bytes.
    fn encode(&self, key_id: &KeyId) -> Vec<u8> {
        let tenant = self.tenant.to_string();
        let mut out = Vec::with_capacity(96 + self.owner.len());
        for part in [
            AD_CONTEXT,
            &[VERSION],
            key_id.0.as_bytes(),
            tenant.as_bytes(),
            self.owner.as_bytes(),
            self.column.as_str().as_bytes(),
        ] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }
}

/// A key's name in the keyring: 1–32 characters of `A-Z a-z 0-9 _ - .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(raw: &str) -> Result<Self, KeyringError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_KEY_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(KeyringError::BadKeyId {
                key_id: raw.chars().take(40).collect(),
            })
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the keyring configuration was refused. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error(
        "the token keyring is empty: expected `key_id:BASE64_64_BYTE_KEY[,older_id:BASE64...]`"
    )]
    Empty,
    #[error("keyring entry {position} is not `key_id:BASE64`")]
    BadEntry { position: usize },
    #[error("keyring key id `{key_id}` must be 1-32 characters of A-Z a-z 0-9 _ - .")]
    BadKeyId { key_id: String },
    #[error("keyring key `{key_id}` is not valid base64")]
    BadBase64 { key_id: String },
    #[error("keyring key `{key_id}` is {len} bytes; AES-256-SIV needs exactly 64")]
    BadLength { key_id: String, len: usize },
    #[error("keyring key id `{key_id}` appears more than once")]
    DuplicateKeyId { key_id: String },
}

/// Why a stored ciphertext could not be turned back into a secret. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("ciphertext is malformed: {reason}")]
    Malformed { reason: &'static str },
    #[error("ciphertext format version {version} is not supported (expected {VERSION})")]
    UnsupportedVersion { version: u8 },
    #[error(
        "ciphertext was encrypted under key `{key_id}`, which is not in the keyring; \
         add the old key back to the keyring (as a non-current entry) to read it"
    )]
    UnknownKey { key_id: String },
    #[error(
        "ciphertext under key `{key_id}` failed authentication: wrong tenant, owner or column, \
         or the data was altered"
    )]
    Authentication { key_id: String },
    #[error("decrypted secret is not UTF-8")]
    NotUtf8,
}

/// The encryption keyring. Cheap to share behind an `Arc`; holds keys in zeroize-on-drop boxes.
///
/// Configuration format (e.g. the `TOKEN_KEYS` environment variable):
///
/// ```text
/// k2:BASE64_OF_64_RANDOM_BYTES,k1:BASE64_OF_64_RANDOM_BYTES
/// ```
///
/// Comma-separated `key_id:key` entries; the FIRST entry is the current key used for all new
/// encryptions, the others only decrypt. Key ids are 1–32 characters of `A-Z a-z 0-9 _ - .`;
/// keys are standard or URL-safe base64 of exactly 64 bytes (AES-256-SIV). Whitespace around
/// entries is ignored. To rotate: generate a key with [`TokenVault::generate_key`], put it first
/// under a new id, keep the old entry until [`TokenVault::needs_reencrypt`] finds no more rows.
pub struct TokenVault {
    current: KeyId,
    keys: HashMap<KeyId, SecretBox<[u8; KEY_LEN]>>,
}

impl fmt::Debug for TokenVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.keys.keys().map(KeyId::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("TokenVault")
            .field("current", &self.current.as_str())
            .field("key_ids", &ids)
            .finish_non_exhaustive()
    }
}

impl TokenVault {
    /// Parses a keyring in the format documented on [`TokenVault`].
    pub fn from_keyring(spec: &str) -> Result<Self, KeyringError> {
        let mut current = None;
        let mut keys = HashMap::new();
        for (position, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, b64) = entry.split_once(':').ok_or(KeyringError::BadEntry {
                position: position + 1,
            })?;
            let id = KeyId::parse(id.trim())?;
            let bytes = decode_key(b64.trim()).ok_or_else(|| KeyringError::BadBase64 {
                key_id: id.0.clone(),
            })?;
            let key: [u8; KEY_LEN] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyringError::BadLength {
                        key_id: id.0.clone(),
                        len: bytes.len(),
                    })?;
            if keys.contains_key(&id) {
                return Err(KeyringError::DuplicateKeyId { key_id: id.0 });
            }
            if current.is_none() {
                current = Some(id.clone());
            }
            keys.insert(id, SecretBox::new(Box::new(key)));
        }
        let current = current.ok_or(KeyringError::Empty)?;
        Ok(Self { current, keys })
    }

    /// A fresh random 64-byte key, standard base64, for the keyring configuration.
    #[must_use]
    pub fn generate_key() -> String {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(key.as_mut());
        STANDARD.encode(key.as_ref())
    }

    #[must_use]
    pub fn current_key_id(&self) -> &KeyId {
        &self.current
    }

    /// Encrypts under the current key with a fresh random nonce.
    #[must_use]
    pub fn encrypt(&self, ad: &AssociatedData, secret: &SecretString) -> Vec<u8> {
        let key = &self.keys[&self.current];
        let cipher = cipher(key);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = ad.encode(&self.current);
        let sealed = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: secret.expose_secret().as_bytes(),
                    aad: &aad,
                },
            )
            // AES-SIV only fails for more than 126 header components; we always pass two.
            .expect("AES-SIV encryption with two header components cannot fail");
        let kid = self.current.0.as_bytes();
        let mut out = Vec::with_capacity(2 + kid.len() + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.push(u8::try_from(kid.len()).expect("key ids are at most 32 bytes"));
        out.extend_from_slice(kid);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a value produced by [`TokenVault::encrypt`] with the same associated data.
    pub fn decrypt(&self, ad: &AssociatedData, stored: &[u8]) -> Result<SecretString, VaultError> {
        let parsed = Parsed::from_bytes(stored)?;
        let key_id = KeyId(parsed.key_id.to_owned());
        let key = self
            .keys
            .get(&key_id)
            .ok_or_else(|| VaultError::UnknownKey {
                key_id: key_id.0.clone(),
            })?;
        let aad = ad.encode(&key_id);
        let plain = cipher(key)
            .decrypt(
                &Nonce::from(parsed.nonce),
                Payload {
                    msg: parsed.sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Authentication {
                key_id: key_id.0.clone(),
            })?;
        let plain = Zeroizing::new(plain);
        let text = std::str::from_utf8(&plain).map_err(|_| VaultError::NotUtf8)?;
        Ok(SecretString::from(text))
    }

    /// True when the value is not under the current key (or cannot be parsed at all), so the
    /// row should be decrypted and written back with [`TokenVault::encrypt`].
    #[must_use]
    pub fn needs_reencrypt(&self, stored: &[u8]) -> bool {
        Parsed::from_bytes(stored).map_or(true, |p| p.key_id != self.current.0)
    }
}

struct Parsed<'a> {
    key_id: &'a str,
    nonce: [u8; NONCE_LEN],
    sealed: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn from_bytes(stored: &'a [u8]) -> Result<Self, VaultError> {
        let (&version, rest) = stored.split_first().ok_or(VaultError::Malformed {
            reason: "empty value",
        })?;
        if version != VERSION {
            return Err(VaultError::UnsupportedVersion { version });
        }
        let (&kid_len, rest) = rest.split_first().ok_or(VaultError::Malformed {
            reason: "missing key id length",
        })?;
        let kid_len = usize::from(kid_len);
        if kid_len == 0 || rest.len() < kid_len + NONCE_LEN + TAG_LEN {
            return Err(VaultError::Malformed {
                reason: "value is shorter than its header says",
            });
        }
        let (kid, rest) = rest.split_at(kid_len);
        let key_id = std::str::from_utf8(kid).map_err(|_| VaultError::Malformed {
            reason: "key id is not UTF-8",
        })?;
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| VaultError::Malformed {
            reason: "truncated nonce",
        })?;
        Ok(Self {
            key_id,
            nonce,
            sealed,
        })
    }
}

fn cipher(key: &SecretBox<[u8; KEY_LEN]>) -> Aes256SivAead {
    Aes256SivAead::new_from_slice(key.expose_secret()).expect("keys are validated to be 64 bytes")
}

fn decode_key(b64: &str) -> Option<Zeroizing<Vec<u8>>> {
    [&STANDARD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .into_iter()
        .find_map(|engine| engine.decode(b64).ok())
        .map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec_ids: &[&str]) -> (String, Vec<String>) {
        let keys: Vec<String> = spec_ids
            .iter()
            .map(|_| TokenVault::generate_key())
            .collect();
        let spec = spec_ids
            .iter()
            .zip(&keys)
            .map(|(id, k)| format!("{id}:{k}"))
            .collect::<Vec<_>>()
            .join(",");
        (spec, keys)
    }

    fn ad(column: Column) -> (TenantId, AccountId, AssociatedData) {
        let tenant = TenantId::new();
        let account = AccountId::new();
        (
            tenant,
            account,
            AssociatedData::for_account(tenant, account, column),
        )
    }

    #[test]
    fn round_trip() {
        let vault = TokenVault::from_keyring(&ring(&["k1"]).0).unwrap();
        let (_, _, ad) = ad(Column::RefreshToken);
        let secret = SecretString::from("0.AX8A-refresh-token-ü");
        let stored = vault.encrypt(&ad, &secret);
        assert_eq!(stored[0], VERSION);
        assert_eq!(&stored[2..4], b"k1");
        let back = vault.decrypt(&ad, &stored).unwrap();
        assert_eq!(back.expose_secret(), secret.expose_secret());
        assert!(!vault.needs_reencrypt(&stored));
    }

    #[test]
    fn other_rows_associated_data_fails() {
        let vault = TokenVault::from_keyring(&ring(&["k1"]).0).unwrap();
        let (tenant, account, ad) = ad(Column::AccessToken);
        let stored = vault.encrypt(&ad, &SecretString::from("token"));
        for other in [
            AssociatedData::for_account(tenant, account, Column::RefreshToken),
            AssociatedData::for_account(tenant, AccountId::new(), Column::AccessToken),
            AssociatedData::for_account(TenantId::new(), account, Column::AccessToken),
            AssociatedData::for_owner(tenant, "oauth_state:1", Column::AccessToken),
        ] {
            let err = vault.decrypt(&other, &stored).unwrap_err();
            assert!(matches!(err, VaultError::Authentication { .. }), "{err}");
        }
    }

    #[test]
    fn unknown_key_id_fails_clearly() {
        let writer = TokenVault::from_keyring(&ring(&["old"]).0).unwrap();
        let reader = TokenVault::from_keyring(&ring(&["new"]).0).unwrap();
        let (_, _, ad) = ad(Column::AccessToken);
        let stored = writer.encrypt(&ad, &SecretString::from("token"));
        let err = reader.decrypt(&ad, &stored).unwrap_err();
        assert_eq!(
            err,
            VaultError::UnknownKey {
                key_id: "old".into()
            }
        );
        assert!(err.to_string().contains("`old`"));
        assert!(reader.needs_reencrypt(&stored));
    }

    #[test]
    fn same_key_id_with_different_key_fails_authentication() {
        let a = TokenVault::from_keyring(&ring(&["k1"]).0).unwrap();
        let b = TokenVault::from_keyring(&ring(&["k1"]).0).unwrap();
        let (_, _, ad) = ad(Column::AccessToken);
        let stored = a.encrypt(&ad, &SecretString::from("token"));
        assert!(matches!(
            b.decrypt(&ad, &stored),
            Err(VaultError::Authentication { .. })
        ));
    }

    #[test]
    fn encryptions_of_the_same_secret_differ() {
        let vault = TokenVault::from_keyring(&ring(&["k1"]).0).unwrap();
        let (_, _, ad) = ad(Column::CodeVerifier);
        let secret = SecretString::from("verifier");
        let one = vault.encrypt(&ad, &secret);
        let two = vault.encrypt(&ad, &secret);
        assert_ne!(one, two);
        assert_eq!(
            vault.decrypt(&ad, &two).unwrap().expose_secret(),
            "verifier"
        );
    }

    #[test]
    fn rotation_keeps_old_ciphertexts_readable() {
        let (old_spec, old_keys) = ring(&["k1"]);
        let old = TokenVault::from_keyring(&old_spec).unwrap();
        let (_, _, ad) = ad(Column::RefreshToken);
        let stored = old.encrypt(&ad, &SecretString::from("refresh"));

        let new_key = TokenVault::generate_key();
        let rotated =
            TokenVault::from_keyring(&format!("k2:{new_key}, k1:{}", old_keys[0])).unwrap();
        assert_eq!(rotated.current_key_id().as_str(), "k2");
        assert!(rotated.needs_reencrypt(&stored));
        let plain = rotated.decrypt(&ad, &stored).unwrap();
        assert_eq!(plain.expose_secret(), "refresh");
        let rewritten = rotated.encrypt(&ad, &plain);
        assert!(!rotated.needs_reencrypt(&rewritten));
        assert_eq!(&rewritten[2..4], b"k2");
    }

    #[test]
    fn tampering_and_truncation_are_refused() {
        let vault = TokenVault::from_keyring(&ring(&["k1"]).0).unwrap();
        let (_, _, ad) = ad(Column::AccessToken);
        let mut stored = vault.encrypt(&ad, &SecretString::from("token"));
        assert!(matches!(
            vault.decrypt(&ad, &stored[..10]),
            Err(VaultError::Malformed { .. })
        ));
        assert!(matches!(
            vault.decrypt(&ad, &[]),
            Err(VaultError::Malformed { .. })
        ));
        let last = stored.len() - 1;
        stored[last] ^= 1;
        assert!(matches!(
            vault.decrypt(&ad, &stored),
            Err(VaultError::Authentication { .. })
        ));
        stored[0] = 9;
        assert_eq!(
            vault.decrypt(&ad, &stored).err(),
            Some(VaultError::UnsupportedVersion { version: 9 })
        );
    }

    #[test]
    fn keyring_parsing_errors_and_debug_hide_keys() {
        assert!(matches!(
            TokenVault::from_keyring(" "),
            Err(KeyringError::Empty)
        ));
        assert!(matches!(
            TokenVault::from_keyring("nocolon"),
            Err(KeyringError::BadEntry { position: 1 })
        ));
        assert!(matches!(
            TokenVault::from_keyring("k1:!!!"),
            Err(KeyringError::BadBase64 { .. })
        ));
        assert!(matches!(
            TokenVault::from_keyring("k1:AAAA"),
            Err(KeyringError::BadLength { len: 3, .. })
        ));
        assert!(matches!(
            TokenVault::from_keyring("bad id:AAAA"),
            Err(KeyringError::BadKeyId { .. })
        ));
        let key = TokenVault::generate_key();
        assert!(matches!(
            TokenVault::from_keyring(&format!("k1:{key},k1:{key}")),
            Err(KeyringError::DuplicateKeyId { .. })
        ));
        let vault = TokenVault::from_keyring(&format!("k1:{key}")).unwrap();
        let debug = format!("{vault:?}");
        assert!(debug.contains("k1"));
        assert!(!debug.contains(&key));
        assert!(!debug.contains(&key[..12]));
    }
}
