//! The store directory shared by every `mcp-connect` process of one user on one host.
//!
//! Layout of the directory (created with mode 0700):
//!
//! | path | what |
//! |---|---|
//! | `db/` | the sled database (encrypted token and client records) |
//! | `key` | the encryption key, hex, mode 0600, created on first use |
//! | `store.lock` | the store lock: held for the duration of one store operation |
//! | `refresh-locks/` | token-storage's per-key refresh lease ([`RefreshLease::lock_files`]) |
//! | `login-locks/` | one lock per key: the process that holds it runs the browser step |
//! | `events.log` | the event log behind `why` (JSON lines, no secrets), see `events.rs` |
//! | `debug.log` | debug logs, with `--debug` |
//!
//! sled admits one process per database, so [`LockedSledStore`] opens the database for each
//! operation under an exclusive `flock` on `store.lock` and closes it before the lock is
//! released. Every wait is bounded: a lock held longer than the configured wait ends in
//! [`StoreLocked`] (mapped onto [`Error::StoreLocked`](crate::Error::StoreLocked)).

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mcp_clock::{Clock as _, SharedClock};

use token_storage::{
    Keyring, RefreshLease, SledTokenStore, TokenKey, TokenStore,
    store::{Swapped, Versioned},
};

/// How often a lock wait tries again.
const LOCK_STEP: Duration = Duration::from_millis(10);
/// How long reopening the database may fail with sled's own lock after our lock was taken
/// (sled's background threads may still be letting go of the previous handle).
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// The error source that marks "the store lock was not released in time".
#[derive(Debug)]
pub(crate) struct StoreLocked {
    pub(crate) path: PathBuf,
    pub(crate) waited: Duration,
}

impl fmt::Display for StoreLocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is locked by another process (waited {:?})", self.path.display(), self.waited)
    }
}

impl std::error::Error for StoreLocked {}

/// The error source that marks "the database cannot be opened or read".
#[derive(Debug)]
pub(crate) struct StoreUnreadable {
    pub(crate) path: PathBuf,
    pub(crate) detail: String,
}

impl fmt::Display for StoreUnreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cannot be opened: {}", self.path.display(), self.detail)
    }
}

impl std::error::Error for StoreUnreadable {}

/// The store directory and how long its locks may be waited for.
#[derive(Debug, Clone)]
pub(crate) struct StoreDir {
    root: PathBuf,
    lock_wait: Duration,
    /// The clock every lock and reopen wait sleeps on.
    clock: SharedClock,
}

/// An exclusive advisory lock on a file, released on drop (or by the kernel when the process
/// dies): token storage's, the workspace's one lock-file helper.
pub(crate) use token_storage::FileLock;

impl StoreDir {
    /// The directory at `root` (created, mode 0700, when missing; made private when it is not),
    /// with a warning on stderr when the directory or its key had to be tightened, unless
    /// `silent`.
    pub(crate) fn open(
        root: PathBuf,
        lock_wait: Duration,
        clock: SharedClock,
        silent: bool,
    ) -> Result<Self, token_storage::Error> {
        create_private_dir(&root)?;
        for loosened in tighten(&root)? {
            if !silent {
                eprintln!(
                    "mcp-connect: warning: {} was readable by other users; its mode is now {}",
                    loosened.display(),
                    if loosened == root { "0700" } else { "0600" }
                );
            }
        }
        Ok(StoreDir { root, lock_wait, clock })
    }

    fn db_path(&self) -> PathBuf {
        self.root.join("db")
    }

    /// The refresh lease over lock files in the store directory.
    pub(crate) fn refresh_lease(&self) -> RefreshLease {
        RefreshLease::lock_files(self.root.join("refresh-locks"))
            .wait(self.lock_wait)
            .clock(self.clock.clone())
    }

    /// Take every refresh lease of the directory (each wait bounded), waiting for refreshes in
    /// flight (in this process or another) to commit, and keeping new ones from redeeming while
    /// the locks are held.
    pub(crate) async fn hold_refresh_leases(&self) -> Vec<FileLock> {
        let Ok(entries) = std::fs::read_dir(self.root.join("refresh-locks")) else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_some_and(|e| e == "lock") {
                match lock_file(&self.clock, &path, self.lock_wait).await {
                    Ok(lock) => held.push(lock),
                    Err(e) => tracing::warn!(error = %e, "a refresh did not finish in time"),
                }
            }
        }
        held
    }

    /// Take the store lock, waiting at most the configured lock wait.
    pub(crate) async fn lock_store(&self) -> Result<FileLock, token_storage::Error> {
        lock_file(&self.clock, &self.root.join("store.lock"), self.lock_wait).await
    }

    /// Take the login lock of `key`, waiting at most `wait`.
    pub(crate) async fn lock_login(
        &self,
        key: &TokenKey,
        wait: Duration,
    ) -> Result<FileLock, token_storage::Error> {
        let dir = self.root.join("login-locks");
        create_private_dir(&dir)?;
        lock_file(&self.clock, &dir.join(token_storage::lock_file_name(&key.to_string())), wait)
            .await
    }

    /// The encryption keys: read from `key`, or created there (mode 0600) on first use, under
    /// the store lock so that two first runs agree on one key.
    pub(crate) async fn keyring(&self) -> Result<Keyring, token_storage::Error> {
        let path = self.root.join("key");
        let _lock = self.lock_store().await?;
        if !path.exists() {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| token_storage::Error::KeyProvider {
                message: format!("no randomness for a new key: {e}"),
            })?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(|e| {
                token_storage::Error::store(format!("could not create {}", path.display()), e)
            })?;
            file.write_all(format!("default:{hex}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| {
                    token_storage::Error::store(format!("could not write {}", path.display()), e)
                })?;
        }
        Keyring::from_file(&path)
    }

    /// Open the database (the store lock must be held), retrying briefly while sled's own lock
    /// from a handle this process just closed is still held.
    async fn open_db(&self) -> Result<SledTokenStore, token_storage::Error> {
        let path = self.db_path();
        let mut waited = Duration::ZERO;
        loop {
            match SledTokenStore::open(&path) {
                Ok(store) => return Ok(store),
                Err(e) if waited < REOPEN_WAIT && is_lock_error(&e) => {
                    self.clock.sleep(LOCK_STEP).await;
                    waited += LOCK_STEP;
                }
                Err(e) if is_lock_error(&e) => {
                    return Err(locked(StoreLocked { path, waited: self.lock_wait + waited }));
                }
                Err(e) => {
                    return Err(token_storage::Error::Store {
                        message: "could not open the token database".into(),
                        source: Some(Arc::new(StoreUnreadable { path, detail: chain(&e) })),
                    });
                }
            }
        }
    }
}

fn locked(source: StoreLocked) -> token_storage::Error {
    token_storage::Error::StoreUnavailable {
        message: source.to_string(),
        source: Some(Arc::new(source)),
    }
}

/// Whether a sled open failed on sled's own file lock.
fn is_lock_error(e: &token_storage::Error) -> bool {
    let text = chain(e);
    text.contains("WouldBlock")
        || text.contains("temporarily unavailable")
        || text.contains("could not acquire lock")
}

/// An error and its sources, joined.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The first error of type `T` in `e`'s source chain, looking through the shared
/// `Arc<dyn Error>` sources that token storage wraps its causes in.
pub(crate) fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(shared) = err.downcast_ref::<Shared>()
            && let Some(found) = find::<T>(&**shared)
        {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// Make the store private: the directory and every directory in it mode 0700, every file 0600.
/// Returns the store directory and the key file when they had to be tightened (what a user
/// should hear about); other entries (sled's files, lock files) are tightened silently.
#[cfg(unix)]
fn tighten(root: &Path) -> Result<Vec<PathBuf>, token_storage::Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let failed = |path: &Path, e: std::io::Error| {
        token_storage::Error::store(format!("could not make {} private", path.display()), e)
    };
    let mut loosened = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // Gone meanwhile (sled replaces files): nothing to tighten.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(failed(&path, e)),
        };
        let wanted = if meta.is_dir() {
            0o700
        } else if meta.is_file() {
            0o600
        } else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted))
                .map_err(|e| failed(&path, e))?;
            if path == root || path == root.join("key") {
                loosened.push(path.clone());
            }
        }
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|e| failed(&path, e))?;
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(loosened)
}

#[cfg(not(unix))]
fn tighten(_: &Path) -> Result<Vec<PathBuf>, token_storage::Error> {
    Ok(Vec::new())
}

fn create_private_dir(dir: &Path) -> Result<(), token_storage::Error> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| token_storage::Error::store(format!("could not create {}", dir.display()), e))
}

async fn lock_file(
    clock: &SharedClock,
    path: &Path,
    wait: Duration,
) -> Result<FileLock, token_storage::Error> {
    FileLock::acquire(path, wait, clock)
        .await?
        .ok_or_else(|| locked(StoreLocked { path: path.to_owned(), waited: wait }))
}

/// A [`TokenStore`] over the sled database of a [`StoreDir`], opened for each operation under
/// the store lock, so that several processes share it one operation at a time.
#[derive(Debug, Clone)]
pub(crate) struct LockedSledStore {
    dir: StoreDir,
}

impl LockedSledStore {
    pub(crate) fn new(dir: StoreDir) -> Self {
        LockedSledStore { dir }
    }

    /// Take the store lock and open the database under it.
    async fn open(&self) -> Result<Open, token_storage::Error> {
        let lock = self.dir.lock_store().await?;
        let db = self.dir.open_db().await?;
        Ok(Open { db, _lock: lock })
    }
}

/// An open database and the store lock. Fields drop in order: the database is closed before
/// the lock lets the next process open it.
struct Open {
    db: SledTokenStore,
    _lock: FileLock,
}

#[async_trait::async_trait]
impl TokenStore for LockedSledStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, token_storage::Error> {
        self.open().await?.db.get(key).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, token_storage::Error> {
        let open = self.open().await?;
        open.db.compare_and_swap(key, expected, value).await
    }

    async fn delete_if(
        &self,
        key: &str,
        expected: Option<u64>,
    ) -> Result<bool, token_storage::Error> {
        self.open().await?.db.delete_if(key, expected).await
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, token_storage::Error> {
        self.open().await?.db.keys_with_prefix(prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use token_storage::KeyProvider as _;

    /// Two handles on one directory (as two processes would have) see each other's writes, and
    /// the database is closed between operations (a second open would fail otherwise).
    #[tokio::test]
    async fn two_handles_share_one_database() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StoreDir::open(
            tmp.path().join("s"),
            Duration::from_secs(2),
            SharedClock::system(),
            true,
        )
        .unwrap();
        let a = LockedSledStore::new(dir.clone());
        let b = LockedSledStore::new(dir.clone());
        let Swapped::Swapped { version } =
            a.compare_and_swap("k", None, b"one".to_vec()).await.unwrap()
        else {
            panic!("first write conflicts")
        };
        let read = b.get("k").await.unwrap().unwrap();
        assert_eq!((read.version, &*read.value), (version, &b"one"[..]));
        assert!(matches!(
            b.compare_and_swap("k", None, b"x".to_vec()).await,
            Ok(Swapped::Conflict(_))
        ));
        assert!(b.delete_if("k", Some(version)).await.unwrap());
        assert!(a.get("k").await.unwrap().is_none());
    }

    /// A held store lock ends the wait with the typed "locked" error, not a hang.
    #[tokio::test]
    async fn a_held_lock_is_a_typed_error_after_the_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StoreDir::open(
            tmp.path().to_owned(),
            Duration::from_millis(100),
            SharedClock::system(),
            true,
        )
        .unwrap();
        let held = dir.lock_store().await.unwrap();
        let err = LockedSledStore::new(dir.clone()).get("k").await.unwrap_err();
        assert!(find::<StoreLocked>(&err).is_some(), "{err:?}");
        drop(held);
        assert!(LockedSledStore::new(dir).get("k").await.unwrap().is_none());
    }

    /// The key file is created once with mode 0600 and read back the same.
    #[tokio::test]
    async fn the_key_file_is_private_and_stable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StoreDir::open(
            tmp.path().to_owned(),
            Duration::from_secs(1),
            SharedClock::system(),
            true,
        )
        .unwrap();
        let first = dir.keyring().await.unwrap();
        let text = std::fs::read_to_string(tmp.path().join("key")).unwrap();
        let second = dir.keyring().await.unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("key")).unwrap(), text);
        assert_eq!(first.current_key_id(), second.current_key_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(tmp.path().join("key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
