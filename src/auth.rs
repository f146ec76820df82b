//! Bearer-token authentication: HS256 JWTs naming the peer's id (`sub`) and role.
//!
//! With a secret configured every stream must present `authorization: Bearer <jwt>`; the id in
//! the token is the peer's id (a client's welcome carries it, a worker must register it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::core::{PeerId, Role};

/// Seconds of clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: String,
    exp: u64,
}

/// Why a stream was not let in. `Unauthenticated` maps to gRPC `UNAUTHENTICATED`, `WrongRole`
/// to `PERMISSION_DENIED`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing `authorization: Bearer <token>` metadata")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token is for a {token} but this is the {wanted} service")]
    WrongRole { token: String, wanted: &'static str },
}

/// Verifies tokens against one shared secret.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator { key: DecodingKey::from_secret(secret), validation }
    }

    /// Checks the `authorization` header value of a stream that wants to speak as `role`, and
    /// returns the peer id the token grants.
    pub fn verify(&self, authorization: Option<&str>, role: Role) -> Result<PeerId, AuthError> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?
            .claims;
        let id: PeerId = claims.sub.parse().ok().filter(|id| *id != 0).ok_or_else(|| {
            AuthError::Invalid(format!("`sub` must be a non-zero decimal id, not {:?}", claims.sub))
        })?;
        if claims.role != role.as_str() {
            return Err(AuthError::WrongRole { token: claims.role, wanted: role.as_str() });
        }
        Ok(id)
    }
}

/// Mints a token for `id` speaking as `role`, valid for `ttl`.
pub fn mint(
    secret: &[u8],
    role: Role,
    id: PeerId,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_expiring_at(secret, role, id, SystemTime::now() + ttl)
}

/// Mints a token for `id` speaking as `role` that expires at `exp`.
pub fn mint_expiring_at(
    secret: &[u8],
    role: Role,
    id: PeerId,
    exp: SystemTime,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = exp.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims = Claims { sub: id.to_string(), role: role.as_str().to_owned(), exp };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn accepts_a_fresh_token_of_the_right_role() {
        let token = mint(SECRET, Role::Worker, 42, Duration::from_secs(60)).unwrap();
        let auth = Authenticator::new(SECRET);
        assert_eq!(auth.verify(Some(&bearer(&token)), Role::Worker), Ok(42));
    }

    #[test]
    fn refuses_missing_bad_expired_and_wrong_role() {
        let auth = Authenticator::new(SECRET);
        assert_eq!(auth.verify(None, Role::Client), Err(AuthError::Missing));
        assert_eq!(auth.verify(Some("Basic abc"), Role::Client), Err(AuthError::Missing));
        assert!(matches!(auth.verify(Some("Bearer nonsense"), Role::Client), Err(AuthError::Invalid(_))));

        let other = mint(b"other-secret", Role::Client, 7, Duration::from_secs(60)).unwrap();
        assert!(matches!(auth.verify(Some(&bearer(&other)), Role::Client), Err(AuthError::Invalid(_))));

        let expired =
            mint_expiring_at(SECRET, Role::Client, 7, UNIX_EPOCH + Duration::from_secs(1_000)).unwrap();
        assert_eq!(auth.verify(Some(&bearer(&expired)), Role::Client), Err(AuthError::Expired));

        let worker = mint(SECRET, Role::Worker, 7, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth.verify(Some(&bearer(&worker)), Role::Client),
            Err(AuthError::WrongRole { .. })
        ));
    }

    #[test]
    fn refuses_a_sub_that_is_not_an_id() {
        let auth = Authenticator::new(SECRET);
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 60;
        for sub in ["alice", "0", ""] {
            let claims = Claims { sub: sub.into(), role: "client".into(), exp };
            let token =
                jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
            assert!(
                matches!(auth.verify(Some(&bearer(&token)), Role::Client), Err(AuthError::Invalid(_))),
                "{sub}"
            );
        }
    }
}
