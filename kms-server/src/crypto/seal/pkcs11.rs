//! PKCS#11 sealing: the master key is encrypted (AES-256-GCM, `CKM_AES_GCM`) *inside* a
//! hardware security module by a key that never leaves it (`CKA_SENSITIVE` true,
//! `CKA_EXTRACTABLE` false, a token object). The store holds only the ciphertext; without
//! the token and its user PIN the master key cannot be recovered. Tests run against
//! SoftHSM2; the same code drives a real HSM through its vendor's PKCS#11 module.
//!
//! Configuration (`[seal.pkcs11]`): the module path, the token label, the wrapping key's
//! label, and the user PIN from a file (or the `KEYHOLD_PKCS11_PIN` environment variable).
//! `kms-server init` creates the wrapping key in the token when none has that label;
//! `serve` unseals at start (as with a key file) and `POST /v1/sys/unseal` retries.
//!
//! A PKCS#11 library may be initialized once per process, so one context per process is
//! kept for the configured module ([`context`]); each operation opens its own session.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{check_method, hex, unhex, SealError, SealMethod, SealedMasterKey, Sealer};
use crate::crypto::secret::SecretKey;

/// Environment variable with the token's user PIN, when no `pin_file` is configured.
pub const PIN_ENV: &str = "KEYHOLD_PKCS11_PIN";
/// Default label of the wrapping key in the token.
const DEFAULT_KEY_LABEL: &str = "keyhold-master-wrap";

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// Where the token and its wrapping key are (`[seal.pkcs11]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token holding the wrapping key.
    pub token_label: String,
    /// Label of the wrapping key.
    #[serde(default = "default_key_label")]
    pub key_label: String,
    /// File holding the user PIN; without it, [`PIN_ENV`].
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
}

fn default_key_label() -> String {
    DEFAULT_KEY_LABEL.into()
}

/// What the sealed record says about the token (public: labels and the GCM nonce).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Params {
    /// Token label at sealing time.
    pub token_label: String,
    /// Wrapping key label.
    pub key_label: String,
    /// GCM nonce, hex.
    pub iv: String,
}

/// Seals the master key with a key held in a PKCS#11 token.
pub struct Pkcs11Sealer {
    settings: Pkcs11Settings,
    /// The PIN, or why it could not be read (reported when the token is used).
    pin: Result<Zeroizing<String>, String>,
}

impl std::fmt::Debug for Pkcs11Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Sealer")
            .field("settings", &self.settings)
            .field("pin", &self.pin.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

fn p11(what: &'static str) -> impl Fn(P11Error) -> SealError {
    move |e| match e {
        P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _) => {
            SealError::WrongSecret("PKCS#11 user PIN")
        }
        P11Error::Pkcs11(RvError::PinLocked, _) => {
            SealError::Pkcs11(format!("{what}: the token's user PIN is locked"))
        }
        e => SealError::Pkcs11(format!("{what}: {e}")),
    }
}

/// The process's PKCS#11 module and context, once loaded.
static CONTEXT: OnceLock<Mutex<Option<(PathBuf, Pkcs11)>>> = OnceLock::new();

/// Finalizes the process's PKCS#11 module (`C_Finalize`), if one was loaded; call it once
/// nothing uses the token any more, before the process exits. Modules written in C++
/// (SoftHSM among them) free their global state in exit-time destructors, and those have
/// been seen to crash ("double free") when the application never called `C_Finalize`.
/// A later use loads the module again.
///
/// `C_Finalize` runs on a thread of its own, joined here: a module that keeps per-thread
/// state (SoftHSM through OpenSSL) has then freed it before this returns, instead of in
/// the caller's thread-exit destructors, which could run while the process exits.
pub fn finalize() {
    let taken = CONTEXT
        .get()
        .and_then(|m| m.lock().unwrap_or_else(PoisonError::into_inner).take());
    if let Some((module, ctx)) = taken {
        let done = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("keyhold-pkcs11-finalize".into())
                .spawn_scoped(s, move || ctx.finalize())
                .map(|t| t.join())
        });
        match done {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(module = %module.display(), error = %e, "PKCS#11 C_Finalize failed")
            }
            Ok(Err(_)) => tracing::warn!(module = %module.display(), "PKCS#11 C_Finalize panicked"),
            Err(e) => {
                tracing::warn!(module = %module.display(), error = %e, "PKCS#11 C_Finalize: no thread")
            }
        }
    }
}

/// The process's PKCS#11 context for `module` (initialized on first use).
fn context(module: &Path) -> Result<Pkcs11, SealError> {
    let mut slot = CONTEXT
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((path, ctx)) = slot.as_ref() {
        if path == module {
            return Ok(ctx.clone());
        }
        return Err(SealError::Pkcs11(format!(
            "this process already uses the PKCS#11 module {}",
            path.display()
        )));
    }
    let ctx = Pkcs11::new(module)
        .map_err(|e| SealError::Pkcs11(format!("loading the module {}: {e}", module.display())))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(p11("C_Initialize"))?;
    *slot = Some((module.to_owned(), ctx.clone()));
    Ok(ctx)
}

impl Pkcs11Sealer {
    /// With the PIN from `pin_file` or [`PIN_ENV`], read now; when it cannot be read,
    /// every operation fails with [`SealError::NoSecret`] saying why.
    pub fn new(settings: Pkcs11Settings) -> Self {
        let pin = match &settings.pin_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let text = Zeroizing::new(text);
                    Ok(Zeroizing::new(
                        text.trim_end_matches(['\n', '\r']).to_owned(),
                    ))
                }
                Err(e) => Err(format!("PIN file {}: {e}", path.display())),
            },
            None => std::env::var(PIN_ENV)
                .map(Zeroizing::new)
                .map_err(|_| format!("no seal.pkcs11.pin_file and no {PIN_ENV}")),
        };
        Self { settings, pin }
    }

    /// [`Pkcs11Sealer::new`], or, without settings, a sealer whose every operation fails
    /// asking for `[seal.pkcs11]`.
    pub fn from_settings(settings: Option<Pkcs11Settings>) -> Self {
        match settings {
            Some(s) => Self::new(s),
            None => Self {
                settings: Pkcs11Settings {
                    module: PathBuf::new(),
                    token_label: String::new(),
                    key_label: default_key_label(),
                    pin_file: None,
                },
                pin: Err("the configuration has no [seal.pkcs11] section".into()),
            },
        }
    }

    /// A logged-in read-write session on the configured token.
    fn session(&self) -> Result<Session, SealError> {
        let pin = self
            .pin
            .as_ref()
            .map_err(|why| SealError::Pkcs11(format!("the user PIN is unavailable: {why}")))?;
        let ctx = context(&self.settings.module)?;
        let slot = ctx
            .get_slots_with_token()
            .map_err(p11("listing slots"))?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .is_ok_and(|t| t.label().trim_end() == self.settings.token_label)
            })
            .ok_or_else(|| {
                SealError::Pkcs11(format!(
                    "no token labelled {:?} in {}",
                    self.settings.token_label,
                    self.settings.module.display()
                ))
            })?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(p11("opening a session"))?;
        let auth = AuthPin::new(pin.as_str().into());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(p11("login")(e)),
        }
    }

    fn find_key(&self, session: &Session) -> Result<Option<ObjectHandle>, SealError> {
        find_labelled(session, &self.settings.key_label)
    }

    /// Creates the wrapping key in the token (see [`create_labelled`]).
    fn create_key(&self, session: &Session) -> Result<ObjectHandle, SealError> {
        create_labelled(session, &self.settings.key_label)
    }

    /// The configured wrapping key's label (other keys this service keeps in the token
    /// are named after it, e.g. the erasure epoch keys of [`crate::storage::erasure::shared`]).
    pub fn key_label(&self) -> &str {
        &self.settings.key_label
    }

    /// A logged-in session on the configured token, for keys other than the master
    /// wrapping key ([`TokenSession`]).
    pub fn token_session(&self) -> Result<TokenSession, SealError> {
        Ok(TokenSession {
            session: self.session()?,
        })
    }

    fn aad(key_label: &str) -> Vec<u8> {
        let mut aad = b"keyhold/master-key/v1/pkcs11\0".to_vec();
        aad.extend_from_slice(key_label.as_bytes());
        aad
    }
}

/// The AES key labelled `label`, if the token has exactly one.
fn find_labelled(session: &Session, label: &str) -> Result<Option<ObjectHandle>, SealError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(p11("finding a key"))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(SealError::Pkcs11(format!(
            "{} keys are labelled {label:?}: refusing to guess",
            found.len()
        ))),
    }
}

/// Creates an AES-256 key labelled `label` in the token: a token object, private,
/// sensitive, never extractable, for encrypt/decrypt only.
fn create_labelled(session: &Session, label: &str) -> Result<ObjectHandle, SealError> {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::ValueLen(32.into()),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        )
        .map_err(p11("creating a key"))
}

/// A logged-in session on the sealing token, for the other non-extractable AES keys the
/// service keeps there, each named by its label: encrypt and decrypt (AES-256-GCM, the
/// nonce in front of the ciphertext) inside the token, create, destroy.
pub struct TokenSession {
    session: Session,
}

impl std::fmt::Debug for TokenSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSession")
    }
}

impl TokenSession {
    /// Whether the token holds a key labelled `label`.
    pub fn has_key(&self, label: &str) -> Result<bool, SealError> {
        Ok(find_labelled(&self.session, label)?.is_some())
    }

    /// Creates the key labelled `label` unless the token has it already.
    pub fn ensure_key(&self, label: &str) -> Result<(), SealError> {
        if find_labelled(&self.session, label)?.is_none() {
            create_labelled(&self.session, label)?;
        }
        Ok(())
    }

    /// Encrypts `plaintext` under the key labelled `label`: nonce ‖ ciphertext ‖ tag.
    pub fn encrypt(&self, label: &str, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let key = find_labelled(&self.session, label)?
            .ok_or_else(|| SealError::Pkcs11(format!("the token has no key labelled {label:?}")))?;
        let mut iv = [0u8; IV_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut iv)
            .map_err(|_| SealError::Random)?;
        let mut out = iv.to_vec();
        let params =
            GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(p11("GCM parameters"))?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(p11("encrypting in the token"))?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens an [`TokenSession::encrypt`] result. `Ok(None)`: the token has no key
    /// labelled `label` (destroyed); a blob that fails authentication is an error.
    pub fn decrypt(
        &self,
        label: &str,
        aad: &[u8],
        blob: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, SealError> {
        let Some(key) = find_labelled(&self.session, label)? else {
            return Ok(None);
        };
        let (iv, ciphertext) = blob
            .split_first_chunk::<IV_LEN>()
            .ok_or(SealError::Malformed)?;
        let mut iv = *iv;
        let gcm = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(p11("GCM parameters"))?;
        let plain = self
            .session
            .decrypt(&Mechanism::AesGcm(gcm), key, ciphertext)
            .map_err(|e| match e {
                P11Error::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                ) => SealError::Malformed,
                e => p11("decrypting in the token")(e),
            })?;
        Ok(Some(Zeroizing::new(plain)))
    }

    /// Destroys the key labelled `label`; `false` when the token has none.
    pub fn destroy_key(&self, label: &str) -> Result<bool, SealError> {
        match find_labelled(&self.session, label)? {
            Some(key) => {
                self.session
                    .destroy_object(key)
                    .map_err(p11("destroying a key"))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Sealer for Pkcs11Sealer {
    fn method(&self) -> SealMethod {
        SealMethod::Pkcs11
    }

    /// Encrypts the master key in the token; creates the wrapping key first when the
    /// token has none with the configured label (at `init`).
    fn seal(&self, master: &SecretKey) -> Result<SealedMasterKey, SealError> {
        let session = self.session()?;
        let key = match self.find_key(&session)? {
            Some(k) => k,
            None => self.create_key(&session)?,
        };
        let mut iv = [0u8; IV_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut iv)
            .map_err(|_| SealError::Random)?;
        let iv_hex = hex(&iv);
        let aad = Self::aad(&self.settings.key_label);
        let params =
            GcmParams::new(&mut iv, &aad, TAG_BITS.into()).map_err(p11("GCM parameters"))?;
        let sealed = session
            .encrypt(&Mechanism::AesGcm(params), key, master.expose_secret())
            .map_err(p11("encrypting the master key in the token"))?;
        Ok(SealedMasterKey {
            method: SealMethod::Pkcs11,
            argon2: None,
            shamir: None,
            pkcs11: Some(Pkcs11Params {
                token_label: self.settings.token_label.clone(),
                key_label: self.settings.key_label.clone(),
                iv: iv_hex,
            }),
            sealed: hex(&sealed),
        })
    }

    fn unseal(&self, sealed: &SealedMasterKey) -> Result<SecretKey, SealError> {
        check_method(sealed, SealMethod::Pkcs11)?;
        let params = sealed.pkcs11.as_ref().ok_or(SealError::Malformed)?;
        if params.key_label != self.settings.key_label {
            return Err(SealError::Pkcs11(format!(
                "the store was sealed with the token key {:?}, the configuration names {:?}",
                params.key_label, self.settings.key_label
            )));
        }
        let mut iv: [u8; IV_LEN] = unhex(&params.iv)
            .and_then(|v| v.try_into().ok())
            .ok_or(SealError::Malformed)?;
        let ciphertext = unhex(&sealed.sealed).ok_or(SealError::Malformed)?;
        let session = self.session()?;
        let key = self.find_key(&session)?.ok_or_else(|| {
            SealError::Pkcs11(format!(
                "the token has no key labelled {:?}",
                self.settings.key_label
            ))
        })?;
        let aad = Self::aad(&params.key_label);
        let gcm = GcmParams::new(&mut iv, &aad, TAG_BITS.into()).map_err(p11("GCM parameters"))?;
        let plain = Zeroizing::new(
            session
                .decrypt(&Mechanism::AesGcm(gcm), key, &ciphertext)
                .map_err(|e| match e {
                    P11Error::Pkcs11(
                        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                        _,
                    ) => SealError::WrongSecret("PKCS#11 wrapping key"),
                    e => p11("decrypting the master key in the token")(e),
                })?,
        );
        SecretKey::from_slice(&plain).ok_or(SealError::Malformed)
    }
}
