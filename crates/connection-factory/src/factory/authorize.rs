//! The interactive authorization: step-up, one registration per key and issuer, the PENDING
//! flow (joined, created, or replaced by the one request that claims it) and the prompt.

use super::*;

use crate::error::REGISTRATION;

/// The flow type of the claim to replace one stale PENDING authorization.
const REPLACE_FLOW: &str = "mcp_oauth_replace";
/// How many times a prompt looks again after another request changed the flow under it.
const PROMPT_ROUNDS: usize = 4;

/// When a pending authorization request expires (the callback refuses its state after that).
fn request_expiry(pending: &mcp_oauth::PendingAuthorization) -> Timestamp {
    pending.created_at.saturating_add(pending.ttl)
}

/// The client registrations in flight, per (token key, issuer): concurrent first connects with
/// no stored client join one registration instead of each registering a client (the last one
/// stored would win, and a pending authorization could name a client that is no longer
/// stored). Process-local; across processes the host serializes logins (mcp-connect's login
/// lock).
pub(super) type Registrations =
    SingleFlight<(TokenKey, String), Result<mcp_oauth::ClientRegistration, Error>>;

/// How long a registration may run before callers stop waiting for it (it is kept running once
/// its request went out: its result is stored for the next caller).
const REGISTRATION_DEADLINE: Duration = Duration::from_secs(60);

/// The interactive authorizations this provider is in right now, and when the last of their
/// waits ends (for [`AuthProvider::interaction_deadline`]).
#[derive(Debug, Default)]
pub(super) struct Waiting(Mutex<(usize, Option<Timestamp>)>);

/// One interactive authorization in progress; ends when dropped.
struct InInteraction<'a>(&'a Waiting);

impl Waiting {
    fn enter(&self, until: Timestamp) -> InInteraction<'_> {
        self.extend(until);
        self.0.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
        InInteraction(self)
    }

    fn extend(&self, until: Timestamp) {
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.1 = Some(w.1.map_or(until, |t| t.max(until)));
    }

    pub(super) fn deadline(&self) -> Option<Timestamp> {
        let w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if w.0 > 0 { w.1 } else { None }
    }
}

impl Drop for InInteraction<'_> {
    fn drop(&mut self) {
        let mut w = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.0 -= 1;
        if w.0 == 0 {
            w.1 = None;
        }
    }
}

impl FactoryProvider {
    /// Step-up after a 403 / `insufficient_scope`: no refresh (it cannot add a scope), but a new
    /// interactive authorization for the union of the held scopes and the challenged ones.
    ///
    /// Bounded: when the token refused now is the one a step-up for the same scope set already
    /// produced, the authorization server did not grant the scope, and the request fails with
    /// [`Recovery::InsufficientScope`] instead of prompting again. Without an interactive flow
    /// it fails the same way at once.
    pub(super) async fn step_up(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        if self.interactive.is_none() || self.config.client.is_none() {
            return Ok(Recovery::InsufficientScope);
        }
        let held = self
            .storage
            .tokens(&self.key)
            .await
            .map_err(|e| Error::store("reading the stored tokens", e))?;
        let held_scope = held.as_ref().and_then(|s| s.scope().map(str::to_owned));
        let held_scope = held_scope.or_else(|| self.config.scopes.clone()).unwrap_or_default();
        let target = mcp_oauth::union_scopes(&held_scope, &challenge.scope().unwrap_or_default());
        let set = scope_set(&target);
        if let Some(rejected) = rejected
            && self.step_ups.produced(&self.key, &set).as_ref() == Some(rejected)
        {
            tracing::info!(scopes = %set, "step-up already made for this scope set; not granted");
            return Ok(Recovery::InsufficientScope);
        }
        // A peer's step-up (or refresh) may have stored newer tokens: try them first. Otherwise
        // the COMPLETED authorization is spent for this purpose: a new one is needed.
        if let Recovery::Retry(token) = self.fall_back(rejected).await? {
            return Ok(Recovery::Retry(token));
        }
        match self
            .interactive(Some(challenge), AuthorizationReason::InsufficientScope, Some(&target))
            .await?
        {
            Recovery::Retry(token) if Some(&token) != rejected => {
                self.step_ups.record(&self.key, &set, token.clone());
                Ok(Recovery::Retry(token))
            }
            Recovery::Retry(_) => Ok(Recovery::InsufficientScope),
            other => Ok(other),
        }
    }

    /// The interactive flow: reuse a fresh PENDING flow (no second prompt), else discover,
    /// register (reusing the stored client), build the PKCE URL, create the PENDING flow and
    /// its state mapping, and prompt. Then wait for the callback (or return early).
    pub(super) async fn interactive(
        &self,
        challenge: Option<&Refusal>,
        reason: AuthorizationReason,
        step_up: Option<&str>,
    ) -> Result<Recovery, Error> {
        let Some((oauth, hook)) = &self.interactive else {
            return Ok(Recovery::AuthorizationRequired);
        };
        let Some(client_config) = &self.config.client else {
            return Ok(Recovery::AuthorizationRequired);
        };
        let span = tracing::info_span!(
            "mcp_interactive",
            tenant = self.key.tenant(),
            server = self.key.server(),
            ?reason,
        );
        async {
            let wait = self.config.oauth_wait_timeout;
            let _interaction = self.waiting.enter(self.flows.clock().now().saturating_add(wait));
            let decision = match self
                .prompt(oauth, hook.as_ref(), client_config, challenge, reason, step_up)
                .await?
            {
                Some(decision) => decision,
                None => HookDecision::Wait, // joined a fresh PENDING flow: no second prompt
            };
            if decision == HookDecision::ReturnEarly {
                return Ok(Recovery::AuthorizationRequired);
            }
            self.waiting.extend(self.flows.clock().now().saturating_add(wait));
            let waited =
                within(self.flows.clock(), wait, self.flows.wait::<serde_json::Value>(&self.oauth))
                    .await;
            match waited {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::info!(error = %e, "interactive authorization did not complete");
                    return Ok(Recovery::AuthorizationRequired);
                }
                None => {
                    return Err(Error::Timeout {
                        operation: "interactive authorization",
                        after: wait,
                    });
                }
            }
            self.invalidate_lookup(None).await;
            match self.lookup().await? {
                Some(token) => Ok(Recovery::Retry(token)),
                None => Ok(Recovery::AuthorizationRequired),
            }
        }
        .instrument(span)
        .await
    }

    /// The client registration for `discovery`'s issuer: the stored one, else one new
    /// registration, stored before anyone uses it. Single-flight per (token key, issuer), so
    /// that concurrent first connects register one client and every pending authorization
    /// names the client that is stored. A failed read of the stored client is
    /// [`Error::Store`], never "no client" (a good registration is not registered over).
    pub(super) async fn registration(
        &self,
        oauth: &OAuthClient,
        discovery: &mcp_oauth::Discovery,
        client_config: &mcp_oauth::ClientConfig,
    ) -> Result<mcp_oauth::ClientRegistration, Error> {
        let flight = (self.key.clone(), discovery.issuer().to_owned());
        let (storage, key) = (self.storage.clone(), self.key.clone());
        let (oauth, discovery, client_config) =
            (oauth.clone(), discovery.clone(), client_config.clone());
        let options = flow_state::CallOptions::new(REGISTRATION_DEADLINE);
        let span = tracing::info_span!("mcp_registration", issuer = discovery.issuer());
        self.registrations
            .call_with(flight, options, move |attempt| {
                async move {
                    let stored = storage
                        .client(&key)
                        .await
                        .map_err(|e| Error::store("reading the client registration", e))?;
                    if let Some((d, r)) = stored.as_ref().and_then(decode_stored_client)
                        && d.issuer() == discovery.issuer()
                    {
                        return Ok(r);
                    }
                    // From here on the authorization server may create a client: whatever
                    // happens to the callers, the result is stored.
                    attempt.keep();
                    let r = oauth
                        .register(&discovery, &client_config)
                        .await
                        .map_err(|e| Error::provider(REGISTRATION, e))?;
                    storage
                        .store_client(&key, &stored_client(&discovery, &r))
                        .await
                        .map_err(|e| Error::store("storing the client registration", e))?;
                    Ok(r)
                }
                .instrument(span)
            })
            .await
            .map_err(|e| Error::provider(REGISTRATION, e))?
    }

    /// When this factory replaces a PENDING authorization created at `created_at`: after the
    /// OAuth wait timeout (nobody waits for it any more), or when its authorization request
    /// expires, whichever comes first. Also the expiry the hook is shown.
    fn replaced_at(&self, created_at: Timestamp, meta: Option<&OAuthFlowMeta>) -> Timestamp {
        let waited = created_at.saturating_add(self.config.oauth_wait_timeout);
        match meta {
            Some(m) => waited.min(request_expiry(&m.pending)),
            None => waited,
        }
    }

    /// Claim the right to replace the stale PENDING authorization created at `created_at`:
    /// exactly one request per generation wins (an atomic insert of a claim flow named by the
    /// generation), so two requests that both found it stale never both replace it, and the
    /// loser never deletes the winner's new flow. The winner completes the claim flow once the
    /// new flow exists (or it gave up); losers wait on it. Returns the claim and whether this
    /// request won it.
    async fn claim_replacement(&self, created_at: Timestamp) -> Result<(FlowKey, bool), Error> {
        let id = format!("{}@{}", self.config.flow_id(), created_at.as_millis());
        let claim = FlowKey::scoped(Some(&self.config.tenant), REPLACE_FLOW, &id)
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        match self.flows.init_unless_completed(&claim, serde_json::Value::Null).await {
            Ok(_) => Ok((claim, true)),
            Err(
                flow_state::Error::AlreadyPending { .. } | flow_state::Error::AlreadySettled { .. },
            ) => Ok((claim, false)),
            Err(e) => Err(Error::store("claiming the stale authorization", e)),
        }
    }

    /// Start a new authorization and prompt; or join a fresh PENDING one (no prompt: the hook's
    /// [`AuthorizationHook::authorization_pending`] decides, `None` when the flow does not carry
    /// its URL or was completed by a peer). A stale PENDING one is replaced by the one request
    /// that claims it; a request that loses the claim, or loses the race to create the new
    /// flow, looks again and joins the flow that won.
    async fn prompt(
        &self,
        oauth: &OAuthClient,
        hook: &dyn AuthorizationHook,
        client_config: &mcp_oauth::ClientConfig,
        challenge: Option<&Refusal>,
        reason: AuthorizationReason,
        step_up: Option<&str>,
    ) -> Result<Option<HookDecision>, Error> {
        // Each round either ends or saw another request change the flow (create or replace
        // it); a few rounds settle any realistic contention.
        for _ in 0..PROMPT_ROUNDS {
            let current = self
                .flows
                .get::<serde_json::Value>(&self.oauth)
                .await
                .map_err(|e| Error::store("reading the authorization flow", e))?;
            match current {
                // The fallback deleted any COMPLETED flow before coming here: one seen now was
                // completed by a peer's authorization since, so it is joined, not replaced.
                Some(flow) if flow.status == FlowStatus::Completed => return Ok(None),
                Some(flow) if flow.status == FlowStatus::Pending => {
                    let meta = serde_json::from_value::<OAuthFlowMeta>(flow.metadata.clone()).ok();
                    let replaced_at = self.replaced_at(flow.created_at, meta.as_ref());
                    if self.flows.clock().now() < replaced_at {
                        return Ok(self.join(hook, meta, reason, replaced_at).await);
                    }
                    let (claim, won) = self.claim_replacement(flow.created_at).await?;
                    if !won {
                        // Another request replaces it: wait until it has, then join.
                        let (flows, wait) = (&self.flows, self.config.oauth_wait_timeout);
                        let replaced = flows.wait::<serde_json::Value>(&claim);
                        let _ = within(flows.clock(), wait, replaced).await;
                        continue;
                    }
                    let started = self
                        .replace(
                            &flow,
                            meta.as_ref(),
                            &claim,
                            (oauth, hook, client_config),
                            (challenge, reason, step_up),
                        )
                        .await;
                    // Whatever happened, the claim is settled: its losers look again.
                    let _ = self.flows.complete_if_pending(&claim, &"replaced").await;
                    match started? {
                        Some(decision) => return Ok(Some(decision)),
                        None => continue,
                    }
                }
                _ => {}
            }
            match self.start(oauth, hook, client_config, challenge, reason, step_up, None).await? {
                Some(decision) => return Ok(Some(decision)),
                // Lost the race to create it: look again, and join the one that won.
                None => continue,
            }
        }
        Ok(None)
    }

    /// Replace the `stale` PENDING flow this request claimed (`claim`): its state mapping goes
    /// (its callback is refused), the flow itself only while it is still that generation
    /// ([`flow_state::FlowManager::delete_generation`]), then a new authorization starts.
    async fn replace(
        &self,
        stale: &flow_state::FlowState<serde_json::Value>,
        meta: Option<&OAuthFlowMeta>,
        claim: &FlowKey,
        (oauth, hook, client_config): (
            &OAuthClient,
            &dyn AuthorizationHook,
            &mcp_oauth::ClientConfig,
        ),
        (challenge, reason, step_up): (Option<&Refusal>, AuthorizationReason, Option<&str>),
    ) -> Result<Option<HookDecision>, Error> {
        if let Some(skey) = meta.and_then(|m| state_key(m.pending.state.secret())) {
            let _ = self.flows.delete(&skey).await;
        }
        // Only that generation, in one compare-and-delete: a flow replaced or settled since
        // (by a peer, or by the flow manager's own stale replacement) is left alone.
        self.flows
            .delete_generation(&self.oauth, stale.created_at, FlowStatus::Pending)
            .await
            .map_err(|e| Error::store("replacing the stale authorization", e))?;
        self.start(oauth, hook, client_config, challenge, reason, step_up, Some(claim)).await
    }

    /// A fresh PENDING authorization exists: no second prompt, but the hook sees it (its URL,
    /// scopes, and `expires_at`, when this factory will replace it) and decides whether this
    /// request waits for it. `None` when the flow does not carry its URL.
    async fn join(
        &self,
        hook: &dyn AuthorizationHook,
        meta: Option<OAuthFlowMeta>,
        reason: AuthorizationReason,
        expires_at: Timestamp,
    ) -> Option<HookDecision> {
        let Some(OAuthFlowMeta { pending, authorization_url: Some(url), .. }) = meta else {
            return None;
        };
        let request = AuthorizationRequest {
            authorization_url: url,
            scopes: pending.scope,
            reason,
            expires_at,
        };
        Some(hook.authorization_pending(request).await)
    }

    /// Discover, register (single-flight), build the PKCE URL, create the PENDING flow (only
    /// where none is live) and its state mapping, and prompt. `None` when another request's
    /// flow was created first. `claim`, when this replaces a stale flow, is completed once the
    /// new flow and its state mapping exist, before the hook is called.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        oauth: &OAuthClient,
        hook: &dyn AuthorizationHook,
        client_config: &mcp_oauth::ClientConfig,
        challenge: Option<&Refusal>,
        reason: AuthorizationReason,
        step_up: Option<&str>,
        claim: Option<&FlowKey>,
    ) -> Result<Option<HookDecision>, Error> {
        let oauth_err = |what: &'static str| move |e: mcp_oauth::Error| Error::provider(what, e);
        let server = self.server()?;
        let bearer = challenge.and_then(Refusal::bearer);
        let discovery = oauth
            .discover(&server, bearer.as_ref())
            .instrument(tracing::info_span!("mcp_discovery", server = %server))
            .await
            .map_err(oauth_err("discovery"))?;
        let registration = self.registration(oauth, &discovery, client_config).await?;
        // Configured scopes are what the token key promises: they win over the server's choice.
        let selected = self
            .config
            .scopes
            .clone()
            .or_else(|| mcp_oauth::select_scope(bearer.as_ref(), &discovery));
        let scope = match step_up {
            Some(target) => {
                Some(mcp_oauth::union_scopes(target, selected.as_deref().unwrap_or_default()))
            }
            None => selected,
        };
        let redirect = client_config
            .redirect_uris
            .first()
            .ok_or_else(|| Error::InvalidConfig("the client config has no redirect URI".into()))?;
        let (url, pending) = oauth
            .authorization_url(&discovery, &registration, redirect, scope.as_deref())
            .map_err(oauth_err("authorization URL"))?;
        let state = pending.state.secret().to_owned();
        let request_expiry = request_expiry(&pending);
        let meta = serde_json::to_value(OAuthFlowMeta {
            pending,
            discovery,
            authorization_url: Some(url.to_string()),
            client_id: Some(registration.client_id.clone()),
        })
        .map_err(|e| Error::provider("encoding the pending authorization", e))?;
        // A peer's authorization may have completed while this one was being prepared: it is
        // joined, never replaced (atomically: no check-then-init window).
        let created_at = match self.flows.init_unless_completed(&self.oauth, meta).await {
            Ok(created_at) => created_at,
            Err(
                flow_state::Error::AlreadyPending { .. } | flow_state::Error::AlreadySettled { .. },
            ) => {
                return Ok(None);
            }
            Err(e) => return Err(Error::store("creating the authorization flow", e)),
        };
        let expires_at =
            created_at.saturating_add(self.config.oauth_wait_timeout).min(request_expiry);
        let mapping = serde_json::to_value(StateMeta {
            tenant: self.config.tenant.clone(),
            user: self.config.user.clone(),
            server: self.config.key_server(),
            flow_id: self.config.flow_id(),
        })
        .map_err(|e| Error::provider("encoding the state mapping", e))?;
        let skey = state_key(&state).ok_or_else(|| Error::provider_msg("invalid state"))?;
        self.flows
            .init(&skey, mapping)
            .await
            .map_err(|e| Error::store("creating the state mapping", e))?;
        if let Some(claim) = claim {
            let _ = self.flows.complete_if_pending(claim, &"replaced").await;
        }
        tracing::info!("interactive authorization started");
        let request = AuthorizationRequest {
            authorization_url: url.to_string(),
            scopes: scope,
            reason,
            expires_at,
        };
        Ok(Some(hook.authorization_required(request).await))
    }
}
