//! The authorize endpoint's decisions: scopes, pending authorizations, codes.

use super::*;

impl Core {
    /// Validate the scope asked at the authorize endpoint; default it when empty.
    pub(crate) fn resolve_scope(&self, requested: Vec<String>) -> Result<Vec<String>, OAuthError> {
        if requested.is_empty() {
            return Ok(self.config.default_scopes.clone());
        }
        if let Some(bad) = requested.iter().find(|s| !self.config.scopes_supported.contains(s)) {
            return Err(OAuthError::new("invalid_scope", format!("unsupported scope {bad}")));
        }
        Ok(requested)
    }

    /// Record an authorization request; in manual mode, the receiver resolves when the test
    /// decides.
    pub(crate) fn authorization_requested(&self, req: &AuthorizeRequest) {
        self.record(
            |s| s.authorization_requests += 1,
            Some(AuthEventKind::AuthorizationRequested {
                client_id: req.client_id.clone(),
                scope: join(&req.scope),
            }),
        );
    }

    pub(crate) fn wait_for_decision(&self, req: &AuthorizeRequest) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let client_name = self.client(&req.client_id).and_then(|c| c.name);
        let k = self.knobs.get();
        let mut inner = self.lock(self.now(&k));
        inner.pending.push(Pending {
            info: PendingAuthorization {
                client_id: req.client_id.clone(),
                scope: join(&req.scope),
                redirect_uri: req.redirect_uri.clone(),
                resource: req.resource.clone(),
                client_name,
            },
            decide: tx,
        });
        drop(inner);
        self.pending_changed.notify_waiters();
        rx
    }

    pub(crate) fn pending(&self) -> Vec<PendingAuthorization> {
        let k = self.knobs.get();
        let mut inner = self.lock(self.now(&k));
        inner.pending.retain(|p| !p.decide.is_closed());
        inner.pending.iter().map(|p| p.info.clone()).collect()
    }

    /// Decide every pending authorization; how many were decided.
    pub(crate) fn decide_pending(&self, approve: bool) -> usize {
        let k = self.knobs.get();
        let pending = std::mem::take(&mut self.lock(self.now(&k)).pending);
        pending.into_iter().filter_map(|p| p.decide.send(approve).ok()).count()
    }

    /// Issue a code for an approved request.
    pub(crate) fn approve(&self, req: AuthorizeRequest) -> String {
        let k = self.knobs.get();
        let now = self.now(&k);
        let code = random_token("code_");
        let mut inner = self.lock(now);
        inner.stats.authorizations_approved += 1;
        push_event(
            &mut inner,
            now,
            AuthEventKind::AuthorizationApproved { client_id: req.client_id.clone() },
        );
        inner.codes.insert(
            code.clone(),
            Code {
                client_id: req.client_id,
                redirect_uri: req.redirect_uri,
                challenge: req.challenge,
                scope: req.scope.into_iter().filter(|s| !k.withheld_scopes.contains(s)).collect(),
                resource: req.resource,
                expires: now + CODE_LIFETIME,
                redeemed_family: None,
            },
        );
        code
    }

    pub(crate) fn denied(&self, client_id: &str) {
        self.record(
            |s| s.authorizations_denied += 1,
            Some(AuthEventKind::AuthorizationDenied { client_id: client_id.to_owned() }),
        );
    }
}

pub(super) fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}
