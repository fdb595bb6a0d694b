//! JWT bearer authentication and roles. Agents read tickets and send replies; admins also
//! manage their tenant's accounts and see its jobs; ops see and retry jobs of every tenant.

use jobs::ids::TenantId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem_openapi::{SecurityScheme, auth::Bearer};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Admin,
    Ops,
}

impl Role {
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Admin => "admin",
            Self::Ops => "ops",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Self::Agent),
            "admin" => Ok(Self::Admin),
            "ops" => Ok(Self::Ops),
            other => Err(format!("unknown role `{other}`: use agent, admin or ops")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant_id: Uuid,
    pub role: Role,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub iss: String,
    pub aud: String,
}

/// Who is calling, after the token was verified.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub tenant: TenantId,
    pub role: Role,
}

impl Principal {
    #[must_use]
    pub fn is_ops(&self) -> bool {
        self.role == Role::Ops
    }
    #[must_use]
    pub fn at_least_admin(&self) -> bool {
        self.role >= Role::Admin
    }
}

#[derive(Clone)]
pub struct JwtConfig {
    /// HS256 shared secret (also what `api mint-token` signs with).
    secret: Option<SecretString>,
    /// RS256 public key (PEM), for tokens minted by an external identity provider.
    rsa_public: Option<std::sync::Arc<DecodingKey>>,
    pub issuer: String,
    pub audience: String,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .field("rs256", &self.rsa_public.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtConfig {
    pub fn new(
        secret: SecretString,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        Self {
            secret: Some(secret),
            rsa_public: None,
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    /// Also (or only, with no secret) accept RS256 tokens signed by the key behind `pem`.
    pub fn with_rsa_public_key(mut self, pem: &[u8]) -> Result<Self, String> {
        let key = DecodingKey::from_rsa_pem(pem)
            .map_err(|_| "JWT_PUBLIC_KEY is not an RSA public key in PEM form".to_string())?;
        self.rsa_public = Some(std::sync::Arc::new(key));
        Ok(self)
    }

    /// JWT_SECRET (HS256, at least 32 characters) and/or JWT_PUBLIC_KEY (RS256 public key,
    /// PEM text or a path to a PEM file); at least one is required.
    pub fn from_env() -> Result<Self, jobs::config::ConfigError> {
        use jobs::config::{ConfigError, env_opt};
        let secret = env_opt("JWT_SECRET");
        if let Some(s) = &secret
            && s.len() < 32
        {
            return Err(ConfigError::Invalid {
                name: "JWT_SECRET",
                reason: "must be at least 32 characters".into(),
            });
        }
        let public = env_opt("JWT_PUBLIC_KEY");
        if secret.is_none() && public.is_none() {
            return Err(ConfigError::Missing { name: "JWT_SECRET" });
        }
        let mut config = Self {
            secret: secret.map(SecretString::from),
            rsa_public: None,
            issuer: env_opt("JWT_ISSUER").unwrap_or_else(|| "graphdesk".into()),
            audience: env_opt("JWT_AUDIENCE").unwrap_or_else(|| "graphdesk-api".into()),
        };
        if let Some(public) = public {
            let pem = if public.contains("-----BEGIN") {
                public.into_bytes()
            } else {
                std::fs::read(&public).map_err(|e| ConfigError::Invalid {
                    name: "JWT_PUBLIC_KEY",
                    reason: format!("cannot read {public}: {e}"),
                })?
            };
            config = config
                .with_rsa_public_key(&pem)
                .map_err(|reason| ConfigError::Invalid {
                    name: "JWT_PUBLIC_KEY",
                    reason,
                })?;
        }
        Ok(config)
    }

    /// Mints a token (the `api mint-token` command, the demo and tests).
    pub fn mint(
        &self,
        subject: &str,
        tenant: TenantId,
        role: Role,
        ttl: chrono::Duration,
    ) -> String {
        let claims = Claims {
            sub: subject.to_string(),
            tenant_id: tenant.as_uuid(),
            role,
            exp: (chrono::Utc::now() + ttl).timestamp(),
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let secret = self
            .secret
            .as_ref()
            .expect("minting needs JWT_SECRET (HS256)");
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
        )
        .expect("HS256 signing with an in-memory key cannot fail")
    }

    /// Verifies signature (HS256 with the secret, RS256 with the public key; `none` and every
    /// other algorithm are refused), exp, nbf, iss and aud.
    pub fn verify(&self, token: &str) -> Result<Principal, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| "the token is invalid".to_string())?;
        let secret_key;
        let (algorithm, key) = match (header.alg, &self.secret, &self.rsa_public) {
            (Algorithm::HS256, Some(secret), _) => {
                secret_key = DecodingKey::from_secret(secret.expose_secret().as_bytes());
                (Algorithm::HS256, &secret_key)
            }
            (Algorithm::RS256, _, Some(public)) => (Algorithm::RS256, public.as_ref()),
            _ => return Err("the token's algorithm is not accepted".to_string()),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_string(),
                ErrorKind::ImmatureSignature => "the token is not valid yet".to_string(),
                ErrorKind::InvalidIssuer => "the token has the wrong issuer".to_string(),
                ErrorKind::InvalidAudience => "the token has the wrong audience".to_string(),
                ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted".to_string(),
                _ => "the token is invalid".to_string(),
            }
        })?;
        Ok(Principal {
            subject: data.claims.sub,
            tenant: TenantId::from_uuid(data.claims.tenant_id),
            role: data.claims.role,
        })
    }
}

/// `Authorization: Bearer <JWT>` on every endpoint but the OAuth callback, the Graph webhook
/// and the health checks. (`/metrics` and the dashboard sit outside the OpenAPI routes and
/// check the same tokens themselves.)
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Principal);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let state = req
        .data::<crate::AppState>()
        .ok_or_else(|| poem::Error::from_status(poem::http::StatusCode::INTERNAL_SERVER_ERROR))?;
    let verified = state.jwt.verify(&bearer.token);
    if let Ok(p) = &verified {
        // Every later log line of this request carries who asked.
        let span = tracing::Span::current();
        span.record("tenant", tracing::field::display(p.tenant));
        span.record("role", p.role.as_str());
    }
    verified.map_err(|msg| poem::Error::from_string(msg, poem::http::StatusCode::UNAUTHORIZED))
}
