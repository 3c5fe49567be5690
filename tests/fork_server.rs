//! The fork server: started before any runtime, asked from async code to
//! fork registered jobs; statuses come back, unknown jobs are refused, and
//! dropping it stops and reaps everything.

mod common;

use std::time::Duration;
use tower_exit::fork::server::{ForkServer, SpawnError};

fn len(input: &[u8]) -> i32 {
    input.len() as i32
}

fn crash(_: &[u8]) -> i32 {
    panic!("job bug")
}

fn exits(input: &[u8]) -> i32 {
    tower_exit::exit(i32::from(input[0]))
}

fn sleeps(_: &[u8]) -> i32 {
    std::thread::sleep(Duration::from_secs(30));
    0
}

#[test]
fn jobs_fork_from_the_clean_state_and_report_their_status() {
    let forks = ForkServer::builder()
        .job("len", len)
        .job("crash", crash)
        .job("exit", exits)
        .job("sleep", sleeps)
        .start()
        .unwrap();
    let server_pid = forks.pid().unwrap();
    let forks = std::sync::Arc::new(forks);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let long_job = runtime.block_on(async {
        // Many at once, from many tasks.
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..40u8 {
            let forks = forks.clone();
            tasks.spawn(async move {
                let input = vec![n; usize::from(n)];
                let job = forks.spawn("len", &input).await.unwrap();
                (n, job.wait().await.unwrap())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (n, status) = joined.unwrap();
            assert_eq!(status.code(), Some(i32::from(n)));
        }
        let crashed = forks
            .spawn("crash", b"")
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(crashed.code(), Some(101));
        let exited = forks
            .spawn("exit", &[9])
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(exited.code(), Some(9));
        match forks.spawn("nope", b"").await {
            Err(SpawnError::UnknownJob(name)) => assert_eq!(name, "nope"),
            other => panic!("{other:?}"),
        }
        forks.spawn("sleep", b"").await.unwrap().pid()
    });
    assert!(common::alive(long_job));
    // Dropping the handle stops the fork server, which stops and reaps its jobs.
    drop(forks);
    drop(runtime);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while common::alive(long_job) || common::alive(server_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "fork server or job left behind"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(common::zombies().is_empty());
}

#[test]
fn a_spawn_cancelled_mid_request_leaves_the_link_usable() {
    let forks = ForkServer::builder().job("len", len).start().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // An 8 MiB input cannot be written within 2 ms: the caller gives up
        // while the request is on its way.
        let big = vec![7u8; 8 * 1024 * 1024];
        let cancelled =
            tokio::time::timeout(Duration::from_millis(2), forks.spawn("len", &big)).await;
        assert!(cancelled.is_err(), "timed out");
        // The next request is still understood and answered.
        let job = tokio::time::timeout(Duration::from_secs(5), forks.spawn("len", b"abc"))
            .await
            .expect("answered within 5 s")
            .unwrap();
        assert_eq!(job.wait().await.unwrap().code(), Some(3));
    });
}

#[test]
fn spawn_after_the_fork_server_was_killed_fails_at_once() {
    for first_spawn_before_the_kill in [false, true] {
        let forks = ForkServer::builder().job("len", len).start().unwrap();
        let server_pid = forks.pid().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            if first_spawn_before_the_kill {
                let job = forks.spawn("len", b"ab").await.unwrap();
                assert_eq!(job.wait().await.unwrap().code(), Some(2));
            }
            // SAFETY (test): a signal to a pid this test started.
            assert_eq!(unsafe { libc::kill(server_pid as i32, libc::SIGKILL) }, 0);
            // Its death is seen whatever the reader was doing: two tries,
            // each must fail (not hang) within a second.
            for attempt in 0..2 {
                let spawned =
                    tokio::time::timeout(Duration::from_secs(1), forks.spawn("len", b"a")).await;
                match spawned {
                    Ok(Err(SpawnError::Gone(_))) => {}
                    other => panic!(
                        "attempt {attempt} (spawn before the kill: {first_spawn_before_the_kill}): \
                         {:?}",
                        other.map(|r| r.map(|job| job.pid()))
                    ),
                }
            }
        });
        drop(forks);
        assert!(!common::alive(server_pid), "the fork server was reaped");
    }
}
