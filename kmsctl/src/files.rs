//! `encrypt` and `decrypt`: files (or stdin/stdout) through the envelope format, with a
//! progress bar on large files. Output files are written to a temporary file in the same
//! folder and renamed only on success: an interrupted or failed run never leaves a
//! partial file under the output name, and `decrypt` never leaves unauthenticated
//! plaintext behind. Every file kmsctl writes (decrypted data, backups, ciphertext) is
//! created readable by its owner only (0600), and a run stopped by Ctrl-C or SIGTERM
//! removes its temporary file before it exits ([`remove_partial_files_on_interrupt`]).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context as _};
use envelope::{Decryptor, Encryptor};
use indicatif::{ProgressBar, ProgressStyle};
use kms_client::api::Context;
use kms_client::Client;

/// Files at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN: u64 = 8 << 20;

pub(crate) fn read_all(input: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match input {
        Some(p) => {
            File::open(p)
                .with_context(|| format!("opening {}", p.display()))?
                .read_to_end(&mut buf)?;
        }
        None => {
            io::stdin().read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}

pub(crate) fn open_input(input: Option<&Path>) -> anyhow::Result<(Box<dyn Read>, Option<u64>)> {
    match input {
        Some(p) => {
            let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            Ok((Box::new(BufReader::with_capacity(256 << 10, f)), len))
        }
        None => Ok((Box::new(io::stdin().lock()), None)),
    }
}

fn progress(len: Option<u64>) -> ProgressBar {
    progress_over(len, PROGRESS_MIN)
}

/// A progress bar over `len` bytes when that is at least `min` and stderr is a terminal.
pub(crate) fn progress_over(len: Option<u64>, min: u64) -> ProgressBar {
    match len {
        Some(n) if n >= min && io::stderr().is_terminal() => {
            let pb = ProgressBar::new(n);
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                pb.set_style(style);
            }
            pb
        }
        _ => ProgressBar::hidden(),
    }
}

/// Temporary files of [`Staged`] not committed yet: a process stopped by a signal runs no
/// destructors, so the signal handler removes them.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// On Ctrl-C (SIGINT) or SIGTERM: removes the temporary files of unfinished writes and
/// exits with 130. A thread of its own, so it runs while the main thread blocks on a read.
pub(crate) fn remove_partial_files_on_interrupt() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            #[cfg(unix)]
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            let _ = tokio::signal::ctrl_c().await;
        });
        for path in pending().drain(..) {
            let _ = std::fs::remove_file(path);
        }
        std::process::exit(130);
    });
}

/// A file written beside its final name and renamed into place by `commit`.
pub(crate) struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Staged {
    pub(crate) fn create(target: &Path) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("{} is not a file path", target.display()))?;
        let tmp = target.with_file_name(format!(
            ".{}.kmsctl-{}.partial",
            name.to_string_lossy(),
            std::process::id()
        ));
        pending().push(tmp.clone());
        let mut options = File::options();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            file: Some(BufWriter::with_capacity(256 << 10, file)),
        })
    }

    pub(crate) fn writer(&mut self) -> &mut BufWriter<File> {
        // `file` is Some until `commit` takes it.
        self.file
            .get_or_insert_with(|| unreachable!("staged file used after commit"))
    }

    pub(crate) fn commit(mut self) -> anyhow::Result<()> {
        if let Some(w) = self.file.take() {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
        std::fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("renaming into {}", self.target.display()))?;
        pending().retain(|p| *p != self.tmp);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
        pending().retain(|p| *p != self.tmp);
    }
}

/// Writes `value` as JSON to `path`, in full or not at all.
pub(crate) fn write_json_file(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let mut staged = Staged::create(path)?;
    serde_json::to_writer(staged.writer(), value)?;
    staged.commit()
}

pub(crate) async fn encrypt(
    client: &Client,
    key: &str,
    input: Option<&Path>,
    output: Option<&Path>,
    context: &Context,
) -> anyhow::Result<()> {
    let (mut reader, len) = open_input(input)?;
    let enc = Encryptor::new(client, key, context)
        .await
        .context("getting a data key from the server")?;
    let pb = progress(len);
    match output {
        Some(path) => {
            let mut staged = Staged::create(path)?;
            let mut w = enc.into_writer(staged.writer());
            io::copy(&mut pb.wrap_read(&mut reader), &mut w).context("encrypting")?;
            w.finish().context("writing the last segment")?;
            staged.commit()?;
        }
        None => {
            let stdout = io::stdout().lock();
            if stdout.is_terminal() {
                bail!("refusing to write binary ciphertext to a terminal: use --out <file> or redirect stdout");
            }
            let mut w = enc.into_writer(BufWriter::new(stdout));
            io::copy(&mut pb.wrap_read(&mut reader), &mut w).context("encrypting")?;
            w.finish()?.flush()?;
        }
    }
    pb.finish_and_clear();
    Ok(())
}

pub(crate) async fn decrypt(
    client: &Client,
    input: Option<&Path>,
    output: Option<&Path>,
    context: &Context,
) -> anyhow::Result<()> {
    let (mut reader, len) = open_input(input)?;
    let dec = Decryptor::from_reader(client, &mut reader, context)
        .await
        .context("opening the envelope")?;
    let pb = progress(len);
    let mut plain = dec.into_reader(reader);
    match output {
        Some(path) => {
            let mut staged = Staged::create(path)?;
            io::copy(&mut plain, &mut pb.wrap_write(staged.writer()))
                .map_err(map_decrypt_io)
                .context("decrypting")?;
            staged.commit()?;
        }
        None => {
            let mut stdout = BufWriter::new(io::stdout().lock());
            io::copy(&mut plain, &mut stdout)
                .map_err(map_decrypt_io)
                .context("decrypting")?;
            stdout.flush()?;
        }
    }
    pb.finish_and_clear();
    Ok(())
}

fn map_decrypt_io(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::InvalidData {
        anyhow::Error::new(e)
            .context("the envelope is damaged, truncated, or not for this key and context")
    } else {
        e.into()
    }
}
