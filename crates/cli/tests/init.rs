//! `vx6 init` without namespaces: what it says when its entry peer is down.

use std::process::Command;

#[test]
fn init_with_a_down_peer_says_the_name_was_not_checked() {
    let home = tempfile::tempdir().unwrap();
    // Nothing listens on port 1 of loopback, over TCP or UDP.
    let out = Command::new(env!("CARGO_BIN_EXE_vx6"))
        .arg("--home")
        .arg(home.path())
        .args(["init", "--name", "lonely", "--peer", "127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "init failed: {stderr}");
    assert!(
        stderr.contains("no entry peer answered") && stderr.contains("'lonely'"),
        "stderr: {stderr}"
    );
    // The node was created all the same.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("created node lonely"), "stdout: {stdout}");
}
