//! Workload identity federation (SEP-1933): the RFC 7523 JWT-bearer grant with an assertion
//! the platform hands the workload (a Kubernetes projected service-account token, a cloud
//! provider's identity token), read from a file or an environment variable.
//!
//! The platform rotates the file in place (often by swapping a symlink), so the assertion is
//! read again whenever the file's modification time or length changes; an unchanged file is
//! served from memory. A failed grant is returned as it is: no retry, no other grant.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::client::OAuthClient;
use crate::discovery::Discovery;
use crate::error::{Error, Result};
use crate::registration::ClientRegistration;
use crate::secret::IdToken;
use crate::token::TokenResponse;

/// The RFC 7523 grant type.
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Env(String),
    Fixed(IdToken),
}

/// A file's identity as far as rotation is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Where a workload's JWT assertion comes from.
///
/// `Debug` shows the source (a path or a variable name), never the assertion.
///
/// ```
/// use mcp_oauth::WorkloadIdentity;
/// let dir = std::env::temp_dir().join(format!("wif-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("token");
/// std::fs::write(&path, "eyJ.first.jwt\n").unwrap();
/// let identity = WorkloadIdentity::from_file(&path);
/// assert_eq!(identity.assertion().unwrap().secret(), "eyJ.first.jwt");
/// std::fs::write(&path, "eyJ.second.jwt-rotated").unwrap();
/// assert_eq!(identity.assertion().unwrap().secret(), "eyJ.second.jwt-rotated");
/// assert!(!format!("{identity:?}").contains("eyJ"));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Debug)]
pub struct WorkloadIdentity {
    source: Source,
    cached: Mutex<Option<(FileStamp, IdToken)>>,
}

impl WorkloadIdentity {
    /// The assertion in the file at `path` (surrounding whitespace ignored), read again when
    /// the file changes.
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        Self::with(Source::File(path.into()))
    }

    /// The assertion in the environment variable `name`, read on every grant.
    pub fn from_env(name: impl Into<String>) -> Self {
        Self::with(Source::Env(name.into()))
    }

    /// A fixed assertion (handed over by a host or a test).
    pub fn fixed(assertion: IdToken) -> Self {
        Self::with(Source::Fixed(assertion))
    }

    fn with(source: Source) -> Self {
        WorkloadIdentity { source, cached: Mutex::new(None) }
    }

    /// The current assertion.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the file or variable is missing or empty (the message names the
    /// source, not its content).
    pub fn assertion(&self) -> Result<IdToken> {
        let value = match &self.source {
            Source::Fixed(token) => return Ok(token.clone()),
            Source::Env(name) => std::env::var(name).map_err(|_| {
                Error::InvalidConfig(format!("the workload identity variable {name} is not set"))
            })?,
            Source::File(path) => {
                let unreadable = |e: std::io::Error| {
                    Error::InvalidConfig(format!(
                        "cannot read the workload identity file {}: {}",
                        path.display(),
                        e.kind()
                    ))
                };
                let meta = std::fs::metadata(path).map_err(unreadable)?;
                let stamp = FileStamp { modified: meta.modified().ok(), len: meta.len() };
                let mut cached =
                    self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some((seen, token)) = cached.as_ref()
                    && *seen == stamp
                    && stamp.modified.is_some()
                {
                    return Ok(token.clone());
                }
                let value = std::fs::read_to_string(path).map_err(unreadable)?;
                let token = IdToken::new(value.trim());
                if token.secret().is_empty() {
                    return Err(Error::InvalidConfig(format!(
                        "the workload identity file {} is empty",
                        path.display()
                    )));
                }
                *cached = Some((stamp, token.clone()));
                return Ok(token);
            }
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(Error::InvalidConfig("the workload identity assertion is empty".into()));
        }
        Ok(IdToken::new(value))
    }
}

impl OAuthClient {
    /// The RFC 7523 JWT-bearer grant (SEP-1933 workload identity): the workload's current
    /// assertion as `assertion`, with `scope` when given and the discovery's `resource`,
    /// authenticated as `registration` (typically a public client, `none`).
    ///
    /// An error response is returned as it is (`invalid_grant`, `invalid_scope`,
    /// `unauthorized_client`, ...): the grant is not retried and no other grant is tried.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the assertion cannot be read; the token endpoint's errors.
    pub async fn jwt_bearer(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        identity: &WorkloadIdentity,
        scope: Option<&str>,
    ) -> Result<TokenResponse> {
        let assertion = identity.assertion()?;
        let mut form = vec![
            ("grant_type", JWT_BEARER.to_owned()),
            ("assertion", assertion.secret().to_owned()),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope.to_owned()));
        }
        form.push(("resource", discovery.resource.clone()));
        self.token_request(discovery, registration, form).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{discovery, json, mock};
    use crate::{RegistrationSource, TokenEndpointAuthMethod};

    fn public_client() -> ClientRegistration {
        ClientRegistration {
            client_id: "workload".into(),
            client_secret: None,
            client_key: None,
            auth_method: TokenEndpointAuthMethod::None,
            source: RegistrationSource::PreRegistered,
            issuer: "https://as.example.com".into(),
            client_secret_expires_at: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mcp-oauth-wif-{name}-{}-{}",
            std::process::id(),
            crate::secret::random_urlsafe(6)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The grant carries the assertion, the scope and the resource, and a rotated file is
    /// read again: the second grant sends the new assertion.
    #[tokio::test]
    async fn the_grant_sends_the_current_assertion_of_a_rotating_file() {
        let m = mock(|_| json(serde_json::json!({"access_token": "at", "token_type": "Bearer"})));
        let d = discovery(serde_json::json!({}));
        let dir = temp_dir("rotate");
        let path = dir.join("token");
        std::fs::write(&path, "jwt-one\n").unwrap();
        let identity = WorkloadIdentity::from_file(&path);
        m.client.jwt_bearer(&d, &public_client(), &identity, Some("mcp:tools")).await.unwrap();
        let sent = m.log.last();
        assert_eq!(sent.form_value("grant_type").as_deref(), Some(JWT_BEARER));
        assert_eq!(sent.form_value("assertion").as_deref(), Some("jwt-one"));
        assert_eq!(sent.form_value("scope").as_deref(), Some("mcp:tools"));
        assert_eq!(sent.form_value("resource").as_deref(), Some("https://mcp.example.com/mcp"));
        assert_eq!(sent.form_value("client_id").as_deref(), Some("workload"));

        // The platform rotates the token (a new file swapped in, as Kubernetes does).
        let next = dir.join("token.next");
        std::fs::write(&next, "jwt-two-rotated").unwrap();
        std::fs::rename(&next, &path).unwrap();
        m.client.jwt_bearer(&d, &public_client(), &identity, None).await.unwrap();
        assert_eq!(m.log.last().form_value("assertion").as_deref(), Some("jwt-two-rotated"));
        assert_eq!(m.log.last().form_value("scope"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A refused grant is returned as it is, after one request: no retry, no other grant.
    #[tokio::test]
    async fn a_refused_grant_is_not_retried() {
        let m = mock(|_| {
            crate::HttpResponse::new(400)
                .with_header("content-type", "application/json")
                .with_body(br#"{"error":"invalid_grant","error_description":"expired"}"#)
        });
        let d = discovery(serde_json::json!({}));
        let identity = WorkloadIdentity::fixed(IdToken::new("jwt"));
        let err = m.client.jwt_bearer(&d, &public_client(), &identity, None).await.unwrap_err();
        assert_eq!(err.oauth_code(), Some("invalid_grant"));
        assert_eq!(m.log.all().len(), 1);
    }

    #[test]
    fn missing_sources_are_typed_errors_without_content() {
        let dir = temp_dir("missing");
        let err = WorkloadIdentity::from_file(dir.join("nope")).assertion().unwrap_err();
        assert!(matches!(&err, Error::InvalidConfig(m) if m.contains("nope")), "{err:?}");
        std::fs::write(dir.join("empty"), "  \n").unwrap();
        assert!(WorkloadIdentity::from_file(dir.join("empty")).assertion().is_err());
        let name = format!("MCP_OAUTH_WIF_TEST_UNSET_{}", std::process::id());
        assert!(matches!(
            WorkloadIdentity::from_env(name).assertion(),
            Err(Error::InvalidConfig(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
