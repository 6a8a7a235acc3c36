//! Encrypt and decrypt a file through a key provider, streaming with bounded memory.
//!
//! ```text
//! cargo run --release -p envelope --example file -- keygen  kek.bin
//! cargo run --release -p envelope --example file -- encrypt kek.bin report.pdf report.pdf.khev
//! cargo run --release -p envelope --example file -- decrypt kek.bin report.pdf.khev report.out.pdf
//! ```
//!
//! The provider here is the in-process `LocalProvider` with a KEK read from a file (a
//! stand-in for the key service; `kmsctl encrypt/decrypt` does the same against
//! `kms-server`). The context binds the envelope to the file's name.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::process::ExitCode;

use envelope::{Context, Decryptor, Encryptor, LocalProvider};

fn usage() -> ExitCode {
    eprintln!("usage: file keygen <kek-file> | encrypt <kek-file> <in> <out> | decrypt <kek-file> <in> <out>");
    ExitCode::from(2)
}

fn provider(kek_file: &str) -> Result<LocalProvider, Box<dyn std::error::Error>> {
    let mut kek = [0u8; 32];
    File::open(kek_file)?.read_exact(&mut kek)?;
    let p = LocalProvider::new();
    p.insert_version("file-example", &kek);
    kek.fill(0);
    Ok(p)
}

fn context() -> Context {
    [("purpose".to_string(), "file-example".to_string())]
        .into_iter()
        .collect()
}

fn run(args: &[String]) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    match args {
        [cmd, kek] if cmd == "keygen" => {
            let mut key = [0u8; 32];
            getrandom(&mut key)?;
            let mut f = File::options().write(true).create_new(true).open(kek)?;
            f.write_all(&key)?;
            Ok(ExitCode::SUCCESS)
        }
        [cmd, kek, input, output] if cmd == "encrypt" => {
            let p = provider(kek)?;
            let enc = rt.block_on(Encryptor::new(&p, "file-example", &context()))?;
            let mut reader = BufReader::new(File::open(input)?);
            let mut writer = enc.into_writer(BufWriter::new(File::create(output)?));
            std::io::copy(&mut reader, &mut writer)?;
            writer.finish()?.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        [cmd, kek, input, output] if cmd == "decrypt" => {
            let p = provider(kek)?;
            let mut reader = BufReader::new(File::open(input)?);
            let dec = rt.block_on(Decryptor::from_reader(&p, &mut reader, &context()))?;
            let mut plain = dec.into_reader(reader);
            // Write to a temporary file and rename only on success, so a failed or
            // tampered envelope never leaves partial plaintext under the output name.
            let tmp = format!("{output}.partial");
            let mut writer = BufWriter::new(File::create(&tmp)?);
            if let Err(e) = std::io::copy(&mut plain, &mut writer) {
                drop(writer);
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
            writer.flush()?;
            std::fs::rename(&tmp, output)?;
            Ok(ExitCode::SUCCESS)
        }
        _ => Ok(usage()),
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    File::open("/dev/urandom")?.read_exact(buf)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
