//! The leader lease: several `rxfleet` replicas share one database, and the
//! one holding the `leader` lease runs the background work (the ingest and,
//! later, schedules and rollouts). The holder renews it every
//! [`LeaseConfig::renew`]; when it stops (killed, partitioned), the lease
//! expires after [`LeaseConfig::ttl`] and another replica takes it.
//!
//! Time is the database's clock, so replicas with skewed clocks agree on
//! expiry. Every change of holder increments the lease's `term`, and every
//! ingest commit checks, inside its own transaction, that its replica still
//! holds the lease at the term it acquired ([`Fence`]): a replica that was
//! paused past its lease cannot commit after another took over.

use std::time::Duration;

use sqlx::Row;

use crate::db::{Backend, Db, DbError, Tx};

/// The lease of the replica that leads background work.
pub const LEADER: &str = "leader";

/// How long a lease lasts and how often its holder renews it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Without renewal the lease expires after this.
    pub ttl: Duration,
    /// The holder renews (and others try to take it) this often.
    pub renew: Duration,
}

/// Proof of holding a lease at a term, checked inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lease.
    pub name: String,
    /// This replica.
    pub holder: String,
    /// The term it acquired.
    pub term: i64,
}

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseHolder {
    /// The replica (`host:pid:nonce`).
    pub holder: String,
    /// Changes of holder so far.
    pub term: i64,
    /// Milliseconds until it expires (negative: expired).
    pub expires_in_ms: i64,
}

/// A name for this replica, unique across restarts.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut nonce = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).expect("the system RNG works");
    format!("{}:{}:{}", host.trim(), std::process::id(), u32::from_be_bytes(nonce))
}

impl Db {
    /// The database's clock in Unix ms, as SQL.
    pub(crate) fn now_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS BIGINT)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Takes the lease if it is free or expired, or renews it if `holder`
    /// has it; returns the term held, or `None` when another replica holds it.
    pub async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<i64>, DbError> {
        let now = self.now_sql();
        let sql = format!(
            "INSERT INTO leases (name, holder, term, expires_ms) VALUES ($1, $2, 1, {now} + $3) \
             ON CONFLICT (name) DO UPDATE SET \
               term = CASE WHEN leases.holder = excluded.holder THEN leases.term ELSE leases.term + 1 END, \
               holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_ms < {now} \
             RETURNING term"
        );
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let row = sqlx::query(&sql).bind(name).bind(holder).bind(ttl_ms).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Gives the lease up now (a clean shutdown), if `holder` has it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE leases SET expires_ms = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Who holds the lease, if anyone ever did.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<LeaseHolder>, DbError> {
        let sql = format!("SELECT holder, term, expires_ms - {} FROM leases WHERE name = $1", self.now_sql());
        let row = sqlx::query(&sql).bind(name).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| LeaseHolder { holder: r.get(0), term: r.get(1), expires_in_ms: r.get(2) }))
    }

    /// Inside a transaction: does the fence's replica still hold the lease at
    /// its term? Locks the lease row (PostgreSQL) until the transaction ends,
    /// so no other replica can take it over meanwhile.
    pub(crate) async fn check_fence(&self, tx: &mut Tx<'_>, fence: &Fence) -> Result<(), DbError> {
        let sql = format!(
            "UPDATE leases SET expires_ms = expires_ms \
             WHERE name = $1 AND holder = $2 AND term = $3 AND expires_ms >= {}",
            self.now_sql()
        );
        let held = sqlx::query(&sql)
            .bind(&fence.name)
            .bind(&fence.holder)
            .bind(fence.term)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if held == 1 {
            Ok(())
        } else {
            Err(DbError::LeaseLost)
        }
    }
}
