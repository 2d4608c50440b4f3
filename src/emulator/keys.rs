//! RS256 signing keys for the emulator (and for tests that need real tokens).
//! Tokens are signed by jsonwebtoken's `encode`, independent of the gateway's
//! validator; only [`SigningKey::sign_with_header`], for the hostile headers
//! tests craft (which jsonwebtoken rightly cannot produce), signs by hand.

use std::fmt;

use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    rsa::KeySize,
    signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair},
};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// An RSA-2048 signing key with its `kid`.
pub struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
    encoding: EncodingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a fresh RSA-2048 key named `kid`.
    pub fn generate(kid: impl Into<String>) -> Self {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA-2048 key generation");
        // PKCS#8 from aws-lc-rs, as the PEM jsonwebtoken reads.
        let pkcs8 = pair.as_der().expect("PKCS#8 export");
        let body = STANDARD.encode(pkcs8.as_ref());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        let encoding =
            EncodingKey::from_rsa_pem(pem.as_bytes()).expect("jsonwebtoken reads the key");
        Self {
            kid: kid.into(),
            pair,
            encoding,
        }
    }

    /// Generates a fresh RSA-2048 key whose `kid` is its RFC 7638 JWK
    /// thumbprint: a new key never takes an old key's name, so a validator
    /// that knew a previous key (of a restarted emulator, say) refetches the key
    /// set instead of calling the new signature bad.
    pub fn generate_thumbprinted() -> Self {
        let mut key = Self::generate(String::new());
        key.kid = key.thumbprint();
        key
    }

    /// The RFC 7638 thumbprint: SHA-256 of the required members in
    /// lexicographic order, without whitespace, base64url.
    pub fn thumbprint(&self) -> String {
        let public = self.pair.public_key();
        let canonical = format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
            URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
        );
        URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes(),
        ))
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK (`kty`, `kid`, `alg`, `use`, `n`, `e`).
    pub fn jwk(&self) -> Value {
        let public = self.pair.public_key();
        json!({
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        })
    }

    /// Signs `claims` with header `{"alg": "RS256", "kid"}` (as Cognito does: no
    /// `typ`), with jsonwebtoken.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = None;
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("RS256 signing")
    }

    /// Signs with an arbitrary header, by hand (tests craft hostile ones).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}
