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
