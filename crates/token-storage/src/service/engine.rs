//! The refresh engine: one flight per key, under the cross-process lease when there is one,
//! with the in-doubt intent, fenced writes and a commit retried until it lands.

use super::*;

/// How many times an in-doubt record is tried on transient store errors before the refresh
/// gives up without sending.
pub(super) const COMMIT_TRIES: u32 = 4;

/// Whether a store error may pass (the backend was unreachable).
pub(super) fn transient_store(e: &Error) -> bool {
    matches!(e, Error::StoreUnavailable { .. })
}

/// A held lease, renewed in the background while the refresh runs.
pub(super) struct LeaseGuard {
    held: tokio::sync::Mutex<Held>,
    lost: std::sync::atomic::AtomicBool,
}

impl LeaseGuard {
    pub(super) fn new(held: Held) -> Self {
        LeaseGuard { held: tokio::sync::Mutex::new(held), lost: Default::default() }
    }

    /// Renew every `every` for as long as it is polled; stops renewing once the lease is lost.
    pub(super) async fn keep_renewed(
        &self,
        key: &TokenKey,
        every: Duration,
        clock: &SharedClock,
    ) -> std::convert::Infallible {
        loop {
            clock.sleep(every).await;
            if self.lost.load(Ordering::SeqCst) {
                continue;
            }
            match self.held.lock().await.renew(key).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(%key, "the refresh lease was lost");
                    self.lost.store(true, Ordering::SeqCst);
                }
                // Perhaps applied: the owner token tells at the next renewal or check.
                Err(e) => warn!(%key, error = %e, "could not renew the refresh lease"),
            }
        }
    }

    /// Whether the lease still holds.
    pub(super) async fn check(&self, key: &TokenKey) -> Result<bool, Error> {
        if self.lost.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let held = self.held.lock().await.still_held(key).await?;
        if !held {
            self.lost.store(true, Ordering::SeqCst);
        }
        Ok(held)
    }
}

impl Inner {
    pub(super) fn start_background(
        self: &Arc<Self>,
        key: &TokenKey,
        issuer: &str,
        seen: u64,
        now: Timestamp,
    ) {
        let start = self.slot(key, |s| {
            let failing = s.failure.as_ref().is_some_and(|(until, _)| now < *until);
            let start = !s.background && !failing;
            s.background |= start;
            start
        });
        if !start {
            return;
        }
        debug!(%key, "refreshing ahead of expiry in the background");
        let (inner, key, issuer) = (self.clone(), key.clone(), issuer.to_owned());
        tokio::spawn(async move {
            if let Err(e) = inner.run_flight(&key, &issuer, Trigger::Due { seen }).await {
                debug!(%key, error = %e, "background refresh failed");
            }
            inner.slot(&key, |s| s.background = false);
        });
    }

    pub(super) async fn run_flight(
        self: &Arc<Self>,
        key: &TokenKey,
        issuer: &str,
        trigger: Trigger,
    ) -> Result<Arc<TokenSet>, Error> {
        let mut options =
            CallOptions::new(self.config.refresh_deadline).grace(self.config.refresh_grace);
        if let Some(d) = self.config.caller_deadline {
            options = options.caller_deadline(d);
        }
        let (inner, owned_key, issuer) = (self.clone(), key.clone(), issuer.to_owned());
        let outcome = self
            .flights
            .call_with(key.clone(), options, move |attempt| async move {
                inner.refresh(owned_key, issuer, trigger, attempt).await
            })
            .await;
        match outcome {
            Ok(result) => result,
            Err(SingleFlightError::CallerDeadline | SingleFlightError::Abandoned) => {
                Err(Error::Timeout { key: key.clone() })
            }
            Err(e) => Err(Error::RefreshUnavailable {
                key: key.clone(),
                message: e.to_string(),
                retry_after: None,
            }),
        }
    }

    /// The shared refresh of one key; runs detached from every caller.
    ///
    /// Under the cross-process lease (when configured), renewed in the background for the whole
    /// critical section: the re-read, every attempt, every backoff sleep and the commit. A lease
    /// found lost before a request is sent ends the attempt; the refresh then starts over
    /// (takes the lease again and re-reads, finding a peer's rotation).
    pub(super) async fn refresh(
        self: Arc<Self>,
        key: TokenKey,
        issuer: String,
        trigger: Trigger,
        attempt: Attempt,
    ) -> Result<Arc<TokenSet>, Error> {
        let mut restarts = 0;
        loop {
            let guard = match &self.lease {
                Some(lease) => {
                    // Refreshing ahead of expiry never queues behind a peer's refresh: while the
                    // token is valid, only try the lease; the peer's result will be read later.
                    let ahead = self.valid_ahead(&key, &trigger);
                    let held = if let Some(valid) = ahead {
                        match lease.try_acquire(&key).await? {
                            Some(held) => held,
                            None => {
                                debug!(%key, "a peer holds the refresh lease; serving the valid token");
                                return Ok(valid);
                            }
                        }
                    } else {
                        lease.acquire(&key).await?
                    };
                    debug!(%key, fence = ?held.fence(), "took the refresh lease");
                    // A holder is never dropped at the flight's deadline: a dropped holder
                    // would leave a store lease to expire on its own (the fleet waits a whole
                    // TTL) and could leave its in-doubt intent half done. Every step under the
                    // lease is bounded (store timeouts, the HTTP timeout, the attempt budget),
                    // and the deadline still stops the flight at its next check before a send.
                    attempt.keep();
                    Some(LeaseGuard::new(held))
                }
                None => None,
            };
            let work = self.refresh_held(&key, &issuer, &trigger, &attempt, guard.as_ref());
            let result = match (&guard, &self.lease) {
                (Some(guard), Some(lease)) => {
                    tokio::select! {
                        r = work => r,
                        never = guard.keep_renewed(&key, lease.renew_every(), &self.clock) => match never {},
                    }
                }
                _ => work.await,
            };
            if let Some(guard) = guard {
                guard.held.into_inner().release().await;
            }
            match result {
                Ok(Some(set)) => return Ok(set),
                Ok(None)
                    if restarts < self.config.max_attempts.max(1) && !attempt.is_cancelled() =>
                {
                    restarts += 1;
                    warn!(%key, restarts, "the refresh lease was lost before sending; starting over");
                }
                Ok(None) => {
                    return Err(Error::RefreshUnavailable {
                        key,
                        message: "the refresh lease was lost before the request was sent".into(),
                        retry_after: None,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// For a refresh ahead of expiry: the set in view if it is still valid.
    pub(super) fn valid_ahead(&self, key: &TokenKey, trigger: &Trigger) -> Option<Arc<TokenSet>> {
        if !matches!(trigger, Trigger::Due { .. }) {
            return None;
        }
        let now = self.clock.now();
        let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
        let set = &views.get(key)?.set;
        let valid = set.needs_authorization.is_none() && set.expires_at.is_some_and(|e| now < e);
        valid.then(|| set.clone())
    }

    /// The refresh proper, under the lease when there is one. `Ok(None)`: the lease was found
    /// lost before a request was sent; nothing was sent since.
    pub(super) async fn refresh_held(
        &self,
        key: &TokenKey,
        issuer: &str,
        trigger: &Trigger,
        attempt: &Attempt,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let (key, issuer) = (key.clone(), issuer.to_owned());
        let Some(view) = self.load(&key).await? else {
            return Err(auth(&key, ReauthReason::Missing));
        };
        let mut current = usable(&key, view.set, &issuer)?;
        let now = self.clock.now();
        let still_valid = current.expires_at.is_none_or(|e| now < e);
        match trigger {
            Trigger::Rejected(rejected) if current.access_token != *rejected => {
                debug!(%key, version = current.version, "rejected token already replaced");
                return Ok(Some(current));
            }
            Trigger::Due { .. } if view.refresh_at.is_none_or(|at| now < at) => {
                debug!(%key, version = current.version, "already refreshed");
                return Ok(Some(current));
            }
            Trigger::Due { seen } if current.version != *seen && still_valid => {
                // A peer refreshed while this one waited: its token is valid, use it.
                debug!(%key, version = current.version, "a peer refreshed meanwhile");
                return Ok(Some(current));
            }
            _ => {}
        }
        if let Some(pending) = self.pending_commit(&key, &current) {
            // An earlier refresh's answer that could not be written yet: write it now, never
            // redeem its spent refresh token again.
            info!(%key, "writing a refresh result held in memory since a failed commit");
            return self.commit_set(&key, &current, pending, guard).await;
        }
        let serve_or = |reason| {
            // Refreshing ahead of expiry cannot proceed, but the token is still good.
            if matches!(trigger, Trigger::Due { .. }) && still_valid {
                Ok(Some(current.clone()))
            } else {
                Err(auth(&key, reason))
            }
        };
        let Some(refresh_token) = current.refresh_token.clone() else {
            return serve_or(ReauthReason::NoRefreshToken);
        };
        if current.refresh_token_expires_at.is_some_and(|e| e <= now) {
            return serve_or(ReauthReason::RefreshTokenExpired);
        }
        if let Some(e) = self.cached_failure(&key, now) {
            debug!(%key, "refresh failed recently; not calling the server again yet");
            return Err(e);
        }
        self.check_storm(&key, now)?;
        let client = self.load_client(&key).await?;
        // A DPoP-bound refresh token goes with its key (read only for bound tokens: a Bearer
        // set's refresh costs no extra store read).
        let dpop_bound = current.token_type.eq_ignore_ascii_case("dpop");
        let dpop_key = if dpop_bound { self.load_dpop_key(&key).await? } else { None };
        let request = RefreshRequest {
            refresh_token,
            scope: current.scope.clone(),
            issuer: current.issuer.clone(),
            client: client.as_ref().map(|(_, c)| c.clone()),
            dpop_key,
            dpop_bound,
        };
        // In doubt (issue 12): before the first send, the intent goes into the store, so
        // whoever refreshes next (this flight after a lost answer, or a peer after this process
        // died with its request out) knows the refresh token may be spent. A set found in doubt
        // gets one same-token retry, claimed in the store before it is sent; a set whose retry
        // was claimed already is not presented again.
        let mut retry = match current.doubt {
            Doubt::RetryClaimed => {
                warn!(%key, "the in-doubt refresh token's one retry was claimed by a refresh that did not finish: its rotation was lost in flight");
                let reason = ReauthReason::RotationLostInFlight;
                return self.terminal(&key, &issuer, &current, client, None, reason, guard).await;
            }
            Doubt::Sent => {
                info!(%key, "the refresh token is in doubt (a request may have reached the server unanswered): retrying it once");
                true
            }
            Doubt::No => false,
        };
        let doubt = if retry { Doubt::RetryClaimed } else { Doubt::Sent };
        // The level before this flight's latest in-doubt write: restored if the flight stops
        // without a request that may have reached the server since that write.
        let mut prior = current.doubt;
        match self.record_doubt(&key, &current, doubt, guard).await? {
            Fenced::Written(marked) => current = marked,
            Fenced::Out => return Ok(None),
            Fenced::Conflict(newer) => return self.adopt(&key, &issuer, newer).map(Some),
        }
        let mut tries = 0;
        loop {
            if attempt.is_cancelled() {
                warn!(%key, "refresh abandoned past its deadline before reaching the token endpoint");
                self.restore_doubt(&key, &current, prior, guard).await;
                return Err(Error::Timeout { key });
            }
            // No request without the lease.
            if let Some(guard) = guard {
                match guard.check(&key).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Nothing went out since this flight's latest in-doubt write: take it
                        // back, or the next holder would spend its one same-token retry on a
                        // token never sent. The lease is gone, so this write cannot be fenced;
                        // it is a compare-and-swap on the version of that very write, which
                        // only lands if nobody wrote since, and whoever acts on the intent
                        // (claims the retry, marks the slot) writes first, so it cannot have
                        // acted on it. A new holder that read the intent and has not written
                        // yet finds its write conflicting and reads again.
                        self.restore_doubt(&key, &current, prior, None).await;
                        return Ok(None);
                    }
                    Err(e) => {
                        warn!(%key, error = %e, "could not check the refresh lease; not sending");
                        // Nothing was sent since the latest in-doubt write: take it back
                        // (fenced: it lands only if the lease still holds).
                        self.restore_doubt(&key, &current, prior, Some(guard)).await;
                        return Err(Error::RefreshUnavailable {
                            key,
                            message: format!("could not check the refresh lease: {e}"),
                            retry_after: None,
                        });
                    }
                }
            }
            tries += 1;
            debug!(%key, attempt = tries, version = current.version, retry, "redeeming the refresh token");
            // From here the request may reach the server, which rotates on arrival: the
            // answer must be waited for and committed, never dropped at the flight's deadline.
            attempt.keep();
            let sent_at = self.clock.now();
            match self.refresher.refresh(&key, &request).await {
                Ok(response) => {
                    return self.commit(&key, &current, response, sent_at, guard).await;
                }
                Err(RefreshError::Terminal { code, description }) => {
                    let reason = if retry {
                        warn!(%key, %code, "the in-doubt refresh token was refused: its rotation was lost in flight");
                        ReauthReason::RotationLostInFlight
                    } else {
                        ReauthReason::Rejected { code, description }
                    };
                    return self
                        .terminal(&key, &issuer, &current, client, Some(code), reason, guard)
                        .await;
                }
                Err(e @ RefreshError::Transient { .. }) => {
                    let may_have_acted = e.may_have_acted();
                    let RefreshError::Transient { kind, retry_after, message } = e else {
                        unreachable!()
                    };
                    warn!(%key, attempt = tries, ?kind, %message, may_have_acted, "refresh failed transiently");
                    if retry && kind == TransientKind::Unanswered {
                        // The one same-token retry went unanswered too: presenting the token a
                        // third time is not allowed. (A 5xx *answer* to the retry is retried
                        // within the attempt budget: the server is there, and one that rotated
                        // before failing refuses the next presentation, which then ends here
                        // as a rotation lost in flight, or answers it from its grace window.)
                        warn!(%key, "the retry of the in-doubt refresh token went unanswered: its rotation was lost in flight");
                        let reason = ReauthReason::RotationLostInFlight;
                        return self
                            .terminal(&key, &issuer, &current, client, None, reason, guard)
                            .await;
                    }
                    if may_have_acted && !retry {
                        // The server may have rotated: claim the one same-token retry in the
                        // store before anything else, so a peer taking over after a crash
                        // does not present the token a third time.
                        prior = Doubt::Sent;
                        match self.record_doubt(&key, &current, Doubt::RetryClaimed, guard).await? {
                            Fenced::Written(marked) => current = marked,
                            Fenced::Out => return Ok(None),
                            Fenced::Conflict(newer) => {
                                return self.adopt(&key, &issuer, newer).map(Some);
                            }
                        }
                        retry = true;
                    }
                    let delay = self.backoff(tries, retry_after);
                    let give_up = tries >= self.config.max_attempts.max(1)
                        || retry_after.is_some_and(|r| r > self.config.backoff_max);
                    if give_up {
                        self.restore_doubt(&key, &current, prior, guard).await;
                        let now = self.clock.now();
                        let until =
                            now + self.config.failure_ttl.max(retry_after.unwrap_or_default());
                        let error =
                            Error::RefreshUnavailable { key: key.clone(), message, retry_after };
                        self.slot(&key, |s| s.failure = Some((until, error.clone())));
                        return Err(error);
                    }
                    tokio::select! {
                        () = self.clock.sleep(delay) => {}
                        () = attempt.token().cancelled() => {}
                    }
                }
            }
        }
    }

    /// Record in the store, under the lease, that a refresh of `current` may reach (or may
    /// have reached) the server: `doubt` is [`Doubt::Sent`] before the first send, and
    /// [`Doubt::RetryClaimed`] before the one same-token retry. Transient store errors are
    /// retried (bounded); failing still, the error is returned and nothing is sent.
    pub(super) async fn record_doubt(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        doubt: Doubt,
        guard: Option<&LeaseGuard>,
    ) -> Result<Fenced, Error> {
        let mut marked = current.clone();
        marked.doubt = doubt;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.write_fenced(key, current.version, &marked, guard).await {
                Err(e) if tries < COMMIT_TRIES && transient_store(&e) => {
                    warn!(%key, attempt = tries, error = %e, "could not write the in-doubt record; retrying");
                    self.clock.sleep(self.backoff(tries, None)).await;
                }
                Err(e) if tries > 1 => {
                    // An earlier try may have been applied with its reply lost: the record then
                    // says what this flight meant to write, and giving up would leave it there
                    // unsent (a claimed retry never sent reads as a rotation lost in flight).
                    match self.store.get(&key.record(RecordKind::Tokens)).await {
                        Ok(Some(stored)) if stored.version != current.version => {
                            return self.ours_or_conflict(key, stored, &marked);
                        }
                        Ok(None) => return Ok(Fenced::Conflict(None)),
                        // Unchanged: no try was applied.
                        Ok(Some(_)) => {}
                        Err(read) => {
                            warn!(%key, error = %read, "could not read back the in-doubt record");
                        }
                    }
                    warn!(%key, error = %e, "could not write the in-doubt record");
                    return Err(e);
                }
                Err(e) => {
                    warn!(%key, error = %e, "could not write the in-doubt record");
                    return Err(e);
                }
                Ok(Fenced::Conflict(Some(newer))) if tries > 1 => {
                    return self.ours_or_conflict(key, newer, &marked);
                }
                Ok(outcome) => return Ok(outcome),
            }
        }
    }

    /// `newer`, found in place of the version a write of `written` expected after an earlier
    /// try: that write itself if it is `written` (a try whose reply was lost), else a conflict.
    fn ours_or_conflict(
        &self,
        key: &TokenKey,
        newer: Versioned,
        written: &TokenSet,
    ) -> Result<Fenced, Error> {
        Ok(match self.own_write(key, &newer, written)? {
            Some(ours) => Fenced::Written(ours),
            None => Fenced::Conflict(Some(newer)),
        })
    }

    /// Take back this flight's latest in-doubt write (`current`), restoring the level `prior`
    /// it replaced, when the flight stops (deadline, or giving up) with no request since that
    /// write that can have reached the server: every failure since was known to be before
    /// sending (a lost answer is never followed by this: it is claimed or ends the refresh).
    /// Otherwise an intent left by a flight that never sent would read as a spent token, and a
    /// claimed retry that was never sent as a rotation lost in flight. Best effort, fenced by
    /// `guard`; with `None` (the lease was found lost before sending), fenced by the version of
    /// that write alone, which any later writer replaces.
    pub(super) async fn restore_doubt(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        prior: Doubt,
        guard: Option<&LeaseGuard>,
    ) {
        if current.doubt == prior {
            return;
        }
        // Retried like the intent itself (a failed write is not applied; a lost reply is found
        // as our own write): a take-back that failed once would leave a claimed retry that was
        // never sent, which the next refresh reads as a rotation lost in flight.
        match self.record_doubt(key, current, prior, guard).await {
            Ok(Fenced::Written(_)) => {}
            Ok(_) => debug!(%key, "the in-doubt record changed since; nothing to take back"),
            Err(e) => debug!(%key, error = %e, "could not take back the in-doubt record"),
        }
    }

    /// `newer` (found by a conflict) as `written` with its version, if it is that very set (a
    /// write of ours whose reply was lost).
    pub(super) fn own_write(
        &self,
        key: &TokenKey,
        newer: &Versioned,
        written: &TokenSet,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let mut found = open_tokens(&*self.keys, &key.record(RecordKind::Tokens), newer)?;
        let generation = found.generation;
        (found.version, found.generation) = (written.version, written.generation);
        if found != *written || generation <= written.generation {
            return Ok(None);
        }
        (found.version, found.generation) = (newer.version, generation);
        let found = Arc::new(found);
        self.install(key, found.clone());
        Ok(Some(found))
    }

    /// A write of the token record that lands only while the lease holds (when there is one):
    /// [`Fenced::Out`] if the lease was found lost (nothing written). What the fence
    /// guarantees with each kind of lease: see the `lease` module.
    pub(super) async fn write_fenced(
        &self,
        key: &TokenKey,
        expected: u64,
        set: &TokenSet,
        guard: Option<&LeaseGuard>,
    ) -> Result<Fenced, Error> {
        let written = match guard {
            Some(guard) => {
                // One step with the lease check where the backend can (a Redis script when
                // the lease lives on the same server); else the check, then the write.
                let lost = || {
                    warn!(%key, "the refresh lease was lost: not writing under it");
                    guard.lost.store(true, Ordering::SeqCst);
                    Ok(Fenced::Out)
                };
                if guard.lost.load(Ordering::SeqCst) {
                    return lost();
                }
                let (record, set, sealed) = self.seal_tokens(key, set.clone())?;
                let held = guard.held.lock().await;
                let fence = held.write_fence();
                let Some(swap) = self
                    .store
                    .compare_and_swap_fenced(&record, Some(expected), sealed, &fence)
                    .await?
                else {
                    return lost();
                };
                self.swapped(key, set, swap)
            }
            None => self.write_tokens(key, Some(expected), set.clone()).await?,
        };
        Ok(match written {
            Ok(written) => Fenced::Written(written),
            Err(newer) => Fenced::Conflict(newer),
        })
    }

    /// A refresh result that an earlier commit could not write, if it was derived from the
    /// generation `current` still holds (same refresh token, no marker: a peer may have
    /// recorded that generation in doubt since).
    pub(super) fn pending_commit(&self, key: &TokenKey, current: &TokenSet) -> Option<TokenSet> {
        if current.needs_authorization.is_some() {
            return None;
        }
        self.slot(key, |s| match &s.pending {
            Some((base, set)) if *base == current.refresh_token => Some(set.clone()),
            _ => None,
        })
    }

    pub(super) fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.config.backoff_max);
        // Equal jitter: between half and all of the exponential delay.
        let delay = mcp_clock::equal_jitter(exp);
        delay.max(retry_after.unwrap_or_default())
    }

    /// Persist a refresh result if nothing newer was stored since `current` was read.
    pub(super) async fn commit(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        response: TokenResponse,
        sent_at: Timestamp,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        // Lifetimes count from when the request left, not from when the answer came: the
        // server may have issued the tokens at any time in between, and a late answer (2 s on
        // a 3 s token) would otherwise make us send tokens the server has already expired.
        let mut set = TokenSet::from_response(
            response,
            &current.issuer,
            sent_at,
            self.config.max_date_correction,
        );
        // Obtained now: the refresh-ahead window is a fraction of the life left on arrival,
        // so a token is never due the moment it lands.
        let now = self.clock.now();
        set.obtained_at = now;
        if set.refresh_token.is_none() {
            // A non-rotating server: the old refresh token stays.
            set.refresh_token = current.refresh_token.clone();
            set.refresh_token_expires_at = current.refresh_token_expires_at;
        }
        if set.scope.is_none() {
            set.scope = current.scope.clone();
        }
        self.record_write(key, now);
        self.commit_set(key, current, set, guard).await
    }

    /// Write `set`, derived from `current`, with a compare-and-swap under the lease (offered
    /// on the version read even if the lease lapsed: see the `lease` module).
    ///
    /// A transient store error is retried with backoff under the lease (which the flight keeps
    /// renewing) until the write lands: releasing the lease with the rotated set only in
    /// memory would let a peer re-read the old generation and present its spent refresh token
    /// (the model's "commit retries capped, then release" counterexample). The set is held in
    /// memory meanwhile. A conflict whose stored value is this very set (a write whose reply
    /// was lost) counts as written; a conflict with a peer's failure marker of the set this
    /// refresh read does not beat this valid new set. If the lease is found lost and the
    /// unfenced write fails too, the set stays in memory and is served; the next refresh writes
    /// it instead of redeeming again.
    pub(super) async fn commit_set(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        mut set: TokenSet,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let record = key.record(RecordKind::Tokens);
        let mut expected = current.version;
        set.doubt = Doubt::No;
        set.generation = current.generation;
        let mut tries = 0u32;
        let served = |set: &TokenSet| {
            let mut served = set.clone();
            served.version = current.version;
            Arc::new(served)
        };
        loop {
            tries += 1;
            let outcome = match self.write_fenced(key, expected, &set, guard).await {
                Ok(Fenced::Out) => {
                    // The lease lapsed while the request was out (a pause past the TTL, which
                    // the protocol assumes away). The redemption has spent the old refresh
                    // token: the new set is the only live one, so it is still offered to the
                    // compare-and-swap on the version read (any writer since wins, and a peer
                    // that re-read that version finds this set instead of presenting the spent
                    // token). Only if the store refuses it too is it held in memory.
                    warn!(%key, "the refresh lease was lost before the commit; committing on the version read");
                    match self.write_tokens(key, Some(expected), set.clone()).await {
                        Ok(Ok(stored)) => Ok(stored),
                        Ok(Err(newer)) => Err(newer),
                        Err(e) => {
                            warn!(%key, error = %e, "could not write the refreshed tokens without the lease; holding them in memory");
                            self.slot(key, |s| {
                                s.pending = Some((current.refresh_token.clone(), set.clone()))
                            });
                            return Ok(Some(served(&set)));
                        }
                    }
                }
                Ok(Fenced::Written(stored)) => Ok(stored),
                Ok(Fenced::Conflict(newer)) => Err(newer),
                Err(e) if transient_store(&e) => {
                    warn!(%key, attempt = tries, error = %e, "could not write the refreshed tokens; retrying under the lease");
                    self.slot(key, |s| {
                        s.pending = Some((current.refresh_token.clone(), set.clone()))
                    });
                    self.clock.sleep(self.backoff(tries.min(16), None)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match outcome {
                Ok(stored) => {
                    self.slot(key, |s| s.pending = None);
                    self.clear_failure(key);
                    info!(%key, from = current.version, to = stored.version, "refreshed tokens");
                    if let Some(hook) = &self.on_refresh {
                        hook(key, current, &stored);
                    }
                    return Ok(Some(stored));
                }
                Err(Some(newer)) => {
                    if tries > 1
                        && let Some(stored) = self.own_write(key, &newer, &set)?
                    {
                        // Our own write, whose reply was lost.
                        self.slot(key, |s| s.pending = None);
                        self.clear_failure(key);
                        info!(%key, from = current.version, to = stored.version, "refreshed tokens (the write's reply was lost)");
                        if let Some(hook) = &self.on_refresh {
                            hook(key, current, &stored);
                        }
                        return Ok(Some(stored));
                    }
                    let found = open_tokens(&*self.keys, &record, &newer)?;
                    if found.needs_authorization.is_some()
                        && found.refresh_token.is_none()
                        && found.access_token == current.access_token
                    {
                        // A peer's failure marker of the very set this refresh read (it
                        // presented a token this refresh had already spent): never beats the
                        // valid new set in hand. A marker of any other set is newer news.
                        warn!(%key, marker = newer.version, "replacing a peer's failure marker with a valid refreshed set");
                        expected = newer.version;
                        set.generation = found.generation;
                        continue;
                    }
                    warn!(
                        %key,
                        read = current.version,
                        stored = newer.version,
                        "discarding a refresh result: the tokens were replaced while it ran"
                    );
                    self.slot(key, |s| s.pending = None);
                    return self.adopt(key, &current.issuer, Some(newer)).map(Some);
                }
                Err(None) => {
                    warn!(%key, read = current.version, "discarding a refresh result: the tokens were deleted while it ran");
                    self.slot(key, |s| s.pending = None);
                    return self.adopt(key, &current.issuer, None).map(Some);
                }
            }
        }
    }

    /// Serve what a conflict found in place of the set we read.
    pub(super) fn adopt(
        &self,
        key: &TokenKey,
        issuer: &str,
        newer: Option<Versioned>,
    ) -> Result<Arc<TokenSet>, Error> {
        let Some(newer) = newer else { return Err(auth(key, ReauthReason::Missing)) };
        let set = open_tokens(&*self.keys, &key.record(RecordKind::Tokens), &newer)?;
        usable(key, self.install(key, Arc::new(set)).set, issuer)
    }

    /// A terminal refresh error (`code`; `None` for a rotation lost in flight found without
    /// an answer): adopt a peer's newer tokens if there are any, else mark the slot under the
    /// lease (and drop the client registration on `invalid_client`). A lease found lost leaves
    /// no marker: the slot is a peer's now, and this refresh ends transiently.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn terminal(
        &self,
        key: &TokenKey,
        issuer: &str,
        current: &TokenSet,
        client: Option<(u64, ClientRegistration)>,
        code: Option<TerminalCode>,
        reason: ReauthReason,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let record = key.record(RecordKind::Tokens);
        let stored = self.store.get(&record).await?;
        if stored.as_ref().map(|v| v.version) != Some(current.version) {
            info!(%key, ?code, "refresh rejected, but newer tokens were stored meanwhile: adopting them");
            return self.adopt(key, issuer, stored).map(Some);
        }
        warn!(%key, ?code, "refresh rejected for good; the slot needs authorization");
        if code == Some(TerminalCode::InvalidClient)
            && let Some((version, _)) = client
        {
            self.store.delete_if(&key.record(RecordKind::Client), Some(version)).await?;
        }
        let mut marked = current.clone();
        marked.doubt = Doubt::No;
        marked.refresh_token = None;
        marked.refresh_token_expires_at = None;
        marked.needs_authorization = Some(reason.clone());
        match self.write_fenced(key, current.version, &marked, guard).await? {
            Fenced::Written(_) => Err(auth(key, reason)),
            Fenced::Conflict(newer) => self.adopt(key, issuer, newer).map(Some),
            Fenced::Out => Err(Error::RefreshUnavailable {
                key: key.clone(),
                message: "the refresh lease was lost before the refusal could be recorded".into(),
                retry_after: None,
            }),
        }
    }
}

/// How a write under the lease ended.
pub(super) enum Fenced {
    /// Written: the set as stored, with its new version.
    Written(Arc<TokenSet>),
    /// The stored version was another: what is there.
    Conflict(Option<Versioned>),
    /// The lease was found lost: nothing written.
    Out,
}
