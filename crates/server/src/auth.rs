//! Bearer tokens. Every token's SHA-256 is compared with the presented
//! token's in constant time (`subtle`), so neither the content nor the
//! length of a configured token leaks through response timing; every
//! configured token is compared, matching or not.
//!
//! Missing or unknown token → 401; a known token without the scope → 403.
//! Both are decided before a handler reads its body or touches the store.

use axum::http::{HeaderMap, StatusCode};
use retrain_adapters::settings::{ApiToken, Scope};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who made a request: the token's name, recorded as who triggered,
/// approved or rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
}

/// Identity of requests when the server runs with `--insecure-no-auth`.
pub const ANONYMOUS: &str = "anonymous";

/// The configured tokens, hashed once.
pub struct Tokens {
    /// `None`: `--insecure-no-auth` (loopback only).
    entries: Option<Vec<(ApiToken, [u8; 32])>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Option<Vec<&str>> = self
            .entries
            .as_ref()
            .map(|e| e.iter().map(|(s, _)| s.name.as_str()).collect());
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

fn digest(raw: &[u8]) -> [u8; 32] {
    Sha256::digest(raw).into()
}

impl Tokens {
    pub fn new(tokens: &[ApiToken]) -> Self {
        Self {
            entries: Some(
                tokens
                    .iter()
                    .map(|t| (t.clone(), digest(t.secret.expose_secret().as_bytes())))
                    .collect(),
            ),
        }
    }

    /// Every request is allowed, as [`ANONYMOUS`].
    pub fn insecure_no_auth() -> Self {
        Self { entries: None }
    }

    /// The caller of a request needing `scope`.
    pub fn authorize(&self, headers: &HeaderMap, scope: Scope) -> Result<Caller, ApiError> {
        let Some(entries) = &self.entries else {
            return Ok(Caller {
                name: ANONYMOUS.into(),
            });
        };
        let presented = bearer(headers).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token: send `Authorization: Bearer <token>`",
            )
        })?;
        let presented = digest(presented.as_bytes());
        let mut found: Option<&ApiToken> = None;
        for (entry, hash) in entries {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown bearer token",
            )
        })?;
        if !entry.allows(scope) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("token {:?} lacks the `{scope}` scope", entry.name),
            ));
        }
        Ok(Caller {
            name: entry.name.clone(),
        })
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn token(name: &str, secret: &str, scopes: &[Scope]) -> ApiToken {
        ApiToken {
            name: name.into(),
            secret: SecretString::from(secret.to_owned()),
            scopes: scopes.iter().copied().collect(),
        }
    }

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn tokens_are_matched_by_value_and_scoped() {
        let tokens = Tokens::new(&[
            token("ci", "ci-token-0123456789", &[Scope::Read, Scope::Trigger]),
            token("lead", "lead-token-0123456789", &[Scope::Admin]),
        ]);
        let ci = tokens
            .authorize(&headers("Bearer ci-token-0123456789"), Scope::Trigger)
            .unwrap();
        assert_eq!(ci.name, "ci");
        let lead = tokens
            .authorize(&headers("bearer lead-token-0123456789"), Scope::Approve)
            .unwrap();
        assert_eq!(lead.name, "lead");
        let forbidden = tokens
            .authorize(&headers("Bearer ci-token-0123456789"), Scope::Approve)
            .unwrap_err();
        assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
        assert!(forbidden.message.contains("approve"));
        for bad in [
            "Bearer ci-token-012345678",
            "Basic ci-token-0123456789",
            "Bearer ",
        ] {
            let err = tokens.authorize(&headers(bad), Scope::Read).unwrap_err();
            assert_eq!(err.status, StatusCode::UNAUTHORIZED, "{bad}");
            assert!(!err.message.contains("0123"), "{}", err.message);
        }
        let err = tokens
            .authorize(&HeaderMap::new(), Scope::Read)
            .unwrap_err();
        assert_eq!(err.code, "unauthorized");
        assert!(!format!("{tokens:?}").contains("0123"));
    }

    #[test]
    fn insecure_mode_lets_everyone_in_as_anonymous() {
        let caller = Tokens::insecure_no_auth()
            .authorize(&HeaderMap::new(), Scope::Admin)
            .unwrap();
        assert_eq!(caller.name, ANONYMOUS);
    }
}
