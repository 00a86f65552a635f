//! Sample messages of every kind, for the codec tests here and in the
//! crates that frame them (feature `samples`).

use std::time::Duration;

use crate::{
    Announce, JobId, Limits, ModuleHash, Request, Response, TaskError, TaskOutcome, TaskUnit,
};

pub fn sample_requests() -> Vec<Request> {
    vec![
        Request::Pull {
            job: JobId(0xdead_beef),
            max: 64,
        },
        Request::FetchModule {
            hash: ModuleHash::of(b"m"),
        },
        Request::FetchJobFiles {
            hash: ModuleHash::of(b"m"),
        },
        Request::Wait {
            sizes: vec![(ModuleHash::of(b"m"), 3)],
        },
        Request::EndWait,
        Request::Results {
            job: JobId(3),
            outcomes: vec![TaskOutcome {
                index: 5,
                result: Err(TaskError::OutOfMemory(1 << 20)),
                stderr: None,
                native: false,
            }],
            compute: Duration::from_micros(7),
            pull: 9,
        },
    ]
}

pub fn sample_responses() -> Vec<Response> {
    let units: Vec<TaskUnit> = (0..3)
        .map(|i| TaskUnit {
            index: i,
            // Below and above GATHER_MIN: copied and gathered.
            data: vec![i as u8; [1000, 9000, 5000][i as usize]].into(),
        })
        .collect();
    vec![
        Response::Tasks {
            units: units.clone(),
            lease: Duration::from_secs(30),
        },
        Response::Assigned {
            job: Announce {
                job: JobId(5),
                master: vec![9; 38],
                module: ModuleHash::of(b"m"),
                module_size: 4,
                limits: Limits::default(),
                runtime: crate::Runtime::Auto,
                weight: 1,
                addrs: Vec::new(),
                code: Some(ModuleHash::of(b"c")),
            },
            units,
            lease: Duration::from_secs(30),
        },
        Response::NoWork { finished: true },
        Response::Ack,
        Response::Module(vec![0, 97, 115, 109]),
        Response::JobFiles(vec![0, 1, 2]),
        Response::Refused("no".into()),
    ]
}
