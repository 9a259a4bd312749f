//! What a message from the broker is: a device payload the ingest accepts,
//! or a refusal with its reason. Pure: no I/O, never panics on any input.

use rxvision_protocol::topic::{self, Channel};
use rxvision_protocol::{decode_on, Event, ProtocolError, Status, Telemetry};

/// A valid device payload, on its own device's topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The retained status (or a last will).
    Status(Status),
    /// A telemetry window.
    Telemetry(Telemetry),
    /// An event.
    Event(Event),
}

impl Incoming {
    /// The device it is from.
    pub fn device_id(&self) -> &str {
        match self {
            Incoming::Status(m) => &m.device_id,
            Incoming::Telemetry(m) => &m.device_id,
            Incoming::Event(m) => &m.device_id,
        }
    }

    /// Its `seq` (statuses have none).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Incoming::Status(_) => None,
            Incoming::Telemetry(m) => Some(m.seq),
            Incoming::Event(m) => Some(m.seq),
        }
    }
}

/// Why a message was refused (the database counts by these codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not a topic of this protocol, or a fleet channel.
    BadTopic,
    /// Over the channel's size limit.
    TooLarge,
    /// Not JSON or not the payload's shape.
    Malformed,
    /// Another protocol version.
    Version,
    /// Out of range.
    Invalid,
    /// The payload names another device than its topic.
    WrongDevice,
}

impl RejectReason {
    /// The code stored and reported.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadTopic => "bad_topic",
            RejectReason::TooLarge => "too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::Version => "version",
            RejectReason::Invalid => "invalid",
            RejectReason::WrongDevice => "wrong_device",
        }
    }
}

/// A refused message: the device of its topic (`?` when the topic names
/// none), its channel, why, and the parser's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The topic's device, or `?`.
    pub device_id: String,
    /// The topic's channel, or `?`.
    pub channel: String,
    /// Why.
    pub reason: RejectReason,
    /// Details (bounded).
    pub error: String,
}

/// Classifies one message.
pub fn classify(topic_name: &str, payload: &[u8]) -> Result<Incoming, Rejected> {
    let (device_id, channel) = topic::parse(topic_name).map_err(|e| Rejected {
        device_id: "?".into(),
        channel: "?".into(),
        reason: RejectReason::BadTopic,
        error: e.to_string(),
    })?;
    let reject = |e: ProtocolError| {
        let reason = match e {
            ProtocolError::TooLarge { .. } => RejectReason::TooLarge,
            ProtocolError::Malformed { .. } => RejectReason::Malformed,
            ProtocolError::Version { .. } => RejectReason::Version,
            ProtocolError::Invalid { .. } => RejectReason::Invalid,
            ProtocolError::WrongDevice { .. } => RejectReason::WrongDevice,
            ProtocolError::DeviceId(_) | ProtocolError::Topic(_) => RejectReason::BadTopic,
        };
        Rejected {
            device_id: device_id.clone(),
            channel: channel.to_string(),
            reason,
            error: e.to_string().chars().take(300).collect(),
        }
    };
    match channel {
        Channel::Status => decode_on::<Status>(&device_id, payload).map(Incoming::Status).map_err(reject),
        Channel::Telemetry => decode_on::<Telemetry>(&device_id, payload).map(Incoming::Telemetry).map_err(reject),
        Channel::Events => decode_on::<Event>(&device_id, payload).map(Incoming::Event).map_err(reject),
        Channel::Ack | Channel::Desired => Err(reject(ProtocolError::Topic(topic_name.chars().take(200).collect()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/../protocol/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn reason(topic: &str, payload: &[u8]) -> RejectReason {
        classify(topic, payload).unwrap_err().reason
    }

    #[test]
    fn the_documented_payloads_are_accepted_on_their_topics() {
        let telemetry = golden("telemetry.json");
        let device: serde_json::Value = serde_json::from_slice(&telemetry).unwrap();
        let device = device["device_id"].as_str().unwrap().to_string();
        let accepted = classify(&format!("rxv/v1/dev/{device}/telemetry"), &telemetry).unwrap();
        assert_eq!(accepted.device_id(), device);
        assert!(accepted.seq().is_some());
        assert!(matches!(
            classify(&format!("rxv/v1/dev/{device}/status"), &golden("status.json")).unwrap(),
            Incoming::Status(_)
        ));
        assert!(matches!(
            classify(&format!("rxv/v1/dev/{device}/events"), &golden("event.json")).unwrap(),
            Incoming::Event(_)
        ));
    }

    #[test]
    fn every_kind_of_bad_message_has_its_reason() {
        let telemetry = golden("telemetry.json");
        let value: serde_json::Value = serde_json::from_slice(&telemetry).unwrap();
        let edited = |key: &str, v: serde_json::Value| {
            let mut edited = value.clone();
            edited[key] = v;
            serde_json::to_vec(&edited).unwrap()
        };
        let device = value["device_id"].as_str().unwrap();
        let topic = format!("rxv/v1/dev/{device}/telemetry");
        assert_eq!(reason("rxv/v1/dev/a/b/telemetry", &telemetry), RejectReason::BadTopic);
        assert_eq!(reason(&format!("rxv/v1/dev/{device}/ack"), b"{}"), RejectReason::BadTopic);
        assert_eq!(reason(&topic, b"\xff\x00garbage"), RejectReason::Malformed);
        assert_eq!(reason(&topic, &telemetry[..telemetry.len() / 2]), RejectReason::Malformed);
        assert_eq!(reason(&topic, &vec![b' '; 300 * 1024]), RejectReason::TooLarge);
        assert_eq!(reason(&topic, &edited("v", 2.into())), RejectReason::Version);
        assert_eq!(reason(&topic, &edited("unknown_field", 1.into())), RejectReason::Malformed);
        assert_eq!(reason(&topic, &edited("seq", 0.into())), RejectReason::Invalid);
        assert_eq!(reason("rxv/v1/dev/someone-else/telemetry", &telemetry), RejectReason::WrongDevice);
        let rejected = classify("rxv/v1/dev/someone-else/telemetry", &telemetry).unwrap_err();
        assert_eq!((rejected.device_id.as_str(), rejected.channel.as_str()), ("someone-else", "telemetry"));
    }
}
