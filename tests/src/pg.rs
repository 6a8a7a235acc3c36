//! PostgreSQL for the shared-store tests: `KEYHOLD_TEST_PG` (set by `.ci/run` from
//! `tests/pg/setup.sh`) names a database the caller may create databases from; each test
//! gets a fresh one.

/// A connection string to a new, empty database. Panics when `KEYHOLD_TEST_PG` is unset:
/// run `bash tests/pg/setup.sh` and export what it prints.
pub fn fresh_database() -> String {
    let base = std::env::var("KEYHOLD_TEST_PG")
        .expect("KEYHOLD_TEST_PG is not set: export KEYHOLD_TEST_PG=$(bash tests/pg/setup.sh)");
    let name = format!("keyhold_t{}", rand::random::<u64>());
    let out = std::process::Command::new("psql")
        .arg(&base)
        .args(["-qtAc", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql (PostgreSQL's client) must be installed");
    assert!(
        out.status.success(),
        "creating {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parts: Vec<&str> = base
        .split_whitespace()
        .filter(|p| !p.starts_with("dbname="))
        .collect();
    let db = format!("dbname={name}");
    parts.push(&db);
    parts.join(" ")
}

/// Whether the shared-store tests can run here: `KEYHOLD_TEST_PG` is set. In CI it must
/// be (the tests then run); elsewhere they say they were skipped.
pub fn available(test: &str) -> bool {
    if std::env::var_os("KEYHOLD_TEST_PG").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must set KEYHOLD_TEST_PG (tests/pg/setup.sh)"
    );
    eprintln!("{test}: skipped: KEYHOLD_TEST_PG is not set (export KEYHOLD_TEST_PG=$(bash tests/pg/setup.sh))");
    false
}

/// Runs one SQL statement as the test role (on the database `KEYHOLD_TEST_PG` names).
pub fn sql(statement: &str) {
    sql_on(None, statement);
}

/// Runs one SQL statement as the test role on `database` (default: the one
/// `KEYHOLD_TEST_PG` names) and returns what it printed (unaligned, tuples only).
pub fn sql_on(database: Option<&str>, statement: &str) -> String {
    let base = std::env::var("KEYHOLD_TEST_PG").expect("KEYHOLD_TEST_PG");
    let conn = match database {
        None => base,
        Some(db) => base
            .split_whitespace()
            .filter(|p| !p.starts_with("dbname="))
            .chain(std::iter::once(format!("dbname={db}").as_str()))
            .collect::<Vec<_>>()
            .join(" "),
    };
    let out = std::process::Command::new("psql")
        .arg(&conn)
        .args(["-qtAc", statement])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{statement}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The `dbname=` of the PostgreSQL store in a server config.
pub fn database_of(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    text.split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|w| w.strip_prefix("dbname="))
        .expect("a PostgreSQL store in the config")
        .to_owned()
}
