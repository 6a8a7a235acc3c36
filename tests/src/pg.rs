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

/// A PostgreSQL server of the test's own (its own data directory, socket directory and
/// port, `trust` authentication on the socket), so a test can stop and restart it without
/// disturbing the other tests' shared server. Stopped when dropped.
pub struct PrivateServer {
    dir: tempfile::TempDir,
    /// The data directory (in `dir`, or where [`PrivateServer::start_in`] put it).
    data: std::path::PathBuf,
    bin: std::path::PathBuf,
    port: u16,
}

fn as_postgres_user(cmd: &std::path::Path) -> std::process::Command {
    if rustix::process::getuid().is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        std::process::Command::new(cmd)
    }
}

impl PrivateServer {
    /// Creates and starts one (Debian's packages under `/usr/lib/postgresql`).
    pub fn start() -> PrivateServer {
        Self::start_with(None)
    }

    /// The same with its data directory at `data` (made here; its parent must let
    /// PostgreSQL's user through), e.g. on a LazyFS mount for the power-loss run.
    pub fn start_in(data: &std::path::Path) -> PrivateServer {
        Self::start_with(Some(data))
    }

    fn start_with(data: Option<&std::path::Path>) -> PrivateServer {
        let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL installed");
        let bin = versions
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| std::path::PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .expect("a PostgreSQL version");
        let dir = tempfile::Builder::new()
            .prefix("keyhold-pg")
            .tempdir()
            .unwrap();
        let data = data.map_or_else(|| dir.path().join("data"), std::path::Path::to_owned);
        std::fs::create_dir(&data).unwrap();
        if rustix::process::getuid().is_root() {
            let chown = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .arg(&data)
                .status()
                .unwrap();
            assert!(chown.success());
        }
        let out = as_postgres_user(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "keyhold", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = PrivateServer {
            dir,
            data,
            bin,
            port,
        };
        s.pg_ctl("start");
        s
    }

    fn pg_ctl(&self, action: &str) {
        let (action, mode) = match action.split_once(" -m ") {
            Some((a, m)) => (a, m),
            None => (action, "fast"),
        };
        let options = format!(
            "-p {} -k {} -c listen_addresses=''",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres_user(&self.bin.join("pg_ctl"))
            .args([action, "-w", "-m", mode, "-o", &options, "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {action}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The connection string of its `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=keyhold dbname=postgres",
            self.dir.path().display(),
            self.port
        )
    }

    /// Stops it (fast shutdown: open connections are cut).
    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    /// Crashes it: an immediate shutdown, no checkpoint, as a power cut leaves it (the
    /// next start replays the WAL).
    pub fn crash(&self) {
        self.pg_ctl("stop -m immediate");
    }

    /// Starts it again.
    pub fn start_again(&self) {
        self.pg_ctl("start");
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = as_postgres_user(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.data)
            .output();
    }
}

/// The store's threads in this process (`keyhold-pg-*`: the connection pool and the
/// LISTEN thread), by the names Linux keeps for them.
pub fn store_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|name| name.starts_with("keyhold-pg-"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits (at most 10 s) until no store thread is left in this process, and fails the test
/// otherwise: once its servers are stopped nothing of theirs may outlive them (a pool
/// thread that ran PKCS#11 calls, still exiting while the process exits, races the
/// module's teardown).
pub fn assert_store_threads_stopped() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store_threads() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} store threads still run after every server stopped",
            store_threads()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
