//! Integration tests for flow-state: the store conformance suite on every backend, the
//! manager's scenarios, cancellation, the process-local single-flight, stress, and a
//! model-based property test.

mod cancel;
mod conformance;
mod harness;
mod lease;
mod model;
mod redis;
mod scenarios;
mod single_flight;
mod sled_disk;
mod stress;
