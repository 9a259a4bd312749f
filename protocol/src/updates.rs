//! Signed updates: what the fleet's TUF repository says about each target, and
//! which target a device installs.
//!
//! The fleet publishes a TUF repository (`/tuf/metadata/`, `/tuf/targets/`).
//! Every target of `targets.json` carries, under `custom.rxvision`, a
//! [`TargetInfo`]: its kind, name and version, the **cohort bound** of the
//! rollout stage it serves, and whether it is an explicit **rollback order**.
//! Only signed metadata says who installs what; the MQTT `desired` hint only
//! says "refresh now".
//!
//! # The assignment rule
//!
//! A device's cohort bucket is [`cohort_bucket`] of its id, a number in
//! `0..10_000`. Of the targets of one kind whose `cohort_below` is above the
//! bucket, the device takes the one with the smallest `cohort_below` (the
//! narrowest stage that holds it). So the production model is published with
//! `cohort_below = 10_000` and a candidate in a 10 % stage with
//! `cohort_below = 1_000`: devices below 1,000 run the candidate, the others
//! production. A device never installs a version lower than the one it runs
//! unless the assigned target has `rollback = true`.

use serde::{Deserialize, Serialize};

/// Buckets a device id falls into: a stage of `p` % holds buckets below `p · 100`.
pub const COHORT_BUCKETS: u32 = 10_000;

/// The key of a TUF target's `custom` object that holds its [`TargetInfo`].
pub const CUSTOM_KEY: &str = "rxvision";

/// A device's place in every rollout: the first four bytes of the SHA-256 of
/// its id, big-endian, modulo [`COHORT_BUCKETS`]. The same on every replica,
/// in every rollout, and computed by the device itself.
pub fn cohort_bucket(device_id: &str) -> u32 {
    let digest = ring::digest::digest(&ring::digest::SHA256, device_id.as_bytes());
    let bytes = digest.as_ref();
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) % COHORT_BUCKETS
}

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A model bundle (`.tar.gz`).
    Model,
    /// An `rxvisiond` release.
    Daemon,
}

/// `custom.rxvision` of a TUF target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetInfo {
    /// What the target is.
    pub kind: TargetKind,
    /// The model family (`pillnet`) or `rxvisiond`.
    pub name: String,
    /// Its semantic version.
    pub version: String,
    /// Devices whose [`cohort_bucket`] is below this install it (at most
    /// [`COHORT_BUCKETS`]; 0 holds no device).
    pub cohort_below: u32,
    /// An explicit rollback order: devices assigned this target install it
    /// even when they run a higher version.
    #[serde(default)]
    pub rollback: bool,
}

impl TargetInfo {
    /// Reads `custom.rxvision` from a target's `custom` object; `None` when
    /// the target has none (not one of ours), an error when it is malformed.
    pub fn from_custom(
        custom: &std::collections::HashMap<String, serde_json::Value>,
    ) -> Option<Result<TargetInfo, serde_json::Error>> {
        custom.get(CUSTOM_KEY).map(|value| serde_json::from_value(value.clone()))
    }

    /// The `custom` object that carries this info.
    pub fn to_custom(&self) -> std::collections::HashMap<String, serde_json::Value> {
        let value = serde_json::to_value(self).expect("TargetInfo serialises");
        std::collections::HashMap::from([(CUSTOM_KEY.to_string(), value)])
    }

    /// Whether a device in `bucket` is in this target's cohort.
    pub fn holds(&self, bucket: u32) -> bool {
        bucket < self.cohort_below
    }
}

/// The target a device in `bucket` installs among `targets` (name and info)
/// of `kind`: the one with the smallest `cohort_below` above the bucket, ties
/// broken by name so that every device and replica agrees. `None`: no target
/// of that kind holds the device (it keeps what it runs).
pub fn assigned<'a, N: Ord + ?Sized>(
    targets: impl IntoIterator<Item = (&'a N, &'a TargetInfo)>,
    kind: TargetKind,
    bucket: u32,
) -> Option<(&'a N, &'a TargetInfo)> {
    targets
        .into_iter()
        .filter(|(_, info)| info.kind == kind && info.holds(bucket))
        .min_by(|(a_name, a), (b_name, b)| a.cohort_below.cmp(&b.cohort_below).then_with(|| a_name.cmp(b_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(version: &str, cohort_below: u32) -> TargetInfo {
        TargetInfo {
            kind: TargetKind::Model,
            name: "pillnet".into(),
            version: version.into(),
            cohort_below,
            rollback: false,
        }
    }

    #[test]
    fn the_narrowest_stage_holding_a_device_wins() {
        let targets = [
            ("pillnet-0.4.0.tar.gz".to_string(), model("0.4.0", 10_000)),
            ("pillnet-0.5.0.tar.gz".to_string(), model("0.5.0", 1_000)),
        ];
        let pick = |bucket| {
            assigned(targets.iter().map(|(n, i)| (n.as_str(), i)), TargetKind::Model, bucket)
                .map(|(_, i)| i.version.clone())
        };
        assert_eq!(pick(0).as_deref(), Some("0.5.0"));
        assert_eq!(pick(999).as_deref(), Some("0.5.0"));
        assert_eq!(pick(1_000).as_deref(), Some("0.4.0"));
        assert_eq!(pick(9_999).as_deref(), Some("0.4.0"));
        assert_eq!(assigned(targets.iter().map(|(n, i)| (n.as_str(), i)), TargetKind::Daemon, 0), None);
    }

    #[test]
    fn a_target_for_no_device_is_never_assigned() {
        let targets = [("a".to_string(), model("0.5.0", 0))];
        assert_eq!(assigned(targets.iter().map(|(n, i)| (n.as_str(), i)), TargetKind::Model, 0), None);
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(cohort_bucket("store-0412-counter-1"), cohort_bucket("store-0412-counter-1"));
        let below_100 = (0..20_000).filter(|n| cohort_bucket(&format!("store-{n:05}")) < 100).count();
        assert!((150..=250).contains(&below_100), "{below_100} of 20,000 ids in a 1 % stage");
    }

    #[test]
    fn custom_fields_round_trip_and_unknown_keys_are_refused() {
        let info = TargetInfo { rollback: true, ..model("0.4.0", 10_000) };
        assert_eq!(TargetInfo::from_custom(&info.to_custom()).unwrap().unwrap(), info);
        let mut custom = info.to_custom();
        custom.get_mut(CUSTOM_KEY).unwrap().as_object_mut().unwrap().insert("cohort".into(), 5.into());
        assert!(TargetInfo::from_custom(&custom).unwrap().is_err());
        assert!(TargetInfo::from_custom(&Default::default()).is_none());
    }
}
