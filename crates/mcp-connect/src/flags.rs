//! mcp-remote's flag values as mcp-connect reads them: `--header 'Name: value'` with `${VAR}`
//! taken from the environment, and `--static-oauth-client-info` (JSON or `@file`). Errors never
//! repeat a header value or a client secret.

use crate::error::Error;

/// A `--header 'Name: value'` argument: the name and the value, with every `${VAR}` in the value
/// replaced by the environment variable `VAR` (as mcp-remote does; an unset variable is an
/// error here rather than an empty string). Spaces around the name and the value are trimmed.
///
/// ```
/// let (name, value) = mcp_connect::parse_header(" X-Api-Key: k-123 ").unwrap();
/// assert_eq!((name.as_str(), value.as_str()), ("X-Api-Key", "k-123"));
/// assert!(mcp_connect::parse_header("no colon").is_err());
/// assert!(mcp_connect::parse_header("X-Key: ${MCP_CONNECT_DOC_UNSET_VARIABLE}").is_err());
/// ```
///
/// # Errors
/// [`Error::Usage`] for a missing `:`, an empty name, or an unset or non-UTF-8 variable. The
/// message names the header and the variable, never the value.
pub fn parse_header(spec: &str) -> Result<(String, String), Error> {
    let Some((name, value)) = spec.split_once(':') else {
        return Err(Error::Usage("a --header must look like 'Name: value'".into()));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(Error::Usage("a --header has an empty name".into()));
    }
    let value = expand(value.trim(), name)?;
    Ok((name.to_owned(), value))
}

/// A `--header-file`: one `Name: value` per line, as [`parse_header`] reads it; blank lines and
/// lines starting with `#` are skipped. Keeps headers out of the command line (and so out of
/// `ps` and the host's configuration file).
///
/// ```
/// let path = std::env::temp_dir().join(format!("mcp-connect-doc-{}.headers", std::process::id()));
/// std::fs::write(&path, "# comment\nX-Api-Key: k-1\n\nX-Team: blue\n").unwrap();
/// let headers = mcp_connect::parse_header_file(&path).unwrap();
/// assert_eq!(headers, vec![("X-Api-Key".into(), "k-1".into()), ("X-Team".into(), "blue".into())]);
/// std::fs::remove_file(&path).unwrap();
/// ```
///
/// # Errors
/// [`Error::Usage`] for an unreadable file or a bad line (named by its number, never quoted).
pub fn parse_header_file(path: &std::path::Path) -> Result<Vec<(String, String)>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("cannot read --header-file {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let header = parse_header(line).map_err(|e| {
            Error::Usage(format!(
                "--header-file {} line {}: {}",
                path.display(),
                number + 1,
                match e {
                    Error::Usage(m) => m,
                    other => other.to_string(),
                }
            ))
        })?;
        out.push(header);
    }
    Ok(out)
}

/// An `--authorize-param name=value`.
///
/// ```
/// assert_eq!(mcp_connect::parse_authorize_param("prompt=consent").unwrap(), ("prompt".into(), "consent".into()));
/// assert!(mcp_connect::parse_authorize_param("prompt").is_err());
/// ```
///
/// # Errors
/// [`Error::Usage`] without a `=` or with an empty name.
pub fn parse_authorize_param(spec: &str) -> Result<(String, String), Error> {
    match spec.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(Error::Usage(format!(
            "an --authorize-param must look like name=value, not {spec:?}"
        ))),
    }
}

/// Replace each `${VAR}` in `text` with the environment variable `VAR`.
fn expand(text: &str, header: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(Error::Usage(format!("the --header {header} has a '${{' without '}}'")));
        };
        let var = &after[..end];
        let value = std::env::var(var).map_err(|_| {
            Error::Usage(format!(
                "the --header {header} names the environment variable {var:?}, which is not set (or not UTF-8)"
            ))
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A client registered out of band (`--static-oauth-client-info`): its id and, for a
/// confidential client, its secret. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticClient {
    /// The client id.
    pub client_id: String,
    /// The client secret, if the client has one.
    pub client_secret: Option<String>,
    /// The issuer of the authorization server that knows this client (an `issuer` key in the
    /// JSON, beyond mcp-remote's fields); when absent, a login binds the credentials to the
    /// authorization server the MCP server names then.
    pub issuer: Option<String>,
}

impl std::fmt::Debug for StaticClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "[redacted]"))
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl StaticClient {
    /// mcp-remote's `--static-oauth-client-info`: a JSON object with `client_id`, an optional
    /// `client_secret` and an optional `issuer` (other fields are ignored), or `@path` of a file
    /// holding one.
    ///
    /// ```
    /// let c = mcp_connect::StaticClient::parse(r#"{"client_id":"abc","client_secret":"s3"}"#).unwrap();
    /// assert_eq!(c.client_id, "abc");
    /// assert!(!format!("{c:?}").contains("s3"));
    /// assert!(mcp_connect::StaticClient::parse(r#"{"client_secret":"s3"}"#).is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::Usage`] for an unreadable file, text that is not a JSON object, or a missing or
    /// non-string `client_id` / `client_secret`. Messages never contain the secret.
    pub fn parse(arg: &str) -> Result<Self, Error> {
        let text = match arg.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                Error::Usage(format!("cannot read --static-oauth-client-info file {path:?}: {e}"))
            })?,
            None => arg.to_owned(),
        };
        // Parse to a value first: serde's typed errors may quote the offending value.
        let bad = |what: &str| Error::Usage(format!("--static-oauth-client-info: {what}"));
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(&format!("not JSON (line {}, column {})", e.line(), e.column())))?;
        let object = value.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let client_id = match object.get("client_id") {
            Some(serde_json::Value::String(id)) if !id.is_empty() => id.clone(),
            _ => return Err(bad("client_id must be a non-empty string")),
        };
        let client_secret = match object.get("client_secret") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(secret)) => Some(secret.clone()),
            Some(_) => return Err(bad("client_secret must be a string")),
        };
        let issuer = match object.get("issuer") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(issuer)) if !issuer.is_empty() => Some(issuer.clone()),
            Some(_) => return Err(bad("issuer must be a non-empty string")),
        };
        Ok(StaticClient { client_id, client_secret, issuer })
    }
}

/// mcp-remote's `--static-oauth-client-metadata`: a JSON object of RFC 7591 client metadata
/// (`client_name`, `scope`, `logo_uri`, ...) sent with dynamic registration, or `@path` of a
/// file holding one. The protocol's own fields (redirect URIs, grant types, ...) are not
/// replaced.
///
/// ```
/// let m = mcp_connect::parse_client_metadata(r#"{"client_name":"My Desktop"}"#).unwrap();
/// assert_eq!(m["client_name"], "My Desktop");
/// assert!(mcp_connect::parse_client_metadata("[1]").is_err());
/// ```
///
/// # Errors
/// [`Error::Usage`] for an unreadable file or text that is not a JSON object.
pub fn parse_client_metadata(
    arg: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!("cannot read --static-oauth-client-metadata file {path:?}: {e}"))
        })?,
        None => arg.to_owned(),
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::Usage("--static-oauth-client-metadata: not a JSON object".into())),
        Err(e) => Err(Error::Usage(format!(
            "--static-oauth-client-metadata: not JSON (line {}, column {})",
            e.line(),
            e.column()
        ))),
    }
}
