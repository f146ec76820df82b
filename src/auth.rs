//! Bearer-token authentication: HS256 JWTs naming the peer's id (`sub`) and role.
//!
//! With a secret configured every stream must present `authorization: Bearer <jwt>`; the id in
//! the token is the peer's id (a client's welcome carries it, a worker must register it). A
//! token is checked once, when its stream opens: `exp` (required) and `nbf` (if present) with
//! [`LEEWAY_SECS`] of clock skew, `iss` and `aud` when the distributor is configured with them.
//! The stream then lives until `exp` (see [`Granted::expires`]): the edge ends it with
//! `UNAUTHENTICATED` then, and the peer reconnects with a fresh token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::core::{PeerId, Role};

/// Seconds of clock skew tolerated on `exp` and `nbf` (the issuer's clock against ours).
pub const LEEWAY_SECS: u64 = 5;
/// The shortest secret accepted: HS256 wants a key at least as long as its output.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// Why a stream was not let in. All map to gRPC `UNAUTHENTICATED` but `WrongRole`, which maps
/// to `PERMISSION_DENIED`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing `authorization: Bearer <token>` metadata")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token is for a {token} but this is the {wanted} service")]
    WrongRole { token: String, wanted: &'static str },
}

/// Why an authenticator could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the auth secret is {0} bytes; at least {MIN_SECRET_BYTES} are required")]
pub struct ShortSecret(pub usize);

/// What a valid token grants: the peer's id, until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub id: PeerId,
    /// The token's `exp`, plus the leeway.
    pub expires: SystemTime,
}

/// Verifies tokens against one shared secret.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

/// The claims a deployment requires beyond the signature and the time bounds.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl Authenticator {
    pub fn new(secret: &[u8], expect: &Expect) -> Result<Self, ShortSecret> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ShortSecret(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &expect.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &expect.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Authenticator { key: DecodingKey::from_secret(secret), validation })
    }

    /// Checks the `authorization` header value of a stream that wants to speak as `role`, and
    /// returns what the token grants.
    pub fn verify(&self, authorization: Option<&str>, role: Role) -> Result<Granted, AuthError> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            })?
            .claims;
        let id = canonical_id(&claims.sub).ok_or_else(|| {
            AuthError::Invalid(format!(
                "`sub` must be a positive decimal id without sign or leading zeros, not {:?}",
                claims.sub
            ))
        })?;
        if claims.role != role.as_str() {
            return Err(AuthError::WrongRole { token: claims.role, wanted: role.as_str() });
        }
        let expires = UNIX_EPOCH + Duration::from_secs(claims.exp.saturating_add(LEEWAY_SECS));
        Ok(Granted { id, expires })
    }
}

/// The id `sub` names, if it is written the one way an id is written: digits, no sign, no
/// leading zero, not zero, within `i64`. So "042" and "+42" are not 42.
fn canonical_id(sub: &str) -> Option<PeerId> {
    let digits = sub.bytes().all(|b| b.is_ascii_digit()) && !sub.is_empty() && !sub.starts_with('0');
    digits.then(|| sub.parse::<PeerId>().ok()).flatten()
}

/// What a minted token says besides the peer.
#[derive(Debug, Clone, Default)]
pub struct Mint {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Not valid before this time.
    pub not_before: Option<SystemTime>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Mints a token for `id` speaking as `role`, valid for `ttl`.
pub fn mint(
    secret: &[u8],
    role: Role,
    id: PeerId,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_with(secret, role, id, SystemTime::now() + ttl, &Mint::default())
}

/// Mints a token for `id` speaking as `role` that expires at `exp`.
pub fn mint_expiring_at(
    secret: &[u8],
    role: Role,
    id: PeerId,
    exp: SystemTime,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_with(secret, role, id, exp, &Mint::default())
}

/// Mints a token for `id` speaking as `role` that expires at `exp`, with `extra` claims.
pub fn mint_with(
    secret: &[u8],
    role: Role,
    id: PeerId,
    exp: SystemTime,
    extra: &Mint,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        sub: id.to_string(),
        role: role.as_str().to_owned(),
        exp: unix(exp),
        nbf: extra.not_before.map(unix),
        iss: extra.issuer.clone(),
        aud: extra.audience.clone(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret-of-at-least-32-bytes!";

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn open() -> Authenticator {
        Authenticator::new(SECRET, &Expect::default()).unwrap()
    }

    fn in_a_minute() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    #[test]
    fn accepts_a_fresh_token_of_the_right_role() {
        let exp = in_a_minute();
        let token = mint_expiring_at(SECRET, Role::Worker, 42, exp).unwrap();
        let granted = open().verify(Some(&bearer(&token)), Role::Worker).unwrap();
        assert_eq!(granted.id, 42);
        assert_eq!(unix(granted.expires), unix(exp) + LEEWAY_SECS, "the stream lives until exp");
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert_eq!(Authenticator::new(b"short", &Expect::default()).err(), Some(ShortSecret(5)));
    }

    #[test]
    fn refuses_missing_bad_expired_and_wrong_role() {
        let auth = open();
        assert_eq!(auth.verify(None, Role::Client), Err(AuthError::Missing));
        assert_eq!(auth.verify(Some("Basic abc"), Role::Client), Err(AuthError::Missing));
        assert!(matches!(auth.verify(Some("Bearer nonsense"), Role::Client), Err(AuthError::Invalid(_))));

        let other =
            mint(b"other-secret-of-at-least-32-bytes", Role::Client, 7, Duration::from_secs(60)).unwrap();
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
    fn not_before_is_honoured_with_the_leeway() {
        let auth = open();
        let later = Mint { not_before: Some(SystemTime::now() + Duration::from_secs(60)), ..Mint::default() };
        let token =
            mint_with(SECRET, Role::Client, 7, in_a_minute() + Duration::from_secs(60), &later).unwrap();
        assert_eq!(auth.verify(Some(&bearer(&token)), Role::Client), Err(AuthError::NotYetValid));
        let within_leeway =
            Mint { not_before: Some(SystemTime::now() + Duration::from_secs(2)), ..Mint::default() };
        let token = mint_with(SECRET, Role::Client, 7, in_a_minute(), &within_leeway).unwrap();
        assert_eq!(auth.verify(Some(&bearer(&token)), Role::Client).map(|g| g.id), Ok(7));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let expect = Expect { issuer: Some("https://issuer".into()), audience: Some("distributor".into()) };
        let auth = Authenticator::new(SECRET, &expect).unwrap();
        let right =
            Mint { issuer: expect.issuer.clone(), audience: expect.audience.clone(), ..Mint::default() };
        let token = mint_with(SECRET, Role::Client, 7, in_a_minute(), &right).unwrap();
        assert_eq!(auth.verify(Some(&bearer(&token)), Role::Client).map(|g| g.id), Ok(7));
        for wrong in [
            Mint::default(),
            Mint { issuer: Some("https://other".into()), ..right.clone() },
            Mint { audience: Some("other".into()), ..right.clone() },
            Mint { audience: None, ..right.clone() },
        ] {
            let token = mint_with(SECRET, Role::Client, 7, in_a_minute(), &wrong).unwrap();
            assert!(
                matches!(auth.verify(Some(&bearer(&token)), Role::Client), Err(AuthError::Invalid(_))),
                "{wrong:?}"
            );
        }
        // Without expectations, iss and aud are not checked.
        let token = mint_with(SECRET, Role::Client, 7, in_a_minute(), &right).unwrap();
        assert_eq!(open().verify(Some(&bearer(&token)), Role::Client).map(|g| g.id), Ok(7));
    }

    #[test]
    fn refuses_a_sub_that_is_not_a_canonical_id() {
        let auth = open();
        let exp = unix(in_a_minute());
        for sub in ["alice", "0", "", "042", "+42", "-42", " 42", "42 ", "99999999999999999999", "4_2"] {
            let claims =
                Claims { sub: sub.into(), role: "client".into(), exp, nbf: None, iss: None, aud: None };
            let token =
                jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
            assert!(
                matches!(auth.verify(Some(&bearer(&token)), Role::Client), Err(AuthError::Invalid(_))),
                "{sub:?}"
            );
        }
        assert_eq!(canonical_id("42"), Some(42));
        assert_eq!(canonical_id(&i64::MAX.to_string()), Some(i64::MAX));
    }
}
