//! Running the demo examples and real peers (nginx, cgi-fcgi) as child
//! processes that never outlive a test, even a failing one.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An example binary built by `cargo test` (examples are built with the tests).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    target.join("examples").join(name)
}

/// A child process killed (SIGKILL) and reaped on drop, with its output
/// collected line by line.
pub struct Proc {
    child: Option<Child>,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Proc {
    /// Starts `command`, which dies with the thread that started it (a
    /// test's thread) even if this test process is killed before `Drop`
    /// runs: no example or peer outlives a test run.
    pub fn spawn(mut command: Command) -> Proc {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches nothing of the
        // parent's; it runs in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Proc {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until a stdout line starts with `prefix`; returns the rest.
    pub fn wait_for_line(&self, prefix: &str) -> String {
        let line = wait_line(
            &self.stdout,
            |l| l.starts_with(prefix),
            Duration::from_secs(20),
            || {
                format!(
                    "no {prefix:?} line; stderr: {:?}",
                    self.stderr.lock().unwrap()
                )
            },
        );
        line[prefix.len()..].trim().to_owned()
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a stderr line contains `needle`; returns it.
    #[allow(dead_code)]
    pub fn stderr_line(&self, needle: &str, within: Duration) -> String {
        wait_line(
            &self.stderr,
            |l| l.contains(needle),
            within,
            || format!("no {needle:?} line within {within:?}"),
        )
    }

    /// How many stderr lines hold `needle`, once at least `at_least` do
    /// (waiting for them at most `within`: a line said by another process
    /// reaches the pipe when it does, not when the test looks).
    pub fn stderr_count_once(&self, needle: &str, at_least: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let count = self.stderr_count(needle);
            if count >= at_least || Instant::now() >= deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_count(&self, needle: &str) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// Polls collected `lines` until one `matches`, for at most `within`;
/// returns it, or fails the test with `missing()`.
fn wait_line(
    lines: &Mutex<Vec<String>>,
    matches: impl Fn(&str) -> bool,
    within: Duration,
    missing: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = lines.lock().unwrap().iter().find(|l| matches(l)) {
            return line.clone();
        }
        assert!(Instant::now() < deadline, "{}", missing());
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A process with children is a master (prefork): SIGINT is its
            // fast stop, which kills its workers, reaps them and ends, so
            // that none is left to pid 1. Given a second, then killed.
            let workers = super::children_of(child.id());
            if !workers.is_empty() {
                // SAFETY: a signal to the process this `Proc` started, not
                // reaped yet (so the pid is still its).
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let deadline = Instant::now() + Duration::from_secs(1);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            // Workers of a master killed before it reaped them end within a
            // second (they watch their parent). A test process that is a
            // subreaper adopts them: each is reaped here, by its own pid
            // (never `waitpid(-1)`: tests run in parallel).
            let deadline = Instant::now() + Duration::from_secs(2);
            for (pid, _) in workers {
                while running_or_ours(pid) && Instant::now() < deadline {
                    // SAFETY: reaps this one pid if this process adopted
                    // it; otherwise fails with ECHILD and does nothing.
                    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

/// Whether `pid` still runs, or is a zombie this process must reap (one
/// another process adopted is that process's to reap).
fn running_or_ours(pid: u32) -> bool {
    super::state_of(pid).is_some_and(|(state, parent)| state != "Z" || parent == std::process::id())
}

/// A TCP port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tower-exit-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// nginx in the foreground, one process, passing every request to
/// `fastcgi_pass` (`127.0.0.1:PORT` or `unix:/path`). Returns it and its port.
pub fn nginx(dir: &TempDir, fastcgi_pass: &str) -> (Proc, u16) {
    nginx_with(
        dir,
        fastcgi_pass,
        "include /etc/nginx/fastcgi_params;\n      fastcgi_param REQUEST_URI $request_uri;\n      fastcgi_keep_conn on;\n      fastcgi_pass app;",
    )
}

/// nginx on a free loopback port, its `upstream app` the server at
/// `upstream` with a keep-alive pool of 8, `location /` doing `pass`.
fn nginx_with(dir: &TempDir, upstream: &str, pass: &str) -> (Proc, u16) {
    let port = free_port();
    let d = dir.0.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 128; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  fastcgi_temp_path {d}/fastcgi;\n  proxy_temp_path {d}/proxy;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream app {{ server {upstream}; keepalive 8; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      {pass}\n    }}\n  }}\n}}\n"
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut command = Command::new(sbin("nginx"));
    command
        .arg("-p")
        .arg(&dir.0)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.0.join("stderr.log"));
    let proc = Proc::spawn(command);
    wait_for_port(port, || {
        format!(
            "nginx did not start: {:?}",
            std::fs::read_to_string(dir.0.join("error.log"))
        )
    });
    (proc, port)
}

/// nginx on a free loopback port in front of the HTTP server at
/// `upstream` (`host:port`), through an upstream keep-alive pool of 8
/// (`proxy_pass`, HTTP/1.1, the `Connection` header cleared): the README's
/// recipe.
#[allow(dead_code)]
pub fn nginx_proxy(dir: &TempDir, upstream: &str) -> (Proc, u16) {
    nginx_with(
        dir,
        upstream,
        "proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";",
    )
}

/// What [`pool_run`] saw.
#[allow(dead_code)]
pub struct PoolRun {
    pub took: Duration,
    pub failed: Vec<String>,
    pub hups: usize,
}

/// 8 keep-alive clients through nginx at `port`, `POST /` and `GET /pid`
/// in turn, `requests` in all, and a SIGHUP to `master` every 2 s
/// meanwhile: what kept upstream connections must survive.
#[allow(dead_code)]
pub async fn pool_run(port: u16, master: u32, requests: usize) -> PoolRun {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<String>();
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, sent, failed) = (client.clone(), sent.clone(), failed.clone());
        tasks.spawn(async move {
            loop {
                let i = sent.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                let req = if i % 2 == 0 {
                    http::Request::post(format!("http://127.0.0.1:{port}/"))
                        .body("a=1&b=2".to_owned())
                } else {
                    http::Request::get(format!("http://127.0.0.1:{port}/pid")).body(String::new())
                }
                .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == http::StatusCode::OK => {
                        let _ = res.into_body().collect().await;
                    }
                    Ok(res) => failed
                        .lock()
                        .unwrap()
                        .push(format!("{i}: {}", res.status())),
                    Err(err) => failed.lock().unwrap().push(format!("{i}: {err}")),
                }
            }
        });
    }
    let mut hups = 0;
    while !tasks.is_empty() {
        tokio::select! {
            _ = tasks.join_next() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                signal(master, libc::SIGHUP);
                hups += 1;
            }
        }
    }
    let took = started.elapsed();
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    PoolRun { took, failed, hups }
}

/// A Debian server binary (`/usr/sbin` is not on every user's PATH).
pub fn sbin(name: &'static str) -> String {
    let path = format!("/usr/sbin/{name}");
    if std::path::Path::new(&path).exists() {
        path
    } else {
        name.to_owned()
    }
}

/// Waits up to 10 s for a server to accept on loopback `port`; fails the
/// test with `missing()` otherwise.
pub fn wait_for_port(port: u16, missing: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{}", missing());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request through `cgi-fcgi` (libfcgi's client): its whole output.
pub fn cgi_fcgi(connect: &str, method: &str, uri: &str) -> String {
    let out = Command::new("cgi-fcgi")
        .args(["-bind", "-connect", connect])
        .env_clear()
        .env("REQUEST_METHOD", method)
        .env("REQUEST_URI", uri)
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_PORT", "40000")
        .output()
        .expect("cgi-fcgi runs (apt-get install libfcgi-bin)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pid in a log line `... pid=N ...`.
#[allow(dead_code)]
pub fn pid_in(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("pid="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Sends `sig` to a process the test started.
#[allow(dead_code)]
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall to a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// What a load client saw: requests answered, failures, worker pids.
pub type Seen = (u32, Vec<String>, std::collections::HashSet<u32>);

/// Clients asking `/pid` over fresh connections until stopped: what load
/// a reload or an upgrade must not fail.
#[allow(dead_code)]
pub struct PidLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

#[allow(dead_code)]
impl PidLoad {
    pub fn start(addr: std::net::SocketAddr, clients: usize) -> PidLoad {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed, mut pids) =
                        (0u32, Vec::new(), std::collections::HashSet::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match super::get(addr, "/pid").await {
                            Ok(reply) if reply.status == http::StatusCode::OK => {
                                ok += 1;
                                pids.insert(reply.body.parse::<u32>().unwrap());
                            }
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    (ok, failed, pids)
                })
            })
            .collect();
        PidLoad { stop, tasks }
    }

    /// Stops the clients: requests answered, the failures, the pids seen.
    pub async fn stop(self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut failed, mut pids) = (0, Vec::new(), std::collections::HashSet::new());
        for task in self.tasks {
            let (n, f, p) = task.await.unwrap();
            ok += n;
            failed.extend(f);
            pids.extend(p);
        }
        (ok, failed, pids)
    }
}
