//! `WWW-Authenticate` parsing (RFC 9110 §11.6.1) and the Bearer parameters MCP uses.
//!
//! ```text
//! WWW-Authenticate = #challenge
//! challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
//! auth-param       = token BWS "=" BWS ( token / quoted-string )
//! ```
//! One header may hold several challenges, and a response may repeat the header. Scheme and
//! parameter names are case-insensitive. As a concession to real servers, an unquoted parameter
//! value may hold any visible character except `,` and `"` (for example an unquoted URL).

use std::fmt;

use crate::error::{Error, Result};

/// One challenge: a scheme with either a token68 or a list of parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme as sent (`Bearer`, `DPoP`, ...). Compare with [`Challenge::is_scheme`].
    pub scheme: String,
    /// The token68 form, when the challenge has one instead of parameters.
    pub token68: Option<String>,
    /// Parameters in order, names as sent, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// True when the scheme is `scheme` (case-insensitive).
    pub fn is_scheme(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// The value of parameter `name` (case-insensitive; the first one if repeated).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Challenge {
    /// Renders the challenge; parameter values are always quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        if let Some(t) = &self.token68 {
            return write!(f, " {t}");
        }
        for (i, (name, value)) in self.params.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{name}=\"")?;
            for c in value.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        Ok(())
    }
}

/// The Bearer challenge parameters MCP clients act on (RFC 6750 §3, RFC 9728 §5.1), also read
/// from a `DPoP` challenge (RFC 9449 §7.1), which carries the same parameters plus `algs`: a
/// resource server that takes only DPoP-bound tokens sends no Bearer challenge at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BearerChallenge {
    /// Whether these parameters come from a `DPoP` challenge rather than a `Bearer` one.
    pub dpop: bool,
    /// `algs` of a `DPoP` challenge: the proof algorithms the server accepts (space separated).
    pub algs: Option<String>,
    /// `resource_metadata`: where the protected-resource metadata lives.
    pub resource_metadata: Option<String>,
    /// `scope`: the scopes the request needs (space separated).
    pub scope: Option<String>,
    /// `error`: `invalid_token`, `insufficient_scope`, ...
    pub error: Option<String>,
    /// `error_description`.
    pub error_description: Option<String>,
    /// `realm`.
    pub realm: Option<String>,
}

impl BearerChallenge {
    /// The parameters of a `Bearer` or `DPoP` challenge, or `None` for another scheme.
    ///
    /// ```
    /// use mcp_oauth::{BearerChallenge, parse_challenge_header};
    /// let c = &parse_challenge_header(r#"DPoP error="invalid_token", algs="ES256 PS256""#).unwrap()[0];
    /// let dpop = BearerChallenge::from_challenge(c).unwrap();
    /// assert!(dpop.dpop);
    /// assert_eq!(dpop.algs.as_deref(), Some("ES256 PS256"));
    /// assert_eq!(dpop.error.as_deref(), Some("invalid_token"));
    /// ```
    pub fn from_challenge(challenge: &Challenge) -> Option<Self> {
        let dpop = challenge.is_scheme("DPoP");
        if !dpop && !challenge.is_scheme("Bearer") {
            return None;
        }
        let get = |n: &str| challenge.param(n).map(str::to_owned);
        Some(BearerChallenge {
            dpop,
            algs: get("algs"),
            resource_metadata: get("resource_metadata"),
            scope: get("scope"),
            error: get("error"),
            error_description: get("error_description"),
            realm: get("realm"),
        })
    }

    /// The first Bearer challenge among every `WWW-Authenticate` header value given, else the
    /// first `DPoP` one.
    ///
    /// ```
    /// use mcp_oauth::BearerChallenge;
    /// let header = r#"DPoP algs="ES256", Bearer error="insufficient_scope", scope="files:read files:write""#;
    /// let bearer = BearerChallenge::from_headers([header]).unwrap().unwrap();
    /// assert_eq!(bearer.error.as_deref(), Some("insufficient_scope"));
    /// assert_eq!(bearer.scope.as_deref(), Some("files:read files:write"));
    /// ```
    ///
    /// A header value that does not parse as a whole keeps the challenges that come before the
    /// fault (a server may add a challenge this parser refuses next to a good Bearer one);
    /// the error is returned only when no Bearer or DPoP challenge was found.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Option<Self>> {
        let mut found = Vec::new();
        let mut fault = None;
        for value in values {
            let (challenges, error) =
                Parser { s: value.as_bytes(), input: value, pos: 0 }.header_partial();
            found.extend(challenges);
            if let Some(error) = error {
                tracing::debug!(error = %error, "skipping a malformed part of a WWW-Authenticate header");
                fault.get_or_insert(error);
            }
        }
        let bearer = found
            .iter()
            .filter(|c| c.is_scheme("Bearer"))
            .chain(found.iter().filter(|c| c.is_scheme("DPoP")))
            .find_map(BearerChallenge::from_challenge);
        match (bearer, fault) {
            (Some(bearer), _) => Ok(Some(bearer)),
            (None, Some(error)) => Err(error),
            (None, None) => Ok(None),
        }
    }

    /// True when `error` is `insufficient_scope`.
    pub fn is_insufficient_scope(&self) -> bool {
        self.error.as_deref() == Some("insufficient_scope")
    }
}

/// Every challenge in every `WWW-Authenticate` header value given, in order.
pub fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Vec<Challenge>> {
    let mut out = Vec::new();
    for value in values {
        out.extend(parse_challenge_header(value)?);
    }
    Ok(out)
}

/// Every challenge that parses in the `WWW-Authenticate` header values given, in order: a value
/// that does not parse as a whole keeps the challenges before its fault (the fault is logged at
/// debug level). For a client acting on what it can read, as
/// [`BearerChallenge::from_headers`] does.
///
/// ```
/// let c = mcp_oauth::parse_challenges_lenient([r#"Bearer scope="a b", Broken "x"#, "Basic realm=r"]);
/// assert_eq!(c.len(), 2);
/// assert_eq!(c[0].param("scope"), Some("a b"));
/// assert!(c[1].is_scheme("basic"));
/// ```
pub fn parse_challenges_lenient<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut found = Vec::new();
    for value in values {
        let (challenges, error) =
            Parser { s: value.as_bytes(), input: value, pos: 0 }.header_partial();
        found.extend(challenges);
        if let Some(error) = error {
            tracing::debug!(error = %error, "skipping a malformed part of a WWW-Authenticate header");
        }
    }
    found
}

/// Every challenge in one `WWW-Authenticate` header value.
///
/// ```
/// use mcp_oauth::parse_challenge_header;
/// let c = parse_challenge_header(r#"Basic realm="a \"b\"", Newauth dG9rZW4=="#).unwrap();
/// assert_eq!(c.len(), 2);
/// assert_eq!(c[0].param("REALM"), Some("a \"b\""));
/// assert_eq!(c[1].token68.as_deref(), Some("dG9rZW4=="));
/// ```
pub fn parse_challenge_header(input: &str) -> Result<Vec<Challenge>> {
    Parser { s: input.as_bytes(), input, pos: 0 }.header()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

struct Parser<'a> {
    s: &'a [u8],
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err<T>(&self, reason: &'static str) -> Result<T> {
        Err(Error::InvalidChallenge { position: self.pos, reason })
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn skip_ows_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> &str {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        &self.input[start..self.pos]
    }

    fn header(self) -> Result<Vec<Challenge>> {
        match self.header_partial() {
            (out, None) => Ok(out),
            (_, Some(error)) => Err(error),
        }
    }

    /// The challenges before the first fault, and the fault.
    fn header_partial(mut self) -> (Vec<Challenge>, Option<Error>) {
        let mut out = Vec::new();
        let fault = self.challenges(&mut out).err();
        (out, fault)
    }

    fn challenges(&mut self, out: &mut Vec<Challenge>) -> Result<()> {
        loop {
            self.skip_ows_and_commas();
            if self.peek().is_none() {
                return Ok(());
            }
            let scheme = self.token().to_owned();
            if scheme.is_empty() {
                return self.err("expected an auth scheme");
            }
            let mut challenge = Challenge { scheme, token68: None, params: Vec::new() };
            match self.peek() {
                None | Some(b',') => {
                    out.push(challenge);
                    continue;
                }
                Some(b' ' | b'\t') => self.skip_ows(),
                Some(_) => return self.err("expected a space after the auth scheme"),
            }
            if let Some(t) = self.try_token68() {
                challenge.token68 = Some(t);
                out.push(challenge);
                continue;
            }
            // A list of auth-params; a list element that is not `name =` starts the next challenge.
            loop {
                if self.peek().is_none() || self.peek() == Some(b',') {
                    break;
                }
                let save = self.pos;
                let name = self.token().to_owned();
                self.skip_ows();
                if name.is_empty() || self.peek() != Some(b'=') {
                    if challenge.params.is_empty() {
                        return self.err("expected an auth-param or token68");
                    }
                    self.pos = save;
                    break;
                }
                self.pos += 1;
                self.skip_ows();
                let value = self.value()?;
                // RFC 9110 §11.2: each parameter name only once per challenge.
                if challenge.params.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                    return self.err("duplicate auth-param");
                }
                challenge.params.push((name, value));
                self.skip_ows();
                match self.peek() {
                    None => break,
                    Some(b',') => {
                        self.skip_ows_and_commas();
                        // Continue with the next param unless this is the start of a new challenge.
                        if !self.next_is_param() {
                            break;
                        }
                    }
                    Some(_) => return self.err("expected ',' after an auth-param"),
                }
            }
            out.push(challenge);
        }
    }

    /// At a list element: is it `token BWS "="` followed by something other than end or `,`?
    fn next_is_param(&self) -> bool {
        let mut i = self.pos;
        let start = i;
        while self.s.get(i).copied().is_some_and(is_tchar) {
            i += 1;
        }
        if i == start {
            return false;
        }
        while matches!(self.s.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        self.s.get(i) == Some(&b'=')
    }

    /// token68, only if it is followed by the end of the challenge (end of input or `,`).
    fn try_token68(&mut self) -> Option<String> {
        let start = self.pos;
        let mut i = start;
        while self.s.get(i).copied().is_some_and(is_token68_char) {
            i += 1;
        }
        if i == start {
            return None;
        }
        while self.s.get(i) == Some(&b'=') {
            i += 1;
        }
        let end = i;
        while matches!(self.s.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        if matches!(self.s.get(i), None | Some(b',')) {
            // `name=value` would have continued after '='; a bare `abc` or `abc==` is token68.
            self.pos = i;
            return Some(self.input[start..end].to_owned());
        }
        None
    }

    fn value(&mut self) -> Result<String> {
        if self.peek() == Some(b'"') {
            self.pos += 1;
            let mut out = String::new();
            let mut chars = self.input[self.pos..].char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        self.pos += i + 1;
                        return Ok(out);
                    }
                    '\\' => match chars.next() {
                        Some((_, e)) if e == '\t' || !e.is_ascii_control() => out.push(e),
                        _ => {
                            self.pos += i;
                            return self.err("bad quoted-pair");
                        }
                    },
                    c if c == '\t' || !c.is_ascii_control() => out.push(c),
                    _ => {
                        self.pos += i;
                        return self.err("control character in a quoted string");
                    }
                }
            }
            self.pos = self.s.len();
            return self.err("unterminated quoted string");
        }
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b',' || b == b'"' || b == b' ' || b == b'\t' || b.is_ascii_control() {
                break;
            }
            self.pos += 1;
        }
        // Stop at a char boundary (the loop only stops on ASCII bytes, so it is one).
        if self.pos == start {
            return self.err("expected a parameter value");
        }
        Ok(self.input[start..self.pos].to_owned())
    }
}

#[cfg(test)]
mod tests;
