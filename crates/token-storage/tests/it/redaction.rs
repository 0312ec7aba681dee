//! Secrets never print: tracing output captured through a full refresh contains none of them.

use crate::common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use token_storage::TokenStore as _;
use token_storage::{
    ClientRegistration, RefreshError, Secret, TerminalCode, TokenKey, TransientKind,
};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_the_logs() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let c = captured.clone();
            move || c.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture();
    let key = key();
    let mut secrets: Vec<String> = vec!["client-secret-value".into()];
    f.storage
        .store_client(
            &key,
            &ClientRegistration::new("c1", ISS).client_secret("client-secret-value"),
        )
        .await
        .unwrap();
    let login = f.server.issue(&key);
    secrets.push(login.access_token.expose().into());
    secrets.push(login.refresh_token.as_ref().unwrap().expose().into());
    let first = f.storage.store(&key, ISS, login).await.unwrap();

    // Refresh ahead of expiry, on expiry, after a 401; a transient failure; a terminal one.
    f.clock.advance(HOUR - Duration::from_secs(30));
    f.storage.get_valid(&key, ISS).await.unwrap();
    for _ in 0..100 {
        if f.server.redemptions() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    f.clock.advance(HOUR);
    let second = f.storage.get_valid(&key, ISS).await.unwrap();
    let third = f.storage.force_refresh(&key, ISS, second.access_token()).await.unwrap();
    f.server.fail_next(RefreshError::transient(TransientKind::Network, "reset"));
    f.server.fail_next(RefreshError::transient(TransientKind::Network, "reset"));
    f.server.fail_next(RefreshError::transient(TransientKind::Network, "reset"));
    let mut attempt = Box::pin(f.storage.force_refresh(&key, ISS, third.access_token()));
    let failed = loop {
        tokio::select! {
            r = &mut attempt => break r,
            () = tokio::task::yield_now() => f.clock.advance(Duration::from_secs(5)),
        }
    };
    drop(attempt);
    tracing::info!(error = ?failed, "caller logs the error");
    f.clock.advance(Duration::from_secs(60));
    f.server.fail_next(RefreshError::terminal(TerminalCode::InvalidGrant, None));
    let dead = f.storage.force_refresh(&key, ISS, third.access_token()).await.unwrap_err();
    tracing::info!(error = ?dead, "caller logs the error");

    for set in [&first, &second, &third] {
        secrets.push(set.access_token().expose().into());
        secrets.push(set.refresh_token().unwrap().expose().into());
        tracing::info!(?set, "caller logs the set");
    }
    tracing::info!(client = ?f.storage.client(&TokenKey::new("acme", "alice", "github")).await.unwrap(), "caller logs the client");
    tracing::info!(secret = %Secret::new("x"), storage = ?f.storage, "caller logs the storage");

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("refreshed tokens"), "the refresh was logged:\n{logs}");
    assert!(logs.contains("refresh rejected for good"), "the rejection was logged:\n{logs}");
    assert!(f.server.redemptions() >= 3);
    secrets.sort();
    secrets.dedup();
    assert_eq!(secrets.len(), 7, "client secret and three generations of tokens");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "secret {secret:?} appears in the logs:\n{logs}");
    }
}

/// The DPoP key is a secret: it is sealed in the store (its PEM is not in the stored bytes),
/// and neither the key, nor a refresh request carrying it, nor the storage prints it, in
/// `Debug`, `Display` or the logs of storing, reading and deleting it.
#[tokio::test(flavor = "current_thread")]
async fn the_dpop_key_is_sealed_and_never_printed() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let c = captured.clone();
            move || c.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let f = fixture();
    let key = key();
    const PEM: &str =
        "-----BEGIN PRIVATE KEY-----\nDPOPSECRETMATERIAL\n-----END PRIVATE KEY-----\n";
    let stored = f.storage.dpop_key_or_insert(&key, Secret::new(PEM)).await.unwrap();
    let read = f.storage.dpop_key(&key).await.unwrap().unwrap();
    assert_eq!(read.expose(), PEM);
    let request = token_storage::RefreshRequest::new("rt", ISS).dpop_key(Some(read.clone()), true);
    tracing::info!(?stored, %read, ?request, storage = ?f.storage, "caller logs the key");
    let records = f.store.keys_with_prefix("").await.unwrap();
    assert_eq!(records.len(), 1);
    let raw = f.store.get(&records[0]).await.unwrap().unwrap();
    assert!(
        !raw.value.windows(b"DPOPSECRETMATERIAL".len()).any(|w| w == b"DPOPSECRETMATERIAL"),
        "the key is sealed at rest"
    );
    f.storage.delete_all(&key).await.unwrap();
    let printed = format!("{stored:?} {read} {request:?} {:?}", f.storage);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("stored a new DPoP key"), "{logs}");
    for text in [printed, logs] {
        assert!(!text.contains("DPOPSECRETMATERIAL") && !text.contains("PRIVATE KEY"), "{text}");
    }
}
