//! `ssh -L` as a reference row: a private sshd on a loopback port with
//! throwaway keys, and an ssh client forwarding a local port to the target.
//! Used only when `ssh`, `sshd` and `ssh-keygen` are installed.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::traffic;

/// A running sshd + `ssh -L`; both are killed on drop.
pub struct SshForward {
    pub listen: SocketAddr,
    pub version: String,
    children: Vec<Child>,
    _dir: TempDir,
}

impl Drop for SshForward {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `name` on PATH or in the usual sbin directories (sshd is often not on a
/// user's PATH).
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Why the ssh row is skipped, or `None` when the tools are there.
pub fn missing() -> Option<String> {
    let absent: Vec<&str> = ["ssh", "sshd", "ssh-keygen"]
        .into_iter()
        .filter(|n| find(n).is_none())
        .collect();
    (!absent.is_empty()).then(|| format!("{} not installed", absent.join(", ")))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn keygen(keygen: &Path, file: &Path) -> Result<()> {
    let st = Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(file)
        .stdin(Stdio::null())
        .status()
        .context("cannot run ssh-keygen")?;
    if !st.success() {
        bail!("ssh-keygen failed ({st})");
    }
    Ok(())
}

fn user() -> String {
    std::env::var("USER")
        .ok()
        .or_else(|| {
            Command::new("id")
                .arg("-un")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "root".into())
}

/// Starts sshd and `ssh -N -L` to `target`; returns the local forward.
pub async fn start(target: SocketAddr) -> Result<SshForward> {
    let (Some(ssh), Some(sshd), Some(kg)) = (find("ssh"), find("sshd"), find("ssh-keygen")) else {
        bail!("ssh, sshd or ssh-keygen not installed");
    };
    let dir = tempfile::Builder::new()
        .prefix("vx6-bench-ssh-")
        .tempdir()?;
    let d = dir.path().to_path_buf();
    keygen(&kg, &d.join("host_key"))?;
    keygen(&kg, &d.join("user_key"))?;
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys"))?;
    let sshd_port = free_port()?;
    let config = format!(
        "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\n\
         AuthorizedKeysFile {ak}\nStrictModes no\nPubkeyAuthentication yes\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowTcpForwarding yes\n",
        hk = d.join("host_key").display(),
        pid = d.join("sshd.pid").display(),
        ak = d.join("authorized_keys").display(),
    );
    std::fs::write(d.join("sshd_config"), config)?;
    let version = Command::new(&ssh)
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    let mut fwd = SshForward {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        version,
        children: Vec::new(),
        _dir: dir,
    };
    let daemon = Command::new(&sshd)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start sshd")?;
    fwd.children.push(daemon);
    traffic::wait_listening(
        SocketAddr::from(([127, 0, 0, 1], sshd_port)),
        Duration::from_secs(10),
    )
    .await
    .context("sshd did not come up")?;
    let local_port = free_port()?;
    let client = Command::new(&ssh)
        .args([
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(d.join("user_key"))
        .args(["-p", &sshd_port.to_string(), "-L"])
        .arg(format!("127.0.0.1:{local_port}:{target}"))
        .arg(format!("{}@127.0.0.1", user()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start ssh")?;
    fwd.children.push(client);
    fwd.listen = SocketAddr::from(([127, 0, 0, 1], local_port));
    traffic::wait_listening(fwd.listen, Duration::from_secs(15))
        .await
        .context("ssh -L did not start forwarding (login refused?)")?;
    traffic::first_byte(fwd.listen)
        .await
        .context("ssh -L forwards nothing")?;
    Ok(fwd)
}
