//! PKCS#11 sealing against SoftHSM2, through the real binaries: `kms-server init` creates
//! the wrapping key in the token (sensitive, never extractable) and seals the master key
//! with it; `serve` unseals from the token at start; seal / unseal over mTLS; master-key
//! rotation; restarts; a wrong PIN starts sealed and is refused, and once the PIN file is
//! fixed `POST /v1/sys/unseal` unseals; a token without the key keeps the server sealed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyhold_tests::softhsm::{SoftHsm, MODULE};
use keyhold_tests::{
    free_ports, generate_pki, kms_client_for, workspace_bin, write_config, TestPki, TestSeal,
};
use serde_json::json;

use crate::{assert_error, post};

struct Node {
    dir: tempfile::TempDir,
    pki: TestPki,
    hsm: SoftHsm,
    config: std::path::PathBuf,
    api: u16,
    ops: u16,
    child: Option<Child>,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::new(dir.path(), "keyhold-test", "1234-user-pin");
        std::fs::write(dir.path().join("hsm.pin"), "1234-user-pin\n").unwrap();
        let pki = generate_pki(&dir.path().join("pki"));
        let config = write_config(dir.path(), TestSeal::KeyFile, "", "");
        let (api, ops) = free_ports();
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(
                "method = \"key-file\"\nkey_file = \"master.key\"\n",
                &format!(
                    "method = \"pkcs11\"\n[seal.pkcs11]\nmodule = \"{MODULE}\"\n\
                     token_label = \"keyhold-test\"\npin_file = \"hsm.pin\"\n"
                ),
            )
            .replace(
                "ops_listen = \"127.0.0.1:0\"",
                &format!("ops_listen = \"127.0.0.1:{ops}\""),
            )
            .replace(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"127.0.0.1:{api}\""),
            )
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{api}\""),
                1,
            );
        assert!(text.contains("method = \"pkcs11\""), "{text}");
        std::fs::write(&config, text).unwrap();
        Node {
            dir,
            pki,
            hsm,
            config,
            api,
            ops,
            child: None,
        }
    }

    fn kms_server(&self, args: &[&str]) -> std::process::Output {
        let (k, v) = self.hsm.env();
        Command::new(workspace_bin("kms-server"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env(k, v)
            .env_remove(kms_server::crypto::seal::PKCS11_PIN_ENV)
            .output()
            .unwrap()
    }

    async fn start(&mut self) {
        let (k, v) = self.hsm.env();
        let child = Command::new(workspace_bin("kms-server"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env(k, v)
            .env_remove(kms_server::crypto::seal::PKCS11_PIN_ENV)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ops_status("/healthz").await.is_none() {
            assert!(
                Instant::now() < deadline,
                "server did not come up: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    async fn ops_status(&self, path: &str) -> Option<u16> {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", self.ops))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.api)
    }

    fn client(&self, who: &str) -> kms_client::Client {
        kms_client_for(&self.pki, who, &[self.url("")])
    }

    fn raw(&self, who: &str) -> reqwest::Client {
        keyhold_tests::client_for(&self.pki, Some(who), false)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sealed_record(store: &Path) -> serde_json::Value {
    let store = kms_server::storage::open(kms_server::storage::Engine::Redb, store).unwrap();
    let sealed = kms_server::keyring::Keyring::new(store)
        .sealed_master_key()
        .unwrap()
        .unwrap();
    serde_json::to_value(sealed).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_unseal_with_softhsm() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut n = Node::new();
    let out = n.kms_server(&["init"]);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("sealed with pkcs11"));
    // The wrapping key lives in the token and cannot be read out of it.
    let probe = n.hsm.probe("keyhold-master-wrap");
    assert_eq!(
        probe,
        json!({"count": 1, "sensitive": true, "extractable": false, "token": true, "value_readable": false})
    );
    // The store holds only ciphertext, labelled with the token and key.
    let store_path = n.dir.path().join("store.redb");
    let rec = sealed_record(&store_path);
    assert_eq!(rec["method"], "pkcs11");
    assert_eq!(rec["pkcs11"]["token_label"], "keyhold-test");
    assert_eq!(rec["sealed"].as_str().unwrap().len(), 2 * (32 + 16));
    // A second init is refused (and does not create a second key).
    assert!(!n.kms_server(&["init"]).status.success());
    assert_eq!(n.hsm.probe("keyhold-master-wrap")["count"], 1);

    // serve unseals from the token at start.
    n.start().await;
    assert_eq!(n.ops_status("/readyz").await, Some(200), "{}", n.log());
    let admin = n.client("admin-a");
    let sys = n.client("sys");
    let app = n.client("app-a");
    admin
        .create_key(&keyhold_tests::create_granted("k", keyhold_tests::APP_A))
        .await
        .unwrap();
    let ctx: kms_client::api::Context = [("doc".to_string(), "1".to_string())].into();
    let dk = app.datakey("k", &ctx).await.unwrap();
    let unwrap_body = json!({"wrapped": dk.wrapped, "context": ctx});

    // Seal wipes the keys; unseal with an empty body asks the token again.
    let status = sys.seal().await.unwrap();
    assert!(status.sealed);
    assert_eq!(n.ops_status("/readyz").await, Some(503));
    assert_error(
        &post(&n.raw("app-a"), &n.url("/v1/unwrap"), unwrap_body.clone()).await,
        503,
        "Sealed",
    );
    let status = sys.unseal(None).await.unwrap();
    assert!(
        !status.sealed && status.seal_method == "pkcs11",
        "{status:?}"
    );
    let un = app.unwrap(dk.wrapped.as_bytes(), &ctx).await.unwrap();
    assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());

    // Master-key rotation under the token: re-sealed with a fresh nonce, keys unchanged.
    let before = sealed_record_while_running(&n);
    assert_eq!(sys.rotate_master(None).await.unwrap(), 1);
    n.stop();
    let after = sealed_record(&store_path);
    assert_ne!(before["sealed"], after["sealed"]);
    assert_ne!(before["pkcs11"]["iv"], after["pkcs11"]["iv"]);
    assert_eq!(
        n.hsm.probe("keyhold-master-wrap")["count"],
        1,
        "the same token key"
    );

    // A restart unseals from the token again; the old DEK unwraps.
    n.start().await;
    assert_eq!(n.ops_status("/readyz").await, Some(200), "{}", n.log());
    let app = n.client("app-a");
    let un = app.unwrap(dk.wrapped.as_bytes(), &ctx).await.unwrap();
    assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
    n.stop();

    // A wrong PIN: the server starts sealed and says why; fixing the PIN file and
    // retrying the unseal works without a restart.
    std::fs::write(n.dir.path().join("hsm.pin"), "0000-wrong\n").unwrap();
    n.start().await;
    assert_eq!(n.ops_status("/readyz").await, Some(503));
    assert!(n.log().contains("PKCS#11 user PIN"), "{}", n.log());
    let r = post(&n.raw("sys"), &n.url("/v1/sys/unseal"), json!({})).await;
    assert_error(&r, 400, "InvalidRequest");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PKCS#11 user PIN"),
        "{r:?}"
    );
    std::fs::write(n.dir.path().join("hsm.pin"), "1234-user-pin\n").unwrap();
    let r = post(&n.raw("sys"), &n.url("/v1/sys/unseal"), json!({})).await;
    assert_eq!((r.0, r.1["sealed"].clone()), (200, json!(false)), "{r:?}");
    n.stop();

    // A configuration naming a key the token does not have: sealed, 503, store unchanged.
    let cfg = std::fs::read_to_string(&n.config).unwrap();
    std::fs::write(
        &n.config,
        cfg.replace(
            "pin_file = \"hsm.pin\"",
            "pin_file = \"hsm.pin\"\nkey_label = \"other\"",
        ),
    )
    .unwrap();
    n.start().await;
    assert_eq!(n.ops_status("/readyz").await, Some(503));
    let r = post(&n.raw("sys"), &n.url("/v1/sys/unseal"), json!({})).await;
    assert_eq!(r.0, 503, "{r:?}");
    n.stop();
    assert_eq!(sealed_record(&store_path)["sealed"], after["sealed"]);
}

/// The sealed record, read from a copy of the store while the server holds it open.
fn sealed_record_while_running(n: &Node) -> serde_json::Value {
    let copy = n.dir.path().join("store-copy.redb");
    std::fs::copy(n.dir.path().join("store.redb"), &copy).unwrap();
    sealed_record(&copy)
}
