//! DPoP (RFC 9449) for the factory: the one key per (tenant, user, server), kept sealed in
//! token storage next to the tokens, and when it is used.
//!
//! The choice is automatic: a key is made (once, at the first code exchange) when the
//! authorization server's metadata advertises ES256 in `dpop_signing_alg_values_supported`,
//! and then every grant for that key carries a proof. A server that does not advertise DPoP
//! keeps Bearer tokens. Tokens the server issued as `DPoP` are presented only with their key:
//! the refresh token at the token endpoint, the access token on every MCP request.

use mcp_oauth::{Discovery, DpopKey, PrivateKeyPem};
use token_storage::{Secret, TokenKey, TokenStorage};

use crate::error::Error;

/// Whether a `token_type` is DPoP's.
pub(crate) fn is_dpop(token_type: &str) -> bool {
    token_type.eq_ignore_ascii_case("dpop")
}

/// The key in a stored PKCS#8 PEM.
pub(crate) fn decode(pem: &Secret) -> Result<DpopKey, mcp_oauth::Error> {
    DpopKey::from_pkcs8_pem(&PrivateKeyPem::from(pem.clone()))
}

/// The DPoP key stored for `key`, if any.
pub(crate) async fn stored(
    storage: &TokenStorage,
    key: &TokenKey,
) -> Result<Option<DpopKey>, Error> {
    let pem = storage.dpop_key(key).await.map_err(|e| Error::store("reading the DPoP key", e))?;
    pem.map(|pem| decode(&pem).map_err(|e| Error::provider("reading the DPoP key", e))).transpose()
}

/// The key the grants for `key` are bound to when `discovery`'s server takes DPoP: the stored
/// one, else a new one stored first (concurrent first uses get the one stored). `None` when the
/// server does not advertise DPoP with ES256.
pub(crate) async fn for_grants(
    storage: &TokenStorage,
    key: &TokenKey,
    discovery: &Discovery,
) -> Result<Option<DpopKey>, Error> {
    if !discovery.authorization_server.supports_dpop_es256() {
        return Ok(None);
    }
    if let Some(stored) = stored(storage, key).await? {
        return Ok(Some(stored));
    }
    let fresh = DpopKey::generate().map_err(|e| Error::provider("making a DPoP key", e))?;
    let pem = fresh.to_pkcs8_pem().map_err(|e| Error::provider("encoding the DPoP key", e))?;
    let kept = storage
        .dpop_key_or_insert(key, pem.into_secret())
        .await
        .map_err(|e| Error::store("storing the DPoP key", e))?;
    decode(&kept).map(Some).map_err(|e| Error::provider("reading the DPoP key", e))
}
