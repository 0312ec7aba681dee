//! Clients: registration (dynamic, pre-registered, metadata documents) and authentication at
//! the token endpoint.

use super::*;

impl Core {
    pub(crate) fn client(&self, id: &str) -> Option<Client> {
        let k = self.knobs.get();
        self.lock(self.now(&k)).clients.get(id).cloned()
    }

    /// Register a client; `event` says whether it counts as a dynamic registration.
    pub(crate) fn register(
        &self,
        method: AuthMethod,
        redirect_uris: Vec<String>,
        grant_types: Vec<String>,
        name: Option<String>,
        fixed: (Option<String>, Option<String>),
        dynamic: bool,
    ) -> RegisteredClient {
        let (fixed_id, fixed_secret) = fixed;
        let id = fixed_id.unwrap_or_else(|| random_token("client_"));
        let secret = (method != AuthMethod::None)
            .then(|| fixed_secret.unwrap_or_else(|| random_token("secret_")));
        let client = Client {
            id: id.clone(),
            secret: secret.clone(),
            method,
            redirect_uris,
            grant_types,
            name,
        };
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        inner.clients.insert(id.clone(), client);
        if dynamic {
            inner.stats.registrations += 1;
        }
        push_event(&mut inner, now, AuthEventKind::ClientRegistered { client_id: id.clone() });
        RegisteredClient { client_id: id, client_secret: secret }
    }

    /// Store a client described by a fetched metadata document.
    pub(crate) fn insert_metadata_client(&self, client: Client) {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        inner.stats.client_metadata_fetches += 1;
        push_event(
            &mut inner,
            now,
            AuthEventKind::ClientMetadataFetched { client_id: client.id.clone() },
        );
        inner.clients.insert(client.id.clone(), client);
    }

    /// Check the client authentication presented at the token, revocation or introspection
    /// endpoint. `secret` is `None` for `none`.
    pub(crate) fn authenticate(
        &self,
        client_id: &str,
        secret: Option<&str>,
        used: AuthMethod,
    ) -> Result<Client, OAuthError> {
        let client = self
            .client(client_id)
            .ok_or_else(|| OAuthError::new("invalid_client", "unknown client"))?;
        if client.method != used {
            return Err(OAuthError::new(
                "invalid_client",
                format!(
                    "client registered for {} but used {}",
                    client.method.as_str(),
                    used.as_str()
                ),
            ));
        }
        match (&client.secret, secret) {
            (None, None) => Ok(client),
            (Some(expected), Some(given)) if expected == given => Ok(client),
            _ => Err(OAuthError::new("invalid_client", "client authentication failed")),
        }
    }
}
