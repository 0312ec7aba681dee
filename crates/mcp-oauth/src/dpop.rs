//! DPoP (RFC 9449, SEP-1932): an ES256 key whose proofs bind tokens to the client.
//!
//! A [`DpopKey`] signs one proof per HTTP request (`typ` `dpop+jwt`, the public key as `jwk`,
//! claims `jti`, `htm`, `htu` without query or fragment, `iat`, and `ath` when an access token
//! goes with the request). It remembers the latest `DPoP-Nonce` each server (origin) sent, and
//! puts it in later proofs for that server. [`OAuthClient::with_dpop`] sends a proof with
//! every token request, retries once with the server's nonce on `use_dpop_nonce`, and accepts
//! `token_type` `DPoP` only then.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use mcp_clock::Timestamp;
use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};
use sha2::{Digest, Sha256};
use url::Url;

use crate::client::OAuthClient;
use crate::error::{Error, Result};
use crate::secret::{PrivateKeyPem, random_urlsafe};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

struct Inner {
    key: p256::ecdsa::SigningKey,
    /// The public key as a JWK with its members in RFC 7638 order.
    jwk: serde_json::Value,
    thumbprint: String,
    /// The latest `DPoP-Nonce` per origin.
    nonces: Mutex<HashMap<String, String>>,
}

/// An ES256 DPoP key (RFC 9449). Cheap to clone (clones share the key and the nonces).
///
/// `Debug` shows the key's thumbprint only.
///
/// ```
/// use mcp_oauth::DpopKey;
/// use mcp_clock::Timestamp;
/// let key = DpopKey::generate().unwrap();
/// let url = "https://mcp.example.com/mcp?x=1".parse().unwrap();
/// let proof = key.proof("POST", &url, Some("access-token"), Timestamp::from_secs(1_800_000_000)).unwrap();
/// assert_eq!(proof.split('.').count(), 3);
/// let again = DpopKey::from_pkcs8_pem(&key.to_pkcs8_pem().unwrap()).unwrap();
/// assert_eq!(again.thumbprint(), key.thumbprint());
/// ```
#[derive(Clone)]
pub struct DpopKey(Arc<Inner>);

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey").field("thumbprint", &self.0.thumbprint).finish_non_exhaustive()
    }
}

/// The origin a nonce belongs to.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// `url` without query and fragment (RFC 9449 §4.2 `htu`).
fn htu(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// The base64url SHA-256 of an access token (`ath`).
pub(crate) fn ath(access_token: &str) -> String {
    B64.encode(Sha256::digest(access_token.as_bytes()))
}

impl DpopKey {
    /// A new random key.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the operating system's random source fails.
    pub fn generate() -> Result<Self> {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| Error::InvalidConfig(format!("no randomness for a DPoP key: {e}")))?;
            // A value outside the curve order (probability ~2^-128) is drawn again.
            if let Ok(key) = p256::ecdsa::SigningKey::from_bytes(&bytes.into()) {
                return Ok(Self::from_signing_key(key));
            }
        }
    }

    /// The key in `pem` (PKCS#8, P-256), as [`DpopKey::to_pkcs8_pem`] wrote it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when it is not a PKCS#8 P-256 private key.
    pub fn from_pkcs8_pem(pem: &PrivateKeyPem) -> Result<Self> {
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(pem.secret()).map_err(|e| {
            Error::InvalidConfig(format!("the DPoP key is not a PKCS#8 P-256 key: {e}"))
        })?;
        Ok(Self::from_signing_key(key))
    }

    /// The private key as PKCS#8 PEM, to keep it (sealed) across restarts.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if encoding fails.
    pub fn to_pkcs8_pem(&self) -> Result<PrivateKeyPem> {
        let pem = self
            .0
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| Error::InvalidConfig(format!("cannot encode the DPoP key: {e}")))?;
        Ok(PrivateKeyPem::new(pem.as_str()))
    }

    fn from_signing_key(key: p256::ecdsa::SigningKey) -> Self {
        let point = key.verifying_key().to_sec1_point(false);
        let (x, y) = (
            B64.encode(point.x().map_or(&[][..], |x| &x[..])),
            B64.encode(point.y().map_or(&[][..], |y| &y[..])),
        );
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = B64.encode(Sha256::digest(canonical.as_bytes()));
        let jwk = serde_json::json!({"crv": "P-256", "kty": "EC", "x": x, "y": y});
        DpopKey(Arc::new(Inner { key, jwk, thumbprint, nonces: Mutex::new(HashMap::new()) }))
    }

    /// The RFC 7638 JWK SHA-256 thumbprint (`cnf.jkt` of the tokens bound to this key).
    pub fn thumbprint(&self) -> &str {
        &self.0.thumbprint
    }

    /// Remember the `DPoP-Nonce` a server sent (for later proofs to that origin).
    pub fn remember_nonce(&self, url: &Url, nonce: &str) {
        let mut nonces = self.0.nonces.lock().unwrap_or_else(PoisonError::into_inner);
        nonces.insert(origin(url), nonce.to_owned());
    }

    /// The nonce remembered for `url`'s origin.
    pub fn nonce(&self, url: &Url) -> Option<String> {
        self.0.nonces.lock().unwrap_or_else(PoisonError::into_inner).get(&origin(url)).cloned()
    }

    /// A fresh proof for `method` on `url` at `now`, with `ath` for `access_token` and the
    /// nonce remembered for the origin.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if signing fails.
    pub fn proof(
        &self,
        method: &str,
        url: &Url,
        access_token: Option<&str>,
        now: Timestamp,
    ) -> Result<String> {
        let header = serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.0.jwk});
        let mut claims = serde_json::json!({
            "jti": random_urlsafe(16),
            "htm": method,
            "htu": htu(url),
            "iat": now.as_secs(),
        });
        if let Some(token) = access_token {
            claims["ath"] = ath(token).into();
        }
        if let Some(nonce) = self.nonce(url) {
            claims["nonce"] = nonce.into();
        }
        let input =
            format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let signature: p256::ecdsa::Signature = self.0.key.sign(input.as_bytes());
        Ok(format!("{input}.{}", B64.encode(signature.to_bytes())))
    }
}

impl OAuthClient {
    /// This client with `key`: every token request (code, refresh, client credentials,
    /// jwt-bearer) carries a DPoP proof, a `use_dpop_nonce` answer is retried once with the
    /// server's nonce, and a `DPoP` token type is accepted.
    pub fn with_dpop(mut self, key: DpopKey) -> Self {
        self.dpop = Some(key);
        self
    }

    /// The DPoP key set with [`OAuthClient::with_dpop`].
    pub fn dpop(&self) -> Option<&DpopKey> {
        self.dpop.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier as _;

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
    }

    /// A proof names the request (`htm`, `htu` without query or fragment), the time, a fresh
    /// `jti`, the token hash and the remembered nonce, and verifies with the `jwk` it carries.
    #[test]
    fn proofs_are_fresh_signed_and_carry_the_request() {
        let key = DpopKey::generate().unwrap();
        let url: Url = "https://rs.example.com/mcp?q=1#f".parse().unwrap();
        let a = key.proof("POST", &url, Some("tok"), Timestamp::from_secs(1000)).unwrap();
        let b = key.proof("POST", &url, Some("tok"), Timestamp::from_secs(1000)).unwrap();
        let parts: Vec<&str> = a.split('.').collect();
        let (header, claims) = (decode(parts[0]), decode(parts[1]));
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert!(header["jwk"].get("d").is_none(), "no private part");
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://rs.example.com/mcp");
        assert_eq!(claims["iat"], 1000);
        assert_eq!(claims["ath"], ath("tok"));
        assert!(claims.get("nonce").is_none());
        assert_ne!(claims["jti"], decode(b.split('.').nth(1).unwrap())["jti"]);

        let x = B64.decode(header["jwk"]["x"].as_str().unwrap()).unwrap();
        let y = B64.decode(header["jwk"]["y"].as_str().unwrap()).unwrap();
        let mut sec1 = vec![4u8];
        sec1.extend(x);
        sec1.extend(y);
        let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&B64.decode(parts[2]).unwrap()).unwrap();
        verifying.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig).unwrap();

        key.remember_nonce(&url, "n-1");
        let with_nonce = key.proof("GET", &url, None, Timestamp::from_secs(1)).unwrap();
        let claims = decode(with_nonce.split('.').nth(1).unwrap());
        assert_eq!(claims["nonce"], "n-1");
        assert!(claims.get("ath").is_none());
        let other: Url = "https://as.example.com/token".parse().unwrap();
        let claims = decode(
            key.proof("POST", &other, None, Timestamp::from_secs(1))
                .unwrap()
                .split('.')
                .nth(1)
                .unwrap(),
        );
        assert!(claims.get("nonce").is_none(), "nonces are per origin");
    }

    /// The thumbprint is the SHA-256 of RFC 7638's canonical form of the EC public key, and
    /// the key survives a PEM round trip with the same thumbprint.
    #[test]
    fn the_thumbprint_is_rfc7638_and_the_key_round_trips() {
        let key = DpopKey::generate().unwrap();
        let jwk = &key.0.jwk;
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(key.thumbprint(), B64.encode(Sha256::digest(canonical.as_bytes())));
        let pem = key.to_pkcs8_pem().unwrap();
        assert_eq!(DpopKey::from_pkcs8_pem(&pem).unwrap().thumbprint(), key.thumbprint());
        assert!(!format!("{key:?} {pem:?}").contains("PRIVATE"));
        assert!(DpopKey::from_pkcs8_pem(&PrivateKeyPem::new("nope")).is_err());
    }
}
