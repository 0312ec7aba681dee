//! Tokens: the grants, refresh token families with rotation and reuse detection, validation,
//! introspection and revocation.

use super::authorize::valid_verifier;
use super::*;

impl Core {
    /// The `authorization_code` grant.
    pub(crate) fn exchange_code(
        &self,
        client: &Client,
        params: &HashMap<String, String>,
        jkt: Option<&str>,
    ) -> Result<TokenAnswer, OAuthError> {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        let code_value = params
            .get("code")
            .ok_or_else(|| OAuthError::new("invalid_request", "code is required"))?;
        let code = inner
            .codes
            .get_mut(code_value)
            .ok_or_else(|| OAuthError::new("invalid_grant", "unknown code"))?;
        if code.client_id != client.id {
            return Err(OAuthError::new("invalid_grant", "code was issued to another client"));
        }
        if let Some(family) = code.redeemed_family {
            // RFC 6749 §4.1.2: a code used twice revokes what it issued.
            revoke_family(&mut inner, family);
            return Err(OAuthError::new("invalid_grant", "code already used"));
        }
        if now > code.expires {
            return Err(OAuthError::new("invalid_grant", "code expired"));
        }
        if params.get("redirect_uri") != Some(&code.redirect_uri) {
            return Err(OAuthError::new(
                "invalid_grant",
                "redirect_uri does not match the authorization request",
            ));
        }
        let verifier = params
            .get("code_verifier")
            .ok_or_else(|| OAuthError::new("invalid_request", "code_verifier is required"))?;
        if !valid_verifier(verifier) || s256(verifier) != code.challenge {
            return Err(OAuthError::new("invalid_grant", "PKCE verification failed"));
        }
        if let (Some(asked), Some(granted)) = (params.get("resource"), &code.resource)
            && asked != granted
        {
            return Err(OAuthError::new(
                "invalid_target",
                "resource differs from the authorization request",
            ));
        }
        let scope = code.scope.clone();
        let resource = code.resource.clone().or_else(|| params.get("resource").cloned());
        let family = inner.families.len() as u64;
        inner.families.push(Family::default());
        if let Some(code) = inner.codes.get_mut(code_value) {
            code.redeemed_family = Some(family);
        }
        let with_refresh =
            !k.refresh_requires_offline_access || scope.iter().any(|s| s == "offline_access");
        let tokens = issue(
            &mut inner,
            &k,
            now,
            (&client.id, jkt),
            scope,
            resource,
            Some(family),
            with_refresh,
        );
        issued_event(&mut inner, now, "authorization_code", &client.id, &tokens);
        Ok(TokenAnswer { tokens })
    }

    /// The `refresh_token` grant.
    pub(crate) fn refresh(
        &self,
        client: &Client,
        params: &HashMap<String, String>,
        jkt: Option<&str>,
    ) -> Result<TokenAnswer, OAuthError> {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        let value = params
            .get("refresh_token")
            .ok_or_else(|| OAuthError::new("invalid_request", "refresh_token is required"))?;
        let fp = TokenFingerprint::of(value);
        let Some(rt) = inner.refresh.get(value) else {
            return Err(OAuthError::new("invalid_grant", "unknown refresh token"));
        };
        let (rt_client, rt_family, rt_scope, rt_resource) =
            (rt.client_id.clone(), rt.family, rt.scope.clone(), rt.resource.clone());
        let (rt_revoked, rt_expires, rt_superseded) = (rt.revoked, rt.expires, rt.superseded_at);
        let rt_jkt = rt.jkt.clone();
        let count = {
            let c = inner.stats.refresh_redemptions.entry(fp.clone()).or_insert(0);
            *c += 1;
            *c
        };
        push_event(
            &mut inner,
            now,
            AuthEventKind::RefreshRedeemed { refresh_token: fp.clone(), redemption: count },
        );
        if rt_client != client.id {
            return Err(OAuthError::new(
                "invalid_grant",
                "refresh token was issued to another client",
            ));
        }
        // RFC 9449 §5: a bound refresh token is redeemed only with a proof by its key.
        if let Some(bound) = &rt_jkt
            && jkt != Some(bound.as_str())
        {
            inner.stats.dpop_proofs_refused += 1;
            let why = if jkt.is_some() {
                "the refresh token is bound to another DPoP key"
            } else {
                "the refresh token is DPoP-bound: a proof by its key is required"
            };
            return Err(OAuthError::new("invalid_dpop_proof", why));
        }
        let family_revoked = inner.families.get(rt_family as usize).is_none_or(|f| f.revoked);
        if rt_revoked || family_revoked {
            return Err(OAuthError::new("invalid_grant", "refresh token revoked"));
        }
        if rt_expires.is_some_and(|e| now > e) {
            return Err(OAuthError::new("invalid_grant", "refresh token expired"));
        }
        let mut within_grace = false;
        if let Some(superseded) = rt_superseded {
            within_grace = k.reuse_grace.is_some_and(|g| now <= superseded + g);
            if within_grace {
                push_event(
                    &mut inner,
                    now,
                    AuthEventKind::ReuseWithinGrace { refresh_token: fp.clone() },
                );
            } else {
                inner.stats.reuse_detections += 1;
                if k.reuse_detection {
                    revoke_family(&mut inner, rt_family);
                }
                push_event(
                    &mut inner,
                    now,
                    AuthEventKind::ReuseDetected {
                        refresh_token: fp,
                        family_revoked: k.reuse_detection,
                    },
                );
                let why = if k.reuse_detection {
                    "refresh token reuse detected; every token of this grant is revoked"
                } else {
                    "refresh token was rotated"
                };
                return Err(OAuthError::new("invalid_grant", why));
            }
        }
        let asked = params.get("scope").map(|s| split_scope(Some(s)));
        if k.require_scope_on_refresh && asked.as_ref().is_none_or(|a| a.is_empty()) {
            return Err(OAuthError::new(
                "invalid_request",
                "the scope parameter is required on refresh",
            ));
        }
        let scope = match asked {
            Some(asked) if !asked.is_empty() => {
                if let Some(extra) = asked.iter().find(|s| !rt_scope.contains(s)) {
                    return Err(OAuthError::new(
                        "invalid_scope",
                        format!("scope {extra} was not granted"),
                    ));
                }
                asked
            }
            _ => rt_scope.clone(),
        };
        if let (Some(asked), Some(granted)) = (params.get("resource"), &rt_resource)
            && asked != granted
        {
            return Err(OAuthError::new(
                "invalid_target",
                "resource differs from the original grant",
            ));
        }
        // Which refresh token the answer carries.
        let keep = if within_grace {
            let latest =
                inner.families.get(rt_family as usize).and_then(|f| f.latest_refresh.clone());
            Some(latest.unwrap_or_else(|| value.clone()))
        } else if k.omit_refresh_on_refresh {
            None
        } else if k.refresh_rotation {
            if let Some(rt) = inner.refresh.get_mut(value) {
                rt.superseded_at = Some(now);
            }
            let successor = random_token("rt_");
            inner.refresh.insert(
                successor.clone(),
                Refresh {
                    client_id: client.id.clone(),
                    scope: rt_scope.clone(),
                    resource: rt_resource.clone(),
                    family: rt_family,
                    issued: now,
                    expires: k.refresh_token_lifetime.map(|l| now + l),
                    superseded_at: None,
                    revoked: false,
                    jkt: rt_jkt.clone(),
                },
            );
            if let Some(f) = inner.families.get_mut(rt_family as usize) {
                f.latest_refresh = Some(successor.clone());
            }
            Some(successor)
        } else {
            Some(value.clone())
        };
        // A bound refresh token's access tokens are bound to the same key; an unbound one's
        // to the proof's key, if any.
        let bind = rt_jkt.as_deref().or(jkt);
        let mut tokens = issue(
            &mut inner,
            &k,
            now,
            (&client.id, bind),
            scope,
            rt_resource,
            Some(rt_family),
            false,
        );
        tokens.refresh_token = keep;
        issued_event(&mut inner, now, "refresh_token", &client.id, &tokens);
        Ok(TokenAnswer { tokens })
    }

    /// The `client_credentials` grant.
    pub(crate) fn client_credentials(
        &self,
        client: &Client,
        params: &HashMap<String, String>,
        jkt: Option<&str>,
    ) -> Result<TokenAnswer, OAuthError> {
        if client.method == AuthMethod::None {
            return Err(OAuthError::new(
                "unauthorized_client",
                "public clients cannot use client_credentials",
            ));
        }
        if !client.grant_types.iter().any(|g| g == "client_credentials") {
            return Err(OAuthError::new(
                "unauthorized_client",
                "client_credentials is not among the client's grant types",
            ));
        }
        let scope = self.resolve_scope(split_scope(params.get("scope").map(String::as_str)))?;
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        let resource = params.get("resource").cloned();
        let tokens = issue(&mut inner, &k, now, (&client.id, jkt), scope, resource, None, false);
        issued_event(&mut inner, now, "client_credentials", &client.id, &tokens);
        Ok(TokenAnswer { tokens })
    }

    /// The jwt-bearer grant (RFC 7523) with a workload identity assertion (SEP-1933): the
    /// assertion must be one the knobs trust; no refresh token is issued.
    pub(crate) fn jwt_bearer(
        &self,
        client: &Client,
        params: &HashMap<String, String>,
    ) -> Result<TokenAnswer, OAuthError> {
        let k = self.knobs.get();
        let Some(assertion) = params.get("assertion") else {
            return Err(OAuthError::new("invalid_request", "assertion is required"));
        };
        if !k.workload_assertions.iter().any(|a| a == assertion) {
            return Err(OAuthError::new("invalid_grant", "the assertion is not trusted"));
        }
        let scope = self.resolve_scope(split_scope(params.get("scope").map(String::as_str)))?;
        let now = self.now(&k);
        let mut inner = self.lock(now);
        let resource = params.get("resource").cloned();
        let tokens = issue(&mut inner, &k, now, (&client.id, None), scope, resource, None, false);
        issued_event(&mut inner, now, "jwt_bearer", &client.id, &tokens);
        Ok(TokenAnswer { tokens })
    }

    /// Mint tokens without HTTP (for tests that need a token to start with).
    pub(crate) fn mint(
        &self,
        client_id: &str,
        scope: Vec<String>,
        resource: Option<String>,
    ) -> IssuedTokens {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        let family = inner.families.len() as u64;
        inner.families.push(Family::default());
        let tokens =
            issue(&mut inner, &k, now, (client_id, None), scope, resource, Some(family), true);
        issued_event(&mut inner, now, "direct", client_id, &tokens);
        tokens
    }

    /// Check an access token for the resource server.
    pub(crate) fn check_access(&self, token: &str) -> Result<Grant, TokenProblem> {
        let k = self.knobs.get();
        let now = self.now(&k);
        let inner = self.lock(now);
        let access = inner.access.get(token).ok_or(TokenProblem::Unknown)?;
        let family_revoked =
            access.family.is_some_and(|f| inner.families.get(f as usize).is_none_or(|f| f.revoked));
        if access.revoked || family_revoked {
            return Err(TokenProblem::Revoked);
        }
        if now >= access.expires {
            return Err(TokenProblem::Expired);
        }
        Ok(Grant {
            client_id: access.client_id.clone(),
            scope: access.scope.clone(),
            resource: access.resource.clone(),
            issued: access.issued,
            expires: access.expires,
            jkt: access.jkt.clone(),
        })
    }

    /// RFC 7662 introspection of any token.
    pub(crate) fn introspect(&self, token: &str) -> serde_json::Value {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        inner.stats.introspections += 1;
        drop(inner);
        if let Ok(grant) = self.check_access(token) {
            let token_type = if grant.jkt.is_some() { "DPoP" } else { "Bearer" };
            let mut v = serde_json::json!({
                "active": true,
                "token_type": token_type,
                "scope": join(&grant.scope),
                "client_id": grant.client_id,
                "iat": grant.issued.as_secs(),
                "exp": grant.expires.as_secs(),
            });
            if let Some(aud) = grant.resource {
                v["aud"] = aud.into();
            }
            if let Some(jkt) = grant.jkt {
                v["cnf"] = serde_json::json!({ "jkt": jkt });
            }
            return v;
        }
        let inner = self.lock(now);
        if let Some(rt) = inner.refresh.get(token) {
            let family_revoked = inner.families.get(rt.family as usize).is_none_or(|f| f.revoked);
            let active = !rt.revoked
                && !family_revoked
                && rt.superseded_at.is_none()
                && rt.expires.is_none_or(|e| now <= e);
            if active {
                return serde_json::json!({
                    "active": true,
                    "token_type": "refresh_token",
                    "scope": join(&rt.scope),
                    "client_id": rt.client_id,
                    "iat": rt.issued.as_secs(),
                });
            }
        }
        serde_json::json!({ "active": false })
    }

    /// RFC 7009 revocation by `client`: unknown tokens and other clients' tokens are ignored.
    pub(crate) fn revoke(&self, client: &Client, token: &str) {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        inner.stats.revocations += 1;
        let mut revoked = false;
        if let Some(a) = inner.access.get_mut(token)
            && a.client_id == client.id
        {
            a.revoked = true;
            revoked = true;
        }
        if let Some(rt) = inner.refresh.get(token)
            && rt.client_id == client.id
        {
            let family = rt.family;
            revoke_family(&mut inner, family);
            revoked = true;
        }
        if revoked {
            push_event(
                &mut inner,
                now,
                AuthEventKind::TokenRevoked { token: TokenFingerprint::of(token) },
            );
        }
    }
}

pub(super) fn issued_event(
    inner: &mut Inner,
    now: Timestamp,
    grant: &str,
    client_id: &str,
    tokens: &IssuedTokens,
) {
    push_event(
        inner,
        now,
        AuthEventKind::TokensIssued {
            grant: grant.to_owned(),
            client_id: client_id.to_owned(),
            access_token: TokenFingerprint::of(&tokens.access_token),
            refresh_token: tokens.refresh_token.as_deref().map(TokenFingerprint::of),
        },
    );
}

pub(super) fn revoke_family(inner: &mut Inner, family: u64) {
    let Some(f) = inner.families.get_mut(family as usize) else { return };
    if !f.revoked {
        f.revoked = true;
        inner.stats.families_revoked += 1;
    }
    inner.refresh.values_mut().filter(|r| r.family == family).for_each(|r| r.revoked = true);
    inner.access.values_mut().filter(|a| a.family == Some(family)).for_each(|a| a.revoked = true);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn issue(
    inner: &mut Inner,
    k: &KnobSettings,
    now: Timestamp,
    (client_id, jkt): (&str, Option<&str>),
    scope: Vec<String>,
    resource: Option<String>,
    family: Option<u64>,
    with_refresh: bool,
) -> IssuedTokens {
    let access_token = random_token("at_");
    inner.access.insert(
        access_token.clone(),
        Access {
            client_id: client_id.to_owned(),
            scope: scope.clone(),
            resource: resource.clone(),
            issued: now,
            expires: now + k.access_token_lifetime,
            revoked: false,
            family,
            jkt: jkt.map(str::to_owned),
        },
    );
    let refresh_token = match (with_refresh, family) {
        (true, Some(family)) => {
            let rt = random_token("rt_");
            inner.refresh.insert(
                rt.clone(),
                Refresh {
                    client_id: client_id.to_owned(),
                    scope: scope.clone(),
                    resource,
                    family,
                    issued: now,
                    expires: k.refresh_token_lifetime.map(|l| now + l),
                    superseded_at: None,
                    revoked: false,
                    jkt: jkt.map(str::to_owned),
                },
            );
            if let Some(f) = inner.families.get_mut(family as usize) {
                f.latest_refresh = Some(rt.clone());
            }
            Some(rt)
        }
        _ => None,
    };
    IssuedTokens {
        access_token,
        refresh_token,
        expires_in: (!k.omit_expires_in).then_some(k.access_token_lifetime.as_secs()),
        scope: join(&scope),
        dpop_bound: jkt.is_some(),
    }
}
