//! `mcp-connect import mcp-remote <url>`: take over the client registration and tokens that
//! mcp-remote keeps for a server, so that a user who switches keeps their login.
//!
//! mcp-remote keeps its files in `$MCP_REMOTE_CONFIG_DIR` (else `~/.mcp-auth`), in one
//! directory per version (`mcp-remote-<version>/`), named by the MD5 of the server URL (joined
//! with `|` to the `--resource` and the JSON of the `--header`s with sorted names, when it was
//! given them): `<hash>_client_info.json` (the RFC 7591 registration) and `<hash>_tokens.json`.
//! The newest version's files win. Their contents are secrets: no error quotes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mcp_clock::{Clock as _, Timestamp};
use serde::Serialize;
use serde_json::Value;

use crate::client::{Client, Target};
use crate::error::Error;

/// What `import` took over.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ImportReport {
    /// The server URL.
    pub server: String,
    /// The mcp-remote directory the files came from.
    pub from: PathBuf,
    /// The imported client id.
    pub client_id: String,
    /// The issuer the credentials are now bound to (from the server's discovery).
    pub issuer: String,
    /// Whether a refresh token came along (without one the next expiry needs a login).
    pub has_refresh_token: bool,
}

/// mcp-remote's name for a server's files (`getServerUrlHash`).
///
/// ```
/// // printf '%s' 'https://mcp.example.com/mcp' | md5sum
/// assert_eq!(
///     mcp_connect::mcp_remote_hash("https://mcp.example.com/mcp", None, &[]),
///     "94baabe3c3fadb285b26c035e4e86046"
/// );
/// ```
pub fn mcp_remote_hash(url: &str, resource: Option<&str>, headers: &[(String, String)]) -> String {
    use md5::Digest as _;
    let mut parts = vec![url.to_owned()];
    if let Some(resource) = resource.filter(|r| !r.is_empty()) {
        parts.push(resource.to_owned());
    }
    if !headers.is_empty() {
        let sorted: BTreeMap<&str, &str> =
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        parts.push(serde_json::to_string(&sorted).unwrap_or_default());
    }
    let digest = md5::Md5::digest(parts.join("|").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// mcp-remote's configuration directory.
pub(crate) fn default_mcp_remote_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MCP_REMOTE_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".mcp-auth"))
}

/// The newest `mcp-remote-*` directory under `base` holding tokens named `hash`.
fn find_files(base: &Path, hashes: &[String]) -> Result<(PathBuf, String), Error> {
    let entries = std::fs::read_dir(base).map_err(|e| {
        Error::Usage(format!("cannot read the mcp-remote directory {}: {e}", base.display()))
    })?;
    let mut best: Option<(std::time::SystemTime, PathBuf, String)> = None;
    for dir in entries.flatten().map(|e| e.path()) {
        let named =
            dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("mcp-remote"));
        if !named || !dir.is_dir() {
            continue;
        }
        for hash in hashes {
            let tokens = dir.join(format!("{hash}_tokens.json"));
            if let Ok(modified) = std::fs::metadata(&tokens).and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(at, _, _)| modified > *at)
            {
                best = Some((modified, dir.clone(), hash.clone()));
            }
        }
    }
    best.map(|(_, dir, hash)| (dir, hash)).ok_or_else(|| {
        Error::Usage(format!(
            "mcp-remote has no tokens for this server under {} (looked for {}_tokens.json in mcp-remote-*/; give the same --header and --resource flags you gave mcp-remote)",
            base.display(),
            hashes.join("_tokens.json or ")
        ))
    })
}

/// A JSON object read from one of mcp-remote's files (errors name the file, never its text).
fn read_object(path: &Path) -> Result<serde_json::Map<String, Value>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", path.display())))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Error::Usage(format!("{} is not a JSON object", path.display()))),
    }
}

fn string(
    map: &serde_json::Map<String, Value>,
    field: &str,
    path: &Path,
) -> Result<Option<String>, Error> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => {
            Err(Error::Usage(format!("{}: {field} is not a non-empty string", path.display())))
        }
    }
}

impl Client {
    /// Import mcp-remote's client registration and tokens for `url` from `dir` (default
    /// `$MCP_REMOTE_CONFIG_DIR`, else `~/.mcp-auth`). The server's discovery binds them to its
    /// authorization server. Refuses to replace usable tokens already stored unless `force`.
    ///
    /// Stop mcp-remote for this server first: two programs redeeming one rotating refresh
    /// token would have the second refused.
    ///
    /// # Errors
    /// [`Error::Usage`] when nothing is found or a file is malformed, or usable tokens are
    /// stored; [`Error::Unreachable`] / [`Error::Authorization`] when discovery fails; store
    /// errors.
    pub async fn import_mcp_remote(
        &self,
        url: &str,
        dir: Option<&Path>,
        force: bool,
    ) -> Result<ImportReport, Error> {
        let target = self.target(url)?;
        let base = match dir {
            Some(dir) => dir.to_owned(),
            None => default_mcp_remote_dir().ok_or_else(|| {
                Error::Usage("no HOME or MCP_REMOTE_CONFIG_DIR: give --from DIR".into())
            })?,
        };
        let headers: Vec<(String, String)> = self.header_values();
        let resource = self.options().resource_override();
        let mut hashes = vec![mcp_remote_hash(url, resource, &headers)];
        let normalized = mcp_remote_hash(target.as_str(), resource, &headers);
        if !hashes.contains(&normalized) {
            hashes.push(normalized);
        }
        let (from, hash) = find_files(&base, &hashes)?;
        let tokens_path = from.join(format!("{hash}_tokens.json"));
        let client_path = from.join(format!("{hash}_client_info.json"));
        let tokens = read_object(&tokens_path)?;
        let client = read_object(&client_path)?;
        let access = string(&tokens, "access_token", &tokens_path)?
            .ok_or_else(|| Error::Usage(format!("{}: no access_token", tokens_path.display())))?;
        let refresh = string(&tokens, "refresh_token", &tokens_path)?;
        let client_id = string(&client, "client_id", &client_path)?
            .ok_or_else(|| Error::Usage(format!("{}: no client_id", client_path.display())))?;
        let secret = string(&client, "client_secret", &client_path)?;

        let stored = self.stored_pair(&target).await?;
        if !force && stored {
            return Err(Error::Usage(format!(
                "usable tokens for {} are already stored; `mcp-connect logout {}` first, or pass --force",
                target.as_str(),
                target.as_str()
            )));
        }
        let discovery = self.oauth().discover(&target.url, None).await.map_err(|e| {
            Error::Authorization(format!(
                "cannot find the authorization server of {}: {}",
                target.as_str(),
                crate::store::chain(&e)
            ))
        })?;
        let auth_method = match string(&client, "token_endpoint_auth_method", &client_path)? {
            Some(method) => {
                serde_json::from_value(Value::String(method.clone())).map_err(|_| {
                    Error::Usage(format!(
                        "{}: unknown token_endpoint_auth_method {method:?}",
                        client_path.display()
                    ))
                })?
            }
            None if secret.is_some() => mcp_oauth::TokenEndpointAuthMethod::ClientSecretBasic,
            None => mcp_oauth::TokenEndpointAuthMethod::None,
        };
        let registration = mcp_oauth::ClientRegistration {
            client_id: client_id.clone(),
            client_secret: secret.as_deref().map(mcp_oauth::ClientSecret::new),
            client_key: None,
            auth_method,
            source: mcp_oauth::RegistrationSource::Dynamic,
            issuer: discovery.issuer().to_owned(),
            client_secret_expires_at: client
                .get("client_secret_expires_at")
                .and_then(Value::as_u64),
        };
        let mut record = connection_factory::stored_client(&discovery, &registration);
        record.redirect_uris = client
            .get("redirect_uris")
            .and_then(Value::as_array)
            .map(|uris| uris.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();

        let mut response = token_storage::TokenResponse::bearer(access);
        // mcp-remote keeps `expires_in` as the server sent it: the access token lives that long
        // from when the file was written.
        if let Some(lifetime) = tokens.get("expires_in").and_then(Value::as_u64) {
            let written = std::fs::metadata(&tokens_path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(Timestamp::from_secs(0), |d| Timestamp::from_secs(d.as_secs()));
            let expires = written.saturating_add(Duration::from_secs(lifetime));
            response = response.expires_in(expires.saturating_since(self.clock().now()));
        }
        if let Some(refresh) = &refresh {
            response = response.refresh_token(refresh.clone());
        }
        if let Some(scope) = string(&tokens, "scope", &tokens_path)? {
            response = response.scope(scope);
        }
        self.storage()
            .store_client(&target.key, &record)
            .await
            .map_err(|e| crate::client::store_error(self.options().store(), &e))?;
        self.storage()
            .store(&target.key, discovery.issuer(), response)
            .await
            .map_err(|e| crate::client::store_error(self.options().store(), &e))?;
        self.events().record(
            &target.key,
            "import",
            format!("imported mcp-remote's client {client_id} and tokens from {}", from.display()),
        );
        Ok(ImportReport {
            server: target.as_str().to_owned(),
            from,
            client_id,
            issuer: discovery.issuer().to_owned(),
            has_refresh_token: refresh.is_some(),
        })
    }

    /// Whether usable tokens are stored for `target`.
    async fn stored_pair(&self, target: &Target) -> Result<bool, Error> {
        let tokens = self
            .storage()
            .tokens(&target.key)
            .await
            .map_err(|e| crate::client::store_error(self.options().store(), &e))?;
        Ok(tokens.is_some_and(|t| t.needs_authorization().is_none()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mcp-remote's `getServerUrlHash`: the md5 of the URL, joined with `|` to the resource and
    /// the headers' JSON with sorted names (the expected value from `md5sum`).
    #[test]
    fn the_hash_joins_resource_and_sorted_headers_like_mcp_remote() {
        // printf '%s' 'https://a/mcp|https://a|{"A":"1","B":"2"}' | md5sum
        assert_eq!(
            mcp_remote_hash(
                "https://a/mcp",
                Some("https://a"),
                &[("B".into(), "2".into()), ("A".into(), "1".into())]
            ),
            "09c8f976571169cf94ced60a54f68661"
        );
    }
}
