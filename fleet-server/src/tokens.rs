//! Bearer tokens of the API, with a role and a scope.
//!
//! A token is `rxf_` and 256 random bits (URL-safe base64), shown once when
//! created; the database keeps its SHA-256 only (a token has the entropy of
//! a key, so a fast hash is enough and a stolen database yields no token).
//! Roles nest: a viewer reads, an operator also acts on devices (reviews an
//! audit chain rewrite; later: pauses and resumes rollouts), an admin also
//! provisions and retires devices and manages tokens. A token reads only
//! within its scope (a site's, a device's, or the fleet); only admin tokens
//! are fleet-wide by necessity.

use base64::Engine as _;
use ring::rand::SecureRandom;
use serde::Serialize;
use sqlx::Row;

use crate::db::{Db, DbError};
use crate::devices::{record_change, RegistryError, Scope};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads and acts on devices.
    Operator,
    /// Everything, fleet-wide.
    Admin,
}

impl Role {
    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(text: &str) -> Result<Role, String> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("{text:?} is not a role (viewer, operator or admin)")),
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Its id.
    pub id: i64,
    /// Its name (unique).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// What it may read: `fleet`, `site:S` or `device:D`.
    pub scope: String,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
    /// Revoked, Unix ms.
    pub revoked_ms: Option<i64>,
}

/// Who is asking: a valid, unrevoked token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// What it may read.
    pub scope: Scope,
}

impl Caller {
    /// The actor recorded with its changes.
    pub fn actor(&self) -> String {
        format!("token:{}", self.name)
    }
}

/// The SHA-256 of a token, hex.
pub fn token_sha256(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the system RNG works");
    format!("rxf_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        return Err(RegistryError::Invalid(format!(
            "{name:?} is not a token name (1-64 letters, digits, '-', '_', '.' or '@')"
        )));
    }
    Ok(())
}

impl Db {
    /// Creates a token and returns it (the only time it is shown). Admin
    /// tokens are fleet-wide.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        scope: &Scope,
        actor: &str,
        now_ms: i64,
    ) -> Result<(TokenInfo, String), RegistryError> {
        check_name(name)?;
        if role == Role::Admin && *scope != Scope::Fleet {
            return Err(RegistryError::Invalid("an admin token is fleet-wide: leave out the scope".into()));
        }
        let token = new_token();
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO api_tokens (name, role, scope, token_sha256, created_ms, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(scope.to_string())
        .bind(token_sha256(&token))
        .bind(now_ms)
        .bind(actor)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(RegistryError::Exists(format!("token {name}")));
        }
        let details = serde_json::json!({ "name": name, "role": role.as_str(), "scope": scope.to_string() });
        record_change(&mut tx, now_ms, actor, "token_created", None, details).await?;
        tx.commit().await?;
        let info = self.tokens().await?.into_iter().find(|t| t.name == name).expect("the token was just created");
        Ok((info, token))
    }

    /// Every token, revoked ones included, by id.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, DbError> {
        let rows =
            sqlx::query("SELECT id, name, role, scope, created_ms, created_by, revoked_ms FROM api_tokens ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| TokenInfo {
                id: r.get(0),
                name: r.get(1),
                role: Role::parse(&r.get::<String, _>(2)).unwrap_or(Role::Viewer),
                scope: r.get(3),
                created_ms: r.get(4),
                created_by: r.get(5),
                revoked_ms: r.get(6),
            })
            .collect())
    }

    /// Revokes a token by name: it stops working at once.
    pub async fn revoke_token(&self, name: &str, actor: &str, now_ms: i64) -> Result<(), RegistryError> {
        let mut tx = self.begin_write().await?;
        let revoked = sqlx::query(
            "UPDATE api_tokens SET revoked_ms = $2, revoked_by = $3 WHERE name = $1 AND revoked_ms IS NULL",
        )
        .bind(name)
        .bind(now_ms)
        .bind(actor)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if revoked == 0 {
            return Err(RegistryError::NotFound(format!("token {name} (or it is revoked already)")));
        }
        record_change(&mut tx, now_ms, actor, "token_revoked", None, serde_json::json!({ "name": name })).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The caller a presented token stands for, if it is valid and not revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Caller>, DbError> {
        let row =
            sqlx::query("SELECT name, role, scope FROM api_tokens WHERE token_sha256 = $1 AND revoked_ms IS NULL")
                .bind(token_sha256(token))
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(|r| {
            Some(Caller {
                name: r.get(0),
                role: Role::parse(&r.get::<String, _>(1)).ok()?,
                scope: Scope::parse(&r.get::<String, _>(2)).ok()?,
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest_and_parse() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!(Role::parse("operator").unwrap(), Role::Operator);
        assert!(Role::parse("root").is_err());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert!(a.starts_with("rxf_") && a.len() == 4 + 43);
        assert_ne!(a, b);
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(token_sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
