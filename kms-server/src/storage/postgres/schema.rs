//! The PostgreSQL store's schema: one step per version, applied in order at start.

use super::{engine_err, msg_err, StoreError, MIGRATION_LOCK};

/// The schema, one step per version; applied in order at start, in one transaction under
/// an advisory lock (nodes starting together apply each step once).
const MIGRATIONS: &[&str] = &[
    // 1: the tables of the store as rows of one relation, ordered by bytes.
    "CREATE TABLE keyhold_kv (
        tbl smallint NOT NULL,
        k bytea NOT NULL,
        v bytea NOT NULL,
        PRIMARY KEY (tbl, k)
    )",
    // 2: the change feed of key records, in commit order (see `commit_batch`), read by
    // every node to drop what it cached.
    "CREATE TABLE keyhold_changes (
        seq bigint PRIMARY KEY,
        k bytea NOT NULL,
        at timestamptz NOT NULL DEFAULT now()
    )",
    // 3: the nodes of the cluster, as they last reported.
    "CREATE TABLE keyhold_nodes (
        id text PRIMARY KEY,
        version text NOT NULL,
        last_seen timestamptz NOT NULL
    )",
    // 4: the cluster's audit chain (`crate::security::audit::postgres`): the records, one JSON line
    // each, and the MAC'd head in a single row that every append locks.
    "CREATE TABLE keyhold_audit (
        seq bigint PRIMARY KEY,
        rec text NOT NULL
    );
    CREATE TABLE keyhold_audit_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL,
        hash text NOT NULL,
        mac text
    );
    INSERT INTO keyhold_audit_head (id, seq, hash, mac)
        VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', NULL)",
    // 5: the change feed names each change's table: besides key records, nodes follow
    // runtime identities and lockouts (`storage::followed`). Earlier entries were all
    // key records (table 1).
    "ALTER TABLE keyhold_changes ADD COLUMN tbl smallint NOT NULL DEFAULT 1",
    // 6: erasure keys under epoch keys rooted in the sealing HSM (`crate::storage::erasure::shared`):
    // the epochs (each one's key wrapped by a token key; times in Unix seconds), the head
    // (current epoch; dirty: a destruction awaits a rotation; the cluster's random id,
    // which names its token keys), and the erasure keys.
    "CREATE TABLE keyhold_erasure_epochs (
        epoch bigint PRIMARY KEY,
        wrapped bytea NOT NULL,
        created_at bigint NOT NULL,
        retired_at bigint,
        destroyed_at bigint
    );
    CREATE TABLE keyhold_erasure_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        dirty boolean NOT NULL,
        cluster text NOT NULL
    );
    INSERT INTO keyhold_erasure_head (id, epoch, dirty, cluster) VALUES (1, 0, false, '');
    CREATE TABLE keyhold_erasure (
        slot bigserial PRIMARY KEY,
        epoch bigint NOT NULL,
        sealed bytea NOT NULL
    )",
];

/// Applies the steps this database has not had yet, in one transaction under an advisory
/// lock (nodes starting together apply each step once); refuses a newer schema.
pub(super) fn migrate(c: &mut postgres::Client) -> Result<(), StoreError> {
    let mut tx = c.transaction().map_err(engine_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(engine_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS keyhold_schema (version integer NOT NULL)")
        .map_err(engine_err)?;
    let current: i32 = match tx
        .query_opt("SELECT version FROM keyhold_schema", &[])
        .map_err(engine_err)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO keyhold_schema (version) VALUES (0)", &[])
                .map_err(engine_err)?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(msg_err(format!(
            "the database schema is version {current}, newer than this kms-server knows ({known}): upgrade kms-server"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(step).map_err(engine_err)?;
        tx.execute("UPDATE keyhold_schema SET version = $1", &[&(i as i32 + 1)])
            .map_err(engine_err)?;
        tracing::info!(version = i + 1, "PostgreSQL store schema migrated");
    }
    tx.commit().map_err(engine_err)
}
