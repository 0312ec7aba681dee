//! The checks: the target protocol holds in the whole bounded state space, and switching off
//! any one rule lets the checker find a counterexample to a named invariant.

use std::collections::BTreeSet;

use mcp_clock::SystemClock;
use stateright::{Checker, Expectation, HasDiscoveries, Model};

use super::protocol::*;

/// What one checker run found.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) unique_states: usize,
    pub(crate) states: usize,
    pub(crate) depth: usize,
    pub(crate) seconds: f64,
    /// `always` properties with a counterexample.
    pub(crate) violated: Vec<&'static str>,
    /// `sometimes` properties never witnessed.
    pub(crate) unwitnessed: Vec<&'static str>,
}

/// Check `model` breadth-first; with `stop_on`, stop as soon as that property has a
/// discovery (a counterexample is then the shortest one), else explore everything.
pub(crate) fn check(label: &str, model: RefreshModel, stop_on: Option<&'static str>) -> Run {
    // A counterexample search runs on one thread, so its counts are the same every run.
    let threads = match stop_on {
        Some(_) => 1,
        None => std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
    };
    let properties = model.properties();
    let mut builder = model.checker().threads(threads);
    if let Some(name) = stop_on {
        builder = builder.finish_when(HasDiscoveries::AnyOf(BTreeSet::from([name])));
    }
    let start = SystemClock::instant();
    let checker = builder.spawn_bfs().join();
    let seconds = (SystemClock::instant() - start).as_secs_f64();
    let discoveries = checker.discoveries();
    let mut violated = Vec::new();
    let mut unwitnessed = Vec::new();
    for p in &properties {
        let found = discoveries.get(p.name);
        match (&p.expectation, found) {
            (Expectation::Sometimes, None) => unwitnessed.push(p.name),
            (Expectation::Always | Expectation::Eventually, Some(path)) => {
                violated.push(p.name);
                eprintln!("[{label}] counterexample to \"{}\":", p.name);
                for (i, action) in path.clone().into_actions().iter().enumerate() {
                    eprintln!("    {:>2}. {action:?}", i + 1);
                }
            }
            _ => {}
        }
    }
    let run = Run {
        unique_states: checker.unique_state_count(),
        states: checker.state_count(),
        depth: checker.max_depth(),
        seconds,
        violated,
        unwitnessed,
    };
    eprintln!(
        "[{label}] {} unique states ({} generated), depth {}, {:.2} s; violated: {:?}",
        run.unique_states, run.states, run.depth, run.seconds, run.violated
    );
    run
}

/// Every fault the model knows, one of each.
fn every_fault(grace: bool) -> Faults {
    every_fault_times(1, grace)
}

/// Every fault the model knows, `n` of each.
fn every_fault_times(n: u8, grace: bool) -> Faults {
    Faults {
        crashes: n,
        lost_answers: n,
        connect_failures: n,
        store_failures: n,
        lost_renewals: n,
        pauses: n,
        abandons: n,
        pause_after_check: false,
        grace,
    }
}

/// The fault budget of the full checks: 1, or `TOKEN_STORAGE_MODEL_BUDGET` for a deeper run
/// (2: about 1.8 million states strict, 2.4 million with the grace window; seconds in a
/// release build, minutes in a debug one).
fn full_check_faults(grace: bool) -> Faults {
    let n = std::env::var("TOKEN_STORAGE_MODEL_BUDGET").ok().and_then(|v| v.parse().ok());
    every_fault_times(n.unwrap_or(1), grace)
}

fn assert_holds(label: &str, faults: Faults) {
    let run = check(label, RefreshModel::new(Rules::ALL, faults), None);
    assert!(run.violated.is_empty(), "{label}: counterexamples to {:?}", run.violated);
    assert!(run.unwitnessed.is_empty(), "{label}: vacuous, never reached {:?}", run.unwitnessed);
}

/// The target protocol against a strict server (reuse revokes the family): every reachable
/// state with up to one crash, lost answer, connection failure, failed store write, lost
/// renewal reply, lease-lapsing pause and abandonment satisfies the four invariants, and a
/// commit, a lost answer, a crash, a lapse, a failed write and a re-authorization all happen
/// somewhere in the space.
#[test]
fn target_protocol_holds_against_a_strict_server() {
    assert_holds("all rules, strict server", full_check_faults(false));
}

/// The same against a server with a reuse grace window (a replay returns the same successor).
#[test]
fn target_protocol_holds_against_a_server_with_a_grace_window() {
    assert_holds("all rules, grace window", full_check_faults(true));
}

/// Switch one rule off (`off`), keep every fault of the full check, and expect a
/// counterexample to `invariant` (breadth-first, so it is among the shortest).
fn assert_breaks(label: &str, off: fn(&mut Rules), grace: bool, invariant: &'static str) {
    let mut rules = Rules::ALL;
    off(&mut rules);
    let run = check(label, RefreshModel::new(rules, every_fault(grace)), Some(invariant));
    assert!(
        run.violated.contains(&invariant),
        "{label}: expected a counterexample to \"{invariant}\", found {:?}",
        run.violated
    );
}

/// Renewed only while a request is pending and never checked before a send: a holder that
/// sleeps through a backoff (or is paused past the TTL) sends after its lease lapsed, while a
/// peer holds it.
#[test]
fn without_the_lease_through_backoff_a_token_is_presented_twice() {
    assert_breaks(
        "lease through backoff off",
        |r| r.lease_through_backoff = false,
        false,
        INV_PRESENTED,
    );
}

/// A version-identified lease: one lost renewal reply and the holder's renewals fail, the
/// lease expires while its request is pending, and a peer presents the same token.
#[test]
fn without_an_owner_token_a_lost_renewal_reply_lets_a_peer_present_the_token_again() {
    assert_breaks("owner token off", |r| r.owner_token = false, false, INV_PRESENTED);
}

/// Unfenced writes: a process whose lease lapsed (paused after acquiring) re-reads, finds the
/// new holder's in-doubt intent and writes its claim over it; the holder's commit then
/// conflicts, and the rotated set it holds is dropped.
#[test]
fn without_the_fence_a_stale_writer_makes_the_holder_drop_its_rotated_set() {
    assert_breaks("fenced commit off", |r| r.fenced_commit = false, false, INV_NOT_LOST);
}

/// Dropped at the deadline after the answer arrived: the rotated token set dies with the flight.
#[test]
fn abandoning_a_sent_request_loses_the_rotated_token_set() {
    assert_breaks("never abandon off", |r| r.never_abandon = false, false, INV_NOT_LOST);
}

/// A lost answer retried like a transient failure: a holder that died after its request
/// reached the server, then a successor whose answer is lost and who retries: a third
/// presentation.
#[test]
fn without_the_in_doubt_record_a_lost_token_is_presented_a_third_time() {
    assert_breaks(
        "in doubt off",
        |r| {
            r.in_doubt = false;
            r.in_doubt_before_send = false;
        },
        false,
        INV_PRESENTED,
    );
}

/// The in-doubt record written only after a loss (the text): a holder that dies after
/// its request reached the server leaves no record, its successor presents the token a second
/// time, loses that answer, records it in doubt and retries: a third presentation.
#[test]
fn an_in_doubt_record_written_only_after_the_loss_misses_a_holder_that_died() {
    assert_breaks(
        "in doubt before send off",
        |r| r.in_doubt_before_send = false,
        false,
        INV_PRESENTED,
    );
}

/// A commit that fails on a transient store error drops the answer: the rotated set is lost.
#[test]
fn without_commit_retry_a_failed_write_loses_the_rotated_token_set() {
    assert_breaks("commit retry off", |r| r.commit_retry = false, false, INV_NOT_LOST);
}

/// A stale peer (paused past the TTL after acquiring) re-reads the holder's claimed in-doubt
/// record and marks the slot; the holder's same-token retry gets the successor from the grace
/// window, its commit meets the marker, adopts it and drops the valid set.
#[test]
fn a_stale_failure_marker_beats_a_valid_token_without_the_rule() {
    assert_breaks(
        "marker never beats token off",
        |r| r.marker_never_beats_token = false,
        true,
        INV_NOT_LOST,
    );
}

/// The existing compare-and-swap is what keeps a stale writer from replacing a newer
/// generation once the fence is gone too: without both, a holder paused past the TTL after its
/// re-read writes its intent for the old generation over a peer's commit. (With the fence on,
/// the lease alone keeps invariant 3; the full check above has the compare-and-swap on.)
#[test]
fn without_compare_and_swap_or_fence_a_stale_write_replaces_a_newer_generation() {
    assert_breaks(
        "compare-and-swap and fence off",
        |r| {
            r.compare_and_swap = false;
            r.fenced_commit = false;
            r.marker_never_beats_token = false;
        },
        false,
        INV_NO_OLDER_COMMIT,
    );
}

/// The model's one assumption, pinned: the lease TTL outlasts the time from the last lease
/// check to the commit. Let the holder be paused past the TTL anywhere after that check
/// (before its send goes out, while the request is pending, with the answer in hand) and
/// even the target protocol breaks invariant 1 (a send by a holder that lost its lease, or a
/// peer that takes the lease over and redeems the same token): only server-side fencing could
/// close that, so the TTL must be chosen above any plausible pause.
#[test]
fn a_pause_past_the_ttl_after_the_lease_check_defeats_the_lease() {
    let faults = Faults { pause_after_check: true, ..every_fault(false) };
    let run = check(
        "all rules, pause after the check",
        RefreshModel::new(Rules::ALL, faults),
        Some(INV_PRESENTED),
    );
    assert!(run.violated.contains(&INV_PRESENTED), "found {:?}", run.violated);
}

/// "A commit is retried (bounded, with backoff)": bounded is not enough if the flight then
/// keeps the set in memory and releases the lease. Two failed writes, the holder gives up
/// with the rotated set in its memory, and a peer re-reads the old generation and presents the
/// spent refresh token again (a reuse under strict detection). The model's `commit_retry`
/// therefore retries under the lease until the write lands.
#[test]
fn a_commit_that_gives_up_and_releases_the_lease_lets_a_peer_present_the_spent_token() {
    let mut model =
        RefreshModel::new(Rules::ALL, Faults { store_failures: 2, ..every_fault(false) });
    model.commit_tries = Some(2);
    let run = check("commit retries bounded at 2", model, Some(INV_PRESENTED));
    assert!(run.violated.contains(&INV_PRESENTED), "found {:?}", run.violated);
}

/// The take-back of an unsent intent after a lost lease cannot be fenced (the lease is gone);
/// what makes it safe is the compare-and-swap on the version of the flight's own write. A
/// blind take-back (write over whatever is stored) lets a paused holder erase the new holder's
/// claim of its retry while that retry is out: the new holder's commit then conflicts, and a
/// third process re-reads the old generation and presents its spent refresh token again.
#[test]
fn a_take_back_without_the_version_check_lets_a_spent_token_be_presented_again() {
    let mut model = RefreshModel::new(Rules::ALL, every_fault(false));
    model.blind_take_back = true;
    let run = check("blind take-back", model, Some(INV_PRESENTED));
    assert!(run.violated.contains(&INV_PRESENTED), "found {:?}", run.violated);
}
