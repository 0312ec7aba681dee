//! [`TokenStorageBuilder`] and [`TokenStorage::builder`].

use super::*;

/// Options for building a [`TokenStorage`].
pub struct TokenStorageBuilder {
    store: SharedTokenStore,
    keys: Arc<dyn KeyProvider>,
    refresher: Arc<dyn Refresher>,
    clock: SharedClock,
    config: TokenStorageConfig,
    on_refresh: Option<RefreshHook>,
    lease: Option<RefreshLease>,
}

impl TokenStorage {
    /// A builder over `store`, sealing records with `keys`, refreshing through `refresher`.
    pub fn builder(
        store: SharedTokenStore,
        keys: Arc<dyn KeyProvider>,
        refresher: Arc<dyn Refresher>,
    ) -> TokenStorageBuilder {
        TokenStorageBuilder {
            store,
            keys,
            refresher,
            clock: SharedClock::system(),
            config: TokenStorageConfig::default(),
            on_refresh: None,
            lease: None,
        }
    }
}

impl fmt::Debug for TokenStorageBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStorageBuilder")
            .field("store", &self.store)
            .field("refresher", &self.refresher)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenStorageBuilder {
    /// Run `hook` after every refresh result is persisted, with the key, the set it replaced
    /// and the new set (the one this refresh wrote, with the version it created, even when a
    /// login replaced it again before the write's reply came back). It runs inside the
    /// detached refresh, so it runs even when every caller has gone (the place to tell live
    /// connections about the new token). Keep it quick.
    pub fn on_refresh(
        mut self,
        hook: impl Fn(&TokenKey, &TokenSet, &TokenSet) + Send + Sync + 'static,
    ) -> Self {
        self.on_refresh = Some(Arc::new(hook));
        self
    }

    /// Coordinate refreshes with other processes that share the store (default: none, for a
    /// store only this process uses). See [`RefreshLease`].
    pub fn lease(mut self, lease: RefreshLease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The clock expiry, backoff and deadlines run on (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The tunables (default: [`TokenStorageConfig::default`]).
    pub fn config(mut self, config: TokenStorageConfig) -> Self {
        self.config = config;
        self
    }

    /// Build the service.
    pub fn build(self) -> TokenStorage {
        let flights = SingleFlight::new(self.clock.clone());
        TokenStorage {
            inner: Arc::new(Inner {
                store: self.store,
                keys: self.keys,
                refresher: self.refresher,
                clock: self.clock,
                config: self.config,
                on_refresh: self.on_refresh,
                lease: self.lease,
                flights,
                views: RwLock::default(),
                deletions: AtomicU64::new(0),
                slots: Mutex::default(),
            }),
        }
    }
}
