//! The store conformance suite (feature `test-util`): one set of checks every [`Store`](crate::Store) backend
//! must pass.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use flow_state::{MemoryStore, SharedStore, testkit};
//!
//! testkit::store_conformance(|clock| {
//!     let store = SharedStore::new(MemoryStore::with_clock(clock.shared()));
//!     async move { store }
//! })
//! .await;
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use mcp_clock::{Clock, ManualClock};

use crate::{Inserted, SharedStore, Swapped};

/// Runs every conformance check against stores built by `make`, which is called once per check
/// with a fresh [`ManualClock`] that the store must use for its TTLs, and must give a store with
/// no records. Panics with the name of the first check that fails.
pub async fn store_conformance<F, Fut>(make: F)
where
    F: Fn(&ManualClock) -> Fut,
    Fut: std::future::Future<Output = SharedStore>,
{
    conformance(make, ("ttl on the injected clock", |s, c| Box::pin(ttl(s, c)))).await
}

/// [`store_conformance`] for a backend whose server decides expiry on its own clock (Redis):
/// the TTL check waits real time (about two seconds, on [`mcp_clock::SystemClock`]) instead of
/// advancing the manual clock, which such a store only reports expiries on.
pub async fn store_conformance_server_time<F, Fut>(make: F)
where
    F: Fn(&ManualClock) -> Fut,
    Fut: std::future::Future<Output = SharedStore>,
{
    conformance(make, ("ttl on the server's clock", |s, c| Box::pin(ttl_server_time(s, c)))).await
}

type Check = fn(SharedStore, ManualClock) -> mcp_clock::BoxFuture<'static, ()>;

async fn conformance<F, Fut>(make: F, ttl_check: (&str, Check))
where
    F: Fn(&ManualClock) -> Fut,
    Fut: std::future::Future<Output = SharedStore>,
{
    let checks: [(&str, Check); 8] = [
        ("get of an absent key", |s, _| Box::pin(absent(s))),
        ("insert-if-absent", |s, _| Box::pin(insert_if_absent(s))),
        ("compare-and-set", |s, _| Box::pin(compare_and_swap(s))),
        ("versions are never reused", |s, _| Box::pin(no_aba(s))),
        ("delete-if", |s, _| Box::pin(delete_if(s))),
        ttl_check,
        ("change notifications", |s, _| Box::pin(notifications(s))),
        ("one winner among racing writers", |s, _| Box::pin(racing_writers(s))),
    ];
    for (name, check) in checks {
        let clock = ManualClock::default();
        let store = make(&clock).await;
        let run = tokio::spawn(check(store, clock));
        if let Err(e) = run.await {
            panic!("store conformance check {name:?} failed: {e}");
        }
    }
}

const TTL: Duration = Duration::from_secs(60);

async fn absent(s: SharedStore) {
    assert_eq!(s.get("k").await.unwrap(), None);
    assert!(!s.delete_if("k", None).await.unwrap());
    assert_eq!(
        s.compare_and_swap("k", 1, b"x".to_vec(), TTL).await.unwrap(),
        Swapped::Conflict(None)
    );
}

async fn insert_if_absent(s: SharedStore) {
    let Inserted::Inserted { version } =
        s.insert_if_absent("k", b"one".to_vec(), TTL).await.unwrap()
    else {
        panic!("first insert must win");
    };
    match s.insert_if_absent("k", b"two".to_vec(), TTL).await.unwrap() {
        Inserted::Exists(v) => {
            assert_eq!(v.version, version);
            assert_eq!(&*v.value, b"one");
        }
        other => panic!("second insert must see the first: {other:?}"),
    }
    let got = s.get("k").await.unwrap().unwrap();
    assert_eq!((got.version, &*got.value), (version, &b"one"[..]));
    // Keys are independent.
    assert!(matches!(
        s.insert_if_absent("k2", b"x".to_vec(), TTL).await.unwrap(),
        Inserted::Inserted { .. }
    ));
}

async fn compare_and_swap(s: SharedStore) {
    let Inserted::Inserted { version: v1 } =
        s.insert_if_absent("k", b"one".to_vec(), TTL).await.unwrap()
    else {
        panic!()
    };
    let Swapped::Swapped { version: v2 } =
        s.compare_and_swap("k", v1, b"two".to_vec(), TTL).await.unwrap()
    else {
        panic!("compare-and-set on the current version must succeed");
    };
    assert_ne!(v1, v2);
    match s.compare_and_swap("k", v1, b"three".to_vec(), TTL).await.unwrap() {
        Swapped::Conflict(Some(current)) => {
            assert_eq!(current.version, v2);
            assert_eq!(&*current.value, b"two");
        }
        other => panic!("a stale version must conflict: {other:?}"),
    }
    assert_eq!(&*s.get("k").await.unwrap().unwrap().value, b"two");
}

async fn no_aba(s: SharedStore) {
    let Inserted::Inserted { version: old } =
        s.insert_if_absent("k", b"a".to_vec(), TTL).await.unwrap()
    else {
        panic!()
    };
    assert!(s.delete_if("k", Some(old)).await.unwrap());
    let Inserted::Inserted { version: new } =
        s.insert_if_absent("k", b"b".to_vec(), TTL).await.unwrap()
    else {
        panic!()
    };
    assert_ne!(old, new, "a version must never be reused for a new generation of a key");
    assert!(matches!(
        s.compare_and_swap("k", old, b"c".to_vec(), TTL).await.unwrap(),
        Swapped::Conflict(Some(_))
    ));
    assert!(!s.delete_if("k", Some(old)).await.unwrap());
    assert_eq!(&*s.get("k").await.unwrap().unwrap().value, b"b");
}

async fn delete_if(s: SharedStore) {
    let Inserted::Inserted { version } = s.insert_if_absent("k", b"a".to_vec(), TTL).await.unwrap()
    else {
        panic!()
    };
    assert!(
        !s.delete_if("k", Some(version + 1_000_000)).await.unwrap(),
        "wrong version deletes nothing"
    );
    assert!(s.get("k").await.unwrap().is_some());
    assert!(s.delete_if("k", Some(version)).await.unwrap());
    assert_eq!(s.get("k").await.unwrap(), None);
    s.insert_if_absent("k", b"b".to_vec(), TTL).await.unwrap();
    assert!(s.delete_if("k", None).await.unwrap(), "None deletes any live version");
    assert!(!s.delete_if("k", None).await.unwrap());
}

/// `k`, written at `version` and expired since, behaves as absent: no compare-and-set, no
/// delete, and an insert (with `ttl`) writes it again.
async fn expired_behaves_as_absent(s: &SharedStore, version: u64, ttl: Duration) {
    assert_eq!(
        s.compare_and_swap("k", version, b"b".to_vec(), TTL).await.unwrap(),
        Swapped::Conflict(None)
    );
    assert!(!s.delete_if("k", Some(version)).await.unwrap());
    assert!(matches!(
        s.insert_if_absent("k", b"c".to_vec(), ttl).await.unwrap(),
        Inserted::Inserted { .. }
    ));
}

async fn ttl(s: SharedStore, clock: ManualClock) {
    let start = clock.now();
    let Inserted::Inserted { version } =
        s.insert_if_absent("k", b"a".to_vec(), Duration::from_secs(10)).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(s.get("k").await.unwrap().unwrap().expires_at, start + Duration::from_secs(10));
    clock.advance(Duration::from_millis(9_999));
    assert!(s.get("k").await.unwrap().is_some(), "alive just before its expiry");
    clock.advance(Duration::from_millis(1));
    assert_eq!(s.get("k").await.unwrap(), None, "gone at its expiry");
    expired_behaves_as_absent(&s, version, TTL).await;
    // A compare-and-set resets the TTL.
    let v = s.get("k").await.unwrap().unwrap();
    clock.advance(Duration::from_secs(30));
    s.compare_and_swap("k", v.version, b"d".to_vec(), Duration::from_secs(60)).await.unwrap();
    clock.advance(Duration::from_secs(45));
    assert_eq!(&*s.get("k").await.unwrap().unwrap().value, b"d");
}

/// The TTL check in real time, for a store whose server decides expiry: the manual clock
/// never moves, so only the server's clock can expire the records.
async fn ttl_server_time(s: SharedStore, clock: ManualClock) {
    let wait = |ms| mcp_clock::SystemClock.sleep(Duration::from_millis(ms));
    let start = clock.now();
    let Inserted::Inserted { version } =
        s.insert_if_absent("k", b"a".to_vec(), Duration::from_millis(500)).await.unwrap()
    else {
        panic!()
    };
    let live = s.get("k").await.unwrap().expect("alive before its expiry");
    assert!(
        live.expires_at > start && live.expires_at <= start + Duration::from_millis(500),
        "the expiry is reported on the caller's clock: {:?} after {start:?}",
        live.expires_at
    );
    wait(700).await;
    assert_eq!(s.get("k").await.unwrap(), None, "gone after its expiry, with no clock moved");
    expired_behaves_as_absent(&s, version, Duration::from_millis(600)).await;
    // A compare-and-set resets the TTL.
    let v = s.get("k").await.unwrap().unwrap();
    wait(300).await;
    s.compare_and_swap("k", v.version, b"d".to_vec(), Duration::from_secs(60)).await.unwrap();
    wait(500).await;
    assert_eq!(&*s.get("k").await.unwrap().unwrap().value, b"d");
}

async fn notifications(s: SharedStore) {
    async fn expect_change(sub: &mut crate::Subscription, what: &str) {
        // A bounded wait so a missing notification fails instead of hanging.
        let woken =
            mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(5), sub.changed());
        if woken.await.is_none() {
            panic!("no notification after {what}");
        }
    }
    let mut sub = s.subscribe("k");
    let Inserted::Inserted { version } = s.insert_if_absent("k", b"a".to_vec(), TTL).await.unwrap()
    else {
        panic!()
    };
    expect_change(&mut sub, "insert").await;
    let Swapped::Swapped { version: v2 } =
        s.compare_and_swap("k", version, b"b".to_vec(), TTL).await.unwrap()
    else {
        panic!()
    };
    expect_change(&mut sub, "compare-and-set").await;
    assert!(s.delete_if("k", Some(v2)).await.unwrap());
    expect_change(&mut sub, "delete").await;
    // Another key's writes do not wake this subscriber.
    s.insert_if_absent("other", b"x".to_vec(), TTL).await.unwrap();
    let woken =
        mcp_clock::within(&mcp_clock::SystemClock, Duration::from_millis(50), sub.changed());
    assert!(woken.await.is_none());
}

async fn racing_writers(s: SharedStore) {
    // The race: two replicas both see "absent" and both write; exactly one must win.
    let s = Arc::new(s);
    let inserts: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.insert_if_absent("k", vec![i], TTL).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for t in inserts {
        if matches!(t.await.unwrap(), Inserted::Inserted { .. }) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one insert-if-absent wins");
    let version = s.get("k").await.unwrap().unwrap().version;
    let swaps: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(
                async move { s.compare_and_swap("k", version, vec![i], TTL).await.unwrap() },
            )
        })
        .collect();
    let mut winners = 0;
    for t in swaps {
        if matches!(t.await.unwrap(), Swapped::Swapped { .. }) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one compare-and-set from the same version wins");
}

mod fault_plan;
mod faulty;
pub use fault_plan::{FaultPlan, WriteFault};
pub use faulty::FaultyStore;

#[cfg(feature = "redis")]
pub use redis_server::RedisServer;

#[cfg(feature = "redis")]
mod redis_server {
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    /// A real `redis-server` on a free loopback port, stopped when dropped. For tests.
    ///
    /// Without `redis-server` on `PATH`, [`RedisServer::start`] panics with a message naming the
    /// fix (`cargo xtask test` installs it). The only way to skip is explicit:
    /// `MCP_TEST_SKIP_REDIS=1` makes it return `None`, and the skip is recorded (the test's name,
    /// one line) in the file named by `MCP_TEST_SKIP_REDIS_LOG` when that is set, so
    /// `cargo xtask test` can say how many tests skipped Redis.
    #[derive(Debug)]
    pub struct RedisServer {
        child: Option<Child>,
        port: u16,
        dir: PathBuf,
        append_only: bool,
        _tmp: Option<tempfile_like::TempDir>,
    }

    mod tempfile_like {
        /// A directory removed on drop (avoids a tempfile dependency in the library).
        #[derive(Debug)]
        pub(super) struct TempDir(pub(super) std::path::PathBuf);
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
        listener.local_addr().expect("local addr").port()
    }

    fn on_path() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    /// What a Redis test says when `redis-server` is missing.
    const MISSING: &str = "redis-server is not on PATH, and the Redis tests need it. \
        Run the tests with `cargo xtask test` (it installs redis-server when it can), or install \
        it yourself (`sudo apt-get install redis-server`; macOS: `brew install redis`). To skip \
        the Redis tests on purpose, set MCP_TEST_SKIP_REDIS=1.";

    /// `MCP_TEST_SKIP_REDIS=1`: the one way to skip the Redis tests.
    fn skip_requested() -> bool {
        std::env::var("MCP_TEST_SKIP_REDIS").is_ok_and(|v| v == "1")
    }

    /// Says that this test skipped Redis, on stderr and, when `MCP_TEST_SKIP_REDIS_LOG` names a
    /// file, as one line there (the test thread's name is the test's name under libtest).
    fn record_skip() {
        let thread = std::thread::current();
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let test = format!("{binary} {}", thread.name().unwrap_or("<unnamed test>"));
        eprintln!("SKIPPED Redis (MCP_TEST_SKIP_REDIS=1): {test}");
        if let Some(path) = std::env::var_os("MCP_TEST_SKIP_REDIS_LOG") {
            use std::io::Write;
            let line = format!("{test}\n");
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                panic!("record the Redis skip in {}: {e}", std::path::Path::new(&path).display());
            }
        }
    }

    impl RedisServer {
        /// Start a server without persistence (`None` only when `MCP_TEST_SKIP_REDIS=1`).
        pub fn start() -> Option<RedisServer> {
            RedisServer::start_with(false)
        }

        /// Start a server; with `append_only`, writes are persisted to an append-only file in a
        /// private directory so [`RedisServer::restart`] keeps them.
        pub fn start_with(append_only: bool) -> Option<RedisServer> {
            if skip_requested() {
                record_skip();
                return None;
            }
            if !on_path() {
                panic!("{MISSING}");
            }
            let dir = std::env::temp_dir().join(format!(
                "flow-state-redis-{}-{}",
                std::process::id(),
                free_port()
            ));
            std::fs::create_dir_all(&dir).expect("create the redis directory");
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                dir: dir.clone(),
                append_only,
                _tmp: Some(tempfile_like::TempDir(dir)),
            };
            server.spawn();
            Some(server)
        }

        fn spawn(&mut self) {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
                .args(["--appendonly", if self.append_only { "yes" } else { "no" }])
                .args(["--appendfsync", "always"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            self.child = Some(cmd.spawn().expect("start redis-server"));
            wait_until_up(self.addr());
        }

        /// The server's address.
        pub fn addr(&self) -> SocketAddr {
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
        }

        /// A `redis://` URL for the server.
        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        /// The server's working directory (where the append-only file lives).
        pub fn dir(&self) -> &Path {
            &self.dir
        }

        /// Stop the server (SIGKILL) without restarting it.
        pub fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Stop the server and start it again on the same port and directory.
        pub fn restart(&mut self) {
            self.stop();
            self.spawn();
        }
    }

    fn wait_until_up(addr: SocketAddr) {
        for _ in 0..500 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start listening on {addr}");
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
        }
    }
}
