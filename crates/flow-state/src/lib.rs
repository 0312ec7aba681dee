//! Flow-state engine (work in progress).
