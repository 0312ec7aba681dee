//! Cross-crate end-to-end tests live in `tests/` beside this file; this library only compiles the
//! workspace README's examples as doc tests, so the README cannot go stale.
#![doc = include_str!("../../README.md")]
