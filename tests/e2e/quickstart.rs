//! README's quick start, run verbatim: `kms-server dev`, then kmsctl encrypts and decrypts
//! a file. The install line is the one command not run here (CI builds the same packages,
//! and the binaries under test are put first on PATH instead).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyhold_tests::workspace_bin;

fn quickstart_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- quickstart:begin")
        .expect("quickstart marker");
    let end = readme
        .find("<!-- quickstart:end -->")
        .expect("quickstart end marker");
    readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(str::to_owned)
        .collect()
}

fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains(" 200 ")
}

#[test]
fn readme_quick_start_works_as_written() {
    let cmds = quickstart_commands();
    assert!(
        cmds.len() <= 5,
        "the quick start must stay within five commands: {cmds:?}"
    );
    assert!(cmds[0].starts_with("cargo install"), "{cmds:?}");
    assert_eq!(cmds[1], "kms-server dev &");
    let bin_dir = workspace_bin("kmsctl").parent().unwrap().to_path_buf();
    assert!(bin_dir.join("kms-server").exists());
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    let sh = |cmd: &str| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("KMSCTL_ENDPOINT")
            .env_remove("KMSCTL_CONFIG")
            .env("XDG_CONFIG_HOME", dir.path().join("no-config"))
            .env("RUST_BACKTRACE", "0");
        c
    };
    // `kms-server dev &`: run in the background, as the shell would.
    // `exec` so that killing the child stops the server itself, not only the shell.
    let mut server = sh(&format!("exec {}", cmds[1].trim_end_matches('&').trim()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(dir.path().join("keyhold-dev/kms-server.toml").exists() && ready(9443)) {
        assert!(
            Instant::now() < deadline,
            "kms-server dev did not become ready on 127.0.0.1:8443/9443 (ports in use?)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut failure = None;
    for cmd in &cmds[2..] {
        let out = sh(cmd).output().unwrap();
        if !out.status.success() {
            failure = Some(format!(
                "`{cmd}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    if let Some(f) = failure {
        panic!("{f}");
    }
    let read = |p: &str| std::fs::read(Path::new(dir.path()).join(p)).unwrap();
    assert_eq!(read("note.out.txt"), b"attack at dawn\n");
    assert_eq!(&read("note.txt.khev")[..4], b"KHEV");
}
