//! The silent refresh after a 401: budgeted, led once per key, and the fallback when it fails.

use super::*;

use flow_state::Flight;

/// How long after its budget a timed-out refresh still answers the 401s that join it with its
/// outcome (LibreChat's abort grace), unless it settles first.
const LEAD_GRACE: Duration = Duration::from_secs(1);

/// The refreshes led right now, per token key (which includes the configuration digest), with
/// the leader's deadline: a 401 that finds its key led joins that refresh (`coalesced`) instead
/// of leading one, and waits no longer than the leader does. Followers do not wait for the
/// leader's value: each runs its own `force_refresh`, which token storage coalesces into the
/// one grant; they only read who leads and until when. A led refresh that ran out of its budget
/// keeps its lead until the refresh itself settles or [`LEAD_GRACE`] passes, so a 401 arriving
/// meanwhile gets the leader's outcome (timed out) at once instead of waiting a budget of its
/// own on the same hung refresh (the seed's scenario 21).
pub(super) type Leaders = SingleFlight<TokenKey, ()>;

/// One check at a time per key of whether the server moved to another authorization server.
pub(super) type IssuerChecks = SingleFlight<TokenKey, bool>;

/// How long callers wait for that check (discovery's own HTTP timeouts bound it too).
const ISSUER_CHECK_DEADLINE: Duration = Duration::from_secs(30);

impl FactoryProvider {
    pub(super) async fn refresh(
        &self,
        rejected: &Secret,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        if self.interactive.is_some()
            && self.config.client.is_some()
            && self.authorization_server_moved(challenge).await
        {
            // SEP-2352: the grant and the client belong to the old authorization server; a
            // refresh there would get tokens this server refuses. Authorize at the new one
            // (the registration step registers anew: the old credentials stay with the old).
            // Tokens stored since (a peer's new authorization) are used; the last completed
            // authorization is stale.
            if let Recovery::Retry(token) = self.fall_back(Some(rejected)).await? {
                return Ok(Recovery::Retry(token));
            }
            return self
                .interactive(Some(challenge), AuthorizationReason::RefreshFailed, None)
                .await;
        }
        let recovery = self.silent_refresh(rejected).await;
        if let (Some(workload), Ok(Recovery::AuthorizationRequired)) = (&self.workload, &recovery) {
            return self.workload_grant(workload, Some(challenge), Some(rejected)).await;
        }
        match recovery {
            Ok(Recovery::AuthorizationRequired)
            | Err(Error::Timeout { .. })
            | Err(Error::Provider { .. })
                if self.interactive.is_some() && self.config.client.is_some() =>
            {
                self.interactive(Some(challenge), AuthorizationReason::RefreshFailed, None).await
            }
            other => other,
        }
    }

    /// Whether the server's metadata now names another authorization server than the one the
    /// stored client registration belongs to. A failed discovery says no (the refresh decides).
    ///
    /// One check per key at a time: a burst of 401s makes one discovery, not one each.
    async fn authorization_server_moved(&self, challenge: &Refusal) -> bool {
        let Some((oauth, _)) = &self.interactive else { return false };
        let Ok(server) = self.server() else { return false };
        let (oauth, bearer) = (oauth.clone(), challenge.bearer());
        let (storage, key) = (self.storage.clone(), self.key.clone());
        let options = flow_state::CallOptions::new(ISSUER_CHECK_DEADLINE);
        let moved = self.issuer_checks.call_with(self.key.clone(), options, move |_| async move {
            let Ok(Some(client)) = storage.client(&key).await else { return false };
            match oauth.discover(&server, bearer.as_ref()).await {
                Ok(discovery) if discovery.issuer() != client.issuer => {
                    tracing::info!(
                        from = %client.issuer,
                        to = discovery.issuer(),
                        "the server moved to another authorization server"
                    );
                    true
                }
                _ => false,
            }
        });
        moved.await.unwrap_or(false)
    }

    async fn silent_refresh(&self, rejected: &Secret) -> Result<Recovery, Error> {
        let span = tracing::info_span!(
            "mcp_refresh",
            tenant = self.key.tenant(),
            server = self.key.server(),
            outcome = tracing::field::Empty,
        );
        async {
            let record = |outcome: &'static str, counter: &AtomicU64| {
                tracing::Span::current().record("outcome", outcome);
                bump(counter);
            };
            let Some(issuer) = self.issuer().await? else {
                record("rejected", &self.counters.rejected);
                return self.fall_back(Some(rejected)).await;
            };
            let rejected_ts = rejected.clone();
            // Lead or join first, then read: a refresh that finished before this 401 led is
            // then seen as stored (adopted), not led again.
            let budget = self.config.refresh_budget();
            let now = self.flows.clock().now();
            let lead = match self.leaders.lead(self.key.clone(), Some(now.saturating_add(budget))) {
                Flight::Lead(lead) => Ok(lead),
                Flight::Follow(follower) => Err(follower.deadline()),
            };
            let led = lead.is_ok();
            let before = self.storage.tokens(&self.key).await.ok().flatten();
            let adopted = before.as_ref().is_some_and(|s| *s.access_token() != rejected_ts);
            if let Some(set) = before
                .as_ref()
                .filter(|s| adopted && s.needs_authorization().is_none() && !self.expired(s))
            {
                // A peer already stored newer tokens: use them, without joining whatever
                // refresh may still be in flight for the key.
                drop(lead);
                record("adopted", &self.counters.adopted);
                self.invalidate_lookup(Some(&CachedToken::of(set))).await;
                return Ok(Recovery::Retry(set.access_token().clone()));
            }
            // A joiner waits no longer than the leader: not at all once the leader timed out
            // (unless newer tokens are stored already: they are served).
            let wait = match &lead {
                Err(Some(led_until)) if !adopted => budget.min(led_until.saturating_since(now)),
                _ => budget,
            };
            let (storage, key, issuer) = (self.storage.clone(), self.key.clone(), issuer.clone());
            let rejected_owned = rejected_ts.clone();
            let mut refresh =
                Box::pin(
                    async move { storage.force_refresh(&key, &issuer, &rejected_owned).await },
                );
            let outcome = if wait.is_zero() {
                None
            } else {
                within(self.flows.clock(), wait, &mut refresh).await
            };
            match (outcome.is_none(), lead) {
                // Timed out leading: the lead lasts until the refresh itself settles, or the
                // abort grace after the deadline passes (the seed's lock release).
                (true, Ok(lead)) => {
                    let clock = self.flows.clock().clone();
                    let until = now.saturating_add(budget).saturating_add(LEAD_GRACE);
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = refresh => {}
                            () = clock.sleep_until(until) => {}
                        }
                        drop(lead);
                    });
                }
                (_, lead) => drop(lead),
            }
            match outcome {
                Some(Ok(set)) if *set.access_token() != rejected_ts => {
                    if adopted {
                        record("adopted", &self.counters.adopted);
                    } else if led {
                        record("refreshed", &self.counters.refreshed);
                    } else {
                        record("coalesced", &self.counters.coalesced);
                    }
                    self.invalidate_lookup(Some(&CachedToken::of(&set))).await;
                    Ok(Recovery::Retry(set.access_token().clone()))
                }
                Some(Ok(_)) => {
                    record("rejected", &self.counters.rejected);
                    self.fall_back(Some(rejected)).await
                }
                Some(Err(e)) if e.is_authorization_required() => {
                    record("rejected", &self.counters.rejected);
                    self.fall_back(Some(rejected)).await
                }
                Some(Err(
                    e @ (token_storage::Error::StoreUnavailable { .. }
                    | token_storage::Error::Store { .. }
                    | token_storage::Error::Decrypt { .. }
                    | token_storage::Error::KeyProvider { .. }),
                )) => {
                    // The store failed, not the authorization: no prompt over it.
                    record("transient", &self.counters.transient);
                    Err(Error::store("refreshing the tokens", e))
                }
                Some(Err(e)) => {
                    record("transient", &self.counters.transient);
                    if let Recovery::Retry(token) = self.fall_back(Some(rejected)).await? {
                        return Ok(Recovery::Retry(token));
                    }
                    Err(Error::provider("silent refresh failed", e))
                }
                None => {
                    record("timed_out", &self.counters.timed_out);
                    tracing::warn!(?wait, "silent refresh did not finish within its budget");
                    if let Recovery::Retry(token) = self.fall_back(Some(rejected)).await? {
                        return Ok(Recovery::Retry(token));
                    }
                    Err(Error::Timeout { operation: "silent refresh", after: wait })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The silent refresh failed: a COMPLETED interactive flow of this tenant is stale now, and
    /// so is its state mapping.
    ///
    /// Unless usable tokens other than `rejected` are stored by now (a re-authorization that
    /// finished while this refresh failed): then that COMPLETED flow is current, and the request
    /// is retried with its token.
    pub(super) async fn fall_back(&self, rejected: Option<&Secret>) -> Result<Recovery, Error> {
        // Read the flow before the tokens: the callback stores tokens before it completes the
        // flow, so a COMPLETED flow read here whose tokens are not newer is really stale.
        let flow = self
            .flows
            .get::<serde_json::Value>(&self.oauth)
            .await
            .map_err(|e| Error::store("reading the authorization flow", e))?;
        let stored = self
            .storage
            .tokens(&self.key)
            .await
            .map_err(|e| Error::store("reading the stored tokens", e))?;
        let now = self.flows.clock().now();
        if let Some(set) = stored
            && set.needs_authorization().is_none()
            && set.expires_at().is_none_or(|e| now < e)
            && rejected.is_none_or(|r| set.access_token().expose() != r.expose())
        {
            bump(&self.counters.adopted);
            return Ok(Recovery::Retry(set.access_token().clone()));
        }
        if let Some(flow) = flow
            && flow.status == FlowStatus::Completed
        {
            if let Ok(meta) = serde_json::from_value::<OAuthFlowMeta>(flow.metadata)
                && let Some(skey) = state_key(meta.pending.state.secret())
            {
                let _ = self.flows.delete(&skey).await;
            }
            let _ = self.flows.delete_if_status(&self.oauth, FlowStatus::Completed).await;
        }
        self.invalidate_lookup(None).await;
        Ok(Recovery::AuthorizationRequired)
    }
}
