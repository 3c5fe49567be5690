//! How an `Exit` is raised: no panic hook, and under `panic = "abort"` the
//! process ends with the exit's status after the abort hooks ran.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower_exit::Exit;

#[test]
fn raising_does_not_run_the_panic_hook_but_panicking_does() {
    static HOOK_CALLS: AtomicUsize = AtomicUsize::new(0);
    std::panic::set_hook(Box::new(|_| {
        HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    }));
    let payload = std::panic::catch_unwind(|| tower_exit::exit(2)).unwrap_err();
    assert_eq!(Exit::from_panic(&*payload).map(Exit::code), Some(2));
    let payload = std::panic::catch_unwind(|| Exit::failure("stop").raise()).unwrap_err();
    assert_eq!(
        Exit::from_panic(&*payload).and_then(Exit::message),
        Some("stop")
    );
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 0);

    // The counter works: a real panic does run it.
    let _ = std::panic::catch_unwind(|| panic!("real"));
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 1);
    let _ = std::panic::take_hook();
}

#[test]
fn under_panic_abort_raising_runs_the_hooks_and_exits_with_the_status() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/abort");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/abort-fixture");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(fixture.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cargo runs");
    assert!(built.success(), "fixture builds");
    let binary = target.join("debug/abort-exit");

    for (code, status) in [(0, 0), (3, 3), (256, 0), (-1, 255)] {
        let out = Command::new(&binary)
            .arg(code.to_string())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(status), "exit({code})");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout, format!("hook 1: exit {code}: bye\nhook 2\n"));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!stderr.contains("panicked"), "no panic message: {stderr}");
    }
}
