//! Crash safety of the node's local state: a child process (this test binary,
//! re-executed) edits the TOML state, rewrites files atomically and writes the
//! database in a loop; the parent kills it with SIGKILL at random moments and
//! checks after each kill that every file parses, the database opens, its
//! contents are consistent, and nothing durable went backwards.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vx6_node::config::{Config, ServiceEntry, edit_services, load_pins, load_services};
use vx6_node::db::{Db, Health};
use vx6_node::home::{Home, StateError, atomic_write};
use vx6_proto::NodeId;
use vx6_proto::name::ServiceName;

const CHILD_ENV: &str = "VX6_STATE_CRASH_CHILD";
const KILLS: usize = 20;
const BLOB_LEN: usize = 64 * 1024;

fn node(i: u64) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&i.to_be_bytes());
    NodeId::from_bytes(b)
}

/// A record whose bytes say which seq they belong to.
fn record_bytes(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().repeat(16)
}

/// A file whose every byte can be checked: an 8-byte counter, then the
/// counter's low byte repeated.
fn blob(n: u64) -> Vec<u8> {
    let mut v = n.to_be_bytes().to_vec();
    v.resize(BLOB_LEN, n as u8);
    v
}

fn check_blob(bytes: &[u8]) -> u64 {
    assert_eq!(bytes.len(), BLOB_LEN, "blob has a partial length");
    let n = u64::from_be_bytes(bytes[..8].try_into().unwrap());
    assert!(
        bytes[8..].iter().all(|&b| b == n as u8),
        "blob {n} has mixed contents"
    );
    n
}

fn dht_generation(g: u64) -> Vec<([u8; 32], u8, Vec<u8>)> {
    (0..(g % 7 + 1))
        .map(|i| ([i as u8; 32], (i % 3) as u8, g.to_be_bytes().repeat(4)))
        .collect()
}

/// The child: loops forever over every kind of write, announcing each
/// durable `next_seq` value on stdout.
fn child_main(root: &Path) -> ! {
    let home = Home::new(root);
    let lock = home.lock_daemon().expect("child takes the daemon lock");
    let db = Db::open(&home.db_path()).expect("child opens the db");
    let mut out = std::io::stdout().lock();
    // libtest has printed "test crash_child ... " without a newline.
    writeln!(out, "\nREADY").unwrap();
    out.flush().unwrap();
    let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    for n in 0u64.. {
        let seq = db.next_seq("crash", 0).unwrap();
        writeln!(out, "SEQ {seq}").unwrap();
        out.flush().unwrap();

        let name: ServiceName = format!("s{}", n % 40).parse().unwrap();
        edit_services(&home, |s| {
            let mut e = ServiceEntry::new(SocketAddr::new(target.ip(), 1 + (n % 60_000) as u16));
            e.private = n % 2 == 0;
            if n % 3 == 0 {
                s.remove(&name);
            } else {
                s.insert(&name, e);
            }
            Ok(())
        })
        .unwrap();

        atomic_write(&root.join("blob"), &blob(n), 0o600).unwrap();
        let mut cfg = home.load_config().unwrap();
        cfg.relay.max_circuits = (n % 1000) as u32;
        cfg.save(&home.config_path()).unwrap();

        let items: Vec<(NodeId, u64, Vec<u8>)> = (0..5)
            .map(|i| (node((n + i) % 50), seq, record_bytes(seq)))
            .collect();
        let refs: Vec<(NodeId, u64, &[u8])> = items
            .iter()
            .map(|(a, b, c)| (*a, *b, c.as_slice()))
            .collect();
        db.put_node_records(&refs).unwrap();
        db.record_peer_contact(
            SocketAddr::from(([10, 0, 0, (n % 200) as u8], 4242)),
            node(n % 50),
            seq,
            n % 4 != 0,
        )
        .unwrap();
        db.replace_dht_values(&dht_generation(seq)).unwrap();
        db.put_health(
            &node(n % 30),
            &Health {
                successes: seq as u32,
                failures: 0,
                rtt_ms: 1,
                last: seq,
            },
        )
        .unwrap();
    }
    drop(lock);
    unreachable!()
}

/// Not a test of its own: the entry point of the re-executed child.
#[test]
fn crash_child() {
    if let Some(root) = std::env::var_os(CHILD_ENV) {
        child_main(Path::new(&root));
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn spawn_child(
    root: &Path,
) -> (
    std::process::Child,
    Arc<Mutex<Option<u64>>>,
    std::thread::JoinHandle<()>,
) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let last = Arc::new(Mutex::new(None));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let last2 = last.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line == "READY" {
                let _ = ready_tx.send(());
            } else if let Some(s) = line.strip_prefix("SEQ ") {
                *last2.lock().unwrap() = Some(s.parse().unwrap());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("child did not start");
    (child, last, reader)
}

fn check_state(home: &Home, last_seq: Option<u64>, round: usize) {
    let root = home.root();
    // Every file parses.
    let cfg = home
        .load_config()
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
    assert_eq!(cfg.name, "crash");
    let services = load_services(home).unwrap_or_else(|e| panic!("round {round}: {e}"));
    assert!(services.len() <= 40);
    load_pins(home).unwrap();
    match std::fs::read(root.join("blob")) {
        Ok(b) => {
            check_blob(&b);
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
    home.load_identity().unwrap();
    // The daemon lock died with the child.
    let lock = home
        .lock_daemon()
        .unwrap_or_else(|e| panic!("round {round}: lock not released: {e}"));

    // The database opens and is consistent.
    let db = Db::open(&home.db_path()).unwrap_or_else(|e| panic!("round {round}: {e}"));
    let records = db.node_records().unwrap();
    assert!(records.len() <= 50);
    for (id, bytes) in &records {
        let seq = db.node_record_seq(id).unwrap().unwrap();
        assert_eq!(
            bytes,
            &record_bytes(seq),
            "round {round}: record bytes do not match its seq"
        );
        if let Some(last) = last_seq {
            assert!(
                seq <= last + 1,
                "round {round}: record seq {seq} from the future (last {last})"
            );
        }
    }
    let dht = db.dht_values().unwrap();
    if let Some((_, _, first)) = dht.first() {
        let g = u64::from_be_bytes(first[..8].try_into().unwrap());
        assert_eq!(
            dht,
            {
                let mut want = dht_generation(g);
                want.sort();
                want.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
                want
            },
            "round {round}: DHT store mixes generations"
        );
    }
    for p in db.peers().unwrap() {
        assert!(p.last_ok <= last_seq.unwrap_or(0) + 1);
    }
    for (_, h) in db.health().unwrap() {
        assert_eq!(u64::from(h.successes), h.last);
    }
    // A seq the child saw committed is never handed out again.
    let next = db.next_seq("crash", 0).unwrap();
    if let Some(last) = last_seq {
        assert!(
            next > last,
            "round {round}: next_seq {next} did not move past {last}"
        );
    }
    drop(db);
    drop(lock);
}

#[test]
fn state_survives_kill_9_at_random_moments() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    home.init(&Config::new("crash".parse().unwrap())).unwrap();

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut prev_seq: Option<u64> = None;
    let start = Instant::now();
    for round in 0..KILLS {
        let (mut child, last, reader) = spawn_child(home.root());
        // While the child runs, the home is taken.
        assert!(matches!(
            home.lock_daemon(),
            Err(StateError::AlreadyRunning { .. })
        ));
        std::thread::sleep(Duration::from_millis(1 + rng.below(150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let last_seq = *last.lock().unwrap();
        if let (Some(p), Some(l)) = (prev_seq, last_seq) {
            assert!(l > p, "round {round}: seqs went backwards");
        }
        check_state(&home, last_seq.or(prev_seq), round);
        prev_seq = last_seq.or(prev_seq);
    }
    assert!(prev_seq.is_some(), "the child never got to write");
    eprintln!(
        "{KILLS} kills in {:?}, last seq {prev_seq:?}",
        start.elapsed()
    );
    // Nothing but the expected files (and at most a crash temporary per kill).
    let stray: Vec<PathBuf> = std::fs::read_dir(home.root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".vx6tmp"))
        .collect();
    assert!(stray.len() <= KILLS, "{stray:?}");
}

#[test]
fn public_api_round_trip() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path());
    let key = home.init(&Config::new("alice".parse().unwrap())).unwrap();
    assert_eq!(home.load_identity().unwrap().node_id(), key.node_id());
    let web: ServiceName = "web".parse().unwrap();
    edit_services(&home, |s| {
        Ok(s.insert(&web, ServiceEntry::new("[::1]:8080".parse().unwrap())))
    })
    .unwrap();
    assert_eq!(
        load_services(&home).unwrap().get(&web).unwrap().target,
        "[::1]:8080".parse().unwrap()
    );
    let lock = home.lock_daemon().unwrap();
    let db = Db::open(&home.db_path()).unwrap();
    assert!(db.put_node_record(&key.node_id(), 1, b"rec").unwrap());
    drop(db);
    drop(lock);
    let db = Db::open(&home.db_path()).unwrap();
    assert_eq!(db.get_node_record(&key.node_id()).unwrap().unwrap(), b"rec");
}
