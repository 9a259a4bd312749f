//! Wire types, MQTT topic names and protocol versions shared by the appliance
//! daemon (`rxvisiond`) and the fleet server (`rxfleet`).
//!
//! This crate is pure data: it never performs I/O and depends on nothing of
//! ours. Everything that crosses the wire between an appliance and the fleet is
//! defined here, so that both ends agree by construction. The design brief
//! (`shared/design/SYSTEM.md`, "Telemetry and offline operation") lists the
//! topics; they land here together with the telemetry issue.

/// Version of the device ↔ fleet protocol; every topic lives under `rxv/v{N}/`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Prefix of every MQTT topic of this protocol version.
pub const TOPIC_PREFIX: &str = "rxv/v1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_prefix_carries_the_protocol_version() {
        assert_eq!(TOPIC_PREFIX, format!("rxv/v{PROTOCOL_VERSION}"));
    }
}
