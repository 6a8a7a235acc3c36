//! The secrets kmsctl reads: passphrases, unseal shares and DEKs from a file or stdin, and
//! the client's private key.
//!
//! Each is read into one buffer of its largest size, allocated before the first byte
//! comes: it never grows (a growing `String` or `Vec` leaves a copy of what it held so far
//! in every allocation it outgrows, freed without being wiped), it is wiped when dropped,
//! and stdin is read from its descriptor, not through std's buffer (which would keep a
//! copy for the life of the process). Error messages name the source, never the content.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use zeroize::Zeroizing;

/// Longest passphrase or unseal share read (the server takes request bodies of 64 KiB by
/// default).
pub(crate) const MAX_PASSPHRASE: usize = 64 << 10;

/// Longest DEK text read: a DEK is at most 64 bytes, 88 characters of base64; the rest is
/// room for whitespace.
const MAX_DEK_TEXT: usize = 4 << 10;

/// Largest client key file read (the PEM of an RSA-8192 key is under 7 KiB).
const MAX_KEY_FILE: usize = 64 << 10;

/// How a source is named in messages.
fn name(source: &Path) -> String {
    if source.as_os_str() == "-" {
        "stdin".into()
    } else {
        source.display().to_string()
    }
}

/// Opens `source`, `-` being stdin.
fn open(source: &Path) -> anyhow::Result<Box<dyn Read>> {
    if source.as_os_str() == "-" {
        // A descriptor of its own on stdin: reads go straight into our buffer.
        #[cfg(unix)]
        {
            use std::os::fd::AsFd as _;
            let fd = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("opening stdin")?;
            return Ok(Box::new(File::from(fd)));
        }
        #[cfg(not(unix))]
        return Ok(Box::new(std::io::stdin()));
    }
    let file = File::open(source).with_context(|| format!("opening {}", source.display()))?;
    Ok(Box::new(file))
}

/// Reads all of `reader`, at most `max` bytes, into a buffer allocated once.
fn read_bounded(
    mut reader: impl Read,
    max: usize,
    name: &str,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    // One byte more than allowed, to tell "exactly max" from "longer".
    let mut buf = Zeroizing::new(vec![0u8; max.saturating_add(1)]);
    let mut len = 0;
    while len < buf.len() {
        match reader.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    if len > max {
        bail!("{name} is longer than {max} bytes");
    }
    // The bytes past `len` stay in the capacity, wiped with the rest on drop.
    buf.truncate(len);
    Ok(buf)
}

/// A passphrase or share (`what`) from `source` (`-`: stdin), without its final line
/// break.
pub(crate) fn read_secret(
    source: &Path,
    what: &str,
    max: usize,
) -> anyhow::Result<Zeroizing<String>> {
    let name = name(source);
    let mut bytes = read_bounded(open(source)?, max, &name)?;
    while bytes.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        bytes.pop();
    }
    let text =
        std::str::from_utf8(&bytes).map_err(|_| anyhow!("{name}: the {what} is not UTF-8 text"))?;
    // One copy, into a string of exactly its size (so it never grows either).
    let mut secret = Zeroizing::new(String::with_capacity(text.len()));
    secret.push_str(text);
    Ok(secret)
}

/// A DEK written in standard base64 in `source` (`-`: stdin), decoded.
pub(crate) fn read_dek(source: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let name = name(source);
    let text = read_bounded(open(source)?, MAX_DEK_TEXT, &name)?;
    let text = text.trim_ascii();
    let mut dek = Zeroizing::new(vec![0u8; text.len().div_ceil(4) * 3]);
    let n = B64
        .decode_slice(text, &mut dek[..])
        .map_err(|_| anyhow!("the DEK in {name} is not standard base64"))?;
    dek.truncate(n);
    Ok(dek)
}

/// The client's private key (PEM) from `path`. Like ssh, refused when the file grants any
/// permission to its group or to others: other users of the machine could act as this
/// identity. The mode is read from the opened file, so it is that of the bytes used.
pub(crate) fn read_private_key(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file
            .metadata()
            .with_context(|| format!("reading the mode of {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{p}: the client private key is open to other users (mode {:04o}): anyone who \
                 can read it can act as this identity. Make it yours only: chmod 600 {p}",
                mode & 0o7777,
                p = path.display()
            );
        }
    }
    read_bounded(file, MAX_KEY_FILE, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out one byte per call, like a slow pipe.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    /// Read a byte at a time, the buffer is the one allocated first (it never grew), and
    /// one byte past the limit is refused.
    #[test]
    fn bounded_reads_never_grow_and_stop_at_the_limit() {
        let data = vec![b'x'; 1000];
        let buf = read_bounded(Trickle(&data), 1000, "test").unwrap();
        assert_eq!(&buf[..], &data[..]);
        assert_eq!(buf.capacity(), 1001);
        let err = read_bounded(Trickle(&data), 999, "test").unwrap_err();
        assert!(err.to_string().contains("longer than 999 bytes"), "{err}");
        assert!(read_bounded(Trickle(b""), 10, "test").unwrap().is_empty());
    }

    #[test]
    fn secrets_lose_their_line_break_and_errors_do_not_echo_them() {
        let dir = tempfile_dir();
        let file = dir.join("pass");
        std::fs::write(&file, "correct horse \r\n").unwrap();
        let pass = read_secret(&file, "passphrase", MAX_PASSPHRASE).unwrap();
        assert_eq!(pass.as_str(), "correct horse ");
        assert_eq!(pass.capacity(), pass.len());
        std::fs::write(&file, b"sekrit\xff").unwrap();
        let err = read_secret(&file, "passphrase", MAX_PASSPHRASE).unwrap_err();
        assert!(err.to_string().contains("not UTF-8") && !format!("{err:#}").contains("sekrit"));
        std::fs::write(&file, " AAECAwQFBgcICQoLDA0ODw==\n").unwrap();
        assert_eq!(
            &read_dek(&file).unwrap()[..],
            &(0..16).collect::<Vec<u8>>()[..]
        );
        std::fs::write(&file, "sekrit!!").unwrap();
        let err = format!("{:#}", read_dek(&file).unwrap_err());
        assert!(
            err.contains("not standard base64") && !err.contains("sekrit"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kmsctl-secrets-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
