//! Encryption at rest: [`KeyProvider`], [`Keyring`], [`EncryptionKey`], and the sealed-record
//! format.
//!
//! A sealed record is
//!
//! ```text
//! "MTS" 0x02 | generation (8 bytes, big-endian) | key-id length (1 byte) | key id | nonce (24 bytes) | XChaCha20-Poly1305 ciphertext + tag
//! ```
//!
//! The associated data is the record's store key (tenant, user, server, record kind) followed
//! by the header, so a record copied under another key, re-labelled with another key id, or
//! given another generation fails authentication. The generation grows with every write of a
//! token record, so a reader that has seen generation `g` refuses an older sealed blob written
//! back under the same name ([`DecryptFailure::RolledBack`](crate::DecryptFailure)). Records of
//! the first format (`"MTS" 0x01`, without a generation) still open, as generation 0.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};

use crate::Error;
use crate::error::DecryptFailure;

const MAGIC_V1: &[u8; 4] = b"MTS\x01";
const MAGIC: &[u8; 4] = b"MTS\x02";
const GENERATION_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// One 256-bit data key. `Debug` prints no key material.
///
/// ```
/// let key = token_storage::EncryptionKey::from_bytes([7; 32]);
/// assert_eq!(format!("{key:?}"), "EncryptionKey([redacted])");
/// ```
#[derive(Clone)]
pub struct EncryptionKey {
    cipher: XChaCha20Poly1305,
}

impl EncryptionKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EncryptionKey { cipher: XChaCha20Poly1305::new(&bytes.into()) }
    }

    /// A key from 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, Error> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return Err(key_error(format!("a key is 64 hex digits, got {} characters", hex.len())));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16)
                .map_err(|_| key_error("a key is 64 hex digits; found a non-hex character"))?;
        }
        Ok(EncryptionKey::from_bytes(bytes))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

fn key_error(message: impl Into<String>) -> Error {
    Error::KeyProvider { message: message.into() }
}

/// Where the data keys come from. New records are sealed with the current key; records sealed
/// with an older key stay readable while the provider still has that key id, so keys rotate
/// without a migration.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// The id of the key new records are sealed with.
    fn current_key_id(&self) -> &str;

    /// The key with `id`, if this provider has it.
    fn key(&self, id: &str) -> Option<&EncryptionKey>;
}

/// A [`KeyProvider`] holding named keys in memory: from an environment variable, a key file or
/// the caller.
///
/// The text form (environment variable or file) is a list of `id:hex` entries separated by
/// commas or new lines; the first is the current key, the rest stay readable. A bare 64-digit
/// hex key is the key with id `default`. Lines starting with `#` are comments.
///
/// ```
/// use token_storage::{KeyProvider, Keyring};
///
/// let k2 = "22".repeat(32);
/// let k1 = "11".repeat(32);
/// let keys = Keyring::parse(&format!("k2:{k2}, k1:{k1}"))?;
/// assert_eq!(keys.current_key_id(), "k2");
/// assert!(keys.key("k1").is_some());
/// # Ok::<(), token_storage::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Keyring {
    current: String,
    keys: HashMap<String, EncryptionKey>,
}

impl Keyring {
    /// A keyring with one key, `id`, current.
    pub fn new(id: impl Into<String>, key: EncryptionKey) -> Result<Self, Error> {
        let id = id.into();
        check_id(&id)?;
        Ok(Keyring { keys: HashMap::from([(id.clone(), key)]), current: id })
    }

    /// Add an older key that stays readable (the current key does not change).
    pub fn with_old_key(
        mut self,
        id: impl Into<String>,
        key: EncryptionKey,
    ) -> Result<Self, Error> {
        let id = id.into();
        check_id(&id)?;
        if self.keys.contains_key(&id) {
            return Err(key_error(format!("key id {id:?} given twice")));
        }
        self.keys.insert(id, key);
        Ok(self)
    }

    /// Parse the text form (see the type's docs).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut ring: Option<Keyring> = None;
        for entry in
            text.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(|l| l.split(','))
        {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let (id, hex) = entry.split_once(':').unwrap_or(("default", entry));
            let key = EncryptionKey::from_hex(hex)?;
            ring = Some(match ring {
                None => Keyring::new(id.trim(), key)?,
                Some(ring) => ring.with_old_key(id.trim(), key)?,
            });
        }
        ring.ok_or_else(|| key_error("no keys given"))
    }

    /// Read the keys from the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Self, Error> {
        let text = std::env::var(var)
            .map_err(|e| key_error(format!("environment variable {var}: {e}")))?;
        Keyring::parse(&text).map_err(|e| key_error(format!("environment variable {var}: {e}")))
    }

    /// Read the keys from the file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| key_error(format!("key file {}: {e}", path.display())))?;
        Keyring::parse(&text).map_err(|e| key_error(format!("key file {}: {e}", path.display())))
    }
}

fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty()
        || id.len() > 255
        || id.chars().any(|c| c.is_whitespace() || c == ':' || c == ',')
    {
        return Err(key_error(format!(
            "key id {id:?} must be 1 to 255 bytes without spaces, ':' or ','"
        )));
    }
    Ok(())
}

impl KeyProvider for Keyring {
    fn current_key_id(&self) -> &str {
        &self.current
    }

    fn key(&self, id: &str) -> Option<&EncryptionKey> {
        self.keys.get(id)
    }
}

fn aad(record: &str, header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(record.len() + 1 + header.len());
    aad.extend_from_slice(record.as_bytes());
    aad.push(0);
    aad.extend_from_slice(header);
    aad
}

/// Seal `plaintext` as the record stored under `record` (generation 0).
pub(crate) fn seal(
    keys: &dyn KeyProvider,
    record: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    seal_generation(keys, record, 0, plaintext)
}

/// Seal `plaintext` as generation `generation` of the record stored under `record`.
pub(crate) fn seal_generation(
    keys: &dyn KeyProvider,
    record: &str,
    generation: u64,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let id = keys.current_key_id();
    let key =
        keys.key(id).ok_or_else(|| key_error(format!("the current key id {id:?} has no key")))?;
    let id_len = u8::try_from(id.len()).map_err(|_| key_error("key id longer than 255 bytes"))?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce)
        .map_err(|e| key_error(format!("no randomness for a nonce: {e}")))?;
    let mut out =
        Vec::with_capacity(5 + GENERATION_LEN + id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&generation.to_be_bytes());
    out.push(id_len);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&nonce);
    let aad = aad(record, &out);
    let ciphertext = key
        .cipher
        .encrypt(&nonce.into(), Payload { msg: plaintext, aad: &aad })
        .map_err(|_| key_error("encryption failed"))?;
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Open a record sealed by [`seal`] under the same `record` key.
pub(crate) fn open(keys: &dyn KeyProvider, record: &str, sealed: &[u8]) -> Result<Vec<u8>, Error> {
    open_generation(keys, record, sealed).map(|(plain, _)| plain)
}

/// Open a record sealed by [`seal_generation`] under the same `record` key: its plaintext and
/// its (authenticated) generation.
pub(crate) fn open_generation(
    keys: &dyn KeyProvider,
    record: &str,
    sealed: &[u8],
) -> Result<(Vec<u8>, u64), Error> {
    let fail = |reason| Error::Decrypt { record: record.to_owned(), reason };
    if sealed.len() < MAGIC.len() + 1 {
        return Err(fail(if MAGIC.starts_with(sealed) || MAGIC_V1.starts_with(sealed) {
            DecryptFailure::Truncated
        } else {
            DecryptFailure::UnknownFormat
        }));
    }
    let (generation, rest) = match &sealed[..4] {
        m if m == MAGIC => {
            let Some(bytes) = sealed.get(4..4 + GENERATION_LEN) else {
                return Err(fail(DecryptFailure::Truncated));
            };
            let bytes: [u8; GENERATION_LEN] =
                bytes.try_into().map_err(|_| fail(DecryptFailure::Truncated))?;
            (u64::from_be_bytes(bytes), 4 + GENERATION_LEN)
        }
        m if m == MAGIC_V1 => (0, 4),
        _ => return Err(fail(DecryptFailure::UnknownFormat)),
    };
    let Some(&id_len) = sealed.get(rest) else { return Err(fail(DecryptFailure::Truncated)) };
    let id_len = usize::from(id_len);
    if id_len == 0 {
        return Err(fail(DecryptFailure::MissingKeyId));
    }
    let id_start = rest + 1;
    let header_len = id_start + id_len + NONCE_LEN;
    if sealed.len() < header_len + TAG_LEN {
        return Err(fail(DecryptFailure::Truncated));
    }
    let id = std::str::from_utf8(&sealed[id_start..id_start + id_len])
        .map_err(|_| fail(DecryptFailure::Authentication))?;
    let key = keys.key(id).ok_or_else(|| fail(DecryptFailure::UnknownKeyId(id.to_owned())))?;
    let nonce: [u8; NONCE_LEN] = sealed[id_start + id_len..header_len]
        .try_into()
        .map_err(|_| fail(DecryptFailure::Truncated))?;
    let aad = aad(record, &sealed[..header_len]);
    let plain = key
        .cipher
        .decrypt(&nonce.into(), Payload { msg: &sealed[header_len..], aad: &aad })
        .map_err(|_| fail(DecryptFailure::Authentication))?;
    Ok((plain, generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(id: &str, byte: u8) -> Keyring {
        Keyring::new(id, EncryptionKey::from_bytes([byte; 32])).unwrap()
    }

    fn reason(e: Error) -> DecryptFailure {
        match e {
            Error::Decrypt { reason, .. } => reason,
            other => panic!("expected a decrypt error, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_and_ciphertext_hides_the_plaintext() {
        let keys = ring("k1", 1);
        let sealed = seal(&keys, "rec", b"top secret token").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(open(&keys, "rec", &sealed).unwrap(), b"top secret token");
        // Fresh nonce every time.
        assert_ne!(sealed, seal(&keys, "rec", b"top secret token").unwrap());
    }

    #[test]
    fn a_record_moved_under_another_key_fails() {
        let keys = ring("k1", 1);
        let sealed = seal(&keys, "t/alice/github/tokens", b"x").unwrap();
        assert_eq!(
            reason(open(&keys, "t/mallory/github/tokens", &sealed).unwrap_err()),
            DecryptFailure::Authentication
        );
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let keys = ring("k1", 1);
        let sealed = seal(&keys, "rec", b"payload").unwrap();
        // Truncated anywhere.
        for len in [0, 3, 5, 20, sealed.len() - 1] {
            let r = reason(open(&keys, "rec", &sealed[..len]).unwrap_err());
            assert!(
                matches!(r, DecryptFailure::Truncated | DecryptFailure::Authentication),
                "len {len}: {r:?}"
            );
        }
        // Every single-bit flip is caught.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(open(&keys, "rec", &bad).is_err(), "flip at {i} went unnoticed");
        }
        // Wrong key under the same id.
        assert_eq!(
            reason(open(&ring("k1", 2), "rec", &sealed).unwrap_err()),
            DecryptFailure::Authentication
        );
        // Unknown key id.
        assert_eq!(
            reason(open(&ring("k9", 1), "rec", &sealed).unwrap_err()),
            DecryptFailure::UnknownKeyId("k1".into())
        );
        // Missing key id.
        let mut no_id = sealed[..12].to_vec();
        no_id.push(0);
        no_id.extend_from_slice(&sealed[15..]);
        assert_eq!(reason(open(&keys, "rec", &no_id).unwrap_err()), DecryptFailure::MissingKeyId);
        // Not ours at all.
        assert_eq!(
            reason(open(&keys, "rec", b"{\"access_token\":1}").unwrap_err()),
            DecryptFailure::UnknownFormat
        );
    }

    /// The generation is authenticated: relabelling a record with another generation fails,
    /// and a record of the first format (no generation) still opens, as generation 0.
    #[test]
    fn the_generation_is_bound_and_old_records_open_as_generation_0() {
        let keys = ring("k1", 1);
        let sealed = seal_generation(&keys, "rec", 7, b"payload").unwrap();
        assert_eq!(open_generation(&keys, "rec", &sealed).unwrap(), (b"payload".to_vec(), 7));
        let mut relabelled = sealed.clone();
        relabelled[4..12].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            reason(open_generation(&keys, "rec", &relabelled).unwrap_err()),
            DecryptFailure::Authentication
        );
        // The first format: MTS 0x01 | id length | id | nonce | ciphertext.
        let mut v1 = MAGIC_V1.to_vec();
        v1.push(2);
        v1.extend_from_slice(b"k1");
        v1.extend_from_slice(&[3; NONCE_LEN]);
        let aad = aad("rec", &v1);
        let key = keys.key("k1").unwrap();
        let ct =
            key.cipher.encrypt(&[3; NONCE_LEN].into(), Payload { msg: b"old", aad: &aad }).unwrap();
        v1.extend_from_slice(&ct);
        assert_eq!(open_generation(&keys, "rec", &v1).unwrap(), (b"old".to_vec(), 0));
    }

    #[test]
    fn rotation_keeps_old_records_readable() {
        let old = ring("k1", 1);
        let sealed = seal(&old, "rec", b"v").unwrap();
        let rotated = Keyring::new("k2", EncryptionKey::from_bytes([2; 32]))
            .unwrap()
            .with_old_key("k1", EncryptionKey::from_bytes([1; 32]))
            .unwrap();
        assert_eq!(open(&rotated, "rec", &sealed).unwrap(), b"v");
        let resealed = seal(&rotated, "rec", b"v").unwrap();
        assert_eq!(&resealed[13..15], b"k2");
        assert!(open(&old, "rec", &resealed).is_err());
    }

    #[test]
    fn key_text_forms() {
        let hex = "ab".repeat(32);
        assert_eq!(Keyring::parse(&hex).unwrap().current_key_id(), "default");
        let two =
            Keyring::parse(&format!("# rotated\nnew:{}\nold:{hex}\n", "cd".repeat(32))).unwrap();
        assert_eq!(two.current_key_id(), "new");
        assert!(two.key("old").is_some());
        for bad in [
            "",
            "k:abc",
            &format!("k:{}", "zz".repeat(32)),
            &format!("a b:{hex}"),
            &format!("k:{hex},k:{hex}"),
        ] {
            assert!(matches!(Keyring::parse(bad), Err(Error::KeyProvider { .. })), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("file:{hex}\n")).unwrap();
        assert_eq!(Keyring::from_file(&path).unwrap().current_key_id(), "file");
        assert!(Keyring::from_file(dir.path().join("absent")).is_err());
        assert!(Keyring::from_env("TOKEN_STORAGE_TEST_SURELY_UNSET_VAR").is_err());
    }
}
