use super::*;
use antnest_proto::ByteBuf;

use crate::intake::split_channel;

/// A worker named for a test.
fn w(name: &str) -> PeerId {
    PeerId::named(name)
}

/// Figures from an earlier job: each worker's turnaround and pace alike.
fn paces(known: &[(&str, Duration)]) -> WorkerTimes {
    let known: HashMap<PeerId, Duration> = known.iter().map(|(n, t)| (w(n), *t)).collect();
    WorkerTimes {
        pace: known.iter().map(|(w, t)| (*w, Pace::steady(*t))).collect(),
        turnaround: known,
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn book(units: &[&str]) -> JobBook {
    let (tx, rx) = split_channel(16, 1 << 20);
    for u in units {
        tx.send(u.as_bytes().to_vec()).unwrap();
    }
    drop(tx);
    JobBook::new(rx, Duration::from_secs(10), 2)
}

fn ok(index: u64, s: &str) -> TaskOutcome {
    TaskOutcome {
        index,
        result: Ok(ByteBuf::from(s.as_bytes().to_vec())),
        stderr: None,
        native: false,
    }
}

#[test]
fn only_batches_for_the_network_stop_at_the_byte_cap() {
    let unit = 1 << 20;
    let fits = MAX_BATCH_BYTES.div_ceil(unit);
    let (tx, rx) = split_channel(64, 64 << 20);
    for _ in 0..2 * fits + 2 {
        tx.send(vec![b'x'; unit]).unwrap();
    }
    drop(tx);
    let book = |rx, known: &[(&str, Duration)]| {
        JobBook::new(rx, Duration::from_secs(10), 2).with_times(paces(known))
    };
    let now = Instant::now();
    // With no figures, a lone worker's share is all there is.
    let mut b = book(rx, &[]);
    assert_eq!(b.lease(w("remote"), 100, now).len(), fits);
    // The local slot is far the faster, so its share is all that is
    // left: only a byte cap could stop it.
    let (tx, rx) = split_channel(64, 64 << 20);
    for _ in 0..2 * fits + 2 {
        tx.send(vec![b'x'; unit]).unwrap();
    }
    drop(tx);
    let paces = [
        ("local", Duration::from_micros(1)),
        ("remote", Duration::from_secs(1)),
    ];
    let mut b = book(rx, &paces);
    assert_eq!(b.lease_local(w("local"), 100, now).len(), 2 * fits + 2);
}

#[test]
fn expired_leases_are_reissued_and_duplicates_ignored() {
    let mut b = book(&["a", "b"]);
    let t0 = Instant::now();
    let first = b.lease(w("w1"), 10, t0);
    assert_eq!(first.len(), 2);
    assert!(
        b.lease(w("w1"), 10, t0).is_empty(),
        "nothing fresh, and no backups of its own"
    );
    let later = t0 + Duration::from_secs(11);
    let again = b.lease(w("w2"), 10, later);
    assert_eq!(again.len(), 2, "expired leases come back");
    b.complete(w("w2"), vec![ok(0, "A"), ok(1, "B")]);
    b.complete(w("w1"), vec![ok(0, "late duplicate")]);
    assert!(b.is_finished());
    let results = b.take_results();
    assert_eq!(results[&0], b"A");
    assert_eq!(b.per_worker()[&w("w2")], 2);
    assert!(!b.per_worker().contains_key(&w("w1")));
}

#[test]
fn taskunits_given_back_go_to_the_idle_worker_and_each_batch_is_asked_once() {
    let mut b = book(&["a", "b", "c", "d", "e", "f"]);
    let t0 = Instant::now();
    let remote = b.lease(w("remote"), 4, t0);
    assert_eq!(remote.len(), 4);
    // While there are taskunits to hand out, nobody is asked.
    assert!(b.to_reclaim(w("master")).is_empty());
    let mine = b.lease_local(w("master"), 10, t0);
    assert_eq!(mine.len(), 2);
    b.complete(w("master"), vec![ok(4, "E"), ok(5, "F")]);
    // The master's slot has run out: the remote's batch is asked, once.
    assert_eq!(b.to_reclaim(w("master")), vec![w("remote")]);
    assert!(b.to_reclaim(w("master")).is_empty());
    // It gives back its last two (and an index it does not hold, ignored).
    assert_eq!(b.give_back(w("remote"), &[2, 3, 99]), 2);
    assert_eq!(b.give_back(w("someone"), &[0]), 0, "not its lease");
    assert_eq!(b.progress().taken_back, 2);
    let back = b.lease_local(w("master"), 10, t0);
    assert_eq!(back.iter().map(|u| u.index).collect::<Vec<_>>(), vec![2, 3]);
    b.complete(w("master"), vec![ok(2, "C"), ok(3, "D")]);
    b.complete(w("remote"), vec![ok(0, "A"), ok(1, "B")]);
    assert!(b.is_finished());
    assert_eq!(b.per_worker()[&w("master")], 4);
    assert_eq!(b.per_worker()[&w("remote")], 2);
    let results = b.take_results();
    assert_eq!(
        results.values().map(|r| r[0]).collect::<Vec<_>>(),
        b"ABCDEF"
    );
}

#[test]
fn vanished_worker_loses_nothing() {
    let mut b = book(&["a", "b", "c"]);
    let now = Instant::now();
    assert_eq!(b.lease(w("dead"), 2, now).len(), 2);
    assert_eq!(b.release_worker(w("dead")), 2);
    let units = b.lease(w("alive"), 10, now);
    let mut idx: Vec<u64> = units.iter().map(|u| u.index).collect();
    idx.sort();
    assert_eq!(idx, vec![0, 1, 2]);
}

#[test]
fn idle_workers_back_up_stragglers_and_the_first_result_wins() {
    let mut b = book(&["a", "b"]);
    let now = Instant::now();
    let ms = Duration::from_millis;
    assert_eq!(b.lease(w("slow"), 1, now).len(), 1);
    assert_eq!(b.lease(w("fast"), 1, now).len(), 1);
    b.complete_at(w("fast"), vec![ok(1, "B")], now + ms(10));
    // Nothing fresh is left, but "slow" is not late yet: its taskunit
    // (and one it may have had in hand) were expected to take about as
    // long as "fast"'s (10 ms each).
    assert!(
        b.lease(w("fast"), 4, now + ms(29)).is_empty(),
        "not overdue"
    );
    // Half as long again: "fast" gets a backup of "slow"'s taskunit, once.
    let now = now + ms(31);
    let backup = b.lease(w("fast"), 4, now);
    assert_eq!(backup.iter().map(|u| u.index).collect::<Vec<_>>(), vec![0]);
    assert!(
        b.lease(w("other"), 4, now).is_empty(),
        "one backup per taskunit"
    );
    assert!(
        b.lease(w("slow"), 4, now).is_empty(),
        "no backup of your own lease"
    );
    b.complete(w("fast"), vec![ok(0, "A from backup")]);
    b.complete(w("slow"), vec![ok(0, "A late")]);
    assert!(b.is_finished());
    assert_eq!(b.take_results()[&0], b"A from backup");
    assert_eq!(b.per_worker()[&w("fast")], 2);
}

#[test]
fn a_batch_is_backed_up_only_once_late_for_its_worker_and_size() {
    let mut b = book(&["a", "b", "c", "d", "e"]);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let indices = |units: Vec<TaskUnit>| units.iter().map(|u| u.index).collect::<Vec<_>>();
    assert_eq!(indices(b.lease(w("remote"), 2, at(0))), vec![0, 1]);
    // The remote's first batch took 20 ms per taskunit.
    b.complete_at(w("remote"), vec![ok(0, "A"), ok(1, "B")], at(40));
    assert_eq!(indices(b.lease(w("remote"), 2, at(40))), vec![2, 3]);
    assert_eq!(indices(b.lease_local(w("local"), 1, at(40))), vec![4]);
    b.complete_at(w("local"), vec![ok(4, "E")], at(50));
    // 80 ms into a 2-taskunit batch of a 20 ms worker (that may have
    // had one more in hand): on time, though the last batch in (the
    // master's own slot's) took 10 ms.
    assert!(b.lease_local(w("local"), 1, at(80)).is_empty());
    // The master's slot found nothing: its peer asks the remote to give
    // back what it has not started (here it answers nothing). Until
    // then no backups: the ask comes first.
    assert!(b.lease_local(w("local"), 1, at(200)).is_empty());
    assert_eq!(b.to_reclaim(w("local")), vec![w("remote")]);
    assert!(b.lease_local(w("local"), 1, at(129)).is_empty());
    // Past half as long again (90 ms): backed up, one taskunit a call.
    assert_eq!(indices(b.lease_local(w("local"), 1, at(131))), vec![2]);
    assert_eq!(indices(b.lease_local(w("local"), 1, at(131))), vec![3]);
}

#[test]
fn the_end_is_shared_out_by_how_fast_each_worker_turns_batches_around() {
    let names: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let mut b = book(&names.iter().map(String::as_str).collect::<Vec<_>>());
    b.split_done(10);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    assert_eq!(b.lease(w("fast"), 1, at(0)).len(), 1);
    assert_eq!(b.lease(w("slow"), 1, at(0)).len(), 1);
    b.complete_at(w("fast"), vec![ok(0, "a")], at(10));
    b.complete_at(w("slow"), vec![ok(1, "b")], at(30));
    // 8 left; "fast" is three times as fast, so its share is 3/4.
    assert_eq!(b.lease(w("fast"), 100, at(30)).len(), 6);
    // A quarter of the 8 left (6 of them held by "fast"): its two end
    // with the 6 of "fast", at 90 ms.
    assert_eq!(b.lease(w("slow"), 100, at(30)).len(), 2);
    assert!(b.lease(w("newcomer"), 100, at(30)).is_empty(), "none left");
}

#[test]
fn a_workers_first_batch_is_its_share_by_the_last_job_of_the_module() {
    let book_with = |known: &[(&str, Duration)]| {
        let (tx, rx) = split_channel(64, 1 << 20);
        for i in 0..64 {
            tx.send(vec![i]).unwrap();
        }
        let mut b = JobBook::new(rx, Duration::from_secs(10), 2).with_times(paces(known));
        b.split_done(64);
        b
    };
    let now = Instant::now();
    // The master's own slot holds one; 63 are left. In the module's
    // last job the remote took three times as long per taskunit.
    let mut b = book_with(&[("local", ms(2)), ("remote", ms(6))]);
    assert_eq!(b.lease_local(w("local"), 1, now).len(), 1);
    assert_eq!(b.lease(w("remote"), 100, now).len(), 16);
    // Without figures the two count alike.
    let mut b = book_with(&[]);
    assert_eq!(b.lease_local(w("local"), 1, now).len(), 1);
    assert_eq!(b.lease(w("remote"), 100, now).len(), 32);
}

#[test]
fn at_the_end_a_worker_gets_only_what_it_would_finish_first() {
    let known = paces(&[("local", ms(10)), ("remote", ms(10))]);
    let mut b = book(&["a", "b", "c", "d"]).with_times(known);
    b.split_done(4);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    assert_eq!(b.lease_local(w("local"), 1, at(0)).len(), 1);
    assert_eq!(b.lease(w("remote"), 1, at(0)).len(), 1);
    // The remote asks ahead, 2 ms into its taskunit: of the two left,
    // the master's slot (free at 10 ms) would end one at 20 ms, the
    // remote (free at 12 ms) the other at 22 ms.
    assert_eq!(b.lease(w("remote"), 100, at(2)).len(), 1);
    // Asking again at 3 ms, it holds two: the last one would end at
    // 33 ms with it, at 20 ms with the master's slot.
    assert!(b.lease(w("remote"), 100, at(3)).is_empty());
    b.complete_at(w("local"), vec![ok(0, "A")], at(10));
    assert_eq!(b.lease_local(w("local"), 1, at(10)).len(), 1);
    // Paced as it measured its work, not by the time since its lease;
    // a few fast taskunits do not move its pace, half the window does.
    b.complete_computed(w("remote"), vec![ok(1, "B")], ms(7));
    b.complete_computed(w("remote"), vec![ok(2, "C")], ms(7));
    for _ in 0..5 {
        b.paced(w("remote"), ms(7), 1);
    }
    assert_eq!(
        b.pace(w("remote")),
        Some(ms(10)),
        "7 of 16 taskunits at 7 ms"
    );
    b.paced(w("remote"), ms(7), 1);
    assert_eq!(
        b.pace(w("remote")),
        Some(ms(7)),
        "8 of 16 taskunits at 7 ms"
    );
}

#[test]
fn a_pace_is_the_median_of_recent_taskunits_and_a_large_batch_sets_it() {
    let (tx, rx) = split_channel(64, 1 << 20);
    for i in 0..40 {
        tx.send(vec![i]).unwrap();
    }
    let known = paces(&[("local", ms(2)), ("remote", ms(2))]);
    let mut b = JobBook::new(rx, Duration::from_secs(10), 2).with_times(known);
    b.split_done(40);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    // The master's slot is held up 18 ms on one taskunit, then 6 ms on
    // the next (its peer's combine and the next job's start share its
    // core): its pace does not move.
    let one = b.lease_local(w("local"), 1, at(0));
    b.complete_at(w("local"), vec![ok(one[0].index, "x")], at(18));
    let two = b.lease_local(w("local"), 1, at(18));
    b.complete_at(w("local"), vec![ok(two[0].index, "x")], at(24));
    assert_eq!(b.pace(w("local")), Some(ms(2)));
    // So the shares stay even: 19 of the 38 left to the remote, not
    // the 34 that an 18 ms pace would give it.
    assert_eq!(b.share(w("remote"), 38), 19);
    // A batch of 16 or more taskunits sets the pace outright.
    let batch = b.lease(w("remote"), 16, at(0));
    assert_eq!(batch.len(), 16);
    let done = batch.iter().map(|u| ok(u.index, "y")).collect();
    b.complete_computed(w("remote"), done, ms(16 * 4));
    assert_eq!(b.pace(w("remote")), Some(ms(4)));
    // And the next job starts from the window as it is.
    let (_tx, rx) = split_channel(1, 1);
    let next = JobBook::new(rx, Duration::from_secs(10), 2).with_times(b.times());
    assert_eq!(next.pace(w("local")), Some(ms(2)));
    assert_eq!(next.pace(w("remote")), Some(ms(4)));
}

#[test]
fn a_worker_holding_nothing_gets_one_even_if_others_would_be_first() {
    let known = paces(&[("fast", ms(1)), ("slow", ms(100))]);
    let mut b = book(&["a", "b", "c"]).with_times(known);
    b.split_done(3);
    let now = Instant::now();
    assert_eq!(b.lease(w("fast"), 1, now).len(), 1);
    assert_eq!(b.lease(w("slow"), 100, now).len(), 1);
}

#[test]
fn while_the_split_runs_a_batch_is_a_share_of_what_it_has_made() {
    let (tx, rx) = split_channel(64, 1 << 20);
    for i in 0..10 {
        tx.send(vec![i]).unwrap();
    }
    let mut b = JobBook::new(rx, Duration::from_secs(10), 2);
    let now = Instant::now();
    assert_eq!(b.lease_local(w("local"), 1, now).len(), 1);
    // 9 made and not handed out, two workers alike: 4.5, rounded.
    assert_eq!(b.lease(w("remote"), 100, now).len(), 5);
    drop(tx);
}

#[test]
fn a_cancelled_job_hands_out_nothing_not_even_backups() {
    let mut b = book(&["a", "b", "c"]);
    let now = Instant::now();
    assert_eq!(b.lease(w("w1"), 1, now).len(), 1);
    b.release_worker(w("w1")); // its taskunit waits in the queue again
    assert_eq!(b.lease(w("w2"), 1, now).len(), 1);
    b.cancel();
    assert!(
        b.lease_local(w("local"), 10, now + Duration::from_secs(60))
            .is_empty()
    );
    assert!(
        b.lease(w("w3"), 10, now + Duration::from_secs(60))
            .is_empty()
    );
    assert!(b.is_finished());
}

fn book_k(units: &[&str], k: u8) -> JobBook {
    book(units).with_replicas(k)
}

#[test]
fn replicas_go_to_distinct_workers_and_must_agree() {
    let mut b = book_k(&["a"], 2);
    let now = Instant::now();
    assert_eq!(b.lease(w("w1"), 4, now).len(), 1);
    assert!(
        b.lease(w("w1"), 4, now).is_empty(),
        "w1 may not run both replicas"
    );
    assert_eq!(b.lease(w("w2"), 4, now).len(), 1);
    b.complete(w("w1"), vec![ok(0, "A")]);
    assert!(!b.is_finished(), "one replica is not enough");
    b.complete(w("w2"), vec![ok(0, "A")]);
    assert!(b.is_finished());
    assert_eq!(b.take_results()[&0], b"A");
    assert_eq!(b.per_worker()[&w("w1")] + b.per_worker()[&w("w2")], 2);
}

#[test]
fn disagreeing_replicas_are_rerun_then_fail() {
    let mut b = book_k(&["a"], 2);
    let now = Instant::now();
    for round in 0..2 {
        assert_eq!(b.lease(w("w1"), 1, now).len(), 1, "round {round}");
        assert_eq!(b.lease(w("w2"), 1, now).len(), 1, "round {round}");
        b.complete(w("w1"), vec![ok(0, "one answer")]);
        b.complete(w("w2"), vec![ok(0, "another")]);
    }
    assert!(b.is_finished());
    assert_eq!(b.progress().mismatches, 2);
    assert_eq!(b.failures()[&0], TaskError::Mismatch(2));
}

#[test]
fn guest_stderr_is_kept_within_the_job_cap() {
    let mut b = book(&["a", "b"]);
    let now = Instant::now();
    b.lease(w("w"), 2, now);
    let noisy = |index, text: String| TaskOutcome {
        index,
        result: Ok(ByteBuf::from(b"x".to_vec())),
        stderr: Some(text),
        native: false,
    };
    b.complete(w("w"), vec![noisy(0, "é".repeat(MAX_LOG))]);
    b.complete(w("w"), vec![noisy(1, "more".into())]);
    let logs = b.take_logs();
    assert_eq!(logs.len(), 1, "nothing after the cap");
    assert!(logs[0].1.len() <= MAX_LOG && logs[0].1.len() > MAX_LOG - 2);
    assert!(b.take_logs().is_empty(), "taken once");
}

#[test]
fn failure_after_max_attempts() {
    let mut b = book(&["x"]);
    let now = Instant::now();
    let err = |i| TaskOutcome {
        index: i,
        result: Err(TaskError::Guest("boom".into())),
        stderr: None,
        native: false,
    };
    b.lease(w("w"), 1, now);
    b.complete(w("w"), vec![err(0)]);
    assert!(!b.is_finished(), "one failure is retried");
    assert_eq!(b.lease(w("w"), 1, now).len(), 1);
    b.complete(w("w"), vec![err(0)]);
    assert!(b.is_finished());
    assert_eq!(b.progress().failed, 1);
    assert_eq!(b.failures()[&0], TaskError::Guest("boom".into()));
}

#[test]
fn accepted_results_become_journal_records_to_write_outside_the_book() {
    let mut b = book(&["a", "b"]);
    assert!(b.take_journal().is_empty(), "no journal, no records");
    b.set_journal(Default::default());
    let now = Instant::now();
    assert_eq!(b.lease(w("x"), 2, now).len(), 2);
    b.complete(w("x"), vec![ok(1, "B")]);
    let mut want = Vec::new();
    crate::journal::encode(&mut want, 1, b"B");
    assert_eq!(b.take_journal(), want);
    assert!(
        b.take_journal().is_empty(),
        "each record is handed out once"
    );
    // A duplicate is not accepted again, so it is not journaled again.
    b.complete(w("x"), vec![ok(1, "B")]);
    assert!(b.take_journal().is_empty());
}

#[test]
fn only_the_worker_holding_a_taskunit_may_hand_it_in() {
    let mut b = book(&["a", "b"]);
    let now = Instant::now();
    assert_eq!(b.lease(w("honest"), 2, now).len(), 2);
    // A peer that was given nothing: its result and its error are dropped.
    b.complete(w("forger"), vec![ok(0, "forged")]);
    let err = |i| TaskOutcome {
        index: i,
        result: Err(TaskError::Guest("boom".into())),
        stderr: Some("noise".into()),
        native: false,
    };
    b.complete(w("forger"), vec![err(1), err(1), err(1)]);
    assert_eq!(b.progress().done, 0);
    assert_eq!(b.progress().failed, 0);
    assert!(b.take_logs().is_empty(), "no stderr from a non-holder");
    b.complete(w("honest"), vec![ok(0, "A"), ok(1, "B")]);
    assert!(b.is_finished());
    let done = b.finish();
    assert_eq!(done.results[&0], b"A");
    assert_eq!(done.unleased[&w("forger")], 4);
    assert!(!done.unleased.contains_key(&w("honest")));
}

#[test]
fn one_error_repeated_in_a_request_is_one_attempt() {
    let mut b = book(&["x"]);
    let now = Instant::now();
    let err = TaskOutcome {
        index: 0,
        result: Err(TaskError::Guest("boom".into())),
        stderr: None,
        native: false,
    };
    assert_eq!(b.lease(w("w"), 1, now).len(), 1);
    b.complete(w("w"), vec![err.clone(), err.clone(), err]);
    assert!(!b.is_finished(), "the taskunit gets its second attempt");
    assert_eq!(b.progress().failed, 0);
    assert_eq!(b.lease(w("other"), 1, now).len(), 1);
}

#[test]
fn replica_votes_count_only_from_assigned_workers() {
    let mut b = book_k(&["a"], 2);
    let now = Instant::now();
    assert_eq!(b.lease(w("w1"), 4, now).len(), 1);
    assert_eq!(b.lease(w("w2"), 4, now).len(), 1);
    // Two fresh ids agreeing on a forged result do not outvote anyone.
    b.complete(w("sybil1"), vec![ok(0, "forged")]);
    b.complete(w("sybil2"), vec![ok(0, "forged")]);
    assert!(!b.is_finished());
    b.complete(w("w1"), vec![ok(0, "A")]);
    b.complete(w("w2"), vec![ok(0, "A")]);
    assert!(b.is_finished());
    assert_eq!(b.take_results()[&0], b"A");
}

#[test]
fn a_result_for_a_taskunit_not_handed_out_yet_is_dropped_and_counted() {
    let mut b = book(&["a", "b"]);
    let now = Instant::now();
    assert_eq!(b.lease(w("honest"), 1, now).len(), 1);
    b.complete(w("forger"), vec![ok(1, "forged")]);
    assert_eq!(
        b.lease(w("honest"), 1, now).len(),
        1,
        "taskunit 1 is still to do"
    );
    b.complete(w("honest"), vec![ok(0, "A"), ok(1, "B")]);
    // A late duplicate of a retired taskunit is only ignored.
    b.complete(w("honest"), vec![ok(0, "A")]);
    assert!(b.is_finished());
    let done = b.finish();
    assert_eq!(done.results[&1], b"B");
    assert_eq!(done.unleased.len(), 1);
    assert_eq!(done.unleased[&w("forger")], 1);
}

/// The reversed text of each unit: the right result.
fn right(b: &[TaskUnit]) -> Vec<TaskOutcome> {
    b.iter()
        .map(|u| {
            ok(
                u.index,
                &String::from_utf8_lossy(&u.data)
                    .chars()
                    .rev()
                    .collect::<String>(),
            )
        })
        .collect()
}

#[test]
fn spot_checks_accept_a_right_result_once_the_master_agrees() {
    let mut b = book(&["ab", "cd", "ef"]).with_checks(1.0, 7, w("master"));
    let now = Instant::now();
    let batch = b.lease(w("remote"), 3, now);
    assert_eq!(batch.len(), 3);
    b.complete(w("remote"), right(&batch));
    assert_eq!(b.progress().done, 0, "held until checked");
    assert!(!b.is_finished());
    // Nothing for another remote worker: the checks are the master's.
    assert!(b.lease(w("other"), 10, now).is_empty());
    let checks = b.lease_local(w("master"), 10, now);
    assert_eq!(checks.len(), 3);
    b.complete(w("master"), right(&checks));
    assert!(b.is_finished());
    let done = b.finish();
    assert_eq!(done.verified, 3);
    assert!(done.caught.is_empty());
    assert_eq!(done.per_worker[&w("remote")], 3);
    assert_eq!(done.results[&0], b"ba");
}

#[test]
fn a_worker_caught_with_a_wrong_result_is_refused_and_its_results_run_again() {
    let units: Vec<String> = (0..40).map(|i| format!("u{i:02}")).collect();
    let units: Vec<&str> = units.iter().map(String::as_str).collect();
    // About a quarter checked.
    let (tx, rx) = split_channel(64, 1 << 20);
    for u in &units {
        tx.send(u.as_bytes().to_vec()).unwrap();
    }
    drop(tx);
    let mut b = JobBook::new(rx, Duration::from_secs(10), 2).with_checks(0.25, 99, w("master"));
    b.set_journal(Default::default());
    let now = Instant::now();
    // The liar's first batch is right, and passed on to the combine.
    let first = b.lease(w("liar"), 20, now);
    b.complete(w("liar"), right(&first));
    let passed = b.take_accepted().len();
    // Then it lies about all of its second batch.
    let second = b.lease(w("liar"), 20, now);
    let lies: Vec<TaskOutcome> = second.iter().map(|u| ok(u.index, "forged")).collect();
    b.complete(w("liar"), lies);
    // The master's slots run the checks, and every taskunit left.
    let mut rounds = 0;
    while !b.is_finished() && rounds < 100 {
        let batch = b.lease_local(w("master"), 8, now);
        b.complete(w("master"), right(&batch));
        rounds += 1;
    }
    assert!(b.is_finished(), "the job ends on the master's own slots");
    // A caught worker gets nothing more.
    assert!(b.lease(w("liar"), 10, now).is_empty());
    // Its results are taken back in the journal too, then journaled anew:
    // read in order, the journal holds only right results.
    let mut journal = std::collections::BTreeMap::new();
    let records = b.take_journal();
    let mut at = 0;
    while at < records.len() {
        let index = u64::from_le_bytes(records[at..at + 8].try_into().unwrap());
        let len = u32::from_le_bytes(records[at + 8..at + 12].try_into().unwrap());
        at += 12;
        if len == u32::MAX {
            assert!(journal.remove(&index).is_some(), "a retraction of a result");
        } else {
            journal.insert(index, records[at..at + len as usize].to_vec());
            at += len as usize;
        }
    }
    assert_eq!(journal.len(), 40);
    for (i, r) in &journal {
        let want: String = format!("u{i:02}").chars().rev().collect();
        assert_eq!(r, want.as_bytes(), "journaled taskunit {i} is right");
    }
    let done = b.finish();
    assert!(done.caught[&w("liar")] >= 1, "caught");
    assert_eq!(done.results.len(), 40);
    for (i, r) in &done.results {
        let want: String = format!("u{i:02}").chars().rev().collect();
        assert_eq!(r, want.as_bytes(), "taskunit {i} is right");
    }
    assert!(
        !done.per_worker.contains_key(&w("liar")),
        "nothing counts as the liar's: {:?}",
        done.per_worker
    );
    assert_eq!(
        done.passed_on as usize, passed,
        "its results already passed on are counted"
    );
}

#[test]
fn a_job_whose_results_vary_between_runs_stops_its_checks_and_judges_no_one() {
    let mut b = book(&["ab", "cd"]).with_checks(1.0, 7, w("master"));
    let now = Instant::now();
    let batch = b.lease(w("remote"), 2, now);
    let theirs: Vec<TaskOutcome> = batch.iter().map(|u| ok(u.index, "r-remote")).collect();
    b.complete(w("remote"), theirs);
    // The master's runs differ from the worker's, and from each other.
    let mut run = 0;
    while !b.is_finished() && run < 10 {
        let checks = b.lease_local(w("master"), 1, now);
        let ours: Vec<TaskOutcome> = checks
            .iter()
            .map(|u| ok(u.index, &format!("r-master-{run}")))
            .collect();
        b.complete(w("master"), ours);
        run += 1;
    }
    assert!(b.is_finished());
    let done = b.finish();
    assert!(done.checks_stopped);
    assert!(done.caught.is_empty(), "no one judged: {:?}", done.caught);
    assert_eq!(done.results[&0], b"r-remote");
    assert_eq!(done.results[&1], b"r-remote");
    assert!(done.unleased.is_empty(), "{:?}", done.unleased);
}

#[test]
fn a_result_held_for_a_check_is_counted_once_though_a_backup_copy_comes_in_too() {
    // Both orders: the backup's result first, or the original's.
    for backup_first in [true, false] {
        let mut b = book(&["ab"]).with_checks(1.0, 7, w("master"));
        let t0 = Instant::now();
        assert_eq!(b.lease(w("slow"), 1, t0).len(), 1);
        // Nothing fresh is left, and the slow worker is overdue: a copy.
        let copy = b.lease(w("fast"), 1, t0 + Duration::from_secs(5));
        assert_eq!(copy.len(), 1, "a backup copy");
        let (first, second) = if backup_first {
            ("fast", "slow")
        } else {
            ("slow", "fast")
        };
        b.complete(w(first), vec![ok(0, "ba")]);
        // The result is held for its check; the other copy's result is a
        // duplicate, and its lease gone (no third run when it expires).
        b.complete(w(second), vec![ok(0, "ba")]);
        let later = t0 + Duration::from_secs(60);
        assert!(b.lease(w("third"), 1, later).is_empty(), "nothing to rerun");
        let checks = b.lease_local(w("master"), 10, later);
        assert_eq!(checks.len(), 1, "one check");
        b.complete(w("master"), right(&checks));
        assert!(b.is_finished());
        let done = b.finish();
        let counted: u64 = done.per_worker.values().sum();
        assert_eq!(counted, 1, "one result counted: {:?}", done.per_worker);
        assert_eq!(done.per_worker[&w(first)], 1);
        assert_eq!(done.verified, 1);
        assert!(done.unleased.is_empty(), "{:?}", done.unleased);
    }
}
