//! A live peer fed malformed CBOR, oversized frames and unknown module
//! hashes over a real libp2p connection, by request-response or on a
//! long-lived stream, keeps serving jobs; forged results and
//! announcements gossiped in another master's name are not taken.

use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};
use serde_json::{Value, json};

use crate::common::*;

type Rr = request_response::cbor::Behaviour<Value, Value>;

/// A swarm of a fresh identity with only `behaviour`: a stranger to talk
/// to a peer with.
fn outsider<B: libp2p::swarm::NetworkBehaviour>(behaviour: B) -> libp2p::Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

async fn abuse(addr: Multiaddr) -> Vec<Result<Value, String>> {
    let codec = request_response::cbor::codec::Codec::<Value, Value>::default()
        .set_request_size_maximum(200 << 20)
        .set_response_size_maximum(1 << 20);
    let mut swarm = outsider(Rr::with_codec(
        codec,
        [(
            StreamProtocol::new(antnest_proto::msg::PROTOCOL),
            ProtocolSupport::Outbound,
        )],
        request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
    ));
    let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
        panic!("address without /p2p/");
    };
    swarm.dial(addr).unwrap();
    let requests = vec![
        json!({"Pull": {"job": "not a number", "max": -1}}),
        json!({"NoSuchRequest": [1, 2, 3]}),
        json!([1, "two", {"three": null}]),
        // Larger than the 64 MiB request limit.
        json!({"Results": {"job": 1, "outcomes": [], "compute": "x".repeat(70 << 20)}}),
        // A well-formed request for a module nobody has.
        json!({"FetchModule": {"hash": vec![7u8; 32]}}),
        json!({"Pull": {"job": 12345, "max": 10}}),
        // A long poll belongs on a task stream.
        json!({"Wait": {"sizes": []}}),
    ];
    let mut ids = Vec::new();
    let mut results: Vec<Option<Result<Value, String>>> = vec![None; requests.len()];
    let mut pending = requests.into_iter();
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { .. } if ids.is_empty() => {
                for r in pending.by_ref() {
                    ids.push(swarm.behaviour_mut().send_request(&peer, r));
                }
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) => {
                let i = ids.iter().position(|id| *id == request_id).unwrap();
                results[i] = Some(Ok(response));
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                let i = ids.iter().position(|id| *id == request_id).unwrap();
                results[i] = Some(Err(error.to_string()));
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                panic!("cannot reach the peer: {error}")
            }
            _ => {}
        }
        if !ids.is_empty() && results.iter().all(Option::is_some) {
            return results.into_iter().map(Option::unwrap).collect();
        }
    }
}

/// An outsider dialing `peer` to open task streams to it: the peer's id,
/// the outsider's stream control, and the task driving its swarm.
fn stream_outsider(
    peer: &PeerProc,
) -> (
    libp2p::PeerId,
    libp2p_stream::Control,
    tokio::task::JoinHandle<()>,
) {
    let addr: Multiaddr = peer.addr().parse().unwrap();
    let Some(libp2p::multiaddr::Protocol::P2p(id)) = addr.iter().last() else {
        panic!("address without /p2p/");
    };
    let mut swarm = outsider(libp2p_stream::Behaviour::new());
    let control = swarm.behaviour().new_control();
    swarm.dial(addr).unwrap();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (id, control, driver)
}

fn still_runs_jobs(peer: &PeerProc) {
    let out = run(
        &[
            "submit",
            "--control",
            peer.control.to_str().unwrap(),
            artifact("reverse_strings").to_str().unwrap(),
        ],
        b"abc\nxyz\n",
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "cba\nzyx");
}

#[tokio::test]
async fn malformed_requests_leave_the_peer_serving() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let addr: Multiaddr = peer.addr().parse().unwrap();
    let results = tokio::time::timeout(Duration::from_secs(120), abuse(addr))
        .await
        .expect("abuse finished in time");
    for (i, r) in results.iter().take(4).enumerate() {
        assert!(r.is_err(), "malformed request {i} was answered: {r:?}");
    }
    let refused = results[4].as_ref().expect("a refusal, not a failure");
    assert!(
        refused["Refused"].as_str().unwrap().contains("is not here"),
        "{refused}"
    );
    assert_eq!(
        results[5].as_ref().unwrap(),
        &json!({"NoWork": {"finished": true}})
    );
    let refused = results[6].as_ref().expect("a refusal, not a failure");
    assert!(
        refused["Refused"].as_str().unwrap().contains("task stream"),
        "{refused}"
    );
    // The peer still runs jobs.
    still_runs_jobs(&peer);
}

/// The long-lived stream a worker slot keeps to a master: a frame that
/// claims more than the limit, or holds bytes that are no request, ends
/// that stream only; a well-formed request on a new stream is answered,
/// and the peer still runs jobs.
#[tokio::test]
async fn malformed_frames_on_a_stream_leave_the_peer_serving() {
    use antnest_proto::frame::Frames;
    use antnest_proto::{JobId, Request, Response};
    use futures::{AsyncReadExt, AsyncWriteExt};

    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let (id, mut control, driver) = stream_outsider(&peer);
    let protocol = StreamProtocol::new(antnest_proto::msg::STREAM_PROTOCOL);
    let t = Duration::from_secs(60);
    // Ends when the peer closes the stream (or resets it).
    let closed = |mut s: libp2p::Stream| async move {
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf).await, Ok(0) | Err(_))
    };

    let mut s = tokio::time::timeout(t, control.open_stream(id, protocol.clone()))
        .await
        .unwrap()
        .unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    s.flush().await.unwrap();
    assert!(
        tokio::time::timeout(t, closed(s)).await.unwrap(),
        "a 4 GiB frame was not refused"
    );

    let mut s = control.open_stream(id, protocol.clone()).await.unwrap();
    s.write_all(&5u32.to_le_bytes()).await.unwrap();
    s.write_all(b"\xff\x00abc").await.unwrap();
    s.flush().await.unwrap();
    assert!(
        tokio::time::timeout(t, closed(s)).await.unwrap(),
        "a frame that is no request was answered"
    );

    let mut s = control.open_stream(id, protocol).await.unwrap();
    for _ in 0..2 {
        let pull = Request::Pull {
            job: JobId(12345),
            max: 10,
        };
        Frames::write_request(&mut s, &pull).await.unwrap();
        let response = tokio::time::timeout(t, Frames::read_response(&mut s))
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(response, Response::NoWork { finished: true }),
            "{response:?}"
        );
    }
    driver.abort();

    still_runs_jobs(&peer);
}

/// The long poll a worker slot parks at its last master: a `Wait` on a
/// task stream is held while the peer has no job, answered with taskunits
/// as soon as a job has some (no announcement needed), and an `EndWait`
/// ends one early: its answer first, then the `EndWait`'s.
#[tokio::test]
async fn a_wait_is_answered_with_taskunits_when_a_job_has_some() {
    use antnest_proto::frame::Frames;
    use antnest_proto::{ByteBuf, Request, Response, TaskOutcome};

    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let (id, mut control, driver) = stream_outsider(&peer);
    let protocol = StreamProtocol::new(antnest_proto::msg::STREAM_PROTOCOL);
    let t = Duration::from_secs(60);
    let mut s = tokio::time::timeout(t, control.open_stream(id, protocol))
        .await
        .unwrap()
        .unwrap();

    // No job: the wait is held (nothing is read, so giving up the read
    // loses no bytes).
    let wait = Request::Wait { sizes: vec![] };
    Frames::write_request(&mut s, &wait).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), Frames::read_response(&mut s));
    assert!(early.await.is_err(), "a wait answered with no job running");

    // A job of slow taskunits: the peer's own slot takes one at a time, so
    // the wait gets one (no size asked for the module: one), and the
    // slot is busy long enough not to back that one up before it is in.
    let numbers: Vec<u64> = (150_000..150_012).collect();
    let input: String = numbers.iter().map(|n| format!("{n}\n")).collect();
    let job = peer.spawn_submit(&artifact("primes"), &[], input.as_bytes());
    // A wait ends with `NoWork` after 5 s (a debug build may take longer
    // to compile the job): then it is asked again, as a slot does.
    let mut waits = 0;
    let (announced, units) = loop {
        match tokio::time::timeout(t, Frames::read_response(&mut s))
            .await
            .unwrap()
            .unwrap()
        {
            Response::Assigned { job, units, .. } => break (job, units),
            Response::NoWork { finished: false } if waits < 24 => {
                waits += 1;
                Frames::write_request(&mut s, &wait).await.unwrap();
            }
            other => panic!("not taskunits: {other:?}"),
        }
    };
    assert_eq!(announced.master, id.to_bytes());
    assert_eq!(units.len(), 1, "{units:?}");
    let unit = &units[0];
    let n: u64 = std::str::from_utf8(&unit.data).unwrap().parse().unwrap();
    assert_eq!(n, numbers[unit.index as usize]);
    // Hand in a wrong count: the job's sum shows whose result was taken.
    let results = Request::Results {
        job: announced.job,
        outcomes: vec![TaskOutcome {
            index: unit.index,
            result: Ok(ByteBuf::from(b"1000000".to_vec())),
            stderr: None,
            native: false,
        }],
        compute: Duration::from_millis(50),
        pull: 0,
    };
    Frames::write_request(&mut s, &results).await.unwrap();
    let ack = tokio::time::timeout(t, Frames::read_response(&mut s)).await;
    assert!(matches!(ack, Ok(Ok(Response::Ack))), "{ack:?}");
    let out = job.finish(Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let count = |n: u64| {
        (2..n)
            .filter(|k| (2..).take_while(|d| d * d <= *k).all(|d| k % d != 0))
            .count() as u64
    };
    let expected: u64 = numbers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if i as u64 == unit.index {
                1_000_000
            } else {
                count(*n)
            }
        })
        .sum();
    assert_eq!(text(&out.stdout).trim(), expected.to_string());

    // Ending a wait: its answer (no work), then the EndWait's.
    Frames::write_request(&mut s, &wait).await.unwrap();
    Frames::write_request(&mut s, &Request::EndWait)
        .await
        .unwrap();
    for expected in [Response::NoWork { finished: false }, Response::Ack] {
        let got = tokio::time::timeout(t, Frames::read_response(&mut s)).await;
        assert!(matches!(&got, Ok(Ok(r)) if *r == expected), "{got:?}");
    }
    driver.abort();
}

/// Hand `request` (results) in on task stream `s` until the master takes
/// it: its job is registered a moment after the job's id is printed, and
/// refused before. It must be taken (`Ack`).
async fn hand_in(s: &mut libp2p::Stream, request: &antnest_proto::Request) {
    use antnest_proto::frame::Frames;
    let mut answered = None;
    for _ in 0..100 {
        Frames::write_request(s, request).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(60), Frames::read_response(s)).await;
        match read {
            Ok(Ok(antnest_proto::Response::Refused(_))) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => {
                answered = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(answered, Some(Ok(Ok(antnest_proto::Response::Ack)))),
        "{answered:?}"
    );
}

/// A peer that was given no taskunit of a job hands in a forged result for
/// one: the master drops it and counts it against that peer, and the job's
/// output is the honest one.
#[tokio::test]
async fn a_result_from_a_peer_not_given_the_taskunit_is_dropped_and_counted() {
    use antnest_proto::{ByteBuf, JobId, Request, TaskOutcome};

    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let (id, mut control, driver) = stream_outsider(&peer);
    let t = Duration::from_secs(60);
    let protocol = StreamProtocol::new(antnest_proto::msg::STREAM_PROTOCOL);
    let mut s = tokio::time::timeout(t, control.open_stream(id, protocol))
        .await
        .unwrap()
        .unwrap();
    // Slow taskunits (~0.1 s each) on the peer's one slot: the last is
    // open for a while.
    let numbers: Vec<u64> = (1_000_000..1_000_004).collect();
    let input: String = numbers.iter().map(|n| format!("{n}\n")).collect();
    let stats = dir.path().join("s.json");
    let mut job = peer.spawn_submit(
        &artifact("primes"),
        &["--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    let job_id: JobId = job.job_id(t).parse().unwrap();
    let forged = Request::Results {
        job: job_id,
        outcomes: vec![TaskOutcome {
            index: 3,
            result: Ok(ByteBuf::from(b"1000000".to_vec())),
            stderr: None,
            native: false,
        }],
        compute: Duration::from_millis(50),
        pull: 0,
    };
    hand_in(&mut s, &forged).await;
    let out = job.finish(Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The same job with nobody forging gives the same output.
    let honest = peer.submit(&artifact("primes"), &[], input.as_bytes());
    assert!(honest.status.success(), "{}", text(&honest.stderr));
    assert_eq!(text(&out.stdout), text(&honest.stdout));
    let stats = stats_of(&stats);
    let dropped = stats["unleased"].as_object().unwrap();
    assert_eq!(dropped.len(), 1, "{stats}");
    let (who, n) = dropped.iter().next().unwrap();
    assert_ne!(who, &peer.peer_id);
    assert_eq!(n.as_u64(), Some(1), "{stats}");
    driver.abort();
}

/// An outsider connecting to `addr` (dialing again while it is refused)
/// and sending `n` pulls at once (for jobs nobody has): how many were
/// answered, and the failures.
async fn pulls(addr: Multiaddr, n: u64) -> (usize, Vec<String>) {
    let mut swarm = outsider(Rr::new(
        [(
            StreamProtocol::new(antnest_proto::msg::PROTOCOL),
            ProtocolSupport::Outbound,
        )],
        request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
    ));
    let Some(libp2p::multiaddr::Protocol::P2p(id)) = addr.iter().last() else {
        panic!("address without /p2p/");
    };
    swarm.dial(addr.clone()).unwrap();
    let (mut sent, mut answered, mut failed) = (0, 0, Vec::new());
    let mut dials = 1;
    loop {
        match swarm.select_next_some().await {
            // A peer takes only so many handshakes at once and refuses the
            // rest: dial again a little later, as a libp2p peer would.
            SwarmEvent::OutgoingConnectionError { .. } if dials < 100 => {
                dials += 1;
                let pause = 50 + (u64::from(swarm.local_peer_id().to_bytes()[10]) + dials) % 200;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                swarm.dial(addr.clone()).unwrap();
            }
            SwarmEvent::ConnectionEstablished { .. } if sent == 0 => {
                for job in 0..n {
                    let pull = json!({"Pull": {"job": job, "max": 1}});
                    swarm.behaviour_mut().send_request(&id, pull);
                    sent += 1;
                }
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { .. },
                ..
            }) => answered += 1,
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                failed.push(error.to_string())
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                return (0, vec![format!("cannot reach the peer: {error}")]);
            }
            _ => {}
        }
        if sent > 0 && answered + failed.len() == sent {
            return (answered, failed);
        }
    }
}

/// 10,000 requests over 500 connections (500 outsiders with 20 pulls
/// each, all at once) while a job runs on the peer: the job ends with the
/// right output, every request is answered (the peer takes 64 handshakes
/// at once and refuses the rest, which dial again), the peer's memory
/// stays bounded, and it goes on running jobs.
#[tokio::test]
async fn ten_thousand_requests_over_500_connections_leave_a_job_running() {
    const CONNECTIONS: usize = 500;
    const EACH: u64 = 20;
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let addr: Multiaddr = peer.addr().parse().unwrap();
    let rss_before = rss_kib(peer.child.id());
    let (input, want) = primes_input(40, 1_000_000);
    let job = peer.spawn_submit(&artifact("primes"), &["-q"], input.as_bytes());
    let bursts: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(pulls(addr.clone(), EACH)))
        .collect();
    let (mut answered, mut failed) = (0, Vec::new());
    let mut rss_most = rss_before;
    for burst in bursts {
        let (a, f) = tokio::time::timeout(Duration::from_secs(300), burst)
            .await
            .expect("every request answered or failed in time")
            .unwrap();
        answered += a;
        failed.extend(f);
        rss_most = rss_most.max(rss_kib(peer.child.id()));
    }
    let out = tokio::task::spawn_blocking(move || job.finish(Duration::from_secs(300)))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    eprintln!(
        "{answered} of {} requests answered, {} failed ({:?}); peer RSS {rss_before} KiB before, at most {rss_most} KiB during",
        CONNECTIONS as u64 * EACH,
        failed.len(),
        failed.first()
    );
    assert!(
        answered as u64 == CONNECTIONS as u64 * EACH,
        "{answered} answered, failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(rss_most < 512 << 10, "peer RSS {rss_most} KiB");
    still_runs_jobs(&peer);
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sybil replica votes: four outsiders (four fresh peer ids, none given a
/// taskunit) each hand in the same forged result for every taskunit of a
/// job replicated on two honest peers, as soon as the job exists. Their
/// votes do not count: each forged outcome is dropped and counted against
/// its sender, no replica mismatch is seen, and the output is a clean
/// run's.
#[tokio::test]
async fn sybil_replica_votes_do_not_count() {
    use antnest_proto::{ByteBuf, JobId, Request, TaskOutcome};

    const SYBILS: usize = 4;
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    // Nothing else runs on this test's thread yet: waiting here blocks nothing.
    eventually(Duration::from_secs(30), "b connected to a", || {
        connected(&a, &b)
    });
    let t = Duration::from_secs(60);
    let protocol = StreamProtocol::new(antnest_proto::msg::STREAM_PROTOCOL);
    let mut sybils = Vec::new();
    for _ in 0..SYBILS {
        let (id, mut control, driver) = stream_outsider(&a);
        let s = tokio::time::timeout(t, control.open_stream(id, protocol.clone()))
            .await
            .unwrap()
            .unwrap();
        sybils.push((s, driver));
    }
    const UNITS: u64 = 30;
    let (input, want) = primes_input(UNITS, 300_000);
    let stats = dir.path().join("s.json");
    let mut job = a.spawn_submit(
        &artifact("primes"),
        &["--replicate", "2", "--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    let job_id: JobId = job.job_id(t).parse().unwrap();
    let forged = Request::Results {
        job: job_id,
        outcomes: (0..UNITS)
            .map(|index| TaskOutcome {
                index,
                result: Ok(ByteBuf::from(b"1".to_vec())),
                stderr: None,
                native: false,
            })
            .collect(),
        compute: Duration::from_millis(50),
        pull: 0,
    };
    for (s, _) in &mut sybils {
        hand_in(s, &forged).await;
    }
    let out = tokio::task::spawn_blocking(move || job.finish(Duration::from_secs(300)))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    let stats = stats_of(&stats);
    assert_eq!(stats["mismatches"], 0, "{stats}");
    let dropped = stats["unleased"].as_object().unwrap();
    assert_eq!(
        dropped.len(),
        SYBILS,
        "every Sybil's votes dropped: {stats}"
    );
    assert!(!dropped.contains_key(&a.peer_id) && !dropped.contains_key(&b.peer_id));
    assert!(dropped.values().all(|n| n.as_u64() > Some(0)), "{stats}");
    let per_peer = stats["per_peer"].as_object().unwrap();
    assert_eq!(per_peer.len(), 2, "only the honest peers' results: {stats}");
    for (_, driver) in sybils {
        driver.abort();
    }
}

/// Many outsiders at once, each with a hundred requests in flight (more
/// than the peer's event and command channels hold together): every
/// request gets an answer (taken, or refused as busy), and the peer goes
/// on running jobs.
#[tokio::test]
async fn a_burst_of_requests_from_many_peers_is_answered_and_the_peer_serves_on() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let addr: Multiaddr = peer.addr().parse().unwrap();
    let bursts: Vec<_> = (0..6)
        .map(|_| tokio::spawn(pulls(addr.clone(), 100)))
        .collect();
    for burst in bursts {
        let (answered, failed) = tokio::time::timeout(Duration::from_secs(120), burst)
            .await
            .expect("every request answered in time")
            .unwrap();
        assert!(failed.is_empty(), "{answered} answered, failed: {failed:?}");
        assert_eq!(answered, 100);
    }
    still_runs_jobs(&peer);
}

/// One outsider opening task streams without end: the peer serves a
/// bounded number of them at once and closes the rest; the ones it kept
/// still work, and the peer still runs jobs.
#[tokio::test]
async fn a_peer_serves_a_bounded_number_of_task_streams_per_peer() {
    use antnest_proto::frame::Frames;
    use antnest_proto::{JobId, Request, Response};

    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let (id, mut control, driver) = stream_outsider(&peer);
    let protocol = StreamProtocol::new(antnest_proto::msg::STREAM_PROTOCOL);
    let t = Duration::from_secs(60);
    let pull = Request::Pull {
        job: JobId(7),
        max: 1,
    };
    let mut kept = Vec::new();
    let mut closed = 0;
    for _ in 0..300 {
        let mut s = tokio::time::timeout(t, control.open_stream(id, protocol.clone()))
            .await
            .unwrap()
            .unwrap();
        let asked = Frames::write_request(&mut s, &pull).await;
        match tokio::time::timeout(t, Frames::read_response(&mut s)).await {
            Ok(Ok(answer)) if asked.is_ok() => {
                assert_eq!(answer, Response::NoWork { finished: true });
                kept.push(s);
            }
            Ok(_) => closed += 1,
            Err(_) => panic!("a stream neither answered nor closed"),
        }
    }
    assert_eq!((kept.len(), closed), (256, 44));
    // A kept stream still answers.
    Frames::write_request(&mut kept[0], &pull).await.unwrap();
    let again = tokio::time::timeout(t, Frames::read_response(&mut kept[0])).await;
    assert!(
        matches!(again, Ok(Ok(Response::NoWork { .. }))),
        "{again:?}"
    );
    still_runs_jobs(&peer);
    driver.abort();
}

#[derive(libp2p::swarm::NetworkBehaviour)]
struct Gossiper {
    gossip: libp2p::gossipsub::Behaviour,
    rr: Rr,
}

/// An outsider that gossips on antnest's jobs topic (subscribed) and
/// speaks its request-response protocol with `rr`.
fn gossiper(rr: Rr) -> (libp2p::Swarm<Gossiper>, libp2p::gossipsub::IdentTopic) {
    gossip_swarm(|gossip| Gossiper { gossip, rr })
}

/// A swarm of a fresh identity whose behaviour `make` builds around a
/// gossipsub subscribed to antnest's jobs topic.
fn gossip_swarm<B: libp2p::swarm::NetworkBehaviour>(
    make: impl FnOnce(libp2p::gossipsub::Behaviour) -> B,
) -> (libp2p::Swarm<B>, libp2p::gossipsub::IdentTopic) {
    use libp2p::gossipsub;

    let topic = gossipsub::IdentTopic::new(antnest_proto::msg::JOBS_TOPIC);
    let swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let mut gossip = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(200))
                    .build()
                    .unwrap(),
            )
            .unwrap();
            gossip.subscribe(&topic).unwrap();
            make(gossip)
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    (swarm, topic)
}

/// An outsider that announces jobs and serves their modules, speaking
/// antnest's own messages.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct ModuleServer {
    gossip: libp2p::gossipsub::Behaviour,
    rr: request_response::cbor::Behaviour<antnest_proto::Request, antnest_proto::Response>,
}

/// A [`ModuleServer`] of a fresh identity, its requests sent under
/// `config`, and the jobs topic it is subscribed to.
fn module_server(
    config: request_response::Config,
) -> (libp2p::Swarm<ModuleServer>, libp2p::gossipsub::IdentTopic) {
    gossip_swarm(|gossip| ModuleServer {
        gossip,
        rr: request_response::cbor::Behaviour::new(
            [(
                StreamProtocol::new(antnest_proto::msg::PROTOCOL),
                ProtocolSupport::Full,
            )],
            config,
        ),
    })
}

/// A job of `module` announced in `master`'s name, with default limits.
fn announcement(master: libp2p::PeerId, module: &[u8]) -> antnest_proto::Announce {
    antnest_proto::Announce {
        job: antnest_proto::JobId::random(),
        master: master.to_bytes(),
        module: antnest_proto::ModuleHash::of(module),
        module_size: module.len() as u64,
        limits: antnest_proto::Limits::default(),
        runtime: antnest_proto::Runtime::Wasm,
        weight: 1,
        addrs: Vec::new(),
        code: None,
    }
}

/// Drive `liar` as a master does: gossip `announcements` every 500 ms once
/// the peer has subscribed (calling `tick` each time), and answer a
/// `FetchModule` of one of `modules` with its bytes (anything else with
/// `NoWork`), telling `served`; until `served` says it is enough.
async fn serve_modules(
    liar: &mut libp2p::Swarm<ModuleServer>,
    topic: &libp2p::gossipsub::IdentTopic,
    announcements: &[Vec<u8>],
    modules: &std::collections::HashMap<antnest_proto::ModuleHash, Vec<u8>>,
    mut tick: impl FnMut(),
    mut served: impl FnMut(antnest_proto::ModuleHash) -> bool,
) {
    let mut published = false;
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                tick();
                // Announced again and again, as a master does.
                if published {
                    for a in announcements {
                        let _ = liar.behaviour_mut().gossip.publish(topic.clone(), a.clone());
                    }
                }
            }
            e = liar.select_next_some() => match e {
                SwarmEvent::Behaviour(ModuleServerEvent::Gossip(
                    libp2p::gossipsub::Event::Subscribed { .. },
                )) => published = true,
                SwarmEvent::Behaviour(ModuleServerEvent::Rr(request_response::Event::Message {
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    let (response, hash) = match request {
                        antnest_proto::Request::FetchModule { hash } if modules.contains_key(&hash) => {
                            (antnest_proto::Response::Module(modules[&hash].clone()), Some(hash))
                        }
                        _ => (antnest_proto::Response::NoWork { finished: false }, None),
                    };
                    let _ = liar.behaviour_mut().rr.send_response(channel, response);
                    if hash.is_some_and(&mut served) {
                        return;
                    }
                }
                _ => {}
            },
        }
    }
}

/// An outsider that gossips announcements to a live peer: one of a job
/// in another peer's name, one of its own. The peer takes up its own (it
/// asks it for the module at once) and never the one in another's name
/// (it never asks that peer for anything).
#[tokio::test]
async fn an_announcement_in_another_masters_name_is_ignored() {
    use antnest_proto::Announce;
    use libp2p::gossipsub;

    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "w", &[]);
    let addr: Multiaddr = peer.addr().parse().unwrap();
    let rr = || {
        Rr::new(
            [(
                StreamProtocol::new(antnest_proto::msg::PROTOCOL),
                ProtocolSupport::Full,
            )],
            request_response::Config::default(),
        )
    };
    // The peer the liar names as master.
    let mut named = outsider(rr());
    let named_id = *named.local_peer_id();
    named.dial(addr.clone()).unwrap();
    let (mut liar, topic) = gossiper(rr());
    let liar_id = *liar.local_peer_id();
    liar.dial(addr).unwrap();
    let forged = announcement(named_id, b"forged module");
    let own = announcement(liar_id, b"the liar's own module");
    let encode = |a: &Announce| cbor4ii::serde::to_vec(Vec::new(), a).unwrap();
    let asked = async {
        let mut published = false;
        loop {
            tokio::select! {
                e = liar.select_next_some() => match e {
                    SwarmEvent::Behaviour(GossiperEvent::Gossip(
                        gossipsub::Event::Subscribed { .. },
                    )) if !published => {
                        published = true;
                        for a in [&forged, &own] {
                            liar.behaviour_mut().gossip.publish(topic.clone(), encode(a)).unwrap();
                        }
                    }
                    SwarmEvent::Behaviour(GossiperEvent::Rr(request_response::Event::Message {
                        message: request_response::Message::Request { request, .. },
                        ..
                    })) => return format!("{request:?}"),
                    _ => {}
                },
                e = named.select_next_some() => {
                    if let SwarmEvent::Behaviour(request_response::Event::Message { message, .. }) = e {
                        panic!("the peer took up a job in another's name: it asked {message:?}");
                    }
                }
            }
        }
    };
    let request = tokio::time::timeout(Duration::from_secs(60), asked)
        .await
        .expect("the peer never asked the liar for its own job's module");
    assert!(request.contains("FetchModule"), "{request}");
    // Time for the forged one, gossiped first, to be acted on too.
    let settle = async {
        loop {
            tokio::select! {
                _ = liar.select_next_some() => {}
                e = named.select_next_some() => {
                    if let SwarmEvent::Behaviour(request_response::Event::Message { message, .. }) = e {
                        panic!("the peer took up a job in another's name: it asked {message:?}");
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), settle).await;
    still_runs_jobs(&peer);
}

/// An outsider announces many jobs, each of a module of its own (one
/// compiled job or an empty component, with a different custom section
/// each), and serves their bytes to a live peer whose disk cache is
/// bounded at 4 MiB: the peer
/// fetches and compiles them, its cache stays within its bound (the least
/// recently used removed, as its log says) and its memory within reason,
/// and it still runs jobs.
#[tokio::test]
async fn many_modules_announced_leave_the_cache_within_its_bound() {
    use antnest_proto::ModuleHash;

    // The first COMPILED are a real job each (a compile of ~0.5 s in a
    // debug build); the others are empty components, quick to compile,
    // so that the test takes about a minute.
    const MODULES: usize = 500;
    const COMPILED: usize = 40;
    const CAP: u64 = 4 << 20;
    let dir = scratch();
    let cache = dir.path().join("wcache");
    let peer = PeerProc::loopback(
        dir.path(),
        "w",
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-max-mb",
            "4",
        ],
    );
    let code = std::fs::read(artifact("primes")).unwrap();
    // A component's preamble: magic, version 0x0d, layer 1.
    let empty = b"\0asm\x0d\0\x01\0".to_vec();
    let modules: Vec<Vec<u8>> = (0..MODULES)
        .map(|i| {
            // A custom section: id 0, size, name, contents.
            let name = b"antnest-test-pad";
            let body = [&[name.len() as u8][..], name, &i.to_le_bytes()].concat();
            let code = if i < COMPILED { &code } else { &empty };
            [&code[..], &[0, body.len() as u8], &body].concat()
        })
        .collect();
    let (mut liar, topic) = module_server(request_response::Config::default());
    let liar_id = *liar.local_peer_id();
    liar.dial(peer.addr().parse::<Multiaddr>().unwrap())
        .unwrap();
    let announcements: Vec<Vec<u8>> = modules
        .iter()
        .map(|m| cbor4ii::serde::to_vec(Vec::new(), &announcement(liar_id, m)).unwrap())
        .collect();
    let by_hash: std::collections::HashMap<ModuleHash, Vec<u8>> = modules
        .into_iter()
        .map(|m| (ModuleHash::of(&m), m))
        .collect();
    let pid = peer.child.id();
    let mut most_compiling = 0;
    let mut served = std::collections::HashSet::new();
    let served = serve_modules(
        &mut liar,
        &topic,
        &announcements,
        &by_hash,
        || most_compiling = most_compiling.max(children_of(pid)),
        |hash| {
            served.insert(hash);
            served.len() == MODULES
        },
    );
    tokio::time::timeout(Duration::from_secs(400), served)
        .await
        .expect("the peer did not fetch every module announced");
    // The last fetched are compiled (and kept) meanwhile.
    let size = || -> u64 {
        std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    };
    let mut last = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = size();
        assert!(
            last <= CAP + CAP / 2,
            "the cache holds {last} bytes, past its 4 MiB bound"
        );
    }
    assert!(last > 0, "the cache holds the modules fetched last");
    let rss_kib = rss_kib(peer.child.id());
    eprintln!(
        "peer RSS after {MODULES} modules: {rss_kib} KiB, cache {last} bytes, \
         at most {most_compiling} compiles at once"
    );
    // Each compile is a child process; a peer runs a few at once.
    assert!(
        (1..=4).contains(&most_compiling),
        "{most_compiling} compiles at once"
    );
    assert!(
        rss_kib < 400 << 10,
        "peer RSS {rss_kib} KiB after {MODULES} modules"
    );
    still_runs_jobs(&peer);
}

/// How many child processes `pid` has now.
fn children_of(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // After the command's name (in parentheses): state, then ppid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            ppid == Some(pid.to_string().as_str())
        })
        .count()
}

/// An outsider speaking antnest's messages, connected to `peer` and
/// hearing its gossip (requests time out after 120 s).
async fn joined_worker(peer: &PeerProc) -> libp2p::Swarm<ModuleServer> {
    let (mut swarm, _topic) = module_server(
        request_response::Config::default().with_request_timeout(Duration::from_secs(120)),
    );
    swarm
        .dial(peer.addr().parse::<Multiaddr>().unwrap())
        .unwrap();
    let subscribed = async {
        loop {
            if let SwarmEvent::Behaviour(ModuleServerEvent::Gossip(
                libp2p::gossipsub::Event::Subscribed { .. },
            )) = swarm.select_next_some().await
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), subscribed)
        .await
        .expect("the peer's gossip never reached the outsider");
    swarm
}

/// The job an outsider's event announces, and its master (the signer).
fn announced(
    event: &SwarmEvent<ModuleServerEvent>,
) -> Option<(antnest_proto::JobId, libp2p::PeerId)> {
    let SwarmEvent::Behaviour(ModuleServerEvent::Gossip(libp2p::gossipsub::Event::Message {
        message,
        ..
    })) = event
    else {
        return None;
    };
    let a: antnest_proto::Announce = cbor4ii::serde::from_slice(&message.data).ok()?;
    Some((a.job, libp2p::PeerId::from_bytes(&a.master).ok()?))
}

/// Taskunits an outsider's event brings (the answer to its pull): from
/// whom, for which request.
fn tasks_received(
    event: SwarmEvent<ModuleServerEvent>,
) -> Option<(
    libp2p::PeerId,
    request_response::OutboundRequestId,
    Vec<antnest_proto::TaskUnit>,
)> {
    let SwarmEvent::Behaviour(ModuleServerEvent::Rr(request_response::Event::Message {
        peer,
        message:
            request_response::Message::Response {
                request_id,
                response: antnest_proto::Response::Tasks { units, .. },
            },
        ..
    })) = event
    else {
        return None;
    };
    Some((peer, request_id, units))
}

/// An outsider takes all the taskunits it can (a pull of 4096 at the
/// first announcement) and never answers. The master's own slot runs
/// backup copies of what it holds, so the job ends with the right output
/// long before the outsider's leases (120 s) expire, and the stats show
/// the backups and no result from the outsider.
#[tokio::test]
async fn a_worker_holding_leases_does_not_hold_the_job() {
    use antnest_proto::Request;

    let dir = scratch();
    let master = PeerProc::loopback(dir.path(), "m", &["--lease", "120s"]);
    let mut holder = joined_worker(&master).await;
    let holder_id = holder.local_peer_id().to_string();
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let holding = {
        let held = held.clone();
        tokio::spawn(async move {
            let mut pulled = std::collections::HashSet::new();
            loop {
                let event = holder.select_next_some().await;
                if let Some((job, master)) = announced(&event) {
                    if pulled.insert(job) {
                        let pull = Request::Pull { job, max: 4096 };
                        holder.behaviour_mut().rr.send_request(&master, pull);
                    }
                } else if let Some((_, _, units)) = tasks_received(event) {
                    // Kept, never run, never answered.
                    held.fetch_add(units.len(), std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    // 400 taskunits of a few ms each: about two seconds on one slot. On a
    // loaded machine the announcement may reach the holder only once the
    // master has run them all: up to three jobs, each with the right
    // output, until the holder has held some of one.
    let (input, want) = primes_input(400, 60_000);
    let stats = dir.path().join("s.json");
    for _ in 0..3 {
        let before = held.load(std::sync::atomic::Ordering::Relaxed);
        let job = master.spawn_submit(
            &artifact("primes"),
            &["--stats-json", stats.to_str().unwrap()],
            input.as_bytes(),
        );
        let started = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || job.finish(Duration::from_secs(100)))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), want.to_string());
        let stats = stats_of(&stats);
        assert!(
            stats["per_peer"].get(&holder_id).is_none(),
            "nothing counted from the holder: {stats}"
        );
        let this_job = held.load(std::sync::atomic::Ordering::Relaxed) - before;
        if this_job == 0 {
            continue;
        }
        assert!(
            stats["backups"].as_u64().unwrap() >= 1,
            "the held taskunits were run as backups: {stats}"
        );
        // Ended well within its 100 s (else it was killed and failed
        // above), with the holder's leases good for 120 s.
        eprintln!("the holder held {this_job} taskunits; the job took {took:?}: {stats}");
        holding.abort();
        return;
    }
    panic!("the holder got no taskunits to hold in three jobs");
}

/// A worker that lies: it takes taskunits the usual way (a pull at the
/// announcement, then results with the next pull) and hands in a forged
/// result for every one. With `--verify 1` every remote result is run
/// again on the master's own slot before it is taken: the liar is caught,
/// refused, and what it handed in is run again, so the output is right,
/// and the stats name it.
#[tokio::test]
async fn a_worker_handing_in_wrong_results_is_caught_by_spot_checks() {
    use antnest_proto::{ByteBuf, Request, TaskOutcome};

    let dir = scratch();
    let master = PeerProc::loopback(dir.path(), "m", &[]);
    let mut liar = joined_worker(&master).await;
    let liar_id = liar.local_peer_id().to_string();
    let forged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lying = {
        let forged = forged.clone();
        tokio::spawn(async move {
            // The request last sent for each job.
            let mut jobs = std::collections::HashMap::new();
            loop {
                let event = liar.select_next_some().await;
                if let Some((job, master)) = announced(&event) {
                    if let std::collections::hash_map::Entry::Vacant(first) = jobs.entry(job) {
                        let pull = Request::Pull { job, max: 8 };
                        first.insert(liar.behaviour_mut().rr.send_request(&master, pull));
                    }
                } else if let Some((peer, request_id, units)) = tasks_received(event) {
                    let Some(job) = jobs
                        .iter()
                        .find(|(_, id)| **id == request_id)
                        .map(|(job, _)| *job)
                    else {
                        continue;
                    };
                    forged.fetch_add(units.len(), std::sync::atomic::Ordering::Relaxed);
                    let outcomes = units
                        .iter()
                        .map(|u| TaskOutcome {
                            index: u.index,
                            result: Ok(ByteBuf::from(b"1".to_vec())),
                            stderr: None,
                            native: false,
                        })
                        .collect();
                    let results = Request::Results {
                        job,
                        outcomes,
                        compute: Duration::from_millis(1),
                        pull: 8,
                    };
                    jobs.insert(job, liar.behaviour_mut().rr.send_request(&peer, results));
                }
            }
        })
    };
    // 200 taskunits of a few ms each.
    let (input, want) = primes_input(200, 60_000);
    let stats = dir.path().join("s.json");
    let job = master.spawn_submit(
        &artifact("primes"),
        &["--verify", "1", "--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    let out = tokio::task::spawn_blocking(move || job.finish(Duration::from_secs(300)))
        .await
        .unwrap();
    lying.abort();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string(), "the output is right");
    let forged = forged.load(std::sync::atomic::Ordering::Relaxed);
    assert!(forged > 0, "the liar got taskunits to lie about");
    let stats = stats_of(&stats);
    assert!(
        stats["caught"][&liar_id].as_u64() >= Some(1),
        "the liar is named: {stats}"
    );
    assert!(
        stats["per_peer"].get(&liar_id).is_none(),
        "no result counts as the liar's: {stats}"
    );
    eprintln!("the liar forged {forged} results: {stats}");
}

/// `n` as wasm writes sizes and counts (unsigned LEB128), onto `out`.
fn wasm_leb(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A wasm section (of a module or a component) onto `out`.
fn wasm_section(out: &mut Vec<u8>, id: u8, body: &[u8]) {
    out.push(id);
    wasm_leb(out, body.len());
    out.extend_from_slice(body);
}

/// A component whose one function (run at instantiation, so it is
/// compiled) is `ops` chained multiply-adds over 64 live locals: its
/// compile takes seconds for 100k ops and minutes for 600k (Cranelift's
/// register allocation), though it is a few MB of valid wasm.
fn compile_bomb(ops: usize) -> Vec<u8> {
    fn sleb(mut n: i64, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if (n == 0 && byte & 0x40 == 0) || (n == -1 && byte & 0x40 != 0) {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    const LOCALS: usize = 64;
    let (get, set, global_get, global_set, konst) = (0x20, 0x21, 0x23, 0x24, 0x42);
    let (mul, add, end) = (0x7e, 0x7c, 0x0b);
    let mut body = vec![1, LOCALS as u8, 0x7e]; // 64 locals of i64
    // Every local from a mutable global, so nothing folds to a constant.
    for j in 0..LOCALS {
        body.extend([global_get, 0, konst]);
        sleb(j as i64 * 2_654_435_761 + 1, &mut body);
        body.extend([mul, set, j as u8]);
    }
    for k in 0..ops {
        let (a, mut b, c) = (
            (k * 31 + 1) % LOCALS,
            (k * 7 + 3) % LOCALS,
            (k * 13 + 5) % LOCALS,
        );
        if a == b {
            b = (b + 1) % LOCALS;
        }
        body.extend([get, a as u8, konst]);
        sleb(2 * k as i64 + 3, &mut body);
        body.extend([mul, get, b as u8, add, set, c as u8]);
    }
    body.extend([global_get, 0]);
    for j in 0..LOCALS {
        body.extend([get, j as u8, add]);
    }
    body.extend([global_set, 0, end]);
    let mut code = vec![1];
    wasm_leb(&mut code, body.len());
    code.extend_from_slice(&body);
    let mut core = b"\0asm\x01\0\0\0".to_vec();
    wasm_section(&mut core, 1, &[1, 0x60, 0, 0]); // one type: [] -> []
    wasm_section(&mut core, 3, &[1, 0]); // one function of it
    wasm_section(&mut core, 6, &[1, 0x7e, 1, konst, 7, end]); // a mutable i64
    wasm_section(&mut core, 8, &[0]); // the function starts the instance
    wasm_section(&mut core, 10, &code);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    wasm_section(&mut component, 1, &core); // the core module
    wasm_section(&mut component, 2, &[1, 0, 0, 0]); // one instance of it
    component
}

/// A compile bomb (a few MB of valid wasm that takes minutes to compile)
/// announced by an outsider to a worker while another master's job
/// needs it: the worker's compile of the bomb is cut at
/// `--compile-timeout`, nothing of it is cached, the failure is counted
/// on /metrics, and the honest job runs on the worker meanwhile, with the
/// right output.
#[tokio::test]
async fn a_compile_bomb_is_cut_and_holds_back_no_other_masters_job() {
    use antnest_proto::ModuleHash;

    let dir = scratch();
    let m = PeerProc::loopback(dir.path(), "m", &[]);
    // A cache of its own: w compiles the honest job's module too.
    let (w, w_cache) = PeerProc::own_cache_worker(
        dir.path(),
        "w",
        &m,
        &["--compile-timeout", "10s", "--ui", "127.0.0.1:0"],
    );
    let ui = w.ui.clone().expect("the peer prints its UI address");
    let bomb = compile_bomb(600_000);
    let bomb_hash = ModuleHash::of(&bomb);
    let (mut liar, topic) = module_server(request_response::Config::default());
    let announce =
        cbor4ii::serde::to_vec(Vec::new(), &announcement(*liar.local_peer_id(), &bomb)).unwrap();
    liar.dial(w.addr().parse::<Multiaddr>().unwrap()).unwrap();
    let (fetched_tx, fetched) = tokio::sync::oneshot::channel();
    let liar_task = tokio::spawn(async move {
        let mut fetched_tx = Some(fetched_tx);
        let modules = std::collections::HashMap::from([(bomb_hash, bomb)]);
        let announcements = [announce];
        serve_modules(
            &mut liar,
            &topic,
            &announcements,
            &modules,
            || {},
            |_| {
                if let Some(tx) = fetched_tx.take() {
                    let _ = tx.send(());
                }
                false
            },
        )
        .await;
    });
    tokio::time::timeout(Duration::from_secs(60), fetched)
        .await
        .expect("the worker fetched the bomb")
        .unwrap();
    let started = std::time::Instant::now();
    // The honest job, while the bomb compiles on w.
    let (input, want) = primes_input(40, 1_000_000);
    let stats = dir.path().join("s.json");
    let out = {
        let (job, stats) = (artifact("primes"), stats.clone());
        let control = m.control.clone();
        tokio::task::spawn_blocking(move || {
            run(
                &[
                    "submit",
                    "-q",
                    "--control",
                    control.to_str().unwrap(),
                    job.to_str().unwrap(),
                    "--stats-json",
                    stats.to_str().unwrap(),
                ],
                input.as_bytes(),
                Duration::from_secs(300),
            )
        })
        .await
        .unwrap()
    };
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    let stats = stats_of(&stats);
    assert!(
        stats["per_peer"].get(&w.peer_id).is_some(),
        "w worked on the honest job while the bomb compiled: {stats}"
    );
    eprintln!(
        "honest job done {:?} after the bomb was fetched",
        started.elapsed()
    );
    // The bomb's compile is cut, counted, and leaves nothing behind.
    let failures =
        || metric_value(&http_get(&ui, "/metrics"), "antnest_module_failures_total").unwrap_or(0.0);
    let cut = tokio::time::timeout(Duration::from_secs(60), async {
        while failures() < 1.0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    assert!(cut.is_ok(), "the bomb's compile was not cut");
    assert!(
        std::fs::read_dir(&w_cache).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(&bomb_hash.to_string())),
        "nothing of the bomb is cached"
    );
    assert_eq!(children_of(w.child.id()), 0, "no compile left running");
    liar_task.abort();
    still_runs_jobs(&w);
}

/// `component` (a job built by cargo) with `extra` more memories of
/// `pages` wasm pages (64 KiB) each in its main core module: memory asked
/// for at instantiation, spread thin over many memories.
fn with_extra_memories(component: &[u8], extra: u32, pages: u32) -> Vec<u8> {
    fn leb_read(b: &[u8], at: &mut usize) -> usize {
        let (mut n, mut shift) = (0usize, 0);
        loop {
            let byte = b[*at];
            *at += 1;
            n |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return n;
            }
        }
    }
    /// `(id, body)` of each section after the 8-byte preamble.
    fn sections(b: &[u8]) -> Vec<(u8, &[u8])> {
        let mut at = 8;
        let mut out = Vec::new();
        while at < b.len() {
            let id = b[at];
            at += 1;
            let len = leb_read(b, &mut at);
            out.push((id, &b[at..at + len]));
            at += len;
        }
        out
    }
    fn assemble(preamble: &[u8], sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = preamble.to_vec();
        for (id, body) in sections {
            wasm_section(&mut out, *id, body);
        }
        out
    }
    let mut done = false;
    let outer: Vec<(u8, Vec<u8>)> = sections(component)
        .into_iter()
        .map(|(id, body)| {
            // The first core module that defines a memory: the job's own.
            let defines_memory = id == 1 && sections(body).iter().any(|(i, _)| *i == 5);
            if done || !defines_memory {
                return (id, body.to_vec());
            }
            done = true;
            let inner: Vec<(u8, Vec<u8>)> = sections(body)
                .into_iter()
                .map(|(i, b)| {
                    if i != 5 {
                        return (i, b.to_vec());
                    }
                    let mut at = 0;
                    let count = leb_read(b, &mut at);
                    let mut memories = Vec::new();
                    wasm_leb(&mut memories, count + extra as usize);
                    memories.extend_from_slice(&b[at..]);
                    for _ in 0..extra {
                        memories.push(0); // a minimum, no maximum
                        wasm_leb(&mut memories, pages as usize);
                    }
                    (i, memories)
                })
                .collect();
            (id, assemble(&body[..8], &inner))
        })
        .collect();
    assert!(done, "a core module with a memory");
    assemble(&component[..8], &outer)
}

/// A memory bomb spread over many memories and instances: a real job
/// with 99 more memories of 1 MiB (each small; 99 MiB together). Under
/// a 64 MiB taskunit limit every taskunit fails as out of memory, with a
/// clear error, and the peer goes on. Under its own limit (512 MiB) the
/// job runs, and on a peer whose instances may hold 150 MiB together, its
/// two slots' instances (about 100 MiB each) never hold more than that:
/// the job still ends right, and the peer still runs jobs.
#[test]
fn a_memory_bomb_over_many_memories_and_instances_stays_within_bounds() {
    let dir = scratch();
    let bomb = dir.path().join("bomb.wasm");
    let faulty = std::fs::read(artifact("faulty")).unwrap();
    // 99 more: a module may have 100 memories at most.
    std::fs::write(&bomb, with_extra_memories(&faulty, 99, 16)).unwrap();
    let peer = PeerProc::start(
        dir.path(),
        "p",
        &[
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--slots",
            "2",
            "--max-memory",
            "150",
            "--ui",
            "127.0.0.1:0",
        ],
    );
    let ui = peer.ui.clone().expect("the peer prints its UI address");
    let out = peer.submit(&bomb, &["--memory-mb", "64", "--attempts", "1"], b"a\nb\n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("out of memory"),
        "{}",
        text(&out.stderr)
    );
    // Long enough (every taskunit instantiates the bomb) that sampling the
    // peer's memory catches an instance whole, on a busy machine too.
    let input = "abc\n".repeat(400);
    let mut job = peer.spawn_submit(&bomb, &["-q"], input.as_bytes());
    let mut most: f64 = 0.0;
    while job.running() {
        let metrics = http_get(&ui, "/metrics");
        most = most.max(metric_value(&metrics, "antnest_instance_memory_bytes").unwrap_or(0.0));
    }
    let out = job.finish(Duration::from_secs(120));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ABC\n".repeat(400).trim_end());
    eprintln!("instances held at most {:.0} MiB", most / (1 << 20) as f64);
    assert!(
        most > 99.0 * (1 << 20) as f64 && most <= 150.0 * (1 << 20) as f64,
        "instances held {most} bytes"
    );
    still_runs_jobs(&peer);
}
