//! Rollouts in the database: starting one, the admin's commands, and the
//! leader's step that judges the running stage and moves the rollout on.
//! Every change is a fleet event with its actor; every judgement is kept
//! with its numbers.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::evidence::StageQuery;
use super::stage::{self, Command, Decision, Outcome, Plan, State};
use crate::db::{Db, DbError};
use crate::registry::ModelState;

/// Why a rollout request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The request is not acceptable (versions, plan).
    #[error("{0}")]
    Invalid(String),
    /// No such rollout.
    #[error("no rollout {0}")]
    NotFound(i64),
    /// It cannot be done now (another rollout is active, or the state does not allow it).
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for RolloutError {
    fn from(e: sqlx::Error) -> RolloutError {
        RolloutError::Db(DbError::Sql(e))
    }
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Rollout {
    /// Its number.
    pub id: i64,
    /// The version rolled out.
    pub model_version: String,
    /// The version it replaces (what the control cohort runs).
    pub previous_version: String,
    /// How it proceeds (stages, soak, limits).
    #[schema(value_type = Object)]
    pub plan: Plan,
    /// Where it is: `{"state": "running", "stage": 0, "since_ms": …}`,
    /// `paused` (with `reason`), `awaiting_approval`, `completed`, `halted`
    /// (with `reason`) or `aborted` (with `by`).
    #[schema(value_type = Object)]
    pub state: State,
    /// Percent of the fleet assigned the new version now.
    pub percent: u32,
    /// When and by whom it was started.
    pub created_ms: i64,
    /// Who started it.
    pub created_by: String,
    /// Its last change, Unix ms.
    pub updated_ms: i64,
}

/// What an admin asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    /// Stop where it is.
    Pause,
    /// Go on from a pause (the stage's evidence starts afresh).
    Resume,
    /// Let the last stage (100 %) go.
    Approve,
    /// Stop and order its devices back.
    Abort,
}

const COLUMNS: &str = "id, model_version, previous_version, plan, state, created_ms, created_by, updated_ms";

fn from_row(row: &AnyRow) -> Result<Rollout, RolloutError> {
    let corrupt = |what: &str, e: serde_json::Error| RolloutError::Invalid(format!("a stored rollout's {what}: {e}"));
    let plan: Plan = serde_json::from_str(&row.get::<String, _>(3)).map_err(|e| corrupt("plan", e))?;
    let state: State = serde_json::from_str(&row.get::<String, _>(4)).map_err(|e| corrupt("state", e))?;
    Ok(Rollout {
        id: row.get(0),
        model_version: row.get(1),
        previous_version: row.get(2),
        percent: state.percent(&plan),
        plan,
        state,
        created_ms: row.get(5),
        created_by: row.get(6),
        updated_ms: row.get(7),
    })
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("rollout state serialises")
}

impl Db {
    /// Starts rolling `model_version` out in place of `previous_version`:
    /// its first stage runs from now. Refused while another rollout is active.
    pub async fn start_rollout(
        &self,
        model_version: &str,
        previous_version: &str,
        plan: &Plan,
        actor: &str,
        now_ms: i64,
    ) -> Result<Rollout, RolloutError> {
        if model_version.trim().is_empty() || previous_version.trim().is_empty() || model_version == previous_version {
            return Err(RolloutError::Invalid("the new and the previous version must be named and differ".into()));
        }
        plan.check().map_err(RolloutError::Invalid)?;
        let state = State::Running { stage: 0, since_ms: now_ms };
        let mut tx = self.begin_write().await?;
        if let Some(row) =
            sqlx::query("SELECT id, model_version FROM rollouts WHERE active = 1").fetch_optional(&mut *tx).await?
        {
            return Err(RolloutError::Conflict(format!(
                "rollout {} of {} is still active: finish, abort or wait for it first",
                row.get::<i64, _>(0),
                row.get::<String, _>(1)
            )));
        }
        let id: i64 = sqlx::query(
            "INSERT INTO rollouts (model_version, previous_version, plan, state, active, created_ms, created_by, updated_ms) \
             VALUES ($1, $2, $3, $4, 1, $5, $6, $5) RETURNING id",
        )
        .bind(model_version)
        .bind(previous_version)
        .bind(json(plan))
        .bind(json(&state))
        .bind(now_ms)
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        let details = serde_json::json!({
            "rollout": id, "model_version": model_version, "previous_version": previous_version, "stages": plan.stages,
        });
        crate::devices::record_change(&mut tx, now_ms, actor, "rollout_started", None, details).await?;
        crate::registry::set_state(
            &mut tx,
            model_version,
            ModelState::RollingOut,
            &format!("rollout {id} started by {actor}"),
            now_ms,
        )
        .await?;
        tx.commit().await?;
        self.rollout(id).await?.ok_or(RolloutError::NotFound(id))
    }

    /// One rollout.
    pub async fn rollout(&self, id: i64) -> Result<Option<Rollout>, RolloutError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM rollouts WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The newest rollouts, newest first (at most `limit`).
    pub async fn rollouts(&self, limit: i64) -> Result<Vec<Rollout>, RolloutError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM rollouts ORDER BY id DESC LIMIT $1"))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// The active rollout, if any.
    pub async fn active_rollout(&self) -> Result<Option<Rollout>, RolloutError> {
        let row =
            sqlx::query(&format!("SELECT {COLUMNS} FROM rollouts WHERE active = 1")).fetch_optional(&self.pool).await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The rollout's judgements, newest first (at most `limit`).
    pub async fn rollout_decisions(&self, id: i64, limit: i64) -> Result<Vec<Decision>, RolloutError> {
        let rows =
            sqlx::query("SELECT decision FROM rollout_decisions WHERE rollout_id = $1 ORDER BY id DESC LIMIT $2")
                .bind(id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(&r.get::<String, _>(0))
                    .map_err(|e| RolloutError::Invalid(format!("a stored decision: {e}")))
            })
            .collect()
    }

    /// An admin's command; refused when the rollout's state does not take it.
    pub async fn command_rollout(
        &self,
        id: i64,
        command: AdminCommand,
        actor: &str,
        now_ms: i64,
    ) -> Result<Rollout, RolloutError> {
        let rollout = self.rollout(id).await?.ok_or(RolloutError::NotFound(id))?;
        let (step, kind) = match command {
            AdminCommand::Pause => (Command::Pause(actor), "rollout_paused"),
            AdminCommand::Resume => (Command::Resume, "rollout_resumed"),
            AdminCommand::Approve => (Command::Approve, "rollout_approved"),
            AdminCommand::Abort => (Command::Abort(actor), "rollout_aborted"),
        };
        let next = stage::next(&rollout.plan, &rollout.state, &step, now_ms)
            .map_err(|why| RolloutError::Conflict(format!("rollout {id}: {why}")))?;
        self.move_rollout(&rollout, &next, None, actor, kind, now_ms).await
    }

    /// The leader's step: judges the active rollout's running stage from
    /// telemetry (`vetoes`: install failures and crash-loop rollbacks in the
    /// stage, from the updater's events), keeps the judgement, and moves the
    /// rollout when it says so. `None` when no stage is running.
    pub async fn decide_rollout(&self, vetoes: (u64, u64), now_ms: i64) -> Result<Option<Decision>, RolloutError> {
        let Some(rollout) = self.active_rollout().await? else { return Ok(None) };
        let State::Running { stage, since_ms } = rollout.state else { return Ok(None) };
        let query = StageQuery {
            candidate: &rollout.model_version,
            previous: &rollout.previous_version,
            percent: rollout.plan.stages[stage],
            since_ms,
        };
        let mut evidence = self.stage_evidence(&query).await?;
        (evidence.install_failures, evidence.crash_loops) = vetoes;
        let decision = stage::judge(&rollout.plan, stage, since_ms, now_ms, &evidence);
        let next = stage::next(&rollout.plan, &rollout.state, &Command::Decided(&decision), now_ms)
            .map_err(RolloutError::Conflict)?;
        let kind = match &decision.outcome {
            Outcome::Continue(_) => "rollout_judged",
            Outcome::Pass => "rollout_stage_passed",
            Outcome::Fail(_) => "rollout_halted",
            Outcome::Inconclusive(_) => "rollout_inconclusive",
            Outcome::Outage(_) => "rollout_telemetry_outage",
        };
        self.move_rollout(&rollout, &next, Some(&decision), "rxfleet", kind, now_ms).await?;
        Ok(Some(decision))
    }

    /// The updater's vetoes against a rollout's candidate from the devices
    /// of its current stage: install failures (`model_rejected` or
    /// `selftest_failed` for the candidate's version) and crash-loop
    /// rollbacks (`model_rolled_back` from it with reason `crash_loop`). A
    /// version is rolled out once, so its version names this rollout's events.
    pub async fn rollout_vetoes(&self, rollout: &Rollout) -> Result<(u64, u64), RolloutError> {
        let rows = sqlx::query(
            "SELECT device_id, kind, details FROM device_events \
             WHERE kind IN ('model_rejected', 'selftest_failed', 'model_rolled_back')",
        )
        .fetch_all(&self.pool)
        .await?;
        let (mut failures, mut crash_loops) = (0, 0);
        for row in rows {
            let device: String = row.get(0);
            if !super::in_stage(&device, rollout.percent) {
                continue;
            }
            let kind: String = row.get(1);
            let details: serde_json::Value = serde_json::from_str(&row.get::<String, _>(2)).unwrap_or_default();
            let about = |key: &str| details[key].as_str() == Some(rollout.model_version.as_str());
            match kind.as_str() {
                "model_rejected" | "selftest_failed" if about("version") => failures += 1,
                "model_rolled_back" if about("from") && details["reason"] == "crash_loop" => crash_loops += 1,
                _ => {}
            }
        }
        Ok((failures, crash_loops))
    }

    /// The leader's step with the updater's vetoes: judges the active
    /// rollout's running stage (see [`Db::decide_rollout`]).
    pub async fn judge_active_rollout(&self, now_ms: i64) -> Result<Option<Decision>, RolloutError> {
        let Some(rollout) = self.active_rollout().await? else { return Ok(None) };
        let vetoes = self.rollout_vetoes(&rollout).await?;
        self.decide_rollout(vetoes, now_ms).await
    }

    /// Stores a rollout's next state (and the decision behind it), if the
    /// stored state is still the one it was computed from.
    async fn move_rollout(
        &self,
        rollout: &Rollout,
        next: &State,
        decision: Option<&Decision>,
        actor: &str,
        kind: &str,
        now_ms: i64,
    ) -> Result<Rollout, RolloutError> {
        let mut tx = self.begin_write().await?;
        let moved =
            sqlx::query("UPDATE rollouts SET state = $2, active = $3, updated_ms = $4 WHERE id = $1 AND state = $5")
                .bind(rollout.id)
                .bind(json(next))
                .bind(i64::from(!next.is_final()))
                .bind(now_ms)
                .bind(json(&rollout.state))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if moved == 0 {
            return Err(RolloutError::Conflict(format!("rollout {} changed meanwhile: try again", rollout.id)));
        }
        if let Some(decision) = decision {
            let outcome = serde_json::to_value(&decision.outcome).expect("an outcome serialises");
            sqlx::query(
                "INSERT INTO rollout_decisions (rollout_id, at_ms, stage, outcome, decision) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(rollout.id)
            .bind(now_ms)
            .bind(i64::try_from(decision.stage).unwrap_or(i64::MAX))
            .bind(outcome["outcome"].as_str().unwrap_or_default().to_string())
            .bind(json(decision))
            .execute(&mut *tx)
            .await?;
        }
        // The registry follows a rollout's end.
        match next {
            State::Completed if rollout.state != State::Completed => {
                crate::registry::promote(&mut tx, &rollout.model_version, rollout.id, now_ms).await?;
            }
            State::Halted { reason, .. } => {
                let why = format!("rollout {} halted: {reason}", rollout.id);
                crate::registry::set_state(&mut tx, &rollout.model_version, ModelState::Halted, &why, now_ms).await?;
            }
            State::Aborted { by } => {
                let why = format!("rollout {} aborted by {by}", rollout.id);
                crate::registry::set_state(&mut tx, &rollout.model_version, ModelState::Halted, &why, now_ms).await?;
            }
            _ => {}
        }
        // A judgement that changes nothing is kept with the rollout, not as a fleet event.
        if *next != rollout.state || decision.is_none() {
            let details = serde_json::json!({
                "rollout": rollout.id,
                "model_version": rollout.model_version,
                "from": rollout.state,
                "to": next,
                "outcome": decision.map(|d| &d.outcome),
            });
            crate::devices::record_change(&mut tx, now_ms, actor, kind, None, details).await?;
        }
        tx.commit().await?;
        self.rollout(rollout.id).await?.ok_or(RolloutError::NotFound(rollout.id))
    }
}
