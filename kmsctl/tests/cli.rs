//! kmsctl without a server: help, completions, and the errors for missing settings, bad
//! arguments and unreachable servers.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kmsctl");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("KMSCTL_ENDPOINT")
        .env_remove("KMSCTL_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent-xdg-config-for-tests")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_command_group() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "keys",
        "datakey",
        "wrap",
        "unwrap",
        "rewrap",
        "batch",
        "encrypt",
        "decrypt",
        "sys",
        "completions",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
    let out = run(&["keys", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["list", "get", "create", "rotate", "disable", "enable"] {
        assert!(text.contains(cmd), "keys {cmd} missing");
    }
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("kmsctl"),
            "{shell}"
        );
    }
}

#[test]
fn missing_settings_and_bad_arguments_are_explained() {
    let out = run(&["keys", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no endpoint") && err.contains("--dev"),
        "{err}"
    );
    let out = run(&["datakey", "--key", "k", "--context", "novalue"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected key=value"));
    let out = run(&["--dev", "/nonexistent-dev-dir", "keys", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kms-server dev"));
    let out = run(&[
        "--endpoint",
        "http://plain:80",
        "--tls-ca",
        "/dev/null",
        "--tls-cert",
        "/dev/null",
        "--tls-key",
        "/dev/null",
        "keys",
        "list",
    ]);
    assert_eq!(out.status.code(), Some(1));
}
