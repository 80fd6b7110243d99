//! The multi-host test lab: real `vx6` daemons, each in its own Linux
//! network namespace with its own IPv6 address, joined by a bridge
//! (docs: ../shared/design/NETLAB.md).
//!
//! # Layout
//!
//! ```text
//!   hub namespace  <prefix>h     bridge br0
//!   node namespace <prefix>n<i>  eth0 = fd00:<i>::1/16   (i = 1..=N, hex)
//! ```
//!
//! Every host sits in its own /48 — the first 48 bits `fd00:000i:0000` differ
//! per host — inside one on-link /16, so prefix-diversity rules see distinct
//! networks while every host reaches every other without routing. The
//! prefix is `vx6t<pid>x<counter>`, unique per lab in a run; the root
//! namespace only ever holds a veth end for a moment (`v<pid hex>x<ctr>n<i>`,
//! at most 15 characters) before it moves into the hub.
//!
//! # How the test process talks inside a namespace
//!
//! Daemons and CLI calls run as `ip netns exec NS vx6 --home HOME ...`
//! (`ip` execs the command, so the child's pid is the daemon's pid). The test
//! process itself acts as servers and clients without helper programs: a
//! short-lived thread calls `setns(2)` into the namespace and creates the
//! socket there. A socket belongs to the namespace it was created in for its
//! whole life, so the thread hands the socket back and the test uses it from
//! anywhere. Echo, tag and connection-recording servers are threads of the
//! test process listening on 127.0.0.1 *inside* a namespace; clients connect
//! to a forward's 127.0.0.1 port inside the client's namespace. Async work
//! that must live in a namespace (a raw vx6 transport client with a fresh
//! key, see [`Probe`]) runs on a current-thread tokio runtime in a thread
//! that entered it. Only addresses inside the lab namespaces (and their
//! loopback) are ever dialed.
//!
//! # Teardown
//!
//! [`Lab`] owns everything: on drop — normal end or panic — it stops its
//! server threads, SIGKILLs every process it started (by pid), then every
//! process still inside its namespaces (`ip netns pids`), and deletes the
//! namespaces. When the test is failing it first prints the tail of every
//! daemon log. `VX6_NETLAB_KEEP=1` keeps the homes and logs on disk. A test
//! process killed outright cannot clean up; the next run deletes its
//! namespaces once they are empty (`ip netns list | grep vx6t` shows them).
//!
//! # Skipping
//!
//! Without root or a working `ip netns`, [`Lab::new`] prints
//! `skipped: needs root for network namespaces` and returns `None`; with
//! `VX6_REQUIRE_NETNS=1` (set it in CI) it panics instead.

#![allow(dead_code)] // each test file uses a different part of the lab

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The vx6 binary under test.
pub const VX6: &str = env!("CARGO_BIN_EXE_vx6");
/// The port every lab daemon listens on.
pub const PORT: u16 = 4242;
/// Longest any single CLI call may take before the test calls it hung.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------ namespaces

/// Moves the calling thread into network namespace `ns`.
#[allow(unsafe_code)]
fn enter_netns(ns: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns(2) with a valid, open namespace fd and CLONE_NEWNET only
    // changes the network namespace of the calling thread; no memory is
    // touched.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result.
/// Sockets `f` creates belong to `ns` for good.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter_netns(&ns).unwrap_or_else(|e| panic!("cannot enter namespace {ns}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs an async block on a current-thread runtime inside namespace `ns`.
pub fn in_ns_async<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    in_ns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("netlab setup: {e}");
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

// ------------------------------------------------------------ hosts

/// One namespace with one address.
#[derive(Clone, Debug)]
pub struct Host {
    pub index: usize,
    pub ns: String,
    /// The address the host starts with.
    pub addr: Ipv6Addr,
    veth: String,
}

impl Host {
    /// `[addr]:4242`, what `--listen`/`--peer`/`--addr` take.
    pub fn sockaddr(&self) -> String {
        format!("[{}]:{PORT}", self.addr)
    }

    /// Another address in this host's own /48 (`fd00:<i>::<last>`).
    pub fn alt_addr(&self, last: u16) -> Ipv6Addr {
        addr_of(self.index, last)
    }

    /// Runs `f` in a thread inside this host's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_ns(&self.ns, f)
    }

    /// Runs an async block inside this host's namespace.
    pub fn run_async<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        in_ns_async(&self.ns, f)
    }

    /// A TCP connection made from inside this namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, timeout))
    }

    /// A UDP socket bound inside this namespace.
    pub fn udp_socket(&self) -> io::Result<UdpSocket> {
        self.run(|| UdpSocket::bind("[::]:0"))
    }

    /// Connects to 127.0.0.1:`port` in this namespace (a forward's listener).
    pub fn local(&self, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        self.tcp_connect(SocketAddr::from(([127, 0, 0, 1], port)), timeout)
    }
}

fn addr_of(index: usize, last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, index as u16, 0, 0, 0, 0, 0, last)
}

// ------------------------------------------------------------ processes

/// Output of one CLI call.
#[derive(Debug, Clone)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
    /// One-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{}, stdout {:?}, stderr {:?}",
            exit_text(&self.status),
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// "exit N" or "killed by signal N" (a signal nobody in the test sent
/// means something outside the lab killed the process).
pub fn exit_text(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{st}"),
    }
}

/// A running daemon.
struct Daemon {
    child: Child,
    started: Instant,
}

// ------------------------------------------------------------ the lab

pub struct Lab {
    pub name: String,
    prefix: String,
    hub: String,
    hosts: Vec<Host>,
    created: Mutex<Vec<String>>,
    dir: Option<tempfile::TempDir>,
    daemons: Mutex<HashMap<usize, Daemon>>,
    others: Mutex<Vec<Child>>,
    stop: Arc<AtomicBool>,
    started: Instant,
}

impl Lab {
    /// A hub and `n` hosts (indexes 1..=n). `None` (after printing why) when
    /// namespaces are unavailable and `VX6_REQUIRE_NETNS` is not `1`.
    pub fn new(name: &str, n: usize) -> Option<Lab> {
        assert!((1..=250).contains(&n));
        let required = std::env::var("VX6_REQUIRE_NETNS").is_ok_and(|v| v == "1");
        let skip = |why: String| {
            if required {
                panic!("VX6_REQUIRE_NETNS=1 but network namespaces are unavailable: {why}");
            }
            eprintln!("skipped: needs root for network namespaces ({why})");
            None
        };
        if !is_root() {
            return skip("not running as root".into());
        }
        let pid = std::process::id();
        let ctr = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("vx6t{pid}x{ctr}");
        let hub = format!("{prefix}h");
        let dir = tempfile::Builder::new()
            .prefix(&format!("vx6-netlab-{name}-"))
            .tempdir()
            .expect("temp dir");
        if ctr == 0 {
            remove_stale_namespaces();
        }
        if let Err(e) = ip(&["netns", "add", &hub]) {
            return skip(e);
        }
        let mut lab = Lab {
            name: name.to_string(),
            prefix: prefix.clone(),
            hub: hub.clone(),
            hosts: Vec::new(),
            created: Mutex::new(vec![hub.clone()]),
            dir: Some(dir),
            daemons: Mutex::new(HashMap::new()),
            others: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
        };
        // From here on, a panic drops `lab`, which deletes what exists.
        ip_ok(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 1..=n {
            let ns = format!("{prefix}n{i}");
            let veth = format!("v{pid:x}x{ctr:x}n{i}");
            assert!(veth.len() <= 15, "interface name {veth} too long");
            ip_ok(&["netns", "add", &ns]);
            lock(&lab.created).push(ns.clone());
            ip_ok(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip_ok(&["link", "set", &veth, "netns", &hub]);
            ip_ok(&["-n", &hub, "link", "set", &veth, "master", "br0"]);
            ip_ok(&["-n", &hub, "link", "set", &veth, "up"]);
            ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            let addr = addr_of(i, 1);
            ip_ok(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/16"),
                "dev",
                "eth0",
                "nodad",
            ]);
            std::fs::create_dir_all(lab.host_dir(i)).expect("host dir");
            lab.hosts.push(Host {
                index: i,
                ns,
                addr,
                veth,
            });
        }
        eprintln!(
            "netlab {name}: {n} hosts in namespaces {prefix}n1..n{n}, files in {}",
            lab.root().display()
        );
        Some(lab)
    }

    pub fn root(&self) -> &Path {
        self.dir.as_ref().expect("lab dir").path()
    }

    fn host_dir(&self, i: usize) -> PathBuf {
        self.root().join(format!("n{i}"))
    }

    /// The home of host `i`'s node.
    pub fn home(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("home")
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("node.log")
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn n(&self) -> usize {
        self.hosts.len()
    }

    /// Seconds since the lab was built, for log lines.
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn log(&self, msg: impl AsRef<str>) {
        eprintln!("[{} {:7.2}s] {}", self.name, self.t(), msg.as_ref());
    }

    // -------------------------------------------------------- vx6 CLI

    fn vx6_cmd(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(i).ns, VX6, "--home"])
            .arg(self.home(i))
            .args(args)
            .env_remove("VX6_HOME")
            .stdin(Stdio::null());
        c
    }

    /// Runs `vx6 --home <home of i> ARGS` inside host `i`; never hangs longer
    /// than a minute.
    pub fn vx6(&self, i: usize, args: &[&str]) -> Out {
        let t = Instant::now();
        let mut child = self
            .vx6_cmd(i, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vx6");
        let mut so = child.stdout.take().expect("stdout");
        let mut se = child.stderr.take().expect("stderr");
        let ro = thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        let re = thread::spawn(move || {
            let mut s = String::new();
            let _ = se.read_to_string(&mut s);
            s
        });
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait vx6") {
                break st;
            }
            if t.elapsed() > CLI_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "host {i}: `vx6 {}` did not finish within {CLI_TIMEOUT:?}",
                    args.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        Out {
            status,
            stdout: ro.join().unwrap_or_default(),
            stderr: re.join().unwrap_or_default(),
        }
    }

    /// Like [`Lab::vx6`] but panics unless it succeeds; returns stdout.
    pub fn vx6_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.vx6(i, args);
        assert!(
            out.ok(),
            "host {i}: `vx6 {}` failed: {}",
            args.join(" "),
            out.describe()
        );
        out.stdout
    }

    /// `vx6 init --name NAME --listen ... EXTRA...` on host `i`.
    pub fn init(&self, i: usize, name: &str, listen: &str, extra: &[&str]) -> Out {
        let mut args = vec!["init", "--name", name, "--listen", listen];
        args.extend_from_slice(extra);
        let out = self.vx6(i, &args);
        assert!(out.ok(), "host {i}: init failed: {}", out.describe());
        out
    }

    /// Host `i`'s node id (works with or without a daemon).
    pub fn node_id(&self, i: usize) -> String {
        let v = self.vx6(i, &["identity", "--json"]).json();
        v["node_id"].as_str().expect("node_id").to_string()
    }

    pub fn status(&self, i: usize) -> Value {
        self.vx6(i, &["status", "--json"]).json()
    }

    /// `status --json` if the daemon answers.
    pub fn try_status(&self, i: usize) -> Option<Value> {
        let out = self.vx6(i, &["status", "--json"]);
        out.ok().then(|| out.json())
    }

    // -------------------------------------------------------- daemons

    /// Starts `vx6 node` on host `i` (debug logs appended to its log file)
    /// and waits until its control socket answers.
    pub fn start_node(&self, i: usize) -> u32 {
        let log_path = self.log_path(i);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let _ = writeln!(
            log,
            "==== [{:.2}s] netlab: starting vx6 node ====",
            self.t()
        );
        let err = log.try_clone().expect("log clone");
        let child = self
            .vx6_cmd(i, &["node"])
            .env("VX6_LOG", "debug")
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn vx6 node");
        let pid = child.id();
        let prev = lock(&self.daemons).insert(
            i,
            Daemon {
                child,
                started: Instant::now(),
            },
        );
        assert!(prev.is_none(), "host {i} already runs a daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.daemon_exit(i) {
                panic!(
                    "host {i}: vx6 node exited at start ({}); log:\n{}",
                    exit_text(&st),
                    tail(&log_path, 30)
                );
            }
            if self.vx6(i, &["status", "--json"]).ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "host {i}: vx6 node did not answer on its control socket within 30 s; log:\n{}",
                tail(&log_path, 30)
            );
            thread::sleep(Duration::from_millis(50));
        }
        self.log(format!("host {i}: vx6 node running, pid {pid}"));
        pid
    }

    /// The daemon's pid on host `i`, if one was started and not reaped.
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        lock(&self.daemons).get(&i).map(|d| d.child.id())
    }

    /// `Some(status)` if host `i`'s daemon has exited.
    pub fn daemon_exit(&self, i: usize) -> Option<ExitStatus> {
        lock(&self.daemons)
            .get_mut(&i)
            .and_then(|d| d.child.try_wait().ok().flatten())
    }

    /// Whether host `i`'s daemon process is still running.
    pub fn daemon_alive(&self, i: usize) -> bool {
        lock(&self.daemons)
            .get_mut(&i)
            .is_some_and(|d| matches!(d.child.try_wait(), Ok(None)))
    }

    /// SIGKILLs host `i`'s daemon and reaps it.
    pub fn kill9(&self, i: usize) {
        let d = lock(&self.daemons).remove(&i);
        let Some(mut d) = d else {
            panic!("host {i} runs no daemon");
        };
        let _ = d.child.kill();
        let _ = d.child.wait();
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log_path(i))
            .and_then(|mut f| {
                writeln!(
                    f,
                    "==== [{:.2}s] netlab: kill -9 (ran {:.1}s) ====",
                    self.t(),
                    d.started.elapsed().as_secs_f64()
                )
            });
        self.log(format!("host {i}: daemon killed with SIGKILL"));
    }

    /// Spawns a long-running `vx6 ARGS` (e.g. a foreground connect) on host
    /// `i`; it is killed at teardown. Output goes to a file in the host dir.
    pub fn spawn_vx6(&self, i: usize, args: &[&str], tag: &str) -> u32 {
        let path = self.host_dir(i).join(format!("{tag}.out"));
        let f = File::create(&path).expect("out file");
        let e = f.try_clone().expect("clone");
        let child = self
            .vx6_cmd(i, args)
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(e))
            .spawn()
            .expect("spawn vx6");
        let pid = child.id();
        lock(&self.others).push(child);
        pid
    }

    // -------------------------------------------------------- network

    /// `ip -6 addr replace ADDR/16 dev eth0 nodad` in host `i`.
    pub fn addr_replace(&self, i: usize, addr: Ipv6Addr) {
        ip_ok(&[
            "-n",
            &self.host(i).ns,
            "-6",
            "addr",
            "replace",
            &format!("{addr}/16"),
            "dev",
            "eth0",
            "nodad",
        ]);
    }

    /// `ip -6 addr del ADDR/16 dev eth0` in host `i`.
    pub fn addr_del(&self, i: usize, addr: Ipv6Addr) {
        ip_ok(&[
            "-n",
            &self.host(i).ns,
            "-6",
            "addr",
            "del",
            &format!("{addr}/16"),
            "dev",
            "eth0",
        ]);
    }

    /// Cuts host `i` off the bridge (partition) or reconnects it.
    pub fn link(&self, i: usize, up: bool) {
        ip_ok(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.host(i).veth,
            if up { "up" } else { "down" },
        ]);
    }

    // -------------------------------------------------------- servers

    /// Serves 127.0.0.1:`port` inside host `i`, one thread per connection
    /// running `handler`, until the lab is dropped.
    pub fn serve(
        &self,
        i: usize,
        port: u16,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> SocketAddr {
        let listener = self
            .host(i)
            .run(move || TcpListener::bind(("127.0.0.1", port)))
            .unwrap_or_else(|e| panic!("host {i}: cannot listen on 127.0.0.1:{port}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = self.stop.clone();
        let handler = Arc::new(handler);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let h = handler.clone();
                        thread::spawn(move || h(s));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        addr
    }

    /// An echo server on 127.0.0.1:`port` in host `i` (half-close aware).
    pub fn echo_server(&self, i: usize, port: u16) -> SocketAddr {
        self.serve(i, port, echo)
    }

    /// Writes `tag\n` first, then echoes: tells a client which host it reached.
    pub fn tag_server(&self, i: usize, port: u16, tag: &str) -> SocketAddr {
        let tag = format!("{tag}\n");
        self.serve(i, port, move |mut s| {
            if s.write_all(tag.as_bytes()).is_ok() {
                echo(s);
            }
        })
    }

    /// Streams random bytes to every client until it goes away (a
    /// download that never ends).
    pub fn source_server(&self, i: usize, port: u16) -> SocketAddr {
        self.serve(i, port, |mut s| {
            let chunk = random_bytes(64 * 1024);
            while s.write_all(&chunk).is_ok() {}
        })
    }

    /// A listener that only records that someone connected (and how many
    /// bytes arrived); it never answers.
    pub fn recording_listener(&self, i: usize, port: u16) -> Arc<Recorder> {
        let rec = Arc::new(Recorder::default());
        let r = rec.clone();
        self.serve(i, port, move |mut s| {
            r.connections.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                r.bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        });
        rec
    }
}

/// Copies everything back until EOF, then half-closes.
pub fn echo(s: TcpStream) {
    let Ok(mut r) = s.try_clone() else { return };
    let mut w = s;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = w.shutdown(Shutdown::Write);
}

/// What a [`Lab::recording_listener`] saw.
#[derive(Default, Debug)]
pub struct Recorder {
    pub connections: AtomicUsize,
    pub bytes: AtomicU64,
}

impl Recorder {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failing = thread::panicking();
        self.stop.store(true, Ordering::Relaxed);
        if failing {
            let mut idx: Vec<usize> = (1..=self.hosts.len()).collect();
            idx.retain(|i| self.log_path(*i).exists());
            for i in idx {
                let state = match self.daemon_exit(i) {
                    Some(st) => format!("daemon exited unexpectedly: {}", exit_text(&st)),
                    None if self.daemon_pid(i).is_some() => "daemon running".to_string(),
                    None => "no daemon".to_string(),
                };
                eprintln!(
                    "\n---- netlab {}: host {i} ({}), {state}; node log, last lines ----\n{}",
                    self.name,
                    self.host(i).addr,
                    tail(&self.log_path(i), 40)
                );
            }
        }
        for (_, mut d) in lock(&self.daemons).drain() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        for mut c in lock(&self.others).drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let created = lock(&self.created).clone();
        for ns in created.iter().rev() {
            // Anything still running inside (e.g. a stray CLI) goes too.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if pid.parse::<u32>().is_ok() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
            }
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netlab teardown: {e}");
            }
        }
        if std::env::var("VX6_NETLAB_KEEP").is_ok_and(|v| v == "1")
            && let Some(d) = self.dir.take()
        {
            eprintln!("netlab {}: kept {}", self.name, d.keep().display());
        }
    }
}

/// Deletes lab namespaces left behind by a test process that no longer
/// exists (one killed before its teardown ran) and that hold no process.
/// Namespaces of live test processes, and any with processes inside, are
/// left alone.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns
            .strip_prefix("vx6t")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let empty = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii().is_empty());
        if empty && ip(&["netns", "del", ns]).is_ok() {
            eprintln!("netlab: removed stale namespace {ns}");
        }
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return format!("(no file {})", path.display());
    };
    let lines: Vec<String> = io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

// ------------------------------------------------------------ helpers

/// Polls `f` until it returns `Ok`, panicking with its last error after
/// `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut last;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Like [`wait_until`] but returns the last error instead of panicking.
pub fn poll_until<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        let r = f();
        if r.is_ok() || start.elapsed() >= timeout {
            return r;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Resident memory of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    vx6_proto::identity::fill_random(&mut v);
    v
}

/// A small non-cryptographic PRNG for choices (sizes, orders).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn seeded() -> (Self, u64) {
        let mut b = [0u8; 8];
        vx6_proto::identity::fill_random(&mut b);
        let seed = u64::from_le_bytes(b);
        (Self::new(seed), seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Sends `payload` through `s` while reading the echo on another thread;
/// half-closes after writing and requires the echo to match byte for byte
/// and end with EOF. Returns the seconds taken.
pub fn echo_exchange(
    s: TcpStream,
    payload: Arc<Vec<u8>>,
    timeout: Duration,
) -> Result<f64, String> {
    let t = Instant::now();
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let p = payload.clone();
    let writer = thread::spawn(move || -> Result<(), String> {
        for chunk in p.chunks(256 * 1024) {
            w.write_all(chunk).map_err(|e| format!("write: {e}"))?;
        }
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))
    });
    let mut r = s;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let read_result = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if got + n > payload.len() {
                    break Err(format!(
                        "echo longer than sent: {} > {}",
                        got + n,
                        payload.len()
                    ));
                }
                if buf[..n] != payload[got..got + n] {
                    let off = (0..n).find(|k| buf[*k] != payload[got + k]).unwrap_or(0);
                    break Err(format!("echo differs at byte {}", got + off));
                }
                got += n;
            }
            Err(e) => break Err(format!("read after {got} bytes: {e}")),
        }
    };
    let wr = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    read_result?;
    wr?;
    if got != payload.len() {
        return Err(format!("echo ended after {got} of {} bytes", payload.len()));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Connects to a forward's port in `host` and checks an echo of `payload`.
pub fn echo_via(
    host: &Host,
    port: u16,
    payload: Arc<Vec<u8>>,
    timeout: Duration,
) -> Result<f64, String> {
    let s = host
        .local(port, Duration::from_secs(5))
        .map_err(|e| format!("connect 127.0.0.1:{port} in {}: {e}", host.ns))?;
    echo_exchange(s, payload, timeout)
}

/// Connects to a forward's port, reads the tag line a [`Lab::tag_server`]
/// sends, checks a short echo, and returns the tag.
pub fn tag_via(host: &Host, port: u16) -> Result<String, String> {
    let s = host
        .local(port, Duration::from_secs(5))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let mut r = io::BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("reading the tag: {e}"))?;
    if !line.ends_with('\n') {
        return Err(format!("no tag line (got {line:?}): connection closed"));
    }
    let mut w = s;
    w.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; 4];
    r.read_exact(&mut back)
        .map_err(|e| format!("reading the echo: {e}"))?;
    if &back != b"ping" {
        return Err(format!("bad echo {back:?}"));
    }
    Ok(line.trim().to_string())
}

/// Reads from `s` until EOF or error and returns (bytes, how it ended,
/// seconds); gives up after `timeout` with "timeout".
pub fn drain(mut s: TcpStream, timeout: Duration) -> (u64, String, f64) {
    let t = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut n = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (n, "eof".into(), t.elapsed().as_secs_f64()),
            Ok(k) => n += k as u64,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                if t.elapsed() >= timeout {
                    return (n, "timeout".into(), t.elapsed().as_secs_f64());
                }
            }
            Err(e) => return (n, format!("error: {e}"), t.elapsed().as_secs_f64()),
        }
    }
}

/// Extracts a number at a JSON pointer, 0 when absent.
pub fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

// ------------------------------------------------------------ probe

/// A raw vx6 peer with a fresh identity, for speaking the wire protocol to
/// a node directly (forged records, raw streams, hostile frames). Create
/// and use it inside [`Host::run_async`].
pub struct Probe {
    pub key: vx6_proto::NodeKeypair,
    pub transports: vx6_net::transport::Transports,
}

impl Probe {
    pub async fn new() -> Probe {
        use vx6_net::transport::{NetConfig, Transports};
        use vx6_proto::record::TransportKind;
        let key = vx6_proto::NodeKeypair::generate();
        let transports = Transports::bind(
            &key,
            &[],
            &[TransportKind::Tcp, TransportKind::Quic],
            NetConfig::default(),
        )
        .await
        .expect("probe transports");
        Probe { key, transports }
    }

    pub fn id(&self) -> vx6_proto::NodeId {
        self.key.node_id()
    }

    /// An authenticated connection to whatever node listens at `addr`.
    pub async fn conn(
        &self,
        transport: vx6_proto::record::TransportKind,
        addr: SocketAddr,
    ) -> Result<vx6_net::transport::Conn, String> {
        use vx6_net::transport::Expect;
        use vx6_proto::record::Endpoint;
        self.transports
            .dial(Endpoint { transport, addr }, Expect::AnyKey)
            .await
            .map_err(|e| format!("probe dial {transport}/{addr}: {e}"))
    }

    /// A channel (stream multiplexer) to the node at `addr`. Streams the
    /// node opens towards the probe are refused.
    pub async fn channel(
        &self,
        transport: vx6_proto::record::TransportKind,
        addr: SocketAddr,
    ) -> Result<vx6_net::channel::Channel, String> {
        use vx6_net::channel::{Channel, ChannelConfig, Role};
        let conn = self.conn(transport, addr).await?;
        let (chan, mut incoming) = Channel::spawn(conn, Role::Dialer, ChannelConfig::default());
        tokio::spawn(async move {
            while let Some(s) = incoming.accept().await {
                let mut send = s.send;
                send.reset(vx6_proto::link::code::REFUSED);
            }
        });
        Ok(chan)
    }
}

/// One DHT request over `chan`.
pub async fn dht_request(
    chan: &vx6_net::channel::Channel,
    req: &vx6_proto::dhtmsg::Request,
) -> Result<vx6_proto::dhtmsg::Response, String> {
    use vx6_proto::dhtmsg::{MAX_DHT_MESSAGE_LEN, Response};
    use vx6_proto::nodemsg::Purpose;
    let body = req.encode().map_err(|e| format!("encode: {e}"))?;
    let raw = chan
        .request(
            bytes::Bytes::from(Purpose::Dht.encode()),
            bytes::Bytes::from(body),
            MAX_DHT_MESSAGE_LEN,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| format!("dht request: {e}"))?;
    Response::decode(&raw).map_err(|e| format!("dht response: {e}"))
}

/// The values `chan`'s node holds under `key` (FIND_VALUE).
pub async fn find_value(
    chan: &vx6_net::channel::Channel,
    key: vx6_proto::dhtmsg::DhtKey,
) -> Result<Vec<Vec<u8>>, String> {
    use vx6_proto::dhtmsg::{Request, Response};
    match dht_request(chan, &Request::FindValue { key }).await? {
        Response::Value { values, .. } => Ok(values),
        Response::Nodes(_) => Ok(Vec::new()),
        other => Err(format!("unexpected answer to FIND_VALUE: {other:?}")),
    }
}
