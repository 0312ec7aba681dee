//! The refresh protocol as a `stateright` model: processes, the token store, the lease store
//! and a rotating authorization server, with the faults of issue 12 as bounded environment
//! actions and each protocol rule as a switch in [`Rules`].
//!
//! The state is small on purpose: one token key, token sets named by their refresh token's
//! serial number (the server issues serials in increasing order, so a larger serial is a newer
//! generation), store versions that grow with every write (the compare-and-swap token), and
//! ghost fields that remember what the invariants need (how often each refresh token reached
//! the server, which process received which token set, what each commit replaced).

use stateright::{Model, Property};

/// Refresh-token serials the server may issue before a state leaves the checked boundary.
pub(crate) const MAX_TOKENS: usize = 8;

/// The protocol rules of issue 12 section 2, each one a switch. [`Rules::ALL`] is the target
/// protocol; a test switches one off and expects a counterexample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Rules {
    /// The lease covers the whole critical section and is renewed throughout, the backoff sleep
    /// included, and it is checked immediately before every send ("a lease found lost before
    /// sending ends the attempt"). Off (main at 9e4ccc6): renewed only while a request is
    /// pending, and no send checks it.
    pub(crate) lease_through_backoff: bool,
    /// The lease is identified by an owner token in its value, so a renewal whose reply was
    /// lost still leaves the holder holding it. Off: identified by its store version, so the
    /// holder's next renewal fails and the lease expires under it.
    pub(crate) owner_token: bool,
    /// Fenced commit: the commit, and the in-doubt records written under the lease, land only
    /// while our lease holds (lease check and compare-and-swap in one step). Off:
    /// compare-and-swap on the version read, whatever became of the lease.
    pub(crate) fenced_commit: bool,
    /// The abandonment deadline applies only before a request is sent. Off: the flight is
    /// dropped wherever it is (and its lease is left to expire).
    pub(crate) never_abandon: bool,
    /// A lost answer is recorded in the store as in doubt before anything else happens, and
    /// the same refresh token is retried once under the lease (a refusal or a second loss is
    /// "rotation lost in flight"). Off: a lost answer is retried like any transient failure.
    pub(crate) in_doubt: bool,
    /// With `in_doubt`: the intent is written before the first send too, so a successor that
    /// takes over from a holder that died after sending knows the token may be spent. Not in
    /// the text; the model shows why it is needed (see `checks`).
    pub(crate) in_doubt_before_send: bool,
    /// A commit that fails on a transient store error is retried with the answer held in
    /// memory, under the lease until it lands (see `RefreshModel::commit_tries` for a bounded
    /// variant); a conflict whose stored value is our own set counts as success. Off: the
    /// answer is dropped with the error.
    pub(crate) commit_retry: bool,
    /// A stale failure marker never beats a valid token: the marker is written only under the
    /// lease (fenced like the commit), and a commit that finds a marker of an older generation
    /// replaces it (compare-and-swap on the marker's version). Off (main at 9e4ccc6's
    /// `terminal`): the marker is a compare-and-swap on the version read, whatever became of
    /// the lease, and a commit that meets it adopts it and tells its caller to re-authorize.
    pub(crate) marker_never_beats_token: bool,
    /// Not an issue-12 rule but the one main already has: every write is a compare-and-swap
    /// on the store version read under the lease. Off: writes replace whatever is stored.
    pub(crate) compare_and_swap: bool,
    /// A flight that finds its lease lost at the check before a send, with nothing sent since
    /// its latest in-doubt write, takes that write back (the level before it), so the next
    /// holder does not spend its one same-token retry on a token never sent. The lease is
    /// gone, so the take-back is not fenced: it is a compare-and-swap on the version of that
    /// very write. Off: the intent stays (main before this rule).
    pub(crate) take_back_unsent: bool,
}

impl Rules {
    /// The target protocol: every rule on.
    pub(crate) const ALL: Rules = Rules {
        lease_through_backoff: true,
        owner_token: true,
        fenced_commit: true,
        never_abandon: true,
        in_doubt: true,
        in_doubt_before_send: true,
        commit_retry: true,
        marker_never_beats_token: true,
        compare_and_swap: true,
        take_back_unsent: true,
    };
}

/// How many faults of each kind the environment may inject in one run, and the server's
/// reuse policy. Budgets bound the state space; every fault can strike at every step where
/// it is possible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub(crate) struct Faults {
    /// A process dies at any step; a request it had sent may or may not have reached the
    /// server, and its lease lapses after the TTL.
    pub(crate) crashes: u8,
    /// The server acts (rotates, or detects reuse) and its answer is lost.
    pub(crate) lost_answers: u8,
    /// A request fails before it reaches the server, and the client knows it (connection
    /// refused): a transient failure, retried after a backoff.
    pub(crate) connect_failures: u8,
    /// A store write fails without being applied, or is applied and then reported failed.
    pub(crate) store_failures: u8,
    /// A lease renewal is applied but its reply is lost.
    pub(crate) lost_renewals: u8,
    /// The lease holder is paused longer than the lease TTL at a point before a send (after
    /// acquiring, before the lease check, in a backoff sleep), so its lease lapses.
    pub(crate) pauses: u8,
    /// Outside the protocol's assumption: a pause past the TTL may also strike after the lease
    /// check (before the send, while the request is pending, with the answer in hand);
    /// `checks` shows no lease protocol survives it.
    pub(crate) pause_after_check: bool,
    /// The refresh deadline passes (the single-flight abandons the flight).
    pub(crate) abandons: u8,
    /// The server's reuse grace window: a replay of a rotated refresh token returns the same
    /// successor (while that successor is unused) instead of revoking the family.
    pub(crate) grace: bool,
}

/// What a process is asked to do (once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    /// `get_valid`: refreshes only a set that is due (in the model: the initial set).
    GetValid,
    /// `force_refresh` with the access token of the set the caller saw.
    ForceRefresh,
}

/// The model's configuration.
#[derive(Clone, Debug)]
pub(crate) struct RefreshModel {
    /// One entry per process: what it does.
    pub(crate) ops: Vec<Op>,
    /// Attempts per refresh on transient failures (`max_attempts`).
    pub(crate) max_attempts: u8,
    /// With `commit_retry`: `None`, the commit is retried under the lease until it is written
    /// (the store's failures are bounded by the fault budget); `Some(k)`, after `k` failed
    /// attempts the set is kept in the process's memory and the lease released.
    pub(crate) commit_tries: Option<u8>,
    pub(crate) rules: Rules,
    pub(crate) faults: Faults,
    /// With `take_back_unsent`: the take-back writes whatever is stored over (no
    /// compare-and-swap on the version of the flight's own write). `checks` shows that this
    /// breaks the protocol: the version is what makes an unfenced take-back safe.
    pub(crate) blind_take_back: bool,
}

impl RefreshModel {
    /// Three processes (two force-refresh, one get-valid) under `rules` and `faults`.
    pub(crate) fn new(rules: Rules, faults: Faults) -> Self {
        RefreshModel {
            ops: vec![Op::ForceRefresh, Op::GetValid, Op::ForceRefresh],
            max_attempts: 2,
            commit_tries: None,
            rules,
            faults,
            blind_take_back: false,
        }
    }
}

/// The stored token record (one key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Rec {
    /// The serial of the refresh token in the set (its generation).
    pub(crate) serial: u8,
    /// The store version: the compare-and-swap token, bumped by every write.
    pub(crate) ver: u8,
    /// The needs-authorization marker.
    pub(crate) marker: bool,
    /// In doubt: 0 no, 1 a presentation of `serial` may have reached the server, 2 and its
    /// one same-token retry has been claimed.
    pub(crate) doubt: u8,
}

/// The lease record in the lease store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LeaseRec {
    pub(crate) owner: u8,
    /// A renewal's reply was lost: the holder's copy of the lease version is out of date.
    pub(crate) stale: bool,
}

/// A refresh token at the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Tok {
    Live,
    /// Rotated into the given successor.
    Spent(u8),
    Revoked,
}

/// One refresh attempt's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Flight {
    /// The refresh token being redeemed.
    t: u8,
    /// The store version the next compare-and-swap expects.
    ver: u8,
    attempt: u8,
    /// This is the one same-token retry of a token in doubt.
    retry: bool,
    /// A request of this flight may have reached the server.
    sent: bool,
}

/// Where a process is: each variant between two await points of the real refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Pc {
    Idle,
    /// Waiting for the lease (`RefreshLease::acquire`).
    Acquiring {
        seen: u8,
    },
    /// Holds the lease; next: re-read the store (`refresh_held`'s `load`).
    Acquired {
        seen: u8,
    },
    /// Next: write the in-doubt intent before the first send.
    Intent(Flight),
    /// Next: check the lease before sending.
    Check(Flight),
    /// Next: send the token request (`refresher.refresh` in `redeem`).
    Ready(Flight),
    /// The lease was found lost before a send; next: take back this flight's latest in-doubt
    /// write, unfenced (compare-and-swap on its version).
    TakeBack(Flight),
    /// Request sent; next: its answer (or its loss).
    Sent(Flight),
    /// The answer was lost (or a successor found an intent); next: record in doubt and claim
    /// the one same-token retry.
    Lost(Flight),
    /// Sleeping before the next attempt (`clock.sleep(delay)`).
    Backoff(Flight),
    /// Holds the server's answer (token set `n`); next: the commit compare-and-swap.
    Got {
        n: u8,
        ver: u8,
        /// Commit attempts that failed on a store error so far.
        tries: u8,
    },
    /// Refused, or rotation lost in flight; next: write the needs-authorization marker.
    Fail(Flight),
    /// Next: release the lease.
    Release,
    Crashed,
}

/// One process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Proc {
    pub(crate) pc: Pc,
    pub(crate) op_left: bool,
    /// A token set this process gave up committing and keeps in memory (for its own next
    /// refresh; no peer can see it).
    pub(crate) pending: Option<u8>,
}

/// What the invariants need to remember.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub(crate) struct Ghost {
    /// How often each refresh token reached the server.
    pub(crate) presented: [u8; MAX_TOKENS],
    /// Whether the answer to each token's first presentation was lost.
    pub(crate) first_lost: [bool; MAX_TOKENS],
    /// A request was sent by a process that did not hold the lease.
    pub(crate) nonholder_send: bool,
    /// Bit `p` of entry `n`: token set `n` reached process `p`.
    pub(crate) got: [u8; MAX_TOKENS],
    /// The newest generation ever committed.
    pub(crate) max_committed: u8,
    /// A write replaced a newer generation.
    pub(crate) replaced_newer: bool,
    /// A process was told to re-authorize while the store held a usable token.
    pub(crate) reauth_while_usable: bool,
    /// The server would have issued more than `MAX_TOKENS` serials.
    pub(crate) overflow: bool,
    // Reachability witnesses.
    pub(crate) committed: bool,
    pub(crate) lost: bool,
    pub(crate) lapsed: bool,
    pub(crate) reauth: bool,
    pub(crate) grace_answer: bool,
    pub(crate) store_fault: bool,
    pub(crate) taken_back: bool,
}

/// The remaining fault budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Budget {
    crashes: u8,
    lost_answers: u8,
    connect_failures: u8,
    store_failures: u8,
    lost_renewals: u8,
    pauses: u8,
    abandons: u8,
}

/// The whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct State {
    pub(crate) procs: Vec<Proc>,
    pub(crate) store: Rec,
    pub(crate) lease: Option<LeaseRec>,
    pub(crate) tokens: [Tok; MAX_TOKENS],
    pub(crate) issued: u8,
    pub(crate) budget: Budget,
    pub(crate) ghost: Ghost,
}

/// How a store write ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Write {
    Ok,
    /// Fails without being applied.
    FailUnapplied,
    /// Applied, then reported as failed.
    AppliedThenFailed,
}

/// How a sent request ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Answer {
    /// The server acts and its answer arrives.
    Delivered,
    /// The server acts and its answer is lost.
    Lost,
    /// The request never reached the server, and the client knows it.
    ConnectFailed,
}

/// Process actions (named after the real code's await points) and environment actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Action {
    /// A caller calls `get_valid` / `force_refresh` (reads the view, joins the flight).
    Start(u8),
    /// `refresh`: `lease.acquire(&key).await`.
    AcquireLease(u8),
    /// `refresh_held`: `self.load(&key).await` under the lease.
    ReRead(u8),
    /// Target protocol: write the in-doubt intent before the first send.
    RecordIntent(u8, Write),
    /// Target protocol: the lease check before each send (`still_held`).
    CheckLease(u8),
    /// `refresh_held`: `restore_doubt(.., None)` after the lease was found lost before a send.
    TakeBack(u8, Write),
    /// `redeem`: `self.refresher.refresh(key, request)` is sent.
    Send(u8),
    /// `redeem`: the refresher's future completes (or the answer is lost).
    Receive(u8, Answer),
    /// Target protocol: record the lost answer as in doubt (claims the same-token retry).
    RecordInDoubt(u8, Write),
    /// `refresh_held`: `self.clock.sleep(delay).await` (the backoff) ends.
    Wake(u8),
    /// `commit` -> `write_tokens` -> `store.compare_and_swap(..).await`.
    Commit(u8, Write),
    /// `terminal` -> `write_tokens(marked)`: the needs-authorization marker.
    WriteMarker(u8),
    /// `refresh`: `held.release().await`.
    Release(u8),
    /// Environment: the process dies; `true`: its sent request had reached the server.
    Crash(u8, bool),
    /// Environment: the lease holder is paused past the TTL; its lease lapses.
    Pause(u8),
    /// Environment: a lease nobody renews expires.
    LeaseExpires,
    /// Environment: a renewal of the holder's lease is applied, its reply lost.
    LoseRenewReply(u8),
    /// Environment: the refresh deadline passes; `true`: a sent request had reached the server.
    Abandon(u8, bool),
}

fn bit(p: u8) -> u8 {
    1 << p
}

impl RefreshModel {
    fn held(&self, s: &State, p: u8) -> bool {
        s.lease.is_some_and(|l| l.owner == p && (self.rules.owner_token || !l.stale))
    }

    /// The store holds a token set the client could still refresh without the user: no
    /// marker, not in doubt, and the server would accept its refresh token.
    pub(crate) fn usable(&self, s: &State) -> bool {
        let r = s.store;
        if r.marker || r.doubt != 0 {
            return false;
        }
        match s.tokens[r.serial as usize] {
            Tok::Live => true,
            Tok::Spent(n) => self.faults.grace && s.tokens[n as usize] == Tok::Live,
            Tok::Revoked => false,
        }
    }

    fn tell_reauth(&self, s: &mut State) {
        s.ghost.reauth = true;
        if self.usable(s) {
            s.ghost.reauth_while_usable = true;
        }
    }

    /// The server receives a request presenting refresh token `t`.
    fn server_act(&self, s: &mut State, t: u8, lost: bool) -> Option<u8> {
        let ti = t as usize;
        s.ghost.presented[ti] = s.ghost.presented[ti].saturating_add(1);
        if s.ghost.presented[ti] == 1 {
            s.ghost.first_lost[ti] = lost;
        }
        match s.tokens[ti] {
            Tok::Live => {
                let n = s.issued;
                if n as usize >= MAX_TOKENS {
                    s.ghost.overflow = true;
                    return None;
                }
                s.issued += 1;
                s.tokens[ti] = Tok::Spent(n);
                s.tokens[n as usize] = Tok::Live;
                Some(n)
            }
            Tok::Spent(n) if self.faults.grace && s.tokens[n as usize] == Tok::Live => {
                if !lost {
                    s.ghost.grace_answer = true;
                }
                Some(n)
            }
            _ => {
                // Reuse detection: the whole family is revoked.
                for tok in s.tokens.iter_mut().take(s.issued as usize) {
                    if *tok == Tok::Live {
                        *tok = Tok::Revoked;
                    }
                }
                None
            }
        }
    }

    /// A write of `want` (version aside).
    fn write(s: &mut State, want: Rec) {
        if want.serial < s.store.serial {
            s.ghost.replaced_newer = true;
        }
        let ver = s.store.ver + 1;
        s.store = Rec { ver, ..want };
        if !want.marker && want.doubt == 0 {
            s.ghost.max_committed = s.ghost.max_committed.max(want.serial);
            s.ghost.committed = true;
        }
    }

    /// A compare-and-swap of the token record expecting version `ver`, under fault `w`.
    fn cas(&self, s: &mut State, ver: u8, want: Rec, w: Write) -> Cas {
        if self.rules.compare_and_swap && s.store.ver != ver {
            return Cas::Conflict(s.store);
        }
        match w {
            Write::Ok => {
                Self::write(s, want);
                Cas::Written(s.store.ver)
            }
            Write::FailUnapplied => {
                s.budget.store_failures -= 1;
                s.ghost.store_fault = true;
                Cas::Failed
            }
            Write::AppliedThenFailed => {
                s.budget.store_failures -= 1;
                s.ghost.store_fault = true;
                Self::write(s, want);
                Cas::Failed
            }
        }
    }

    /// The fence: with `fenced_commit`, a write by `p` lands only while `p` holds the lease.
    fn fenced_out(&self, s: &State, p: u8) -> bool {
        self.rules.fenced_commit && !self.held(s, p)
    }

    /// The level before `f`'s latest in-doubt write, if it made one (its version is `f.ver`):
    /// the claim of the one retry replaced "sent"; the intent replaced "not in doubt".
    fn wrote_doubt(&self, f: Flight) -> Option<u8> {
        if !self.rules.in_doubt {
            None
        } else if f.retry {
            Some(1)
        } else if self.rules.in_doubt_before_send {
            Some(0)
        } else {
            None
        }
    }

    fn next_check(&self, f: Flight) -> Pc {
        if self.rules.lease_through_backoff { Pc::Check(f) } else { Pc::Ready(f) }
    }

    /// A transient failure: back off and try again, or give up.
    fn retry(&self, f: Flight) -> Pc {
        if f.attempt < self.max_attempts {
            Pc::Backoff(Flight { attempt: f.attempt + 1, ..f })
        } else {
            Pc::Release
        }
    }

    /// Whether `p` may be abandoned at its current step.
    fn abandonable(&self, pc: Pc) -> bool {
        match pc {
            Pc::Idle | Pc::Crashed | Pc::Release => false,
            Pc::Acquiring { .. } | Pc::Acquired { .. } => true,
            Pc::Intent(f) | Pc::Check(f) | Pc::Ready(f) | Pc::Backoff(f) | Pc::TakeBack(f) => {
                !self.rules.never_abandon || !f.sent
            }
            Pc::Sent(_) | Pc::Lost(_) | Pc::Got { .. } | Pc::Fail(_) => !self.rules.never_abandon,
        }
    }

    fn write_variants(&self, s: &State, mk: fn(u8, Write) -> Action, p: u8, out: &mut Vec<Action>) {
        out.push(mk(p, Write::Ok));
        if s.budget.store_failures > 0 {
            out.push(mk(p, Write::FailUnapplied));
            out.push(mk(p, Write::AppliedThenFailed));
        }
    }
}

enum Cas {
    Written(u8),
    Failed,
    Conflict(Rec),
}

impl Model for RefreshModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let tokens = [Tok::Live; MAX_TOKENS];
        let f = self.faults;
        vec![State {
            procs: self
                .ops
                .iter()
                .map(|_| Proc { pc: Pc::Idle, op_left: true, pending: None })
                .collect(),
            store: Rec { serial: 0, ver: 0, marker: false, doubt: 0 },
            lease: None,
            tokens,
            issued: 1,
            budget: Budget {
                crashes: f.crashes,
                lost_answers: f.lost_answers,
                connect_failures: f.connect_failures,
                store_failures: f.store_failures,
                lost_renewals: f.lost_renewals,
                pauses: f.pauses,
                abandons: f.abandons,
            },
            ghost: Ghost::default(),
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        for (i, proc) in s.procs.iter().enumerate() {
            let p = i as u8;
            match proc.pc {
                Pc::Idle if proc.op_left => out.push(Action::Start(p)),
                Pc::Idle | Pc::Crashed => {}
                Pc::Acquiring { .. } if s.lease.is_none() => out.push(Action::AcquireLease(p)),
                Pc::Acquiring { .. } => {}
                Pc::Acquired { .. } => out.push(Action::ReRead(p)),
                Pc::Intent(_) => self.write_variants(s, Action::RecordIntent, p, out),
                Pc::Check(_) => out.push(Action::CheckLease(p)),
                Pc::TakeBack(_) => self.write_variants(s, Action::TakeBack, p, out),
                Pc::Ready(_) => out.push(Action::Send(p)),
                Pc::Sent(_) => {
                    out.push(Action::Receive(p, Answer::Delivered));
                    if s.budget.lost_answers > 0 {
                        out.push(Action::Receive(p, Answer::Lost));
                    }
                    if s.budget.connect_failures > 0 {
                        out.push(Action::Receive(p, Answer::ConnectFailed));
                    }
                }
                Pc::Lost(_) => self.write_variants(s, Action::RecordInDoubt, p, out),
                Pc::Backoff(_) => out.push(Action::Wake(p)),
                Pc::Got { .. } => self.write_variants(s, Action::Commit, p, out),
                Pc::Fail(_) => out.push(Action::WriteMarker(p)),
                Pc::Release => out.push(Action::Release(p)),
            }
            let in_flight = !matches!(proc.pc, Pc::Idle | Pc::Crashed);
            if in_flight && s.budget.crashes > 0 {
                out.push(Action::Crash(p, false));
                if matches!(proc.pc, Pc::Sent(_)) {
                    out.push(Action::Crash(p, true));
                }
            }
            if s.budget.abandons > 0 && self.abandonable(proc.pc) {
                out.push(Action::Abandon(p, false));
                if matches!(proc.pc, Pc::Sent(_)) {
                    out.push(Action::Abandon(p, true));
                }
            }
            let holder = s.lease.is_some_and(|l| l.owner == p);
            if holder
                && s.budget.pauses > 0
                && (matches!(
                    proc.pc,
                    Pc::Acquired { .. } | Pc::Intent(_) | Pc::Check(_) | Pc::Backoff(_)
                ) || (self.faults.pause_after_check && proc.pc != Pc::Release))
            {
                out.push(Action::Pause(p));
            }
            let renewing = matches!(proc.pc, Pc::Sent(_))
                || (self.rules.lease_through_backoff && matches!(proc.pc, Pc::Backoff(_)));
            if holder && renewing && s.budget.lost_renewals > 0 && !s.lease.is_some_and(|l| l.stale)
            {
                out.push(Action::LoseRenewReply(p));
            }
        }
        if let Some(l) = s.lease {
            let pc = s.procs[l.owner as usize].pc;
            let unrenewed = matches!(pc, Pc::Idle | Pc::Crashed)
                || (l.stale && !self.rules.owner_token)
                || (!self.rules.lease_through_backoff && matches!(pc, Pc::Backoff(_)));
            if unrenewed {
                out.push(Action::LeaseExpires);
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let set_pc = |s: &mut State, p: u8, pc: Pc| s.procs[p as usize].pc = pc;
        match action {
            Action::Start(p) => {
                s.procs[p as usize].op_left = false;
                let rec = s.store;
                if rec.marker {
                    self.tell_reauth(&mut s);
                    return Some(s);
                }
                let refresh = match self.ops[p as usize] {
                    Op::GetValid => rec.serial == 0,
                    Op::ForceRefresh => true,
                };
                if refresh {
                    set_pc(&mut s, p, Pc::Acquiring { seen: rec.serial });
                }
            }
            Action::AcquireLease(p) => {
                let Pc::Acquiring { seen } = s.procs[p as usize].pc else { return None };
                s.lease = Some(LeaseRec { owner: p, stale: false });
                set_pc(&mut s, p, Pc::Acquired { seen });
            }
            Action::ReRead(p) => {
                let Pc::Acquired { seen } = s.procs[p as usize].pc else { return None };
                let rec = s.store;
                let f =
                    Flight { t: rec.serial, ver: rec.ver, attempt: 1, retry: false, sent: false };
                let pc = if rec.marker {
                    self.tell_reauth(&mut s);
                    Pc::Release
                } else if rec.serial != seen {
                    // Already refreshed by a peer: serve it.
                    Pc::Release
                } else if rec.doubt == 2 {
                    // Its one same-token retry was claimed: rotation lost in flight.
                    Pc::Fail(f)
                } else if rec.doubt == 1 {
                    // A presentation may have reached the server: claim the retry.
                    Pc::Lost(f)
                } else if self.rules.in_doubt && self.rules.in_doubt_before_send {
                    Pc::Intent(f)
                } else {
                    self.next_check(f)
                };
                set_pc(&mut s, p, pc);
            }
            Action::RecordIntent(p, w) => {
                let Pc::Intent(f) = s.procs[p as usize].pc else { return None };
                if self.fenced_out(&s, p) {
                    set_pc(&mut s, p, Pc::Release);
                    return Some(s);
                }
                let want = Rec { serial: f.t, ver: 0, marker: false, doubt: 1 };
                let pc = match self.cas(&mut s, f.ver, want, w) {
                    Cas::Written(ver) => self.next_check(Flight { ver, ..f }),
                    Cas::Failed => Pc::Intent(f),
                    Cas::Conflict(r) if (r.serial, r.marker, r.doubt) == (f.t, false, 1) => {
                        self.next_check(Flight { ver: r.ver, ..f })
                    }
                    Cas::Conflict(_) => Pc::Release,
                };
                set_pc(&mut s, p, pc);
            }
            Action::CheckLease(p) => {
                let Pc::Check(f) = s.procs[p as usize].pc else { return None };
                let pc = if self.held(&s, p) {
                    Pc::Ready(f)
                } else if self.rules.take_back_unsent && self.wrote_doubt(f).is_some() {
                    Pc::TakeBack(f)
                } else {
                    Pc::Release
                };
                set_pc(&mut s, p, pc);
            }
            Action::TakeBack(p, w) => {
                let Pc::TakeBack(f) = s.procs[p as usize].pc else { return None };
                let prior = self.wrote_doubt(f)?;
                let want = Rec { serial: f.t, ver: 0, marker: false, doubt: prior };
                // Not a commit: the same generation, back to the level before the intent.
                let (committed, max) = (s.ghost.committed, s.ghost.max_committed);
                if self.blind_take_back {
                    Self::write(&mut s, want);
                    s.ghost.taken_back = true;
                } else if let Cas::Written(_) = self.cas(&mut s, f.ver, want, w) {
                    s.ghost.taken_back = true;
                }
                (s.ghost.committed, s.ghost.max_committed) = (committed, max);
                set_pc(&mut s, p, Pc::Release);
            }
            Action::Send(p) => {
                let Pc::Ready(f) = s.procs[p as usize].pc else { return None };
                if s.lease.is_none_or(|l| l.owner != p) {
                    s.ghost.nonholder_send = true;
                }
                set_pc(&mut s, p, Pc::Sent(Flight { sent: true, ..f }));
            }
            Action::Receive(p, answer) => {
                let Pc::Sent(f) = s.procs[p as usize].pc else { return None };
                let pc = match answer {
                    Answer::ConnectFailed => {
                        s.budget.connect_failures -= 1;
                        self.retry(f)
                    }
                    Answer::Lost => {
                        s.budget.lost_answers -= 1;
                        s.ghost.lost = true;
                        self.server_act(&mut s, f.t, true);
                        if f.retry {
                            Pc::Fail(f)
                        } else if self.rules.in_doubt {
                            Pc::Lost(f)
                        } else {
                            self.retry(f)
                        }
                    }
                    Answer::Delivered => match self.server_act(&mut s, f.t, false) {
                        Some(n) => {
                            s.ghost.got[n as usize] |= bit(p);
                            Pc::Got { n, ver: f.ver, tries: 0 }
                        }
                        None => Pc::Fail(f),
                    },
                };
                set_pc(&mut s, p, pc);
            }
            Action::RecordInDoubt(p, w) => {
                let Pc::Lost(f) = s.procs[p as usize].pc else { return None };
                if self.fenced_out(&s, p) {
                    set_pc(&mut s, p, Pc::Release);
                    return Some(s);
                }
                let want = Rec { serial: f.t, ver: 0, marker: false, doubt: 2 };
                let claimed = |ver| Pc::Backoff(Flight { ver, retry: true, ..f });
                let pc = match self.cas(&mut s, f.ver, want, w) {
                    Cas::Written(ver) => claimed(ver),
                    Cas::Failed => Pc::Lost(f),
                    Cas::Conflict(r) if (r.serial, r.marker, r.doubt) == (f.t, false, 2) => {
                        claimed(r.ver)
                    }
                    Cas::Conflict(_) => Pc::Release,
                };
                set_pc(&mut s, p, pc);
            }
            Action::Wake(p) => {
                let Pc::Backoff(f) = s.procs[p as usize].pc else { return None };
                set_pc(&mut s, p, self.next_check(f));
            }
            Action::Commit(p, w) => {
                let Pc::Got { n, ver, tries } = s.procs[p as usize].pc else { return None };
                if self.fenced_out(&s, p) {
                    // The fence refuses: the lease is not ours (the answer is dropped; the
                    // invariants judge whether that can happen).
                    set_pc(&mut s, p, Pc::Release);
                    return Some(s);
                }
                let want = Rec { serial: n, ver: 0, marker: false, doubt: 0 };
                let pc = match self.cas(&mut s, ver, want, w) {
                    Cas::Written(_) => Pc::Release,
                    Cas::Failed
                        if self.rules.commit_retry
                            && self.commit_tries.is_some_and(|k| tries + 1 >= k) =>
                    {
                        // Given up: held in this process's memory, the lease released.
                        s.procs[p as usize].pending = Some(n);
                        Pc::Release
                    }
                    Cas::Failed if self.rules.commit_retry => Pc::Got { n, ver, tries: tries + 1 },
                    Cas::Failed => Pc::Release,
                    Cas::Conflict(r) if r.serial == n && !r.marker => Pc::Release,
                    Cas::Conflict(r)
                        if r.marker && self.rules.marker_never_beats_token && n > r.serial =>
                    {
                        Pc::Got { n, ver: r.ver, tries }
                    }
                    Cas::Conflict(r) => {
                        if r.marker {
                            self.tell_reauth(&mut s);
                        }
                        Pc::Release
                    }
                };
                set_pc(&mut s, p, pc);
            }
            Action::WriteMarker(p) => {
                let Pc::Fail(f) = s.procs[p as usize].pc else { return None };
                if self.rules.marker_never_beats_token && !self.held(&s, p) {
                    // Not ours to mark any more: a transient failure, no marker.
                } else if !self.rules.compare_and_swap || s.store.ver == f.ver {
                    Self::write(&mut s, Rec { serial: f.t, ver: 0, marker: true, doubt: 0 });
                    self.tell_reauth(&mut s);
                } else if s.store.marker || s.store.serial <= f.t {
                    self.tell_reauth(&mut s);
                }
                set_pc(&mut s, p, Pc::Release);
            }
            Action::Release(p) => {
                if self.held(&s, p) {
                    s.lease = None;
                }
                set_pc(&mut s, p, Pc::Idle);
            }
            Action::Crash(p, reached) => {
                s.budget.crashes -= 1;
                match s.procs[p as usize].pc {
                    Pc::Sent(f) if reached => {
                        self.server_act(&mut s, f.t, true);
                    }
                    Pc::Got { n, .. } => {
                        // An answer that died with its recipient counts as lost.
                        for t in 0..s.issued as usize {
                            if s.tokens[t] == Tok::Spent(n) && s.ghost.presented[t] == 1 {
                                s.ghost.first_lost[t] = true;
                            }
                        }
                    }
                    _ => {}
                }
                set_pc(&mut s, p, Pc::Crashed);
            }
            Action::Abandon(p, reached) => {
                s.budget.abandons -= 1;
                let pc = s.procs[p as usize].pc;
                if reached {
                    let Pc::Sent(f) = pc else { return None };
                    self.server_act(&mut s, f.t, true);
                }
                let next = match pc {
                    Pc::Acquiring { .. } => Pc::Idle,
                    // The target protocol's flight ends at its cancellation check and releases.
                    _ if self.rules.never_abandon => Pc::Release,
                    // Dropped wherever it is: the lease is left to expire.
                    _ => Pc::Idle,
                };
                set_pc(&mut s, p, next);
            }
            Action::Pause(p) => {
                s.budget.pauses -= 1;
                debug_assert!(s.lease.is_some_and(|l| l.owner == p));
                s.lease = None;
                s.ghost.lapsed = true;
            }
            Action::LeaseExpires => {
                s.lease = None;
                s.ghost.lapsed = true;
            }
            Action::LoseRenewReply(_) => {
                s.budget.lost_renewals -= 1;
                if let Some(l) = s.lease.as_mut() {
                    l.stale = true;
                }
            }
        }
        Some(s)
    }

    fn within_boundary(&self, s: &State) -> bool {
        !s.ghost.overflow
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut props = vec![
            Property::always(INV_PRESENTED, |_, s: &State| {
                !s.ghost.nonholder_send
                    && (0..MAX_TOKENS).all(|t| {
                        let limit = if s.ghost.first_lost[t] { 2 } else { 1 };
                        s.ghost.presented[t] <= limit
                    })
            }),
            Property::always(INV_NOT_LOST, |_, s: &State| {
                (0..MAX_TOKENS).all(|n| {
                    (0..s.procs.len()).all(|p| {
                        let reached = s.ghost.got[n] & bit(p as u8) != 0;
                        let pc = s.procs[p].pc;
                        let holds = matches!(pc, Pc::Got { n: m, .. } if m as usize == n)
                            || s.procs[p].pending.is_some_and(|m| m as usize == n);
                        !reached
                            || pc == Pc::Crashed
                            || holds
                            || s.ghost.max_committed as usize >= n
                    })
                })
            }),
            Property::always(INV_NO_OLDER_COMMIT, |_, s: &State| !s.ghost.replaced_newer),
            Property::always(INV_NO_NEEDLESS_REAUTH, |_, s: &State| !s.ghost.reauth_while_usable),
            Property::sometimes(SOME_COMMIT, |_, s: &State| s.ghost.committed),
        ];
        if self.faults.lost_answers > 0 {
            props.push(Property::sometimes(SOME_LOST, |_, s: &State| s.ghost.lost));
        }
        if self.faults.crashes > 0 {
            props.push(Property::sometimes(SOME_CRASH, |_, s: &State| {
                s.procs.iter().any(|p| p.pc == Pc::Crashed)
            }));
        }
        if self.faults.crashes > 0 || self.faults.pauses > 0 {
            props.push(Property::sometimes(SOME_LAPSE, |_, s: &State| s.ghost.lapsed));
        }
        if self.rules.take_back_unsent && self.faults.pauses > 0 {
            props.push(Property::sometimes(SOME_TAKE_BACK, |_, s: &State| s.ghost.taken_back));
        }
        if self.faults.store_failures > 0 {
            props.push(Property::sometimes(SOME_STORE_FAULT, |_, s: &State| s.ghost.store_fault));
        }
        if self.faults.lost_answers > 0 {
            props.push(Property::sometimes(SOME_REAUTH, |_, s: &State| s.ghost.reauth));
        }
        if self.faults.grace && self.faults.lost_answers > 0 {
            props.push(Property::sometimes(SOME_GRACE, |_, s: &State| s.ghost.grace_answer));
        }
        props
    }
}

/// Invariant 1.
pub(crate) const INV_PRESENTED: &str =
    "inv1: a refresh token is presented once (twice if its answer was lost), by the lease holder";
/// Invariant 2.
pub(crate) const INV_NOT_LOST: &str =
    "inv2: a token set that reached a live process is committed or superseded";
/// Invariant 3.
pub(crate) const INV_NO_OLDER_COMMIT: &str = "inv3: no write replaces a newer generation";
/// Invariant 4.
pub(crate) const INV_NO_NEEDLESS_REAUTH: &str =
    "inv4: nobody is told to re-authorize while the store holds a usable token";
pub(crate) const SOME_COMMIT: &str = "sometimes: a refresh commits";
pub(crate) const SOME_LOST: &str = "sometimes: an answer is lost";
pub(crate) const SOME_CRASH: &str = "sometimes: a process crashes";
pub(crate) const SOME_LAPSE: &str = "sometimes: a lease lapses";
pub(crate) const SOME_TAKE_BACK: &str =
    "sometimes: an intent found unsent after a lost lease is taken back";
pub(crate) const SOME_STORE_FAULT: &str = "sometimes: a store write fails";
pub(crate) const SOME_REAUTH: &str = "sometimes: a process is told to re-authorize";
pub(crate) const SOME_GRACE: &str = "sometimes: a same-token retry gets the successor";
