//! A forked child never unwinds: `exit(0)` in a child forked during a
//! guarded request ends the child at the raise, so it cannot hang on a lock
//! another thread of the parent held at the moment of the fork.
//!
//! The whole test binary runs on a global allocator serialised by one mutex
//! (as tracking and profiling allocators are), with threads allocating hard:
//! a child that allocated after the fork (to box the exit, to unwind) would
//! often find that mutex locked forever. A second test holds a
//! `tokio::sync::Semaphore` permit across the fork while other tasks contend
//! for it: a child that unwound would drop the permit and could hang on the
//! semaphore's internal lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{service_fn, ServiceExt};
use tower_exit::fork::{fork, Child, Forked};
use tower_exit::ForkGuardLayer;
use tower_layer::Layer;

/// `System`, with every call serialised by one plain mutex.
struct Serialised;

static ALLOC_LOCK: Mutex<()> = Mutex::new(());

// SAFETY: every call is forwarded to `System` unchanged; the mutex only
// serialises them (it does not allocate: std's mutex is a futex word).
unsafe impl GlobalAlloc for Serialised {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _held = ALLOC_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _held = ALLOC_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _held = ALLOC_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Serialised = Serialised;

/// Threads that allocate and free as fast as they can until dropped.
struct Allocators {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Allocators {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut keep = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        keep.push(vec![i as u8; 64 + (keep.len() % 512)]);
                        if keep.len() > 256 {
                            keep.clear();
                        }
                    }
                })
            })
            .collect();
        Allocators { stop, threads }
    }
}

impl Drop for Allocators {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What became of a batch of children.
#[derive(Debug, Default)]
struct Outcome {
    ended_by_sigterm: usize,
    other: Vec<String>,
    hung: usize,
}

/// Waits for each child (at most `patience`); a child still running then
/// counts as hung and is killed and reaped, so none is left behind.
async fn collect(children: Vec<Child>, patience: Duration, outcome: &mut Outcome) {
    let mut waits = tokio::task::JoinSet::new();
    for mut child in children {
        waits.spawn(async move {
            match tokio::time::timeout(patience, child.wait()).await {
                Ok(status) => Ok(status.expect("wait")),
                Err(_) => {
                    let _ = child.kill(libc::SIGKILL);
                    let _ = child.wait().await;
                    Err(())
                }
            }
        });
    }
    while let Some(ended) = waits.join_next().await {
        match ended.expect("wait task") {
            Ok(status) if status.signal() == Some(libc::SIGTERM) => outcome.ended_by_sigterm += 1,
            Ok(status) => outcome.other.push(status.to_string()),
            Err(()) => outcome.hung += 1,
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const BATCH: usize = 25;
const PATIENCE: Duration = Duration::from_secs(3);

#[test]
fn guarded_children_calling_exit_never_hang_on_a_contended_allocator() {
    const FORKS: usize = 400;
    let runtime = runtime();
    let _allocators = Allocators::start(2);
    let guarded = ForkGuardLayer::new().layer(service_fn(|(): ()| async {
        // SAFETY (test): the child only raises the exit, which the guard
        // turns into the end of the child without allocating.
        match unsafe { fork() }.expect("fork") {
            Forked::Child => tower_exit::exit(0),
            Forked::Parent(child) => Ok::<_, Infallible>(child),
        }
    }));
    let mut outcome = Outcome::default();
    runtime.block_on(async {
        for _ in 0..FORKS / BATCH {
            let mut children = Vec::new();
            for _ in 0..BATCH {
                let child = guarded.oneshot(()).await.unwrap();
                children.push(child);
                // Let the allocating threads and the workers interleave.
                tokio::task::yield_now().await;
            }
            collect(children, PATIENCE, &mut outcome).await;
        }
    });
    assert_eq!(outcome.hung, 0, "{outcome:?}");
    assert!(outcome.other.is_empty(), "{outcome:?}");
    assert_eq!(outcome.ended_by_sigterm, FORKS);
}

#[test]
fn a_semaphore_permit_held_across_the_fork_is_never_dropped_in_the_child() {
    const FORKS: usize = 300;
    let runtime = runtime();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(2));
    let stop = Arc::new(AtomicBool::new(false));
    let mut outcome = Outcome::default();
    runtime.block_on(async {
        // Other tasks contend for the semaphore all the time.
        let contenders: Vec<_> = (0..4)
            .map(|_| {
                let semaphore = semaphore.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let permit = semaphore.acquire().await.unwrap();
                        tokio::task::yield_now().await;
                        drop(permit);
                    }
                })
            })
            .collect();
        let semaphore2 = semaphore.clone();
        let guarded = ForkGuardLayer::new().layer(service_fn(move |(): ()| {
            let semaphore = semaphore2.clone();
            async move {
                let permit = semaphore.acquire_owned().await.unwrap();
                // SAFETY (test): the child only raises the exit.
                let forked = unsafe { fork() }.expect("fork");
                match forked {
                    Forked::Child => tower_exit::exit(0),
                    Forked::Parent(child) => {
                        drop(permit);
                        Ok::<_, Infallible>(child)
                    }
                }
            }
        }));
        for _ in 0..FORKS / BATCH {
            let mut children = Vec::new();
            for _ in 0..BATCH {
                children.push(guarded.clone().oneshot(()).await.unwrap());
            }
            collect(children, PATIENCE, &mut outcome).await;
        }
        stop.store(true, Ordering::Relaxed);
        for contender in contenders {
            contender.await.unwrap();
        }
    });
    assert_eq!(outcome.hung, 0, "{outcome:?}");
    assert!(outcome.other.is_empty(), "{outcome:?}");
    assert_eq!(outcome.ended_by_sigterm, FORKS);
}
