//! A power cut, in a test: LazyFS (dsrhaslab/lazyfs), a FUSE file system that keeps every
//! write not yet `fsync`ed in a cache of its own and drops that cache on
//! `lazyfs::clear-cache`, as a power loss drops the page cache and the disk's write cache.
//!
//! LazyFS is not built by this repository (nor is any recipe for it kept here): point
//! `KEYHOLD_LAZYFS` at a `lazyfs` binary built from its sources (RELIABILITY.md, "Power
//! loss", names the version the documented run used). The tests that need it are `#[ignore]`d
//! and say so.
//!
//! Mounted with `allow_other`, so that PostgreSQL's own user can use a data directory
//! inside it. The kernel's page cache over a FUSE file is dropped when the file is opened
//! again (LazyFS does not set `keep_cache`), and every writer is dead before a cut, so no
//! read after a cut is served from data LazyFS dropped; the cut also asks the kernel to
//! drop its caches, where the test may.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `lazyfs` binary named by `KEYHOLD_LAZYFS`, if any.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("KEYHOLD_LAZYFS").map(PathBuf::from)
}

/// A mounted LazyFS: the mount point (where the test works), the directory under it that
/// holds what reached "the disk", and the fault FIFOs. Unmounted when dropped.
pub struct LazyFs {
    dir: tempfile::TempDir,
    mount: PathBuf,
    faults: std::fs::File,
    completed: BufReader<std::fs::File>,
    process: Child,
}

impl LazyFs {
    /// Mounts one over a fresh directory (needs root or FUSE rights, and `fusermount3`).
    pub fn mount() -> LazyFs {
        let bin = binary().expect("KEYHOLD_LAZYFS names the lazyfs binary");
        let dir = tempfile::Builder::new()
            .prefix("keyhold-lazyfs")
            .tempdir()
            .unwrap();
        // PostgreSQL's user must get through to a data directory inside the mount.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let (mount, root) = (dir.path().join("mnt"), dir.path().join("root"));
        std::fs::create_dir(&mount).unwrap();
        std::fs::create_dir(&root).unwrap();
        let (fifo, done) = (dir.path().join("faults"), dir.path().join("completed"));
        let config = dir.path().join("lazyfs.toml");
        std::fs::write(
            &config,
            format!(
                "[faults]\nfifo_path=\"{}\"\nfifo_path_completed=\"{}\"\n\
                 [cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"4gb\"\nblocks_per_page=1\n\
                 [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
                fifo.display(),
                done.display()
            ),
        )
        .unwrap();
        let process = Command::new(&bin)
            .arg(&mount)
            .arg("--config-path")
            .arg(&config)
            .args(["-o", "allow_other", "-o", "modules=subdir"])
            .arg("-o")
            .arg(format!("subdir={}", root.display()))
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("lazyfs.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted(&mount) || !done.exists() {
            assert!(
                Instant::now() < deadline,
                "LazyFS did not mount: {}",
                std::fs::read_to_string(dir.path().join("lazyfs.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // LazyFS opens the completion FIFO for writing once a reader has it open.
        let completed = BufReader::new(std::fs::File::open(&done).unwrap());
        let faults = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        LazyFs {
            dir,
            mount,
            faults,
            completed,
            process,
        }
    }

    /// Where the test keeps its files.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The power cut: every write not yet synced is dropped. Returns once LazyFS says it is
    /// done. Call it only once every writer is dead (a live one would go on from a state no
    /// power loss leaves).
    pub fn power_cut(&mut self) {
        self.faults.write_all(b"lazyfs::clear-cache\n").unwrap();
        self.faults.flush().unwrap();
        let mut line = String::new();
        self.completed.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "finished::clear-cache",
            "LazyFS answered {line:?}"
        );
    }
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == path.to_str())
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mount)
            .status();
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = &self.dir;
    }
}
