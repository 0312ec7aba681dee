//! Enterprise-managed authorization (SEP-990, cross-app access): an RFC 8693 token exchange of
//! an ID token for an identity assertion JWT authorization grant (ID-JAG) at the enterprise
//! identity provider, then an RFC 7523 jwt-bearer grant with it at the MCP authorization server.

use url::Url;

use crate::client::OAuthClient;
use crate::discovery::Discovery;
use crate::error::{Endpoint, Error, Result};
use crate::http::Reach;
use crate::registration::ClientRegistration;
use crate::secret::IdToken;
use crate::token::TokenResponse;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
use crate::workload::JWT_BEARER;
const ID_JAG: &str = "urn:ietf:params:oauth:token-type:id-jag";
const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

/// What the identity provider leg of SEP-990 needs.
#[derive(Debug, Clone)]
pub struct EnterpriseGrant {
    /// The identity provider's token endpoint.
    pub idp_token_endpoint: Url,
    /// The client as the identity provider knows it (its `issuer` is the IdP's).
    pub idp_client: ClientRegistration,
    /// The user's ID token from the identity provider.
    pub id_token: IdToken,
    /// The scope to ask for, if any.
    pub scope: Option<String>,
}

impl OAuthClient {
    /// SEP-990: exchange the ID token for an ID-JAG at the identity provider (audience: the
    /// authorization server's issuer; resource: the MCP resource), then redeem it with the
    /// jwt-bearer grant at the authorization server, authenticated as `registration`.
    pub async fn enterprise_token(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        grant: &EnterpriseGrant,
    ) -> Result<TokenResponse> {
        let asm = &discovery.authorization_server;
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE.to_owned()),
            ("requested_token_type", ID_JAG.to_owned()),
            ("subject_token", grant.id_token.secret().to_owned()),
            ("subject_token_type", ID_TOKEN.to_owned()),
            ("audience", asm.issuer.clone()),
            ("resource", discovery.resource.clone()),
        ];
        if let Some(scope) = &grant.scope {
            form.push(("scope", scope.clone()));
        }
        let exchanged = self
            .post_grant(
                Endpoint::TokenExchange,
                &grant.idp_token_endpoint,
                // Configured by the user, not taken from a server's metadata.
                Reach::Policy,
                &grant.idp_client,
                grant.idp_client.auth_method,
                &grant.idp_client.issuer,
                form,
                true,
            )
            .await?;
        if exchanged.issued_token_type.as_deref() != Some(ID_JAG) {
            return Err(Error::malformed(
                "token exchange response",
                &grant.idp_token_endpoint,
                format!("issued_token_type {:?}, expected {ID_JAG}", exchanged.issued_token_type),
            ));
        }
        let mut form = vec![
            ("grant_type", JWT_BEARER.to_owned()),
            ("assertion", exchanged.access_token.secret().to_owned()),
        ];
        if let Some(scope) = &grant.scope {
            form.push(("scope", scope.clone()));
        }
        form.push(("resource", discovery.resource.clone()));
        self.token_request(discovery, registration, form).await
    }
}
