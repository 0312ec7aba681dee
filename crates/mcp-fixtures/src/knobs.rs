//! The knobs: per-instance misbehaviour that a test can change while the server runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The RFC 9207 `iss` the authorize endpoint puts in its redirect (the metadata always says
/// it sends one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RedirectIss {
    /// The issuer, exactly.
    #[default]
    Correct,
    /// No `iss` at all.
    Missing,
    /// Another server's issuer (`https://evil.example.com`), as in a mix-up attack.
    Wrong,
    /// The issuer with a trailing slash added (equal only after normalisation).
    TrailingSlash,
}

/// How the authorize endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Approval {
    /// Approve at once: redirect with `code`, `state` and `iss`.
    #[default]
    Auto,
    /// Hold the browser's request open until the test calls
    /// [`AuthServerHandle::approve_pending`](crate::AuthServerHandle::approve_pending) or
    /// [`AuthServerHandle::deny_pending`](crate::AuthServerHandle::deny_pending). A user who never
    /// finishes the browser step is a test that never approves.
    Manual,
    /// Refuse at once: redirect with `error=access_denied`.
    Deny,
}

/// A failure injected into the token endpoint: the `nth` token request after the failure is set
/// (1-based) and the `times - 1` after it get `status`, with `Retry-After` when given.
///
/// ```
/// use mcp_fixtures::InjectedFailure;
/// use std::time::Duration;
/// let f = InjectedFailure::too_many_requests(2, Duration::from_secs(7)).times(3);
/// assert_eq!(f.status(), 429);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFailure {
    nth: u64,
    times: u64,
    status: u16,
    retry_after: Option<Duration>,
}

impl InjectedFailure {
    /// A `503 Service Unavailable` on the `nth` token request from now.
    pub fn server_error(nth: u64) -> Self {
        InjectedFailure { nth: nth.max(1), times: 1, status: 503, retry_after: None }
    }

    /// A `429 Too Many Requests` with `Retry-After: <secs>` on the `nth` token request from now.
    pub fn too_many_requests(nth: u64, retry_after: Duration) -> Self {
        InjectedFailure { nth: nth.max(1), times: 1, status: 429, retry_after: Some(retry_after) }
    }

    /// The same failure with another status code (500, 502, ...).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The same failure with a `Retry-After` header.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Fail `times` consecutive requests instead of one.
    pub fn times(mut self, times: u64) -> Self {
        self.times = times.max(1);
        self
    }

    /// The HTTP status the failing requests get.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The `Retry-After` delay, when set.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// The value of every knob. Start a server with these through the builders, read them back
/// with [`Knobs::get`], change them with the [`Knobs`] setters.
///
/// ```
/// use mcp_fixtures::KnobSettings;
/// let s = KnobSettings::default();
/// assert!(s.refresh_rotation && !s.reuse_detection);
/// assert_eq!(s.expired_token_status, 401);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KnobSettings {
    /// How long newly issued access tokens live (default 1 hour).
    pub access_token_lifetime: Duration,
    /// How long newly issued refresh tokens live (default: for ever).
    pub refresh_token_lifetime: Option<Duration>,
    /// Rotate the refresh token on every refresh (default on). A rotated token is dead.
    pub refresh_rotation: bool,
    /// Strict reuse detection: redeeming a rotated refresh token revokes its whole family
    /// (every refresh and access token descended from the same authorization). Default off.
    pub reuse_detection: bool,
    /// A rotated refresh token redeemed again within this window still works: the server
    /// issues a new access token and returns the family's current refresh token.
    pub reuse_grace: Option<Duration>,
    /// The workload identity assertions (SEP-1933) the RFC 7523 jwt-bearer grant accepts, as
    /// a platform's trust in its workloads' tokens. Empty (the default): the grant is not
    /// offered. It issues no refresh token: a workload asks again with its current assertion.
    pub workload_assertions: Vec<String>,
    /// Leave `expires_in` out of token responses (the tokens still expire).
    pub omit_expires_in: bool,
    /// Leave `scope` out of token responses (RFC 6749 §5.1: then the granted scope is the one
    /// requested); the tokens still carry their scope at the resource server.
    pub omit_scope: bool,
    /// Send `expires_in` as a JSON string (`"3600"`), as some servers do.
    pub expires_in_as_string: bool,
    /// Send `token_type: "bearer"` in lower case, as some servers do.
    pub lowercase_token_type: bool,
    /// Leave `refresh_token` out of refresh responses; the old refresh token stays valid.
    pub omit_refresh_on_refresh: bool,
    /// Refuse a refresh without a `scope` parameter (Entra-style), with `invalid_request`.
    pub require_scope_on_refresh: bool,
    /// Issue a refresh token only when the grant includes `offline_access`.
    pub refresh_requires_offline_access: bool,
    /// The status the resource server answers for an expired access token (default 401;
    /// set 400 to model servers that answer 400 instead).
    pub expired_token_status: u16,
    /// Answer every 401 from the resource server without a `WWW-Authenticate` header, as some
    /// servers do (RFC 6750 requires one).
    pub omit_challenge: bool,
    /// Answer every 403 (a missing scope) without a `WWW-Authenticate` header, as some servers
    /// do.
    pub omit_forbidden_challenge: bool,
    /// Delay every token endpoint answer by this much (real time), before the server acts.
    pub token_delay: Duration,
    /// Answer a `refresh_token` grant this long (real time) *after* the server has acted (the
    /// refresh token is already rotated or refused while the client waits), as a slow token
    /// endpoint does.
    pub refresh_delay: Duration,
    /// Lose the answers of this many next `refresh_token` grants after the server has acted:
    /// the refresh token is rotated (or reuse detected), then the client gets a 502 with no
    /// token in it, as from a proxy whose upstream answer was lost.
    pub lose_refresh_answers: u64,
    /// Never answer the token endpoint (until the knob is cleared or the server stops).
    pub token_hang: bool,
    /// Never answer `refresh_token` grants (until the knob is cleared or the server stops);
    /// the other grants answer as usual, so an interactive authorization still completes.
    pub refresh_hang: bool,
    /// How the authorize endpoint answers.
    pub approval: Approval,
    /// Shift the server's clock by this many milliseconds (positive: ahead). Moving it ahead
    /// mid-session expires tokens as if that much time had passed on the server only.
    pub clock_offset_millis: i64,
    /// Scopes an approved authorization never grants, even when asked for (the server may
    /// issue a narrower scope than requested, RFC 6749 §3.3): the code and its tokens carry the
    /// requested scope without these. Default none.
    pub withheld_scopes: Vec<String>,
    /// The `iss` of authorization redirects (default: the issuer, exactly).
    pub redirect_iss: RedirectIss,
    /// Leave `code_challenge_methods_supported` out of the metadata (PKCE is still required).
    pub omit_pkce_metadata: bool,
    /// DPoP (RFC 9449) required: the metadata advertises `dpop_signing_alg_values_supported`
    /// `["ES256"]`; the token endpoint takes only requests with a valid proof carrying its
    /// nonce (else `400 use_dpop_nonce` with `DPoP-Nonce`) and issues `token_type` `DPoP`
    /// tokens bound to the proof's key (`cnf.jkt`); the resource server takes only
    /// `Authorization: DPoP` with a proof whose `ath` and key match the token, carrying its
    /// own nonce (else `401` with `WWW-Authenticate: DPoP error="use_dpop_nonce"` and
    /// `DPoP-Nonce`). A bound refresh token is refused with another key or without a proof,
    /// and a bound access token without its proof, whatever the knob says later. Default off.
    pub dpop: bool,
}

impl KnobSettings {
    /// Whether the token endpoint holds a request of this grant type.
    pub(crate) fn hangs(&self, grant: &str) -> bool {
        self.token_hang || (self.refresh_hang && grant == "refresh_token")
    }
}

impl Default for KnobSettings {
    fn default() -> Self {
        KnobSettings {
            access_token_lifetime: Duration::from_secs(3600),
            refresh_token_lifetime: None,
            refresh_rotation: true,
            reuse_detection: false,
            reuse_grace: None,
            omit_expires_in: false,
            omit_scope: false,
            expires_in_as_string: false,
            lowercase_token_type: false,
            omit_refresh_on_refresh: false,
            require_scope_on_refresh: false,
            refresh_requires_offline_access: false,
            expired_token_status: 401,
            omit_challenge: false,
            omit_forbidden_challenge: false,
            token_delay: Duration::ZERO,
            refresh_delay: Duration::ZERO,
            lose_refresh_answers: 0,
            token_hang: false,
            refresh_hang: false,
            approval: Approval::Auto,
            clock_offset_millis: 0,
            withheld_scopes: Vec::new(),
            redirect_iss: RedirectIss::Correct,
            omit_pkce_metadata: false,
            workload_assertions: Vec::new(),
            dpop: false,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct KnobState {
    pub(crate) settings: KnobSettings,
    /// The armed token endpoint failure and how many token requests it has seen.
    failure: Option<(InjectedFailure, u64)>,
    /// The armed resource server failure and how many MCP requests it has seen.
    resource_failure: Option<(InjectedFailure, u64)>,
    /// Bumped by [`Knobs::revoke_all_tokens`]; the server acts on each bump once.
    pub(crate) revoke_all_generation: u64,
}

/// A cloneable handle on one server's knobs. Every setter takes effect on the next request.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mcp_fixtures::FixtureError> {
/// use mcp_fixtures::AuthServer;
/// use std::time::Duration;
/// let server = AuthServer::builder().spawn().await?;
/// let knobs = server.knobs();
/// knobs.set_access_token_lifetime(Duration::from_secs(5));
/// knobs.set_reuse_detection(true);
/// assert_eq!(knobs.get().access_token_lifetime, Duration::from_secs(5));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Knobs {
    state: Arc<watch::Sender<KnobState>>,
}

impl Knobs {
    pub(crate) fn new(settings: KnobSettings) -> Self {
        Knobs {
            state: Arc::new(watch::Sender::new(KnobState {
                settings,
                failure: None,
                resource_failure: None,
                revoke_all_generation: 0,
            })),
        }
    }

    /// A snapshot of every knob.
    pub fn get(&self) -> KnobSettings {
        self.state.borrow().settings.clone()
    }

    /// Change any knobs at once.
    pub fn update(&self, change: impl FnOnce(&mut KnobSettings)) {
        self.state.send_modify(|s| change(&mut s.settings));
    }

    /// Replace every knob.
    pub fn set_all(&self, settings: KnobSettings) {
        self.update(|s| *s = settings);
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.update(|s| s.access_token_lifetime = lifetime);
    }

    /// Lifetime of refresh tokens issued from now on (`None`: for ever).
    pub fn set_refresh_token_lifetime(&self, lifetime: Option<Duration>) {
        self.update(|s| s.refresh_token_lifetime = lifetime);
    }

    /// Refresh-token rotation on or off.
    pub fn set_refresh_rotation(&self, on: bool) {
        self.update(|s| s.refresh_rotation = on);
    }

    /// Strict reuse detection on or off.
    pub fn set_reuse_detection(&self, on: bool) {
        self.update(|s| s.reuse_detection = on);
    }

    /// The assertions the jwt-bearer grant accepts ([`KnobSettings::workload_assertions`]).
    pub fn set_workload_assertions(&self, assertions: Vec<String>) {
        self.update(|s| s.workload_assertions = assertions);
    }

    /// The grace window in which a rotated refresh token still works.
    pub fn set_reuse_grace(&self, grace: Option<Duration>) {
        self.update(|s| s.reuse_grace = grace);
    }

    /// Omit `expires_in` from token responses.
    pub fn set_omit_expires_in(&self, on: bool) {
        self.update(|s| s.omit_expires_in = on);
    }

    /// See [`KnobSettings::omit_scope`].
    pub fn set_omit_scope(&self, on: bool) {
        self.update(|s| s.omit_scope = on);
    }

    /// Omit the refresh token from refresh responses.
    pub fn set_omit_refresh_on_refresh(&self, on: bool) {
        self.update(|s| s.omit_refresh_on_refresh = on);
    }

    /// Scopes approved authorizations never grant from now on (down-scoping, RFC 6749 §3.3).
    pub fn set_withheld_scopes<S: Into<String>>(&self, scopes: impl IntoIterator<Item = S>) {
        let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        self.update(|s| s.withheld_scopes = scopes);
    }

    /// Require `scope` on refresh (Entra-style).
    pub fn set_require_scope_on_refresh(&self, on: bool) {
        self.update(|s| s.require_scope_on_refresh = on);
    }

    /// Issue refresh tokens only to grants that include `offline_access`.
    pub fn set_refresh_requires_offline_access(&self, on: bool) {
        self.update(|s| s.refresh_requires_offline_access = on);
    }

    /// The status the resource server answers for an expired token (401, or 400 to misbehave).
    pub fn set_expired_token_status(&self, status: u16) {
        self.update(|s| s.expired_token_status = status);
    }

    /// Answer 401s without a `WWW-Authenticate` header.
    pub fn set_omit_challenge(&self, on: bool) {
        self.update(|s| s.omit_challenge = on);
    }

    /// See [`KnobSettings::omit_forbidden_challenge`].
    pub fn set_omit_forbidden_challenge(&self, on: bool) {
        self.update(|s| s.omit_forbidden_challenge = on);
    }

    /// Delay every token endpoint answer by this much (real time).
    pub fn set_token_delay(&self, delay: Duration) {
        self.update(|s| s.token_delay = delay);
    }

    /// Answer `refresh_token` grants this long after acting (see
    /// [`KnobSettings::refresh_delay`]).
    pub fn set_refresh_delay(&self, delay: Duration) {
        self.update(|s| s.refresh_delay = delay);
    }

    /// Lose the answers of the next `n` `refresh_token` grants after acting (see
    /// [`KnobSettings::lose_refresh_answers`]).
    pub fn lose_refresh_answers(&self, n: u64) {
        self.update(|s| s.lose_refresh_answers = n);
    }

    /// Take one armed lost answer, if any.
    pub(crate) fn take_lost_refresh_answer(&self) -> bool {
        let mut lose = false;
        self.update(|s| {
            lose = s.lose_refresh_answers > 0;
            s.lose_refresh_answers = s.lose_refresh_answers.saturating_sub(1);
        });
        lose
    }

    /// See [`KnobSettings::dpop`].
    pub fn set_dpop(&self, on: bool) {
        self.update(|s| s.dpop = on);
    }

    /// Make the token endpoint hang (never answer) or answer again.
    pub fn set_token_hang(&self, hang: bool) {
        self.update(|s| s.token_hang = hang);
    }

    /// Hang only the `refresh_token` grant (`false` releases the requests held so far).
    pub fn set_refresh_hang(&self, hang: bool) {
        self.update(|s| s.refresh_hang = hang);
    }

    /// How the authorize endpoint answers.
    pub fn set_approval(&self, approval: Approval) {
        self.update(|s| s.approval = approval);
    }

    /// Shift the server's clock (milliseconds, positive: ahead).
    pub fn set_clock_offset_millis(&self, offset: i64) {
        self.update(|s| s.clock_offset_millis = offset);
    }

    /// Arm a failure on the token endpoint, replacing any armed one.
    pub fn fail_token_requests(&self, failure: InjectedFailure) {
        self.state.send_modify(|s| s.failure = Some((failure, 0)));
    }

    /// Disarm the token endpoint failure.
    pub fn clear_failure(&self) {
        self.state.send_modify(|s| s.failure = None);
    }

    /// Arm a failure on the resource servers that trust this authorization server: the `nth`
    /// MCP request from now gets the failure's status, before any token check.
    pub fn fail_resource_requests(&self, failure: InjectedFailure) {
        self.state.send_modify(|s| s.resource_failure = Some((failure, 0)));
    }

    /// Disarm the resource server failure.
    pub fn clear_resource_failure(&self) {
        self.state.send_modify(|s| s.resource_failure = None);
    }

    /// Revoke every access and refresh token issued so far (server-side invalidation).
    pub fn revoke_all_tokens(&self) {
        self.state.send_modify(|s| s.revoke_all_generation += 1);
    }

    pub(crate) fn revoke_all_generation(&self) -> u64 {
        self.state.borrow().revoke_all_generation
    }

    /// Count one token request against the armed failure; the failure to answer with, if any.
    pub(crate) fn take_failure(&self) -> Option<InjectedFailure> {
        let mut fire = None;
        self.state.send_if_modified(|s| {
            fire = count_against(&mut s.failure);
            false
        });
        fire
    }

    /// Count one MCP request against the armed resource failure.
    pub(crate) fn take_resource_failure(&self) -> Option<InjectedFailure> {
        let mut fire = None;
        self.state.send_if_modified(|s| {
            fire = count_against(&mut s.resource_failure);
            false
        });
        fire
    }

    /// Resolves once no hang knob holds a request of this grant type.
    pub(crate) async fn hang_cleared(&self, grant: &str) {
        let mut rx = self.state.subscribe();
        // The sender lives as long as this `Knobs`, so `wait_for` only fails if it is gone.
        let _ = rx.wait_for(|s| !s.settings.hangs(grant)).await;
    }
}

fn count_against(slot: &mut Option<(InjectedFailure, u64)>) -> Option<InjectedFailure> {
    let (failure, seen) = slot.as_mut()?;
    *seen += 1;
    let (failure, seen) = (*failure, *seen);
    if seen >= failure.nth + failure.times - 1 {
        *slot = None;
    }
    (seen >= failure.nth).then_some(failure)
}

/// The HTTP answer for an injected failure: the status, `Retry-After` when set, a JSON error.
pub(crate) fn failure_response(failure: InjectedFailure) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::response::IntoResponse as _;
    let status = StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let error = if failure.status() == 429 { "rate_limited" } else { "temporarily_unavailable" };
    let mut resp = (status, axum::Json(serde_json::json!({ "error": error }))).into_response();
    if let Some(after) = failure.retry_after()
        && let Ok(v) = HeaderValue::from_str(&after.as_secs().to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_fires_on_the_nth_request_for_the_given_times() {
        let knobs = Knobs::new(KnobSettings::default());
        knobs.fail_token_requests(InjectedFailure::server_error(2).times(2));
        let fired: Vec<bool> = (0..5).map(|_| knobs.take_failure().is_some()).collect();
        assert_eq!(fired, [false, true, true, false, false]);
    }

    #[test]
    fn no_failure_when_none_is_armed() {
        let knobs = Knobs::new(KnobSettings::default());
        assert!(knobs.take_failure().is_none());
        knobs.fail_token_requests(InjectedFailure::server_error(1));
        knobs.clear_failure();
        assert!(knobs.take_failure().is_none());
    }
}
