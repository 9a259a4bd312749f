//! Wire types, MQTT topic names and protocol versions shared by the appliance
//! daemon (`rxvisiond`) and the fleet server (`rxfleet`).
//!
//! This crate is pure data: it never performs I/O and depends on nothing of
//! ours. Everything that crosses the wire between an appliance and the fleet
//! is defined here, so both ends agree by construction; `docs/protocol.md`
//! documents it with an example payload per message, and the golden-payload
//! tests (`tests/golden/`) make every format change deliberate.
//!
//! # Layout
//!
//! * [`topic`] — `rxv/v1/dev/{id}/{status|telemetry|events|ack|desired}`,
//!   device ids, per-channel size limits.
//! * [`messages`] — one payload type per channel ([`Status`], [`Telemetry`],
//!   [`Event`], [`Ack`], [`Desired`]) and their validation.
//! * [`decode`] / [`encode`] — bytes ↔ payload with the size limit, the
//!   version check and validation; [`decode_on`] also checks that the
//!   payload's device is the topic's.
//! * [`updates`] — what a TUF target of the fleet's repository says
//!   (`custom.rxvision`: kind, version, cohort bound, rollback order), the
//!   cohort bucket of a device and which target it installs.

pub mod messages;
pub mod topic;
pub mod updates;

pub use messages::{
    feature_bounds, Ack, ChainHead, Desired, EngineState, Event, EventKind, Feedback, Histogram, Message, ModelRef,
    OutboxLosses, OutboxState, Status, Telemetry, Window, CONFIDENCE_BOUNDS, LATENCY_BOUNDS_MS,
};
pub use topic::Channel;

/// Version of the device ↔ fleet protocol; every topic lives under `rxv/v{N}/`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Prefix of every MQTT topic of this protocol version.
pub const TOPIC_PREFIX: &str = "rxv/v1";

/// Why bytes are not a payload of this protocol (or a name not a topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Over the channel's size limit (checked before parsing).
    #[error("{channel} payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The channel.
        channel: Channel,
        /// The payload's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON, or not the payload's shape (the parser's words).
    #[error("malformed {channel} payload: {reason}")]
    Malformed {
        /// The channel.
        channel: Channel,
        /// What the parser said.
        reason: String,
    },
    /// A protocol version this build does not speak.
    #[error("{channel} payload of protocol version {version}; this build speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The channel.
        channel: Channel,
        /// The payload's version.
        version: u32,
    },
    /// Parsed, but out of range (the first problem found).
    #[error("invalid {channel} payload: {reason}")]
    Invalid {
        /// The channel.
        channel: Channel,
        /// What is wrong.
        reason: String,
    },
    /// The payload names another device than its topic.
    #[error("payload of device {payload:?} published under device {topic:?}")]
    WrongDevice {
        /// The device of the topic.
        topic: String,
        /// The device the payload names.
        payload: String,
    },
    /// Not a device id.
    #[error("{0:?} is not a device id (1-64 letters, digits, '-', '_' or '.')")]
    DeviceId(String),
    /// Not a topic of this protocol version.
    #[error("{0:?} is not a topic of protocol {TOPIC_PREFIX}")]
    Topic(String),
}

#[derive(serde::Deserialize)]
struct Versioned {
    v: u32,
}

/// Parses a payload: size limit, JSON, version, shape, validation — in that
/// order, so a payload of a newer version is named as such rather than as
/// malformed.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, ProtocolError> {
    let channel = M::CHANNEL;
    if bytes.len() > channel.max_payload() {
        return Err(ProtocolError::TooLarge { channel, len: bytes.len(), max: channel.max_payload() });
    }
    let malformed = |e: serde_json::Error| ProtocolError::Malformed { channel, reason: e.to_string() };
    let versioned: Versioned = serde_json::from_slice(bytes).map_err(malformed)?;
    if versioned.v != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { channel, version: versioned.v });
    }
    let message: M = serde_json::from_slice(bytes).map_err(malformed)?;
    message.validate().map_err(|reason| ProtocolError::Invalid { channel, reason })?;
    Ok(message)
}

/// [`decode`], and the payload's device must be `topic_device` (a device's
/// credentials only let it publish under its own id, and the fleet checks
/// the payload against the topic as well).
pub fn decode_on<M: Message>(topic_device: &str, bytes: &[u8]) -> Result<M, ProtocolError> {
    let message: M = decode(bytes)?;
    if message.device_id() != topic_device {
        return Err(ProtocolError::WrongDevice {
            topic: topic_device.to_string(),
            payload: message.device_id().chars().take(80).collect(),
        });
    }
    Ok(message)
}

/// Serialises a payload (compact JSON), refusing one that would not decode.
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, ProtocolError> {
    let channel = M::CHANNEL;
    if message.version() != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { channel, version: message.version() });
    }
    message.validate().map_err(|reason| ProtocolError::Invalid { channel, reason })?;
    let bytes = serde_json::to_vec(message).expect("protocol messages serialise");
    if bytes.len() > channel.max_payload() {
        return Err(ProtocolError::TooLarge { channel, len: bytes.len(), max: channel.max_payload() });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_prefix_carries_the_protocol_version() {
        assert_eq!(TOPIC_PREFIX, format!("rxv/v{PROTOCOL_VERSION}"));
    }
}
