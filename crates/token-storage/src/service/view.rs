//! The in-memory view of stored token sets, the storm brake and the failure cache, and the
//! reads and writes of sealed records.

use super::*;

/// The set if it may be served for `issuer`, else why not.
pub(super) fn usable(
    key: &TokenKey,
    set: Arc<TokenSet>,
    issuer: &str,
) -> Result<Arc<TokenSet>, Error> {
    if let Some(reason) = &set.needs_authorization {
        return Err(auth(key, reason.clone()));
    }
    if set.issuer != issuer {
        return Err(auth(
            key,
            ReauthReason::IssuerChanged { stored: set.issuer.clone(), expected: issuer.to_owned() },
        ));
    }
    Ok(set)
}

pub(super) fn open_tokens(
    keys: &dyn KeyProvider,
    record: &str,
    v: &Versioned,
) -> Result<TokenSet, Error> {
    let (plain, generation) = crypto::open_generation(keys, record, &v.value)?;
    let parsed: TokenRecord = serde_json::from_slice(&plain).map_err(|_| Error::Decrypt {
        record: record.to_owned(),
        reason: DecryptFailure::Malformed,
    })?;
    Ok(parsed.into_set(v.version, generation))
}

pub(super) fn open_dpop_key(
    keys: &dyn KeyProvider,
    record: &str,
    v: &Versioned,
) -> Result<Secret, Error> {
    let malformed =
        || Error::Decrypt { record: record.to_owned(), reason: DecryptFailure::Malformed };
    let plain = crypto::open(keys, record, &v.value)?;
    let parsed: serde_json::Value = serde_json::from_slice(&plain).map_err(|_| malformed())?;
    let pem = parsed.get("pem").and_then(|p| p.as_str()).ok_or_else(malformed)?;
    Ok(Secret::new(pem))
}

pub(super) fn open_client(
    keys: &dyn KeyProvider,
    record: &str,
    v: &Versioned,
) -> Result<ClientRegistration, Error> {
    let plain = crypto::open(keys, record, &v.value)?;
    let parsed: ClientRecord = serde_json::from_slice(&plain).map_err(|_| Error::Decrypt {
        record: record.to_owned(),
        reason: DecryptFailure::Malformed,
    })?;
    Ok(parsed.into_registration())
}

impl Inner {
    pub(super) fn fresh_view(
        &self,
        key: &TokenKey,
        issuer: &str,
        now: Timestamp,
    ) -> Option<Arc<TokenSet>> {
        let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
        let view = views.get(key)?;
        let fresh = view.set.needs_authorization.is_none()
            && view.set.issuer == issuer
            && view.refresh_at.is_none_or(|at| now < at);
        fresh.then(|| view.set.clone())
    }

    pub(super) fn slot<T>(&self, key: &TokenKey, f: impl FnOnce(&mut SlotState) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        f(slots.entry(key.clone()).or_default())
    }

    pub(super) fn check_storm(&self, key: &TokenKey, now: Timestamp) -> Result<(), Error> {
        let (limit, window) = (self.config.storm_limit, self.config.storm_window);
        self.slot(key, |s| {
            while s.writes.front().is_some_and(|t| now.saturating_since(*t) >= window) {
                s.writes.pop_front();
            }
            if s.writes.len() >= limit as usize {
                warn!(%key, limit, ?window, "storm brake: too many token writes");
                return Err(Error::WriteStorm { key: key.clone(), limit, window });
            }
            Ok(())
        })
    }

    pub(super) fn record_write(&self, key: &TokenKey, now: Timestamp) {
        self.slot(key, |s| s.writes.push_back(now));
    }

    pub(super) fn clear_failure(&self, key: &TokenKey) {
        self.slot(key, |s| s.failure = None);
    }

    pub(super) fn cached_failure(&self, key: &TokenKey, now: Timestamp) -> Option<Error> {
        self.slot(key, |s| match &s.failure {
            Some((until, e)) if now < *until => Some(e.clone()),
            _ => None,
        })
    }

    /// Install a decrypted set as the view of `key` unless a newer one is there; returns the
    /// view that is in place afterwards (which may be that newer one).
    pub(super) fn install(&self, key: &TokenKey, set: Arc<TokenSet>) -> View {
        self.install_unless_deleted(key, set, None)
    }

    /// [`Inner::install`], skipped if an uninstall happened since `deletions` was read.
    pub(super) fn install_unless_deleted(
        &self,
        key: &TokenKey,
        set: Arc<TokenSet>,
        deletions: Option<u64>,
    ) -> View {
        let refresh_at = set.expires_at.map(|expires_at| {
            let lifetime = expires_at.saturating_since(set.obtained_at);
            let ahead = (self.config.refresh_buffer
                + mcp_clock::jitter(self.config.refresh_jitter))
            .min(lifetime / 2);
            expires_at - ahead
        });
        let view = View { set, refresh_at };
        let mut views = self.views.write().unwrap_or_else(PoisonError::into_inner);
        if deletions.is_some_and(|d| d != self.deletions.load(Ordering::SeqCst)) {
            return view;
        }
        match views.get(key) {
            Some(existing) if existing.set.version >= view.set.version => existing.clone(),
            _ => {
                views.insert(key.clone(), view.clone());
                view
            }
        }
    }

    /// Read the stored token set, decrypting only when the version is not the one in view.
    pub(super) async fn load(&self, key: &TokenKey) -> Result<Option<View>, Error> {
        let record = key.record(RecordKind::Tokens);
        let deletions = self.deletions.load(Ordering::SeqCst);
        let Some(stored) = self.store.get(&record).await? else {
            self.views.write().unwrap_or_else(PoisonError::into_inner).remove(key);
            return Ok(None);
        };
        {
            let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(view) = views.get(key)
                && view.set.version == stored.version
            {
                return Ok(Some(view.clone()));
            }
        }
        let set = open_tokens(&*self.keys, &record, &stored)?;
        self.check_generation(key, &record, &set)?;
        Ok(Some(self.install_unless_deleted(key, Arc::new(set), Some(deletions))))
    }

    /// Refuse a record written after the one in view (a larger store version) whose sealed
    /// generation is older: an older sealed blob written back under the same name (a
    /// rollback). The record is left as it is.
    pub(super) fn check_generation(
        &self,
        key: &TokenKey,
        record: &str,
        set: &TokenSet,
    ) -> Result<(), Error> {
        let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
        match views.get(key) {
            // A newer write (larger version) with an older generation. An older version is
            // only a read that raced a write, not a rollback.
            Some(view)
                if set.version > view.set.version && set.generation < view.set.generation =>
            {
                warn!(%key, found = set.generation, seen = view.set.generation, "refusing a rolled-back token record");
                Err(Error::Decrypt {
                    record: record.to_owned(),
                    reason: DecryptFailure::RolledBack {
                        found: set.generation,
                        seen: view.set.generation,
                    },
                })
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn load_dpop_key(&self, key: &TokenKey) -> Result<Option<Secret>, Error> {
        let record = key.record(RecordKind::DpopKey);
        match self.store.get(&record).await? {
            None => Ok(None),
            Some(v) => Ok(Some(open_dpop_key(&*self.keys, &record, &v)?)),
        }
    }

    pub(super) async fn load_client(
        &self,
        key: &TokenKey,
    ) -> Result<Option<(u64, ClientRegistration)>, Error> {
        let record = key.record(RecordKind::Client);
        match self.store.get(&record).await? {
            None => Ok(None),
            Some(v) => Ok(Some((v.version, open_client(&*self.keys, &record, &v)?))),
        }
    }

    /// Seal and compare-and-swap a token set whose `generation` is that of the record at
    /// `expected`; `Ok(written)` with the set as written (its new version and generation),
    /// `Err(current)` on a conflict.
    pub(super) async fn write_tokens(
        &self,
        key: &TokenKey,
        expected: Option<u64>,
        set: TokenSet,
    ) -> Result<Result<Arc<TokenSet>, Option<Versioned>>, Error> {
        let (record, set, sealed) = self.seal_tokens(key, set)?;
        let swap = self.store.compare_and_swap(&record, expected, sealed).await?;
        Ok(self.swapped(key, set, swap))
    }

    /// The record name, `set` with the generation it is written with, and its sealed bytes.
    pub(super) fn seal_tokens(
        &self,
        key: &TokenKey,
        mut set: TokenSet,
    ) -> Result<(String, TokenSet, Vec<u8>), Error> {
        let record = key.record(RecordKind::Tokens);
        let plain = serde_json::to_vec(&TokenRecord::from_set(&set))
            .map_err(|e| Error::store("could not encode the token set", e))?;
        // `set.generation` is the generation of the record it replaces: the next one is larger,
        // and never below the clock (so a slot deleted and logged into again by another process
        // does not restart below the generation a reader has seen).
        set.generation = (set.generation + 1).max(self.clock.now().as_millis());
        let sealed = crypto::seal_generation(&*self.keys, &record, set.generation, &plain)?;
        Ok((record, set, sealed))
    }

    /// The outcome of writing `set` (sealed by [`Inner::seal_tokens`]).
    pub(super) fn swapped(
        &self,
        key: &TokenKey,
        mut set: TokenSet,
        swap: Swapped,
    ) -> Result<Arc<TokenSet>, Option<Versioned>> {
        match swap {
            Swapped::Swapped { version } => {
                set.version = version;
                let written = Arc::new(set);
                // Between the swap and this line another writer (a login, a refresh) may have
                // replaced this version and put its newer set in the view; the view keeps that
                // one, but the caller gets the set this write stored: a login's own tokens, a
                // refresh's own result for the `on_refresh` hook (never another grant's tokens
                // reported as "the set the refresh replaced `old` with").
                self.install(key, written.clone());
                Ok(written)
            }
            Swapped::Conflict(current) => Err(current),
        }
    }
}
