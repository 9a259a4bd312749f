//! Staged rollouts: which devices a stage holds, what a stage's telemetry
//! says against its control cohort, and how a rollout moves on.
//!
//! - [`sequential`] — the anytime-valid rate comparison every gate uses.
//! - [`evidence`] — a stage's evidence from the devices' hourly rollups.
//! - [`store`] — rollouts in the database: start, admin commands, and the
//!   leader's step that judges the running stage.
//! - [`stage`] — the judgement of a stage and the rollout's state machine
//!   (no I/O: time and evidence come from the caller).

pub mod evidence;
pub mod sequential;
pub mod stage;
pub mod store;

pub use rxvision_protocol::updates::cohort_bucket;

/// Whether a device is in a stage of `percent` %.
pub fn in_stage(device_id: &str, percent: u32) -> bool {
    cohort_bucket(device_id) < percent.saturating_mul(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_nest_and_hold_about_their_share() {
        let ids: Vec<String> = (0..20_000).map(|n| format!("store-{n:05}-counter-1")).collect();
        let mut previous = 0;
        for percent in [1, 10, 50, 100] {
            let members = ids.iter().filter(|id| in_stage(id, percent)).count();
            let expected = 200 * percent as usize;
            assert!(members.abs_diff(expected) <= expected / 10 + 30, "{percent} %: {members}");
            assert!(members >= previous, "a later stage holds every device of an earlier one");
            previous = members;
        }
        assert_eq!(ids.iter().filter(|id| in_stage(id, 0)).count(), 0);
        assert_eq!(cohort_bucket("store-0412-counter-1"), cohort_bucket("store-0412-counter-1"));
    }
}
