//! Lock files: [`FileLock`], an exclusive advisory lock (`flock`) on one file, taken with a
//! bounded wait on an injected clock, and [`lock_file_name`], the file name for any name.
//!
//! The one lock-file helper of the workspace: the lock-file refresh lease
//! ([`RefreshLease::lock_files`](crate::RefreshLease::lock_files)) and mcp-connect's store and
//! login locks take their files here. The kernel releases a lock when its holder dies, so none
//! needs a TTL. Local file systems only: advisory locks over NFS are unreliable.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mcp_clock::{Clock as _, SharedClock};
use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// How often a wait for a peer's lock looks again.
const STEP: Duration = Duration::from_millis(5);

/// An exclusive advisory lock on a file, held until dropped (or until the process dies).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
/// use std::time::Duration;
/// use token_storage::FileLock;
///
/// let path = std::env::temp_dir().join(token_storage::lock_file_name("doc example"));
/// let clock = mcp_clock::SharedClock::system();
/// let held = FileLock::acquire(&path, Duration::from_secs(1), &clock).await?.expect("free");
/// assert!(FileLock::try_acquire(&path)?.is_none(), "held by `held`");
/// drop(held);
/// assert!(FileLock::try_acquire(&path)?.is_some());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Lock `path` (created when missing, with its directory) if nobody holds it: `Ok(None)`
    /// when another handle does.
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>, Error> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { _file: file, path: path.to_owned() })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => {
                Err(Error::store(format!("could not lock {}", path.display()), e))
            }
        }
    }

    /// Lock `path`, waiting up to `wait` (on `clock`) for a peer to let go: `Ok(None)` when it
    /// still holds the lock then. The caller says what that means (a lease wait, a locked
    /// store).
    pub async fn acquire(
        path: &Path,
        wait: Duration,
        clock: &SharedClock,
    ) -> Result<Option<FileLock>, Error> {
        let mut waited = Duration::ZERO;
        loop {
            if let Some(lock) = FileLock::try_acquire(path)? {
                return Ok(Some(lock));
            }
            if waited >= wait {
                return Ok(None);
            }
            clock.sleep(STEP).await;
            waited += STEP;
        }
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path) -> Result<File, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::store(format!("could not create lock directory {}", dir.display()), e)
        })?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::store(format!("could not open lock file {}", path.display()), e))
}

/// The name of a lock file for `name`: a fixed-length digest of it (SHA-256, 64 hex characters)
/// and `.lock`, so any name, however long its URL or user name, fits a file name (file systems
/// refuse names past 255 bytes).
///
/// ```
/// let name = token_storage::lock_file_name(&"x".repeat(1000));
/// assert_eq!(name.len(), 64 + ".lock".len());
/// ```
pub fn lock_file_name(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.lock")
}
