//! The cost of `max_rss`'s check at the end of every request in a prefork
//! worker: one `getrusage(RUSAGE_SELF)` (the peak resident memory), against
//! what the 10 ms timer read before, `/proc/self/statm`, and an empty
//! call as the floor, measured in the same run:
//!
//! `cargo bench --all-features --bench memory_check -- --noplot`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn peak_resident_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the place we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: getrusage filled it.
    unsafe { usage.assume_init_ref() }.ru_maxrss
}

fn resident_pages() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn memory_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("max_rss check");
    group.bench_function("nothing (floor)", |b| b.iter(|| black_box(0u64)));
    group.bench_function("getrusage (per request)", |b| {
        b.iter(|| black_box(peak_resident_kib()))
    });
    group.bench_function("/proc/self/statm (the timer's read before)", |b| {
        b.iter(|| black_box(resident_pages()))
    });
    group.finish();
}

criterion_group!(benches, memory_check);
criterion_main!(benches);
