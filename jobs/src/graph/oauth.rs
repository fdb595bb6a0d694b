//! The Microsoft identity platform (v2.0 endpoints): authorize URL, PKCE, code redemption and
//! refresh. Pure client pieces: persisting tokens and single-flight refresh live elsewhere.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use rand::RngCore as _;
use reqwest::header;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tracing::{instrument, warn};
use url::Url;

use super::client::{BaseUrlError, parse_base_url};
use super::error::{TokenError, parse_retry_after};

/// Microsoft's production identity endpoint (`IDENTITY_BASE_URL` overrides it).
pub const DEFAULT_IDENTITY_BASE_URL: &str = "https://login.microsoftonline.com";

/// Delegated scopes: refresh tokens, the profile, reading/writing and sending mail.
pub const DEFAULT_SCOPES: &str = "offline_access User.Read Mail.ReadWrite Mail.Send";

/// The `{tenant}` path segment: `common`, `organizations`, `consumers`, a tenant GUID or a
/// verified domain. Parsed so that it can never inject path segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantSegment(String);

/// The tenant segment is not a name the identity platform accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a tenant segment: use common, organizations, consumers, a tenant GUID or a domain"
)]
pub struct TenantSegmentError(String);

impl TenantSegment {
    pub fn parse(raw: &str) -> Result<Self, TenantSegmentError> {
        let raw = raw.trim();
        let ok = !raw.is_empty()
            && raw.len() <= 253
            && !raw.starts_with('.')
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(TenantSegmentError(raw.chars().take(80).collect()))
        }
    }

    #[must_use]
    pub fn common() -> Self {
        Self("common".into())
    }

    #[must_use]
    pub fn organizations() -> Self {
        Self("organizations".into())
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PKCE pair (RFC 7636, S256). Store the verifier (encrypted) with the `state`; send the
/// challenge in the authorize URL; send the verifier when redeeming the code.
pub struct Pkce {
    verifier: SecretString,
    challenge: String,
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce")
            .field("verifier", &"[REDACTED]")
            .field("challenge", &self.challenge)
            .finish()
    }
}

/// A code verifier outside RFC 7636's 43–128 unreserved characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a PKCE code verifier must be 43-128 characters of A-Z a-z 0-9 - . _ ~")]
pub struct PkceError;

impl Pkce {
    /// 32 random bytes, base64url: a 43-character verifier (256 bits of entropy).
    #[must_use]
    pub fn new_random() -> Self {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut());
        let verifier = SecretString::from(URL_SAFE_NO_PAD.encode(bytes.as_ref()));
        let challenge = s256(&verifier);
        Self {
            verifier,
            challenge,
        }
    }

    /// Rebuilds the pair from a stored verifier.
    pub fn from_verifier(verifier: SecretString) -> Result<Self, PkceError> {
        let v = verifier.expose_secret();
        let ok = (43..=128).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        if !ok {
            return Err(PkceError);
        }
        let challenge = s256(&verifier);
        Ok(Self {
            verifier,
            challenge,
        })
    }

    #[must_use]
    pub fn verifier(&self) -> &SecretString {
        &self.verifier
    }

    /// `BASE64URL(SHA256(verifier))`, sent with `code_challenge_method=S256`.
    #[must_use]
    pub fn challenge(&self) -> &str {
        &self.challenge
    }
}

fn s256(verifier: &SecretString) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.expose_secret().as_bytes()))
}

/// The application's registration and where the identity platform lives.
#[derive(Clone)]
pub struct IdentityConfig {
    base_url: Url,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Must match a redirect URI registered for the app exactly.
    pub redirect_uri: Url,
    /// Space-separated scopes; [`DEFAULT_SCOPES`] unless shared mailboxes need `*.Shared`.
    pub scopes: String,
}

impl fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("base_url", &self.base_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &"[REDACTED]")
            .field("redirect_uri", &self.redirect_uri.as_str())
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl IdentityConfig {
    pub fn new(
        base_url: &str,
        client_id: impl Into<String>,
        client_secret: SecretString,
        redirect_uri: Url,
    ) -> Result<Self, BaseUrlError> {
        Ok(Self {
            base_url: parse_base_url(base_url)?,
            client_id: client_id.into(),
            client_secret,
            redirect_uri,
            scopes: DEFAULT_SCOPES.into(),
        })
    }

    #[must_use]
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    fn endpoint(&self, tenant: &TenantSegment, leaf: &str) -> Url {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .expect("base URL was checked to be a base")
            .pop_if_empty()
            .extend([tenant.as_str(), "oauth2", "v2.0", leaf]);
        url
    }
}

/// Tokens from a code redemption or a refresh.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    /// Absent only if `offline_access` was not granted. Every refresh returns a new one:
    /// persist it atomically with the access token.
    pub refresh_token: Option<SecretString>,
    /// From `expires_in` at the time the response arrived.
    pub expires_at: DateTime<Utc>,
    pub scope: String,
}

impl TokenSet {
    /// When to refresh proactively: `margin` before expiry (the design uses 5 minutes).
    #[must_use]
    pub fn refresh_due_at(&self, margin: TimeDelta) -> DateTime<Utc> {
        self.expires_at - margin
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token_type: Option<String>,
    #[serde(deserialize_with = "int_or_string")]
    expires_in: i64,
    scope: Option<String>,
    access_token: String,
    refresh_token: Option<String>,
}

/// The v2.0 endpoint sends `expires_in` as a number; v1-style proxies send a string.
fn int_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        Str(String),
    }
    match IntOrString::deserialize(d)? {
        IntOrString::Int(i) => Ok(i),
        IntOrString::Str(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

/// The identity-platform client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IdentityClient {
    http: reqwest::Client,
    config: Arc<IdentityConfig>,
}

impl IdentityClient {
    /// `http` must not follow redirects ([`super::build_http_client`]).
    #[must_use]
    pub fn new(http: reqwest::Client, config: Arc<IdentityConfig>) -> Self {
        Self { http, config }
    }

    #[must_use]
    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// The URL to send the user's browser to. `state` must be single-use and expiring, and
    /// checked on the callback before the code is redeemed.
    #[must_use]
    pub fn authorize_url(
        &self,
        tenant: &TenantSegment,
        state: &str,
        pkce_challenge: &str,
        login_hint: Option<&str>,
    ) -> Url {
        let mut url = self.config.endpoint(tenant, "authorize");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &self.config.client_id)
                .append_pair("response_type", "code")
                .append_pair("redirect_uri", self.config.redirect_uri.as_str())
                .append_pair("scope", &self.config.scopes)
                .append_pair("response_mode", "query")
                .append_pair("state", state)
                .append_pair("code_challenge", pkce_challenge)
                .append_pair("code_challenge_method", "S256");
            if let Some(hint) = login_hint {
                q.append_pair("login_hint", hint);
            }
        }
        url
    }

    /// Redeems an authorization code (grant_type=authorization_code) with its PKCE verifier.
    #[instrument(skip_all, fields(tenant = %tenant))]
    pub async fn exchange_code(
        &self,
        tenant: &TenantSegment,
        code: &SecretString,
        verifier: &SecretString,
    ) -> Result<TokenSet, TokenError> {
        let form = [
            ("grant_type", "authorization_code"),
            ("client_id", self.config.client_id.as_str()),
            ("client_secret", self.config.client_secret.expose_secret()),
            ("code", code.expose_secret()),
            ("redirect_uri", self.config.redirect_uri.as_str()),
            ("code_verifier", verifier.expose_secret()),
            ("scope", self.config.scopes.as_str()),
        ];
        self.token_request(tenant, &form).await
    }

    /// Redeems a refresh token (grant_type=refresh_token). The answer carries a NEW refresh
    /// token; the caller stores both tokens in one transaction.
    #[instrument(skip_all, fields(tenant = %tenant))]
    pub async fn refresh(
        &self,
        tenant: &TenantSegment,
        refresh_token: &SecretString,
    ) -> Result<TokenSet, TokenError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", self.config.client_id.as_str()),
            ("client_secret", self.config.client_secret.expose_secret()),
            ("refresh_token", refresh_token.expose_secret()),
            ("scope", self.config.scopes.as_str()),
        ];
        self.token_request(tenant, &form).await
    }

    async fn token_request(
        &self,
        tenant: &TenantSegment,
        form: &[(&str, &str)],
    ) -> Result<TokenSet, TokenError> {
        let url = self.config.endpoint(tenant, "token");
        let sent_at = Utc::now();
        // The form holds secrets: it goes into the body only, never into a URL or an error.
        let body = zeroize::Zeroizing::new(serde_urlencoded_form(form));
        let resp = self
            .http
            .post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(body.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| TokenError::Transport {
                message: transport_text(&e),
            })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(parse_retry_after);
        let bytes = resp.bytes().await.map_err(|e| TokenError::Transport {
            message: transport_text(&e),
        })?;
        if !status.is_success() {
            let err = TokenError::from_response(status, &bytes, retry_after);
            warn!(status = status.as_u16(), class = %err.class(), error = %err, "token request failed");
            return Err(err);
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| TokenError::Decode {
                // serde's message names the field, never the (secret) value of a string field
                // it failed on, because every secret field here is a string.
                message: format!(
                    "line {} column {}: {}",
                    e.line(),
                    e.column(),
                    e.classify_name()
                ),
            })?;
        if parsed
            .token_type
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
        {
            return Err(TokenError::Decode {
                message: "token_type is not Bearer".into(),
            });
        }
        if parsed.expires_in <= 0 {
            return Err(TokenError::Decode {
                message: format!("expires_in must be positive, got {}", parsed.expires_in),
            });
        }
        Ok(TokenSet {
            access_token: SecretString::from(parsed.access_token),
            refresh_token: parsed.refresh_token.map(SecretString::from),
            // From the request time, so clock drift during the round trip errs on the early side.
            expires_at: sent_at + TimeDelta::seconds(parsed.expires_in),
            scope: parsed.scope.unwrap_or_default(),
        })
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Eof => "truncated JSON",
        }
    }
}

fn serde_urlencoded_form(form: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish()
}

fn transport_text(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> IdentityClient {
        IdentityClient::new(
            reqwest::Client::new(),
            Arc::new(
                IdentityConfig::new(
                    "https://login.example/",
                    "11111111-2222-3333-4444-555555555555",
                    SecretString::from("s3cr3t"),
                    Url::parse("https://desk.example/oauth/callback").unwrap(),
                )
                .unwrap(),
            ),
        )
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        let pkce = Pkce::from_verifier(SecretString::from(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        ))
        .unwrap();
        assert_eq!(
            pkce.challenge(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(!format!("{pkce:?}").contains("dBjft"));
    }

    #[test]
    fn random_pkce_is_valid_and_fresh() {
        let a = Pkce::new_random();
        let b = Pkce::new_random();
        assert_eq!(a.verifier().expose_secret().len(), 43);
        assert!(Pkce::from_verifier(a.verifier().clone()).is_ok());
        assert_ne!(a.verifier().expose_secret(), b.verifier().expose_secret());
        assert_eq!(s256(a.verifier()), a.challenge());
        assert!(Pkce::from_verifier(SecretString::from("short")).is_err());
        assert!(Pkce::from_verifier(SecretString::from("a b".repeat(20))).is_err());
    }

    #[test]
    fn authorize_url_has_every_parameter() {
        let tenant = TenantSegment::organizations();
        let url = identity().authorize_url(&tenant, "st&ate", "chal", Some("a@contoso.com"));
        assert_eq!(url.path(), "/organizations/oauth2/v2.0/authorize");
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["client_id"], "11111111-2222-3333-4444-555555555555");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["redirect_uri"], "https://desk.example/oauth/callback");
        assert_eq!(
            q["scope"],
            "offline_access User.Read Mail.ReadWrite Mail.Send"
        );
        assert_eq!(q["response_mode"], "query");
        assert_eq!(q["state"], "st&ate");
        assert_eq!(q["code_challenge"], "chal");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["login_hint"], "a@contoso.com");
        assert!(!url.as_str().contains("s3cr3t"));
        let no_hint = identity().authorize_url(&tenant, "s", "c", None);
        assert!(!no_hint.query().unwrap().contains("login_hint"));
    }

    #[test]
    fn tenant_segments_cannot_inject_paths() {
        for ok in [
            "common",
            "organizations",
            "contoso.onmicrosoft.com",
            "9188040d-6c67-4c5b-b112-36a304b66dad",
        ] {
            assert!(TenantSegment::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", "a?b", "a b", ".."] {
            assert!(TenantSegment::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_client_secret() {
        let c = identity();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
