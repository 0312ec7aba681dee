//! Cross-crate end-to-end tests live in `tests/` beside this file; this library is empty on
//! purpose (a virtual workspace compiles no root `tests/` folder, so they live in this member).
