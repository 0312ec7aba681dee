//! A model checker for the refresh protocol (issue 12 section 3).
//!
//! `protocol` is a [`stateright`] model of the cross-process refresh of one token key:
//! three processes (two `force_refresh`, one `get_valid`), the token store (compare-and-swap
//! on a version), the lease store, and an authorization server with strict rotation and reuse
//! detection (a reused refresh token revokes its family) and an optional grace window. The
//! environment injects, each within a budget and at every step where it is possible: a crash
//! (the request a crashed process had sent may or may not have reached the server; its lease
//! lapses after the TTL), a lost answer (the server acted, the answer is lost), a connection
//! failure (the request never reached the server), a failed store write (not applied, or
//! applied and then reported failed), a lost renewal reply, a pause of the lease holder past
//! the TTL, and the abandonment deadline. `checks` explores the bounded state space
//! breadth-first.
//!
//! # Actions and the real code's await points
//!
//! | model action      | real code (token-storage `service/engine.rs`, `lease.rs`)           |
//! |-------------------|---------------------------------------------------------------------|
//! | `Start`           | `get_valid` / `force_refresh` read the view and join the flight     |
//! | `AcquireLease`    | `refresh`: `lease.acquire(&key).await`                              |
//! | `ReRead`          | `refresh_held`: `self.load(&key).await` (under the lease)           |
//! | `RecordIntent`    | `refresh_held`: `record_doubt(.., Doubt::Sent)` before the first send |
//! | `CheckLease`      | `refresh_held`: `guard.check(&key)` before each send                |
//! | `TakeBack`        | `refresh_held`: `restore_doubt(.., None)` when that check finds the lease lost (unfenced: compare-and-swap on the version of the flight's own in-doubt write) |
//! | `Send`            | `refresh_held`: `self.refresher.refresh(&key, &request)` goes out   |
//! | `Receive`         | `refresh_held`: the refresher's future completes (or answer lost)   |
//! | `RecordInDoubt`   | `record_doubt(.., Doubt::RetryClaimed)`: claims the one retry       |
//! | `Wake`            | `refresh_held`: `self.clock.sleep(delay)` (backoff) ends            |
//! | `Commit`          | `commit_set` -> `write_fenced` -> `store.compare_and_swap_fenced(..)` |
//! | `WriteMarker`     | `terminal` -> `write_fenced(marked)` (needs-authorization marker)   |
//! | `Release`         | `refresh`: `held.release().await`                                   |
//!
//! Renewals are not separate actions: a lease is renewed wherever the protocol renews it, and
//! `LeaseExpires` is enabled exactly where nobody does (a crashed or departed holder; a backoff
//! sleep without `lease_through_backoff`; a lease whose renewal reply was lost, without
//! `owner_token`). `Pause` lapses a live holder's lease before a send (after acquiring, before
//! the lease check, in a backoff). The model assumes the TTL outlasts the time from the last
//! lease check to the commit: a pause past the TTL there (before the send goes out, while the
//! request is pending, with the answer in hand) defeats every lease protocol without
//! server-side fencing, so the main checks do not inject it;
//! `checks::a_pause_past_the_ttl_after_the_lease_check_defeats_the_lease` pins that.
//!
//! # Rules (switches in `protocol::Rules`)
//!
//! | switch                     | rule (issue 12 section 2)                  | off: broken |
//! |----------------------------|--------------------------------------------|-------------|
//! | `lease_through_backoff`    | the lease covers the critical section, renewed through the backoff; a lease found lost before a send ends the attempt | inv 1 |
//! | `owner_token`              | lease identity is an owner token           | inv 1       |
//! | `fenced_commit`            | the commit (and the in-doubt records) land only while our lease holds | inv 2 |
//! | `never_abandon`            | never abandon a sent request               | inv 2       |
//! | `in_doubt`                 | in-doubt record + one same-token retry under the lease | inv 1 |
//! | `in_doubt_before_send`     | (model finding) the in-doubt intent is also written before the first send | inv 1 |
//! | `commit_retry`             | a commit is retried on a transient store error (under the lease until it lands); a conflict with our own set is success | inv 2 |
//! | `marker_never_beats_token` | a stale failure marker never beats a valid token (the marker is fenced; a commit replaces an older marker) | inv 2 |
//! | `compare_and_swap`         | (main already) writes compare-and-swap on the version read | inv 3, with the fence also off |
//! | `take_back_unsent`         | a flight that finds its lease lost before a send takes back its own unsent in-doubt write, so the next holder keeps its one retry | none of the four (it saves a retry; the full checks show the unfenced take-back breaks none; made blind, without the compare-and-swap on its own write's version, it breaks inv 1) |
//!
//! `RefreshModel::commit_tries` bounds the commit's retries the way issue 12 words the rule
//! ("bounded, with backoff, the answer held in memory"): giving up and releasing the lease
//! with the set only in memory lets a peer present the spent token again (invariant 1), so the
//! model's rule retries under the lease until the write lands.
//!
//! # Invariants
//!
//! 1. A refresh token whose answer was delivered is presented at most once; one whose first
//!    answer was lost at most twice; every presentation by the lease holder. An answer that
//!    reached a process which then crashed holding it counts as lost.
//! 2. A token set that reached a process that did not crash is committed or superseded by a
//!    newer one (or still held by that process on its way to the commit).
//! 3. No write replaces a newer generation.
//! 4. No process is told to re-authorize while the store holds a usable token (no marker, not
//!    in doubt, and the server would accept its refresh token).

mod checks;
mod protocol;
