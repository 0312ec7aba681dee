//! DPoP proof checking (RFC 9449 §4.3), the one place the fixture servers (and tests' own
//! gates) judge a proof: [`DpopChecker`].

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use mcp_clock::Timestamp;
use p256::ecdsa::signature::Verifier as _;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::secret::random_token;

/// How far a proof's `iat` may be from the server's time, either way.
const IAT_WINDOW: Duration = Duration::from_secs(300);

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DpopRefusal {
    /// The proof is missing, malformed, badly signed, or names another request, token or
    /// time (`invalid_dpop_proof`); the text says what.
    Invalid(String),
    /// The proof is valid but lacks the server's current nonce (`use_dpop_nonce`): answer with
    /// the `DPoP-Nonce` header.
    UseNonce,
}

impl fmt::Display for DpopRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DpopRefusal::Invalid(why) => write!(f, "invalid DPoP proof: {why}"),
            DpopRefusal::UseNonce => f.write_str("the DPoP proof lacks the server's nonce"),
        }
    }
}

/// Checks DPoP proofs for one server: the signature with the embedded `jwk`, `typ`
/// `dpop+jwt`, `alg` ES256, `htm`, `htu`, `iat` within five minutes of the server's time,
/// `ath` when an access token goes with the request, a `jti` never seen before, and the
/// server's nonce (a random one per checker). Returns the key's RFC 7638 thumbprint, which a
/// bound token's `cnf.jkt` must equal.
///
/// ```
/// use mcp_fixtures::{DpopChecker, DpopRefusal};
/// use mcp_clock::Timestamp;
/// let checker = DpopChecker::new();
/// let refused = checker.check(None, "POST", "http://127.0.0.1:1/token", None, Timestamp::from_secs(1));
/// assert!(matches!(refused, Err(DpopRefusal::Invalid(_))));
/// assert!(checker.nonce().len() > 16);
/// ```
#[derive(Debug)]
pub struct DpopChecker {
    nonce: String,
    jtis: Mutex<HashSet<String>>,
}

impl Default for DpopChecker {
    fn default() -> Self {
        Self::new()
    }
}

fn json_part(part: &str) -> Option<Value> {
    serde_json::from_slice(&B64.decode(part).ok()?).ok()
}

fn invalid(why: impl Into<String>) -> DpopRefusal {
    DpopRefusal::Invalid(why.into())
}

impl DpopChecker {
    /// A checker with a fresh random nonce.
    pub fn new() -> Self {
        DpopChecker { nonce: random_token("nonce-"), jtis: Mutex::default() }
    }

    /// The nonce proofs must carry (sent in `DPoP-Nonce`).
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Check `proof` (the `DPoP` header, if any) for `method` on `url` at `now`, with the
    /// access token that goes with the request, if any. `Ok(thumbprint)` of the proof's key.
    ///
    /// # Errors
    /// [`DpopRefusal::Invalid`] for a missing or invalid proof (checked before the nonce, and
    /// a replayed `jti` after it); [`DpopRefusal::UseNonce`] for a valid proof without the
    /// current nonce.
    pub fn check(
        &self,
        proof: Option<&str>,
        method: &str,
        url: &str,
        access_token: Option<&str>,
        now: Timestamp,
    ) -> Result<String, DpopRefusal> {
        let proof = proof.ok_or_else(|| invalid("no DPoP proof"))?;
        let parts: Vec<&str> = proof.split('.').collect();
        let [h, c, sig] = parts[..] else { return Err(invalid("not a compact JWS")) };
        let header = json_part(h).ok_or_else(|| invalid("unreadable header"))?;
        let claims = json_part(c).ok_or_else(|| invalid("unreadable claims"))?;
        if header["typ"] != "dpop+jwt" {
            return Err(invalid(format!("typ {}", header["typ"])));
        }
        if header["alg"] != "ES256" {
            return Err(invalid(format!("alg {}", header["alg"])));
        }
        let jwk = &header["jwk"];
        if jwk.get("d").is_some() {
            return Err(invalid("the jwk carries a private key"));
        }
        let coord = |n: &str| jwk[n].as_str().and_then(|s| B64.decode(s).ok());
        let (Some(x), Some(y)) = (coord("x"), coord("y")) else {
            return Err(invalid("the jwk is not an EC key"));
        };
        if jwk["kty"] != "EC" || jwk["crv"] != "P-256" {
            return Err(invalid("the jwk is not a P-256 key"));
        }
        let sec1 = [&[4u8][..], &x, &y].concat();
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
            .map_err(|_| invalid("the jwk is not a point on P-256"))?;
        let signature = B64
            .decode(sig)
            .ok()
            .and_then(|s| p256::ecdsa::Signature::from_slice(&s).ok())
            .ok_or_else(|| invalid("unreadable signature"))?;
        key.verify(format!("{h}.{c}").as_bytes(), &signature)
            .map_err(|_| invalid("bad signature"))?;
        if claims["htm"] != method {
            return Err(invalid(format!("htm {} for a {method}", claims["htm"])));
        }
        if claims["htu"] != url {
            return Err(invalid(format!("htu {} for {url}", claims["htu"])));
        }
        let iat = claims["iat"].as_u64().ok_or_else(|| invalid("no iat"))?;
        if iat.abs_diff(now.as_secs()) > IAT_WINDOW.as_secs() {
            return Err(invalid(format!("iat {iat} is too far from {}", now.as_secs())));
        }
        match access_token {
            Some(token) if claims["ath"] != B64.encode(Sha256::digest(token.as_bytes())) => {
                return Err(invalid("ath does not match the access token"));
            }
            None if claims.get("ath").is_some() => return Err(invalid("ath without a token")),
            _ => {}
        }
        let jti =
            claims["jti"].as_str().filter(|j| !j.is_empty()).ok_or_else(|| invalid("no jti"))?;
        if claims["nonce"] != self.nonce.as_str() {
            return Err(DpopRefusal::UseNonce);
        }
        if !self.jtis.lock().unwrap_or_else(|e| e.into_inner()).insert(jti.to_owned()) {
            return Err(invalid("a replayed jti"));
        }
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            B64.encode(&x),
            B64.encode(&y)
        );
        Ok(B64.encode(Sha256::digest(canonical.as_bytes())))
    }
}
