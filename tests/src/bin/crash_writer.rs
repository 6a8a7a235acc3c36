//! Crash-test child: writes keys as fast as it can and prints an acknowledgement only
//! after each write has been committed (the keyring returns only once the store commit
//! is durable). The parent kills it with SIGKILL at a random moment and checks that every
//! acknowledged write survived.
//!
//! Usage: crash-writer <redb|sled|postgres|postgres-hsm> <store-path> <key-file> <cycle> (for
//! postgres, <store-path> is a file holding the connection string)
//! Prints: `ACK <name> <wrapped-b64> <dek-b64>` after a key is created and a canary DEK
//! wrapped under it, `ROT <name> <version>` after a rotation, `DIS <name>` after a
//! disable, `SCH <name>` after a deletion is scheduled and `DES <name>` after the key
//! is destroyed (erasure key erased), `MST <n>` after a master-key rotation, `GRT <name>`
//! after the key's grants were replaced (a second identity added), `AUD <name>` after an
//! audit record naming the key is durable in the audit chain file (`<store>.audit`, the
//! server's own writer; in bounded-lag mode: written, not yet flushed), with the time of
//! the acknowledgement (µs since the epoch: the power-loss run counts records lost within
//! the lag window against it). Keys `c<cycle>-k<i>` with `i % 7 == 6` are the ones destroyed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::CRASH_WRITER;
use kms_client::api::{Algorithm, Context, Grant, GrantOperation};
use kms_server::access::policy::{Principal, Role};
use kms_server::crypto::seal::KeyFileSealer;
use kms_server::storage::Engine;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let engine = match args[1].as_str() {
        "redb" => Engine::Redb,
        "sled" => Engine::Sled,
        // <store-path> is then a file holding the connection string (and, for
        // postgres-hsm, `<store-path>.token` names the token: `keyring_with_erasure`).
        "postgres" | "postgres-hsm" => Engine::Postgres,
        other => panic!("unknown engine {other}"),
    };
    // As the server opens it: every key gets an erasure key, written before its record.
    let store_path = PathBuf::from(&args[2]);
    let keyring = std::sync::Arc::new(keyhold_tests::keyring_with_erasure(engine, &store_path));
    let sealer = KeyFileSealer::new(&args[3]);
    if keyring.sealed_master_key().unwrap().is_none() {
        keyring.initialize(&sealer).unwrap();
    }
    keyring.unseal(&sealer).unwrap();
    let cycle = &args[4];
    // The audit writer, as the server runs it: a thread with group commit, one fdatasync
    // per batch, acknowledging each record only once it is durable.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    // With KEYHOLD_CRASH_AUDIT_LAG_MS, in bounded-lag mode: records acknowledged once
    // written, flushed within the lag.
    let lag = std::env::var("KEYHOLD_CRASH_AUDIT_LAG_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let policy = kms_server::security::audit::CommitPolicy {
        durability: match lag {
            None => kms_server::security::audit::Durability::PerRequest,
            Some(ms) => kms_server::security::audit::Durability::BoundedLag(
                std::time::Duration::from_millis(ms),
            ),
        },
        ..Default::default()
    };
    let audit = kms_server::security::audit::AuditLog::start_with(
        keyring.store().clone(),
        keyring.clone(),
        &store_path.with_extension("audit"),
        &kms_server::security::audit::Sink::None,
        kms_server::security::alert::Alerter::start(&Default::default()),
        None,
        kms_server::security::audit::AuditOptions {
            policy,
            ..Default::default()
        },
    )
    .unwrap();
    let who = Principal {
        identity: CRASH_WRITER.into(),
        tenant: "crash".into(),
        role: Role::App,
    };
    let mut out = std::io::stdout().lock();
    let ctx: Context = [("canary".to_string(), cycle.clone())]
        .into_iter()
        .collect();
    for i in 0u64.. {
        let name = format!("c{cycle}-k{i}");
        keyring
            .create_key(
                "crash",
                &name,
                Algorithm::Aes256Gcm,
                None,
                vec![Grant::new(CRASH_WRITER, &GrantOperation::ALL)],
            )
            .unwrap();
        let dk = keyring
            .lookups()
            .unwrap()
            .datakey(&who, &name, &ctx)
            .unwrap();
        writeln!(
            out,
            "ACK {name} {} {}",
            B64.encode(&dk.wrapped),
            B64.encode(dk.plaintext.expose_secret())
        )
        .unwrap();
        out.flush().unwrap();
        rt.block_on(audit.append(kms_server::security::audit::AuditDraft {
            tenant: Some("crash".into()),
            operation: "CRASH append".into(),
            key: Some(name.clone()),
            outcome: "ok".into(),
            status: 200,
            key_use: lag.is_some(),
            ..Default::default()
        }))
        .unwrap();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        writeln!(out, "AUD {name} {at}").unwrap();
        out.flush().unwrap();
        if i % 4 == 1 {
            keyring
                .set_grants(
                    "crash",
                    &name,
                    vec![
                        Grant::new(CRASH_WRITER, &GrantOperation::ALL),
                        Grant::new(keyhold_tests::CRASH_READER, &[GrantOperation::Unwrap]),
                    ],
                    kms_server::keyring::Clearance::Cleared,
                )
                .unwrap();
            writeln!(out, "GRT {name}").unwrap();
            out.flush().unwrap();
        }
        if i % 3 == 2 && (i - 1) % 7 != 6 {
            let prev = format!("c{cycle}-k{}", i - 1);
            let info = keyring.rotate("crash", &prev).unwrap();
            writeln!(out, "ROT {prev} {}", info.current_version).unwrap();
            out.flush().unwrap();
        }
        if i % 5 == 4 {
            keyring.set_enabled("crash", &name, false).unwrap();
            writeln!(out, "DIS {name}").unwrap();
            out.flush().unwrap();
        }
        if i % 25 == 24 {
            // A new master key, every version re-sealed: one transaction, old or new.
            let n = keyring.rotate_master(&sealer).unwrap();
            writeln!(out, "MST {n}").unwrap();
            out.flush().unwrap();
        }
        if i % 7 == 6 {
            // Schedule as of the epoch, then sweep eight days later: destroyed now.
            keyring.schedule_deletion("crash", &name, 7, 0).unwrap();
            writeln!(out, "SCH {name}").unwrap();
            out.flush().unwrap();
            keyring.destroy_due(8 * 86_400).unwrap();
            writeln!(out, "DES {name}").unwrap();
            out.flush().unwrap();
        }
    }
}
