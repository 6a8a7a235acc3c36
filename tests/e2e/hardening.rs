//! Process hardening of the real binary (`kms-server serve`), read back from the kernel
//! (`/proc/<pid>/status`, `/proc/<pid>/limits`) and from the server's own report in
//! `GET /v1/sys/status`: no core dumps, not dumpable, memory locked; root refused unless
//! the configuration forces it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyhold_tests::{
    free_ports, generate_pki, kms_client_for, set_ports, workspace_bin, write_config, TestSeal,
};

fn edit(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from} not in {}", config.display());
    std::fs::write(config, text.replace(from, to)).unwrap();
}

/// `/proc/<pid>/status` field `name` (first number), e.g. `VmLck` in kB.
fn proc_status(pid: u32, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// `/proc/<pid>/limits` soft and hard limits of the line starting with `name`.
fn proc_limit(pid: u32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/limits"));
    let mut rest = line[name.len()..].split_whitespace();
    (
        rest.next().unwrap().to_owned(),
        rest.next().unwrap().to_owned(),
    )
}

fn serve(config: &Path, log: &Path) -> Child {
    Command::new(workspace_bin("kms-server"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

async fn wait_healthy(ops: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{ops}/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the server exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_disables_core_dumps_and_ptrace_locks_memory_and_refuses_root() {
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_pki(&dir.path().join("pki"));
    let config = write_config(dir.path(), TestSeal::KeyFile, "", "");
    let (api, ops) = free_ports();
    set_ports(&config, api, ops);
    let root = rustix::process::geteuid().is_root();
    // Production's mlock setting. (Root holds CAP_IPC_LOCK, so it cannot fail there; an
    // unprivileged developer's 8 MiB default limit would refuse to start, which is the
    // point of `required`: this test then runs best-effort.)
    if root {
        edit(&config, "mlock = \"best-effort\"", "mlock = \"required\"");
    }
    let init = Command::new(workspace_bin("kms-server"))
        .args(["init", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let log = dir.path().join("server.log");
    let mut child = serve(&config, &log);
    wait_healthy(ops, &mut child, &log).await;
    let pid = child.id();
    // The kernel's view of the running process.
    assert_eq!(
        proc_limit(pid, "Max core file size"),
        ("0".to_owned(), "0".to_owned())
    );
    let locked_kib = proc_status(pid, "VmLck");
    if root {
        assert!(locked_kib > 0, "no memory locked (VmLck 0)");
    }
    // The server's own report (prctl(PR_GET_DUMPABLE) is readable only from inside).
    let status = kms_client_for(&pki, "admin-a", &[format!("https://127.0.0.1:{api}")])
        .sys_status()
        .await
        .unwrap();
    let p = status.process.expect("the server reports its hardening");
    assert!(!p.dumpable, "{p:?}");
    assert_eq!(p.core_limit, 0);
    assert_eq!(
        p.memory_locked,
        locked_kib > 0,
        "{p:?} VmLck {locked_kib} kB"
    );
    assert_eq!(p.uid, rustix::process::geteuid().as_raw());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("process hardening applied"), "{text}");
    let _ = child.kill();
    let _ = child.wait();

    // Root without `allow_root`: refused before anything is opened.
    if root {
        edit(&config, "allow_root = true", "allow_root = false");
        for command in ["serve", "init"] {
            let out = Command::new(workspace_bin("kms-server"))
                .arg(command)
                .arg("--config")
                .arg(&config)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{command} ran as root");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("refusing to run as root"), "{command}: {err}");
        }
    } else {
        eprintln!("not root: the root refusal is checked only when the tests run as root (CI)");
    }
}
