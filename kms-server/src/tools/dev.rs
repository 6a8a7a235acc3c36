//! Dev mode: a throwaway, single-machine Keyhold that works in one command.
//!
//! `kms-server dev` creates, under its data dir (kept between runs): a CA and server,
//! admin and app certificates (`pki/`), a key file that unseals the store, the store,
//! a config file (`kms-server.toml`, the same format production uses), and a demo key
//! `demo` usable by the app identity. Then it serves and prints commands to paste.
//! NOT FOR PRODUCTION: the key file sits next to the store it unseals.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kms_client::api::{Algorithm, Grant, GrantOperation};

use crate::app::config::Settings;
use crate::app::server;
use crate::base::error::Error;
use crate::crypto::seal::KeyFileSealer;
use crate::tools::pki::Pki;

/// Tenant of the dev identities.
pub const DEV_TENANT: &str = "dev";
/// The admin identity (URI SAN of `pki/admin.pem`).
pub const DEV_ADMIN: &str = "spiffe://keyhold.dev/admin";
/// The app identity (URI SAN of `pki/app.pem`).
pub const DEV_APP: &str = "spiffe://keyhold.dev/app";
/// The auditor identity (URI SAN of `pki/auditor.pem`).
pub const DEV_AUDITOR: &str = "spiffe://keyhold.dev/auditor";
/// The service operator identity, role `sys` (URI SAN of `pki/sys.pem`): seal, unseal,
/// backup, master-key rotation.
pub const DEV_SYS: &str = "spiffe://keyhold.dev/sys";
/// The demo key.
pub const DEMO_KEY: &str = "demo";

/// The files dev mode keeps under its data dir.
#[derive(Debug, Clone)]
pub struct DevLayout {
    /// The data dir.
    pub dir: PathBuf,
}

impl DevLayout {
    /// A file under the data dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// The dev token issuer (`kms-server dev token`): its `iss`, the key id in its JWK set.
pub const DEV_ISSUER: &str = "https://keyhold.dev/dev-issuer";
const DEV_ISSUER_KID: &str = "dev-issuer-1";
/// The DKE key of dev mode (an RSA-2048 Keyhold key of the same name).
pub const DEMO_DKE_KEY: &str = "demo-dke";
/// The identity DKE calls run as in dev mode.
pub const DEV_DKE_IDENTITY: &str = "dke:dev";
/// The user dev-mode DKE lets decrypt.
pub const DEV_DKE_USER: &str = "alice@example.com";

/// Makes the dev token issuer's key (PKCS#8 PEM, mode 600) and its JWK set, once.
fn prepare_issuer(layout: &DevLayout) -> anyhow::Result<()> {
    use aws_lc_rs::encoding::AsDer as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    if layout.path("dev-issuer-key.pem").exists() && layout.path("dev-jwks.json").exists() {
        return Ok(());
    }
    let key = aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("dev issuer key generation failed"))?;
    let der = key
        .as_der()
        .map_err(|_| anyhow::anyhow!("dev issuer key encoding failed"))?;
    let body = STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line)?);
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let spki = key
        .public_key()
        .as_der()
        .map_err(|_| anyhow::anyhow!("dev issuer public key encoding failed"))?;
    let public = rsa::RsaPublicKey::from_public_key_der(spki.as_ref())?;
    let jwks = serde_json::json!({"keys": [{
        "kty": "RSA", "kid": DEV_ISSUER_KID, "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    }]});
    write_private(&layout.path("dev-issuer-key.pem"), &pem)?;
    fs::write(
        layout.path("dev-jwks.json"),
        serde_json::to_vec_pretty(&jwks)?,
    )?;
    Ok(())
}

/// What a dev token is for.
#[derive(Debug, Clone)]
pub enum DevToken {
    /// Microsoft DKE: a bearer token for the dev config's DKE audience.
    Dke,
    /// Google Cloud EKM: a bearer token of Cloud KMS's service agent (`email`) for the
    /// dev config's EKM audience.
    Ekm,
    /// Google Workspace CSE: the `authentication` (IdP) and `authorization` (Google)
    /// tokens, as the JSON fields a CSE request carries, for `role` on `resource`.
    Cse {
        /// `reader`, `writer` or `upgrader`.
        role: String,
        /// The resource name.
        resource: String,
    },
}

/// The Google authorization issuer dev mode plays (its tokens are signed by the dev key).
pub const DEV_GOOGLE_ISSUER: &str = "gsuitecse-tokenissuer-drive@system.gserviceaccount.com";
/// The audience of the dev IdP's CSE authentication tokens.
pub const DEV_CSE_AUDIENCE: &str = "keyhold-dev-kacls";
/// The AES key dev-mode CSE wraps with.
pub const DEMO_CSE_KEY: &str = "demo-cse";
/// The identity CSE calls run as in dev mode.
pub const DEV_CSE_IDENTITY: &str = "cse:dev";
/// The AES key dev-mode EKM wraps with, and its key path.
pub const DEMO_EKM_KEY: &str = "demo-ekm";
/// The identity EKM calls run as in dev mode.
pub const DEV_EKM_IDENTITY: &str = "ekm:dev";
/// The caller dev-mode EKM allows (a Cloud KMS service agent's form).
pub const DEV_EKM_CALLER: &str = "service-0@gcp-sa-ekms.iam.gserviceaccount.com";

/// Salesforce in dev mode: the identity of its callouts, its Keyhold key and key id.
pub const DEV_SF_IDENTITY: &str = "salesforce:dev";
/// The Keyhold key dev-mode Salesforce data keys are made under.
pub const DEMO_SF_KEY: &str = "demo-salesforce";
/// The key identifier dev mode serves.
pub const DEV_SF_KID: &str = "dev-sf-1";

/// The dev stand-ins for Salesforce's side, once: a 4096-bit RSA test certificate (its key
/// beside it, to open the JWE with) and the callout credential.
fn prepare_salesforce(layout: &DevLayout) -> anyhow::Result<()> {
    use aws_lc_rs::encoding::AsDer as _;
    if layout.path("dev-salesforce.crt").exists() {
        return Ok(());
    }
    let key = aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa4096)
        .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
    let der = key
        .as_der()
        .map_err(|_| anyhow::anyhow!("RSA key encoding failed"))?;
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_ref().to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["salesforce-dev-byok".to_owned()])?
        .self_signed(&pair)?;
    write_private(
        &layout.path("dev-salesforce-key.pem"),
        &pair.serialize_pem(),
    )?;
    fs::write(layout.path("dev-salesforce.crt"), cert.pem())?;
    let mut secret = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| anyhow::anyhow!("random"))?;
    write_private(
        &layout.path("dev-salesforce-credential"),
        &format!("{}\n", crate::crypto::seal::hex(&secret)),
    )?;
    Ok(())
}

/// A token (DKE), or the two tokens of a CSE request as JSON fields, from the dev issuer
/// for `email`, valid `ttl` (`kms-server dev token`).
pub fn token(
    dir: &Path,
    email: &str,
    ttl: std::time::Duration,
    what: &DevToken,
) -> anyhow::Result<String> {
    let config = dir.join("kms-server.toml");
    let settings = Settings::load(&config)?;
    let pem = fs::read(dir.join("dev-issuer-key.pem"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let sign = |claims: serde_json::Value| -> anyhow::Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(DEV_ISSUER_KID.to_owned());
        Ok(jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(&pem)?,
        )?)
    };
    let missing =
        |t: &str| anyhow::anyhow!("{}: no [{t}]: run `kms-server dev` once", config.display());
    match what {
        DevToken::Dke => {
            let dke = settings.dke.ok_or_else(|| missing("dke"))?;
            sign(serde_json::json!({
                "iss": DEV_ISSUER, "aud": dke.url, "email": email,
                "iat": now, "exp": now + ttl.as_secs(),
            }))
        }
        DevToken::Ekm => {
            let ekm = settings.ekm.ok_or_else(|| missing("ekm"))?;
            let aud = ekm.jwt.audiences.first().cloned().unwrap_or_default();
            sign(serde_json::json!({
                "iss": DEV_ISSUER, "aud": aud, "email": email,
                "iat": now, "exp": now + ttl.as_secs(),
            }))
        }
        DevToken::Cse { role, resource } => {
            let cse = settings.cse.ok_or_else(|| missing("cse"))?;
            let authentication = sign(serde_json::json!({
                "iss": DEV_ISSUER, "aud": DEV_CSE_AUDIENCE, "email": email,
                "iat": now, "exp": now + ttl.as_secs(),
            }))?;
            let authorization = sign(serde_json::json!({
                "iss": DEV_GOOGLE_ISSUER, "aud": crate::adapters::cse::settings::AUTHZ_AUDIENCE,
                "email": email, "email_type": "google", "role": role,
                "resource_name": resource, "kacls_url": cse.kacls_url, "perimeter_id": "",
                "iat": now, "exp": now + ttl.as_secs(),
            }))?;
            Ok(serde_json::json!({
                "authentication": authentication,
                "authorization": authorization,
            })
            .to_string())
        }
    }
}

/// Creates (or reuses) the dev PKI, key file, token issuer, config, store and demo keys
/// under `dir`, and returns the config path.
pub fn prepare(
    dir: &Path,
    listen: SocketAddr,
    ops_listen: SocketAddr,
    public_listen: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let layout = DevLayout {
        dir: dir.to_path_buf(),
    };
    prepare_pki(&layout)?;
    let key_file = layout.path("master.key");
    if !key_file.exists() {
        KeyFileSealer::generate(&key_file)?;
    }
    prepare_issuer(&layout)?;
    prepare_salesforce(&layout)?;
    let config_path = layout.path("kms-server.toml");
    fs::write(&config_path, dev_config(listen, ops_listen, public_listen))?;
    let settings = Settings::load(&config_path)?;
    let keyring = server::open_keyring(&settings, crate::base::clock::Clock::system())?;
    let sealer = KeyFileSealer::new(&key_file);
    if keyring.sealed_master_key()?.is_none() {
        keyring.initialize(&sealer)?;
    }
    keyring.unseal(&sealer)?;
    create_demo_keys(&keyring)?;
    add_salesforce_key(&layout, &keyring, &config_path)?;
    keyring.seal();
    Ok(config_path)
}

/// The dev CA and the server's and each role's certificate, once.
fn prepare_pki(layout: &DevLayout) -> anyhow::Result<()> {
    fs::create_dir_all(layout.path("pki"))?;
    if !layout.path("pki/ca.pem").exists() {
        let ca = Pki::generate("Keyhold dev CA (NOT FOR PRODUCTION)")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
        let admin = ca.issue_client("keyhold-dev-admin", Some(DEV_ADMIN))?;
        let app = ca.issue_client("keyhold-dev-app", Some(DEV_APP))?;
        let auditor = ca.issue_client("keyhold-dev-auditor", Some(DEV_AUDITOR))?;
        let sys = ca.issue_client("keyhold-dev-sys", Some(DEV_SYS))?;
        for (name, issued) in [
            ("server", &server),
            ("admin", &admin),
            ("app", &app),
            ("auditor", &auditor),
            ("sys", &sys),
        ] {
            fs::write(layout.path(&format!("pki/{name}.pem")), &issued.cert_pem)?;
            write_private(
                &layout.path(&format!("pki/{name}-key.pem")),
                &issued.key_pem,
            )?;
        }
        fs::write(layout.path("pki/ca.pem"), ca.ca_pem())?;
    }
    if !layout.path("pki/sys.pem").exists() {
        tracing::warn!(
            "this dev data dir was made before the sys role: seal, unseal, backup and master-key rotation need it; remove {} to issue new dev certificates",
            layout.path("pki").display()
        );
    }
    Ok(())
}

/// The dev configuration: every listener on loopback, every protocol on the public one.
fn dev_config(listen: SocketAddr, ops_listen: SocketAddr, public_listen: SocketAddr) -> String {
    let public_port = public_listen.port();
    format!(
        r#"# Written by `kms-server dev`. NOT FOR PRODUCTION: the key file that unseals the
# store sits beside it. See deploy/kms-server.toml for a production example.
listen = "{listen}"
ops_listen = "{ops_listen}"

[store]
engine = "redb"
path = "keyhold.redb"

[seal]
method = "key-file"
key_file = "master.key"

[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"

# A developer machine: memory locked if the limit allows it, and whoever runs it (root
# included). Production keeps the defaults: mlock required, root refused.
[process]
mlock = "best-effort"
allow_root = true

[[identities]]
identity = "{DEV_ADMIN}"
tenant = "{DEV_TENANT}"
role = "admin"

[[identities]]
identity = "{DEV_APP}"
tenant = "{DEV_TENANT}"
role = "app"

[[identities]]
identity = "{DEV_AUDITOR}"
tenant = "{DEV_TENANT}"
role = "auditor"

[[identities]]
identity = "{DEV_SYS}"
tenant = "{DEV_TENANT}"
role = "sys"

# The end-user protocols, with a local token issuer (`kms-server dev token`).
[public]
listen = "{public_listen}"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[dke]
url = "https://localhost:{public_port}/dke"
issuers = ["{DEV_ISSUER}"]
jwks = "dev-jwks.json"
tenant = "{DEV_TENANT}"
identity = "{DEV_DKE_IDENTITY}"

[[dke.keys]]
name = "{DEMO_DKE_KEY}"
key = "{DEMO_DKE_KEY}"
emails = ["{DEV_DKE_USER}"]

[cse]
kacls_url = "https://localhost:{public_port}/cse"
tenant = "{DEV_TENANT}"
identity = "{DEV_CSE_IDENTITY}"
key = "{DEMO_CSE_KEY}"

[[cse.authorization]]
issuer = "{DEV_GOOGLE_ISSUER}"
jwks = "dev-jwks.json"

[[cse.authentication]]
issuer = "{DEV_ISSUER}"
audience = "{DEV_CSE_AUDIENCE}"
jwks = "dev-jwks.json"

[ekm]
url = "https://localhost:{public_port}/ekm"
issuers = ["{DEV_ISSUER}"]
jwks = "dev-jwks.json"
tenant = "{DEV_TENANT}"
identity = "{DEV_EKM_IDENTITY}"

[[ekm.keys]]
path = "v0/{DEMO_EKM_KEY}"
key = "{DEMO_EKM_KEY}"
callers = ["{DEV_EKM_CALLER}"]
allow_missing_reason = true

[salesforce]
tenant = "{DEV_TENANT}"
identity = "{DEV_SF_IDENTITY}"
credential_file = "dev-salesforce-credential"
certificate = "dev-salesforce.crt"
"#
    )
}

/// The demo keys, each granted to the one identity that uses it (default deny otherwise):
/// the app's AES key; DKE's RSA-2048 (as Office clients use; DKE may publish and decrypt);
/// CSE's and EKM's AES keys (wrap and unwrap); Salesforce's (a data key, then unwrap).
fn create_demo_keys(keyring: &crate::keyring::Keyring) -> anyhow::Result<()> {
    let wrap_unwrap = [GrantOperation::Wrap, GrantOperation::Unwrap];
    let keys: [(&str, Algorithm, &str, &[GrantOperation]); 5] = [
        (
            DEMO_KEY,
            Algorithm::Aes256Gcm,
            DEV_APP,
            &GrantOperation::ALL,
        ),
        (
            DEMO_DKE_KEY,
            Algorithm::RsaOaep2048Sha256,
            DEV_DKE_IDENTITY,
            &wrap_unwrap,
        ),
        (
            DEMO_CSE_KEY,
            Algorithm::Aes256Gcm,
            DEV_CSE_IDENTITY,
            &wrap_unwrap,
        ),
        (
            DEMO_EKM_KEY,
            Algorithm::Aes256Gcm,
            DEV_EKM_IDENTITY,
            &wrap_unwrap,
        ),
        (
            DEMO_SF_KEY,
            Algorithm::Aes256Gcm,
            DEV_SF_IDENTITY,
            &[GrantOperation::Datakey, GrantOperation::Unwrap],
        ),
    ];
    for (name, algorithm, identity, operations) in keys {
        let grant = Grant::new(identity, operations);
        match keyring.create_key(DEV_TENANT, name, algorithm, None, vec![grant]) {
            Ok(_) | Err(Error::AlreadyExists) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The data key Salesforce's demo key serves (made once, kept wrapped), appended to the
/// configuration as its `[[salesforce.keys]]` entry.
fn add_salesforce_key(
    layout: &DevLayout,
    keyring: &crate::keyring::Keyring,
    config_path: &Path,
) -> anyhow::Result<()> {
    let wrapped_file = layout.path("dev-salesforce.wrapped");
    if !wrapped_file.exists() {
        let who = crate::access::policy::Principal {
            identity: DEV_SF_IDENTITY.to_owned(),
            tenant: DEV_TENANT.to_owned(),
            role: crate::access::policy::Role::App,
        };
        let context: kms_client::api::Context = [(
            crate::adapters::salesforce::CONTEXT_KEY.to_owned(),
            DEV_SF_KID.to_owned(),
        )]
        .into_iter()
        .collect();
        let dk = keyring.lookups()?.datakey(&who, DEMO_SF_KEY, &context)?;
        use base64::Engine as _;
        fs::write(
            &wrapped_file,
            base64::engine::general_purpose::STANDARD.encode(&dk.wrapped),
        )?;
    }
    let wrapped = fs::read_to_string(&wrapped_file)?;
    let mut text = fs::read_to_string(config_path)?;
    text.push_str(&format!(
        "\n[[salesforce.keys]]\nkid = \"{DEV_SF_KID}\"\nkey = \"{DEMO_SF_KEY}\"\nwrapped = \"{}\"\n",
        wrapped.trim()
    ));
    fs::write(config_path, text)?;
    Ok(())
}

/// The banner with ready-to-paste commands.
pub fn banner(
    dir: &Path,
    listen: SocketAddr,
    ops_listen: SocketAddr,
    public_listen: SocketAddr,
) -> String {
    let d = dir.display();
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if listen.is_ipv6() {
        format!("[{}]", listen.ip())
    } else {
        listen.ip().to_string()
    };
    let url = format!("https://{host}:{}", listen.port());
    let public_port = public_listen.port();
    let app = format!(
        "curl -sS --cacert {d}/pki/ca.pem --cert {d}/pki/app.pem --key {d}/pki/app-key.pem -H 'content-type: application/json'"
    );
    let admin = format!(
        "curl -sS --cacert {d}/pki/ca.pem --cert {d}/pki/admin.pem --key {d}/pki/admin-key.pem -H 'content-type: application/json'"
    );
    format!(
        r#"
================================================================================
  Keyhold DEV MODE — NOT FOR PRODUCTION
  The master key file sits next to the store it unseals: {d}/master.key
================================================================================
  API (mTLS): {url}     ops (health, metrics): http://{ops_listen}
  data dir:   {d}   (config: {d}/kms-server.toml)

  Get a data key for the demo key (app identity), then unwrap it again:

    W=$({app} -d '{{"context":{{"doc":"42"}}}}' {url}/v1/keys/{DEMO_KEY}/datakey | sed -E 's/.*"wrapped":"([^"]+)".*/\1/'); echo "wrapped: $W"
    {app} -d "{{\"wrapped\":\"$W\",\"context\":{{\"doc\":\"42\"}}}}" {url}/v1/unwrap

  Manage keys (admin identity):

    {admin} {url}/v1/keys
    {admin} -X POST -d '{{"name":"orders"}}' {url}/v1/keys
    {admin} -X POST {url}/v1/keys/{DEMO_KEY}/rotate

  Audit trail (auditor identity): kmsctl --dev {d} audit verify

  Microsoft DKE on the public listener (https://localhost:{public_port}; no client
  certificate; docs/microsoft-dke.md). The key, then a token for {DEV_DKE_USER}:

    curl -sS --cacert {d}/pki/ca.pem https://localhost:{public_port}/dke/{DEMO_DKE_KEY}
    T=$(kms-server dev token --data-dir {d} --email {DEV_DKE_USER})

  Google Cloud EKM there too (docs/google-cloud-ekm.md): wrap as Cloud KMS would.

    curl -sS --cacert {d}/pki/ca.pem -H "authorization: Bearer $(kms-server dev token --data-dir {d} --protocol ekm --email {DEV_EKM_CALLER})" -H 'content-type: application/json' -d '{{"plaintext":"AAECAwQFBgcICQoLDA0ODw==","additionalAuthenticatedData":"YWFk"}}' https://localhost:{public_port}/ekm/v0/{DEMO_EKM_KEY}:wrap

  Salesforce cache-only key callout (docs/salesforce.md; test certificate and its key in
  the data dir):

    curl -sS --cacert {d}/pki/ca.pem -H "authorization: Bearer $(cat {d}/dev-salesforce-credential)" "https://localhost:{public_port}/salesforce/{DEV_SF_KID}?nonce=n1"

  Google Workspace CSE there too (docs/google-cse.md): wrap a key as a writer.

    kms-server dev token --data-dir {d} --protocol cse --role writer --resource doc1 --email {DEV_DKE_USER} | python3 -c 'import json,sys; t=json.load(sys.stdin); t.update(key="AAECAwQFBgcICQoLDA0ODw==", reason="try"); print(json.dumps(t))' | curl -sS --cacert {d}/pki/ca.pem -H 'content-type: application/json' -d @- https://localhost:{public_port}/cse/wrap

  Health: curl -sS http://{ops_listen}/readyz
================================================================================
"#
    )
}
