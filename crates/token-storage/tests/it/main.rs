//! token-storage's integration tests, one binary (one link): the refresh scenarios, faults,
//! interleavings (proptest), the stores on disk and on a real redis-server, redaction, and the
//! model checker of the refresh protocol (`model`). `crash` and `lock_files` stay binaries of
//! their own: they run themselves as child processes, with their own `main`.

mod common;
mod faults;
mod interleavings;
mod model;
mod redaction;
mod redis;
mod scenarios;
mod stores;
