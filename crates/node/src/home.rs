//! The node's home directory: its layout, the identity file, the daemon lock,
//! atomic file writes, and [`StateError`], the error type of all local state
//! ([`home`](self), [`config`](crate::config), [`db`](crate::db)).
//!
//! # Layout
//!
//! ```text
//! HOME/                 mode 0700
//!   identity.key        mode 0600, the node's Ed25519 secret (format below)
//!   config.toml         mode 0600, settings (crate::config::Config)
//!   services.toml       mode 0600, published services and their localhost targets
//!   pins.toml           mode 0600, pinned node ids (like ssh known_hosts)
//!   *.toml.lock         advisory locks serialising read-modify-write of a TOML file
//!   state.redb          the daemon's database of learned state (crate::db)
//!   control.sock        the control API socket (owned by the control module)
//!   node.lock           held (flock) by the running daemon for its whole life
//! ```
//!
//! # Identity file format (`identity.key`)
//!
//! Three lines of ASCII text, each ending in `\n`, nothing else:
//!
//! ```text
//! vx6-identity-v1
//! secret <64 lowercase hex digits: the 32-byte Ed25519 seed>
//! node <the node id, 52 lowercase base32 characters>
//! ```
//!
//! The `node` line is redundant on purpose: loading recomputes the id from the
//! seed and refuses the file if they differ, so a damaged seed is reported as
//! corruption instead of silently becoming another identity. The file is
//! refused when group or others may read it (as ssh does).
//!
//! # Guarantees
//!
//! Every file here is replaced with [`atomic_write`], so a reader (or a node
//! restarting after `kill -9`) sees either the old or the new contents, never
//! a mix. This module never deletes or overwrites an identity.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use vx6_proto::{NodeId, NodeKeypair};
use zeroize::Zeroizing;

use crate::config::Config;

/// Mode of the home directory when this module creates it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file this module writes (they hold secrets or private targets).
pub const FILE_MODE: u32 = 0o600;

const IDENTITY_HEADER: &str = "vx6-identity-v1";
/// An identity file is three short lines; anything bigger is not one.
const MAX_IDENTITY_FILE_LEN: u64 = 512;
/// Marker in the names of [`atomic_write`]'s temporary files.
const TEMP_MARKER: &str = ".vx6tmp";
/// A temporary file older than this can only be left over from a crash.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

/// Errors from the node's local state: home, identity, config, user state, database.
///
/// Each message is one sentence saying what is wrong and what to do. Grouped
/// by what the caller does next:
/// - the user must act on the home: [`NotInitialized`](Self::NotInitialized),
///   [`IdentityExists`](Self::IdentityExists), [`IdentityPermissions`](Self::IdentityPermissions),
///   [`CorruptIdentity`](Self::CorruptIdentity), [`Parse`](Self::Parse),
///   [`InvalidField`](Self::InvalidField), [`CorruptDb`](Self::CorruptDb);
/// - another process holds the home: [`AlreadyRunning`](Self::AlreadyRunning),
///   [`DbBusy`](Self::DbBusy);
/// - a request was refused (message for the user): [`Invalid`](Self::Invalid),
///   [`PinMismatch`](Self::PinMismatch);
/// - the system failed: [`Io`](Self::Io), [`Db`](Self::Db);
/// - the caller broke a documented limit (a bug): [`TooLarge`](Self::TooLarge).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file the node needs is missing: the home was never initialised.
    #[error("{} does not exist: run 'vx6 init --name NAME' to set up this node home", .0.display())]
    NotInitialized(PathBuf),
    #[error("identity already exists at {}; refusing to overwrite it", .0.display())]
    IdentityExists(PathBuf),
    #[error(
        "identity file {path} can be read by other users (mode {mode:03o}); run 'chmod 600 {path}' and retry",
        path = .path.display()
    )]
    IdentityPermissions { path: PathBuf, mode: u32 },
    #[error(
        "identity file {} is corrupt ({why}); restore it from a backup, or move it away and run 'vx6 init' to create a new identity",
        .path.display()
    )]
    CorruptIdentity { path: PathBuf, why: String },
    #[error(
        "a node is already running in {}{}; stop it first or use another --home",
        .home.display(),
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    AlreadyRunning { home: PathBuf, pid: Option<u32> },
    /// A TOML file does not parse; `line`/`column` are 1-based (0 when unknown).
    #[error("cannot parse {} at line {line}, column {column}: {message}; fix or remove the file", .path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A TOML file parses but a value is not acceptable.
    #[error("invalid '{field}' in {}: {why}", .path.display())]
    InvalidField {
        path: PathBuf,
        field: String,
        why: String,
    },
    /// A request refused with a message meant for the user (a whole sentence).
    #[error("{0}")]
    Invalid(String),
    /// A node answered with a different id than the one pinned for it.
    #[error(
        "{what} is pinned to node {pinned} but presented node {seen}; if this change is expected, remove the pin from pins.toml"
    )]
    PinMismatch {
        what: String,
        pinned: NodeId,
        seen: NodeId,
    },
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "registry database {} is in use by another process; stop the node using this home, or use another --home",
        .0.display()
    )]
    DbBusy(PathBuf),
    #[error(
        "registry database {} is corrupt ({why}); move it away and restart the node, which relearns it from the network",
        .path.display()
    )]
    CorruptDb { path: PathBuf, why: String },
    #[error("registry database {} failed: {source}", .path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("{what} is {len} bytes or items, over the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

impl StateError {
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------
// Atomic writes
// ---------------------------------------------------------------------------

/// Replaces `path` with `bytes` so that no reader ever sees a partial file,
/// even if the process is killed (`kill -9`) or the machine loses power at any
/// moment.
///
/// Writes a uniquely named temporary file in the same directory (created with
/// `O_EXCL` and `mode`), fsyncs it, renames it over `path`, then fsyncs the
/// directory so the rename itself is durable. The final file has exactly
/// `mode` (the umask does not apply). A crash can leave one temporary file
/// behind (`.NAME.PID.N.vx6tmp`); [`Home::lock_daemon`] sweeps old ones.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, tmp, file) = create_temp_beside(path, mode)?;
    let result = write_sync_rename(file, &tmp, path, bytes).and_then(|()| sync_dir(&dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_sync_rename(mut file: File, tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)
}

/// Like [`atomic_write`] but fails with `AlreadyExists` instead of replacing
/// an existing `path` (publishes with `link(2)`, which never overwrites).
fn atomic_create_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, tmp, mut file) = create_temp_beside(path, mode)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    sync_dir(&dir)
}

fn create_temp_beside(path: &Path, mode: u32) -> io::Result<(PathBuf, PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{n}{TEMP_MARKER}", std::process::id()));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => {
                // The umask may have cleared bits of `mode`; set it exactly.
                if let Err(e) = file.set_permissions(Permissions::from_mode(mode)) {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                return Ok((dir, tmp, file));
            }
            // Left over by a crashed process that had our pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes [`atomic_write`] temporaries in `dir` older than `min_age` (left by
/// a crash). Best effort: errors are ignored. Returns how many were removed.
pub fn sweep_stale_temp_files(dir: &Path, min_age: Duration) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with('.') && name.ends_with(TEMP_MARKER)) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age >= min_age);
        if old && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

// ---------------------------------------------------------------------------
// Home
// ---------------------------------------------------------------------------

/// A node's home directory (`--home` / `VX6_HOME`). Cheap to clone; creating
/// one touches nothing on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default home: `$VX6_HOME`, else `$XDG_DATA_HOME/vx6` (when absolute),
    /// else `$HOME/.local/share/vx6`, else `.vx6` in the current directory.
    pub fn default_root() -> PathBuf {
        let var = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(p) = var("VX6_HOME") {
            return p;
        }
        if let Some(p) = var("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
            return p.join("vx6");
        }
        if let Some(p) = var("HOME") {
            return p.join(".local/share/vx6");
        }
        PathBuf::from(".vx6")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.key")
    }
    pub fn services_path(&self) -> PathBuf {
        self.root.join("services.toml")
    }
    pub fn pins_path(&self) -> PathBuf {
        self.root.join("pins.toml")
    }
    pub fn db_path(&self) -> PathBuf {
        self.root.join("state.redb")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("node.lock")
    }

    /// Sets up a new node home: creates the directory (mode 0700) if missing,
    /// generates the identity, writes `config.toml`, and creates empty
    /// `services.toml` / `pins.toml` unless they exist.
    ///
    /// Refuses with [`StateError::IdentityExists`] when an identity is already
    /// there, without touching anything. The identity is written last and
    /// never replaces a file, so a crash half-way leaves a home that `init`
    /// can simply be run on again. Holds the daemon lock meanwhile, so it
    /// cannot race a running node or another `init`.
    pub fn init(&self, cfg: &Config) -> Result<NodeKeypair, StateError> {
        let config_path = self.config_path();
        let id_path = self.identity_path();
        cfg.validate(&config_path)?;
        if fs::symlink_metadata(&id_path).is_ok() {
            return Err(StateError::IdentityExists(id_path));
        }
        self.create_root()?;
        let _lock = self.lock_daemon()?;
        if fs::symlink_metadata(&id_path).is_ok() {
            return Err(StateError::IdentityExists(id_path));
        }
        for path in [self.services_path(), self.pins_path()] {
            if fs::symlink_metadata(&path).is_err() {
                atomic_write(&path, b"", FILE_MODE).map_err(StateError::io("write", &path))?;
            }
        }
        cfg.save(&config_path)?;
        let keypair = NodeKeypair::generate();
        let text = encode_identity(&keypair);
        match atomic_create_new(&id_path, text.as_bytes(), FILE_MODE) {
            Ok(()) => Ok(keypair),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(StateError::IdentityExists(id_path))
            }
            Err(e) => Err(StateError::io("write", &id_path)(e)),
        }
    }

    fn create_root(&self) -> Result<(), StateError> {
        match DirBuilder::new()
            .recursive(false)
            .mode(DIR_MODE)
            .create(&self.root)
        {
            Ok(()) => {
                // Exactly 0700 whatever the umask.
                fs::set_permissions(&self.root, Permissions::from_mode(DIR_MODE))
                    .map_err(StateError::io("set permissions on", &self.root))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.root.is_dir() => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Parents missing: create them with default modes, the home itself 0700.
                if let Some(parent) = self.root.parent() {
                    fs::create_dir_all(parent).map_err(StateError::io("create", parent))?;
                }
                DirBuilder::new()
                    .mode(DIR_MODE)
                    .create(&self.root)
                    .and_then(|()| {
                        fs::set_permissions(&self.root, Permissions::from_mode(DIR_MODE))
                    })
                    .map_err(StateError::io("create", &self.root))
            }
            Err(e) => Err(StateError::io("create", &self.root)(e)),
        }
    }

    /// Loads the node's keypair from `identity.key`.
    ///
    /// Missing → [`StateError::NotInitialized`]; readable by group or others →
    /// [`StateError::IdentityPermissions`]; damaged in any way (header, seed,
    /// node id check, extra bytes) → [`StateError::CorruptIdentity`].
    pub fn load_identity(&self) -> Result<NodeKeypair, StateError> {
        let path = self.identity_path();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotInitialized(path));
            }
            Err(e) => return Err(StateError::io("open", &path)(e)),
        };
        let meta = file.metadata().map_err(StateError::io("read", &path))?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StateError::IdentityPermissions { path, mode });
        }
        if !meta.is_file() {
            return Err(StateError::CorruptIdentity {
                path,
                why: "not a regular file".into(),
            });
        }
        let mut text = Zeroizing::new(Vec::new());
        (&mut file)
            .take(MAX_IDENTITY_FILE_LEN + 1)
            .read_to_end(&mut text)
            .map_err(StateError::io("read", &path))?;
        decode_identity(&text).map_err(|why| StateError::CorruptIdentity {
            path,
            why: why.into(),
        })
    }

    /// Loads and validates `config.toml`.
    pub fn load_config(&self) -> Result<Config, StateError> {
        Config::load(&self.config_path())
    }

    /// Takes the daemon lock (`node.lock`) without waiting, or fails with
    /// [`StateError::AlreadyRunning`] when another process (or another handle
    /// in this process) holds it.
    ///
    /// Hold the returned guard for the daemon's whole life. The lock is an
    /// `flock(2)` on an open file, so the kernel releases it when the process
    /// exits in any way, `kill -9` included: there are no stale locks. The
    /// lock file holds the owner's pid for messages only. Also sweeps
    /// temporary files left by crashed writes.
    pub fn lock_daemon(&self) -> Result<DaemonLock, StateError> {
        let path = self.lock_path();
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotInitialized(self.root.clone()));
            }
            Err(e) => return Err(StateError::io("open", &path)(e)),
        };
        match try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => {
                let mut s = String::new();
                let _ = (&mut file).take(32).read_to_string(&mut s);
                let pid = s.trim().parse().ok();
                return Err(StateError::AlreadyRunning {
                    home: self.root.clone(),
                    pid,
                });
            }
            Err(e) => return Err(StateError::io("lock", &path)(e)),
        }
        // Record our pid (diagnostics only; the lock is the flock).
        let _ = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        sweep_stale_temp_files(&self.root, STALE_TEMP_AGE);
        Ok(DaemonLock { _file: file, path })
    }
}

/// The daemon lock; released when dropped or when the process dies.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
    path: PathBuf,
}

impl DaemonLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when someone else holds it.
// std's file locks are stable since Rust 1.89; the workspace `rust-version`
// says 1.88 (the toolchain here is 1.95). Bumping it to 1.89 removes the allows.
#[allow(clippy::incompatible_msrv)]
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// `flock(LOCK_EX)`, waiting for the holder to release it.
#[allow(clippy::incompatible_msrv)]
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    file.lock()
}

/// Reads a small file in full, `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path, max_len: u64) -> Result<Option<Vec<u8>>, StateError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::io("open", path)(e)),
    };
    let mut buf = Vec::new();
    file.take(max_len + 1)
        .read_to_end(&mut buf)
        .map_err(StateError::io("read", path))?;
    if buf.len() as u64 > max_len {
        return Err(StateError::InvalidField {
            path: path.to_path_buf(),
            field: "(file)".into(),
            why: format!("the file is over {max_len} bytes"),
        });
    }
    Ok(Some(buf))
}

// ---------------------------------------------------------------------------
// Identity encoding
// ---------------------------------------------------------------------------

fn encode_identity(k: &NodeKeypair) -> Zeroizing<String> {
    let seed = k.secret_bytes();
    let mut s = Zeroizing::new(String::with_capacity(200));
    s.push_str(IDENTITY_HEADER);
    s.push_str("\nsecret ");
    for b in seed.iter() {
        s.push(hex_digit(b >> 4));
        s.push(hex_digit(b & 0xf));
    }
    s.push_str("\nnode ");
    s.push_str(&k.node_id().to_string());
    s.push('\n');
    s
}

fn hex_digit(n: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(n & 0xf)])
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn decode_identity(text: &[u8]) -> Result<NodeKeypair, &'static str> {
    if text.len() as u64 > MAX_IDENTITY_FILE_LEN {
        return Err("file is too large to be an identity");
    }
    let text = std::str::from_utf8(text).map_err(|_| "not text")?;
    let body = text
        .strip_suffix('\n')
        .ok_or("truncated (no final newline)")?;
    let mut lines = body.split('\n');
    if lines.next() != Some(IDENTITY_HEADER) {
        return Err("first line is not 'vx6-identity-v1'");
    }
    let secret = lines
        .next()
        .and_then(|l| l.strip_prefix("secret "))
        .ok_or("missing 'secret' line")?;
    let node = lines
        .next()
        .and_then(|l| l.strip_prefix("node "))
        .ok_or("missing 'node' line")?;
    if lines.next().is_some() {
        return Err("unexpected extra lines");
    }
    if secret.len() != 64 {
        return Err("secret is not 64 hex digits");
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    for (out, pair) in seed.iter_mut().zip(secret.as_bytes().chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (
            pair.first().and_then(|&c| hex_value(c)),
            pair.get(1).and_then(|&c| hex_value(c)),
        ) else {
            return Err("secret is not lowercase hex");
        };
        *out = hi << 4 | lo;
    }
    let stated: NodeId = node.parse().map_err(|_| "node id is not valid base32")?;
    let keypair = NodeKeypair::from_secret_bytes(&seed);
    if keypair.node_id() != stated {
        return Err("the secret does not match the node id");
    }
    Ok(keypair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new("alice".parse().unwrap())
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_write(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p), 0o600);
        atomic_write(&p, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o640);
        // no temporaries left behind
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("f")]);
    }

    #[test]
    fn atomic_write_error_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        // the target is a non-empty directory: rename fails
        let p = dir.path().join("d");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("x"), b"").unwrap();
        assert!(atomic_write(&p, b"x", 0o600).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(atomic_write(&dir.path().join("missing/f"), b"x", 0o600).is_err());
    }

    #[test]
    fn atomic_create_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_create_new(&p, b"a", 0o600).unwrap();
        let e = atomic_create_new(&p, b"b", 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"a");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sweep_removes_only_old_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".f.1.0.vx6tmp"), b"").unwrap();
        fs::write(dir.path().join("keep"), b"").unwrap();
        assert_eq!(
            sweep_stale_temp_files(dir.path(), Duration::from_secs(3600)),
            0
        );
        assert_eq!(sweep_stale_temp_files(dir.path(), Duration::ZERO), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn paths() {
        let h = Home::new("/x");
        assert_eq!(h.root(), Path::new("/x"));
        assert_eq!(h.identity_path(), Path::new("/x/identity.key"));
        assert_eq!(h.config_path(), Path::new("/x/config.toml"));
        assert_eq!(h.services_path(), Path::new("/x/services.toml"));
        assert_eq!(h.pins_path(), Path::new("/x/pins.toml"));
        assert_eq!(h.db_path(), Path::new("/x/state.redb"));
        assert_eq!(h.socket_path(), Path::new("/x/control.sock"));
        assert_eq!(h.lock_path(), Path::new("/x/node.lock"));
    }

    #[test]
    fn init_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("a/b/home"));
        let k = home.init(&cfg()).unwrap();
        assert_eq!(mode_of(home.root()), 0o700);
        for p in [
            home.identity_path(),
            home.config_path(),
            home.services_path(),
            home.pins_path(),
        ] {
            assert_eq!(mode_of(&p), 0o600, "{}", p.display());
        }
        assert_eq!(home.load_identity().unwrap().node_id(), k.node_id());
        assert_eq!(home.load_config().unwrap(), cfg());
        assert_eq!(fs::read(home.services_path()).unwrap(), b"");
        // the lock taken by init is released
        drop(home.lock_daemon().unwrap());
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let k = home.init(&cfg()).unwrap();
        let before = fs::read(home.identity_path()).unwrap();
        let mut other = cfg();
        other.name = "bob".into();
        let e = home.init(&other).unwrap_err();
        assert!(matches!(e, StateError::IdentityExists(_)), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "identity already exists at {}; refusing to overwrite it",
                home.identity_path().display()
            )
        );
        assert_eq!(fs::read(home.identity_path()).unwrap(), before);
        assert_eq!(home.load_config().unwrap().name, "alice");
        assert_eq!(home.load_identity().unwrap().node_id(), k.node_id());
    }

    #[test]
    fn init_into_existing_dir_keeps_user_files() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        fs::write(home.pins_path(), "[names]\n").unwrap();
        home.init(&cfg()).unwrap();
        assert_eq!(fs::read(home.pins_path()).unwrap(), b"[names]\n");
    }

    #[test]
    fn init_refuses_invalid_config_before_touching_disk() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("h"));
        let mut c = cfg();
        c.listen.clear();
        assert!(matches!(
            home.init(&c),
            Err(StateError::InvalidField { .. })
        ));
        assert!(!home.root().exists());
    }

    #[test]
    fn load_identity_missing() {
        let dir = tempfile::tempdir().unwrap();
        let e = Home::new(dir.path()).load_identity().unwrap_err();
        assert!(matches!(e, StateError::NotInitialized(_)));
        assert!(e.to_string().contains("run 'vx6 init --name NAME'"), "{e}");
    }

    #[test]
    fn load_identity_refuses_loose_mode() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        home.init(&cfg()).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(home.identity_path(), Permissions::from_mode(mode)).unwrap();
            let e = home.load_identity().unwrap_err();
            assert!(matches!(e, StateError::IdentityPermissions { .. }), "{e}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        fs::set_permissions(home.identity_path(), Permissions::from_mode(0o400)).unwrap();
        home.load_identity().unwrap();
    }

    #[test]
    fn identity_round_trip_and_corruption() {
        let k = NodeKeypair::from_secret_bytes(&[9u8; 32]);
        let good = encode_identity(&k);
        assert_eq!(
            decode_identity(good.as_bytes()).unwrap().node_id(),
            k.node_id()
        );
        let lines: Vec<&str> = good.lines().collect();
        assert_eq!(lines[0], "vx6-identity-v1");
        assert_eq!(lines[1], format!("secret {}", "09".repeat(32)));

        let flip_seed = good.replacen("secret 09", "secret 0a", 1);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "no final newline"),
            (
                good.as_bytes()[..good.len() - 1].to_vec(),
                "no final newline",
            ),
            (good.as_bytes()[..40].to_vec(), "no final newline"),
            (
                good.replace("vx6-identity-v1", "vx6-identity-v2")
                    .into_bytes(),
                "first line",
            ),
            (flip_seed.into_bytes(), "does not match"),
            (good.replace("secret 09", "secret 0G").into_bytes(), "hex"),
            (format!("{}extra\n", good.as_str()).into_bytes(), "extra"),
            (good.replace("node ", "node x").into_bytes(), "base32"),
            (vec![0xff; 10], "not text"),
            (vec![b'\n'; 600], "too large"),
        ];
        for (bytes, want) in cases {
            let why = decode_identity(&bytes).unwrap_err();
            assert!(why.contains(want), "{why:?} should mention {want:?}");
        }
    }

    #[test]
    fn corrupt_identity_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        home.init(&cfg()).unwrap();
        atomic_write(&home.identity_path(), b"vx6-identity-v1\ngarbage\n", 0o600).unwrap();
        let e = home.load_identity().unwrap_err();
        assert!(matches!(e, StateError::CorruptIdentity { .. }), "{e}");
        assert!(e.to_string().contains("is corrupt"), "{e}");
    }

    #[test]
    fn daemon_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let lock = home.lock_daemon().unwrap();
        assert_eq!(mode_of(lock.path()), 0o600);
        let e = home.lock_daemon().unwrap_err();
        match &e {
            StateError::AlreadyRunning { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("already running"), "{e}");
        // a plain second File handle cannot take it either
        let f = File::open(home.lock_path()).unwrap();
        assert!(!try_lock_exclusive(&f).unwrap());
        // init refuses while another process holds the home
        assert!(matches!(
            home.init(&cfg()),
            Err(StateError::AlreadyRunning { .. })
        ));
        assert!(!home.identity_path().exists());
        drop(lock);
        assert!(try_lock_exclusive(&f).unwrap());
        drop(f);
        drop(home.lock_daemon().unwrap());
    }

    #[test]
    fn lock_in_missing_home_says_not_initialized() {
        let dir = tempfile::tempdir().unwrap();
        let e = Home::new(dir.path().join("nope"))
            .lock_daemon()
            .unwrap_err();
        assert!(matches!(e, StateError::NotInitialized(_)), "{e}");
    }

    #[test]
    fn default_root_is_not_empty() {
        assert!(!Home::default_root().as_os_str().is_empty());
    }
}
