//! This key service's signing key: `/certs` and the KACLS-to-KACLS tokens it signs.

use axum::http::StatusCode;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;

use super::CseError;

/// This KACLS's signing key: `/certs` and the KACLS-to-KACLS tokens of `rewrap`.
pub(super) struct Signer {
    key: aws_lc_rs::signature::RsaKeyPair,
    kid: String,
    pub(super) jwk: serde_json::Value,
}

impl Signer {
    pub(super) fn load(path: &std::path::Path) -> Result<Self, String> {
        use rsa::pkcs8::DecodePublicKey as _;
        use rsa::traits::PublicKeyParts as _;
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let b64: zeroize::Zeroizing<String> = zeroize::Zeroizing::new(
            text.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        );
        let der = zeroize::Zeroizing::new(
            B64.decode(b64.as_bytes())
                .map_err(|_| format!("{}: not a PEM key", path.display()))?,
        );
        let key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|_| format!("{}: not an RSA PKCS#8 key", path.display()))?;
        let spki = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(
            aws_lc_rs::signature::KeyPair::public_key(&key),
        )
        .map_err(|_| "the signing key's public half".to_owned())?;
        let public = rsa::RsaPublicKey::from_public_key_der(spki.as_ref())
            .map_err(|_| "the signing key's public half".to_owned())?;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
        // The key id: a digest of the modulus, stable across restarts.
        let kid = crate::crypto::seal::hex(
            &ring::digest::digest(&ring::digest::SHA256, n.as_bytes()).as_ref()[..8],
        );
        let jwk = json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                         "n": n, "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be())});
        Ok(Self { key, kid, jwk })
    }

    /// An RS256 JWT of `claims`.
    pub(super) fn sign(&self, claims: &serde_json::Value) -> Result<String, CseError> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                message.as_bytes(),
                &mut sig,
            )
            .map_err(|_| CseError::new(StatusCode::INTERNAL_SERVER_ERROR, "signing failed"))?;
        Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}
