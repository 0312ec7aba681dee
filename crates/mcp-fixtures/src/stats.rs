//! Counters and the event log that tests read.

use std::collections::BTreeMap;

use mcp_clock::Timestamp;

use crate::secret::TokenFingerprint;

/// A snapshot of the authorization server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthStats {
    /// Token requests with `grant_type=authorization_code`.
    pub authorization_code_requests: u64,
    /// Token requests with `grant_type=refresh_token`.
    pub refresh_token_requests: u64,
    /// Token requests with `grant_type=client_credentials`.
    pub client_credentials_requests: u64,
    /// Token requests with another or no grant type.
    pub other_token_requests: u64,
    /// Token requests with the jwt-bearer grant (RFC 7523, workload identity); also counted
    /// in `other_token_requests`.
    pub jwt_bearer_requests: u64,
    /// Times each refresh token was presented at the token endpoint, successful or not.
    pub refresh_redemptions: BTreeMap<TokenFingerprint, u64>,
    /// Rotated refresh tokens presented again outside the grace window.
    pub reuse_detections: u64,
    /// Token families revoked (by reuse detection or by revoking a refresh token).
    pub families_revoked: u64,
    /// Requests to the authorize endpoint that reached a decision point.
    pub authorization_requests: u64,
    /// Authorizations approved (a code was issued).
    pub authorizations_approved: u64,
    /// Authorizations denied.
    pub authorizations_denied: u64,
    /// Dynamic client registrations that succeeded.
    pub registrations: u64,
    /// Client ID metadata documents fetched.
    pub client_metadata_fetches: u64,
    /// Requests to the revocation endpoint.
    pub revocations: u64,
    /// Requests to the introspection endpoint.
    pub introspections: u64,
    /// Token requests answered with an injected failure (5xx or 429).
    pub injected_failures: u64,
    /// `refresh_token` grants the server acted on whose answer was then lost (a 502 instead,
    /// knob `lose_refresh_answers`).
    pub lost_answers: u64,
    /// The RFC 8707 `resource` parameter of every authorize and token request, in order, as
    /// `authorize <value>` or `token <grant_type> <value>`, with `-` for none.
    pub resource_parameters: Vec<String>,
    /// Token requests refused for a missing or invalid DPoP proof (`invalid_dpop_proof`) or a
    /// bound refresh token presented with another key or none (knob `dpop`).
    pub dpop_proofs_refused: u64,
    /// Token requests answered `use_dpop_nonce` (a valid proof without the current nonce).
    pub dpop_nonce_challenges: u64,
}

impl AuthStats {
    /// Token requests of every grant.
    pub fn token_requests(&self) -> u64 {
        self.authorization_code_requests
            + self.refresh_token_requests
            + self.client_credentials_requests
            + self.other_token_requests
    }

    /// The most times any one refresh token was presented (0 when none was).
    ///
    /// A client that never redeems a refresh token twice keeps this at 1.
    pub fn max_refresh_redemptions(&self) -> u64 {
        self.refresh_redemptions.values().copied().max().unwrap_or(0)
    }
}

/// One thing the authorization server did, with the server's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthEvent {
    /// The server's time (clock plus offset) when it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: AuthEventKind,
}

/// What an [`AuthEvent`] records. Tokens appear only as fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthEventKind {
    /// A client registered (dynamically or through the handle).
    ClientRegistered {
        /// The new client's id.
        client_id: String,
    },
    /// A client ID metadata document was fetched.
    ClientMetadataFetched {
        /// Its URL, which is the client id.
        client_id: String,
    },
    /// An authorization request reached the approval step.
    AuthorizationRequested {
        /// The requesting client.
        client_id: String,
        /// The requested (or defaulted) scope.
        scope: String,
    },
    /// An authorization was approved and a code issued.
    AuthorizationApproved {
        /// The client.
        client_id: String,
    },
    /// An authorization was denied.
    AuthorizationDenied {
        /// The client.
        client_id: String,
    },
    /// Tokens were issued.
    TokensIssued {
        /// The grant type that produced them.
        grant: String,
        /// The client.
        client_id: String,
        /// The new access token.
        access_token: TokenFingerprint,
        /// The refresh token in the response, if any.
        refresh_token: Option<TokenFingerprint>,
    },
    /// A refresh token was presented.
    RefreshRedeemed {
        /// The refresh token.
        refresh_token: TokenFingerprint,
        /// How many times it has now been presented.
        redemption: u64,
    },
    /// A rotated refresh token was accepted again inside the grace window.
    ReuseWithinGrace {
        /// The rotated refresh token.
        refresh_token: TokenFingerprint,
    },
    /// A rotated refresh token was presented again.
    ReuseDetected {
        /// The rotated refresh token.
        refresh_token: TokenFingerprint,
        /// Whether the whole family was revoked.
        family_revoked: bool,
    },
    /// A token request was refused with an OAuth error.
    TokenRequestRefused {
        /// The grant type asked for.
        grant: String,
        /// The OAuth `error` code.
        error: String,
    },
    /// A token request got an injected failure.
    FailureInjected {
        /// The status sent.
        status: u16,
    },
    /// A token was revoked through the revocation endpoint.
    TokenRevoked {
        /// The token.
        token: TokenFingerprint,
    },
    /// Every token was revoked at once.
    AllTokensRevoked,
}

/// A snapshot of the resource server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResourceStats {
    /// Requests to the MCP endpoint.
    pub requests: u64,
    /// Requests refused for a missing, unknown, expired or revoked token (401, or the expired
    /// token status knob).
    pub unauthorized: u64,
    /// Requests refused with 403 `insufficient_scope`.
    pub forbidden: u64,
    /// Requests answered with an injected failure.
    pub injected_failures: u64,
    /// Tool calls that reached the MCP server, by tool name.
    pub tool_calls: BTreeMap<String, u64>,
    /// Every POST to the MCP endpoint, in arrival order (refused ones included).
    pub posts: Vec<PostRecord>,
    /// Every extension header (a name starting with `x-`) the MCP endpoint received, as
    /// `name: value` with the name in lower case, each once: proves custom headers arrive.
    pub extension_headers: std::collections::BTreeSet<String>,
    /// Requests refused for a missing or invalid DPoP proof, or a proof by another key than
    /// the token's (knob `dpop`, or a DPoP-bound token).
    pub dpop_proofs_refused: u64,
    /// Requests answered `401` `use_dpop_nonce` (a valid proof without the current nonce).
    pub dpop_nonce_challenges: u64,
    /// Requests let through with a valid DPoP proof.
    pub dpop_accepted: u64,
}

/// What one POST to the MCP endpoint carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostRecord {
    /// The JSON-RPC `method` of the body (`None` for a response or an unreadable body).
    pub method: Option<String>,
    /// The `MCP-Protocol-Version` header.
    pub protocol_version: Option<String>,
    /// The `Mcp-Method` header (MCP 2026-07-28).
    pub mcp_method: Option<String>,
    /// The request's `_meta` `io.modelcontextprotocol/protocolVersion` (MCP 2026-07-28).
    pub meta_protocol_version: Option<String>,
    /// Whether it carried an access token (`Authorization: Bearer`).
    pub with_token: bool,
}
