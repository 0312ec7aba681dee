//! Workload identity (SEP-1933): where the interactive flow would prompt a user, a factory
//! built [`with_workload_identity`](super::ConnectionFactory::with_workload_identity) runs the
//! RFC 7523 jwt-bearer grant with the workload's current assertion (re-read from its file or
//! variable each time) and stores the tokens. Such tokens usually come without a refresh
//! token: when they expire or are refused (and a refresh cannot help), the grant runs again.
//! Concurrent requests of one process share one grant, and a request that finds another's
//! fresh tokens uses them.

use std::sync::Arc;
use std::time::Duration;

use flow_state::SingleFlight;
use mcp_oauth::{OAuthClient, WorkloadIdentity};
use token_storage::TokenKey;
use tracing::Instrument as _;

use super::FactoryProvider;
use crate::challenge::Refusal;
use crate::error::Error;
use crate::oauth_refresher::convert_response;
use crate::provider::Recovery;
use crate::secret::Secret;

/// One jwt-bearer grant at a time per token key.
pub(super) type WorkloadGrants = SingleFlight<TokenKey, Result<(), Error>>;

/// How long one grant (discovery, registration, the token request) may take.
const GRANT_DEADLINE: Duration = Duration::from_secs(60);

/// The workload identity of a factory: the OAuth client and where the assertion comes from.
#[derive(Clone)]
pub(super) struct Workload {
    pub(super) oauth: OAuthClient,
    pub(super) identity: Arc<WorkloadIdentity>,
    pub(super) grants: WorkloadGrants,
}

impl FactoryProvider {
    /// Tokens from the jwt-bearer grant, stored for this key; the access token to retry with.
    pub(super) async fn workload_grant(
        &self,
        workload: &Workload,
        challenge: Option<&Refusal>,
        rejected: Option<&Secret>,
    ) -> Result<Recovery, Error> {
        let Some(client_config) = self.config.client.clone() else {
            return Ok(Recovery::AuthorizationRequired);
        };
        let server = self.server()?;
        let bearer = challenge.and_then(Refusal::bearer);
        let (oauth, identity) = (workload.oauth.clone(), workload.identity.clone());
        let discovery = oauth
            .discover(&server, bearer.as_ref())
            .instrument(tracing::info_span!("mcp_discovery", server = %server))
            .await
            .map_err(|e| Error::provider("discovery", e))?;
        let registration = self.registration(&oauth, &discovery, &client_config).await?;
        let scope = self
            .config
            .scopes
            .clone()
            .or_else(|| mcp_oauth::select_scope(bearer.as_ref(), &discovery));
        // Another request's grant may have landed meanwhile: its tokens, not a grant of ours.
        if let Recovery::Retry(token) = self.fall_back(rejected).await? {
            return Ok(Recovery::Retry(token));
        }
        let (storage, key) = (self.storage.clone(), self.key.clone());
        let span = tracing::info_span!("mcp_workload_grant", issuer = discovery.issuer());
        let options = flow_state::CallOptions::new(GRANT_DEADLINE);
        let outcome = workload
            .grants
            .call_with(self.key.clone(), options, move |attempt| {
                async move {
                    // The grant may issue tokens: whatever happens to the callers, store them.
                    attempt.keep();
                    let response = oauth
                        .jwt_bearer(&discovery, &registration, &identity, scope.as_deref())
                        .await
                        .map_err(|e| Error::provider("the workload identity grant", e))?;
                    storage
                        .store(&key, discovery.issuer(), convert_response(response))
                        .await
                        .map_err(|e| Error::store("storing the workload's tokens", e))?;
                    Ok(())
                }
                .instrument(span)
            })
            .await
            .map_err(|e| Error::provider("the workload identity grant", e))?;
        outcome?;
        self.invalidate_lookup(None).await;
        match self.lookup().await? {
            Some(token) => Ok(Recovery::Retry(token)),
            None => Ok(Recovery::AuthorizationRequired),
        }
    }
}
