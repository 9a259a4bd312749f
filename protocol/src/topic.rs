//! MQTT topics: `rxv/v1/dev/{device_id}/{channel}`.
//!
//! | channel | direction | QoS / retain |
//! |---|---|---|
//! | `status` | device → fleet | 1, retained; the last will is an offline status |
//! | `telemetry` | device → fleet | 1 |
//! | `events` | device → fleet | 1 |
//! | `ack` | fleet → device | 1 |
//! | `desired` | fleet → device | 1, retained |
//!
//! A device id is 1–64 ASCII letters, digits, `-`, `_` or `.` — never `/`,
//! `+` or `#`, so it is always exactly one topic level.

use std::fmt;

use crate::{ProtocolError, TOPIC_PREFIX};

/// The longest device id.
pub const MAX_DEVICE_ID: usize = 64;

/// One of a device's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// The device's state (retained; the last will says offline).
    Status,
    /// One telemetry window.
    Telemetry,
    /// Something that happened (model installed, engine fallback …).
    Events,
    /// The fleet's acknowledgement: the highest `seq` it has committed.
    Ack,
    /// A hint from the fleet (retained).
    Desired,
}

impl Channel {
    /// Every channel, in topic-table order.
    pub const ALL: [Channel; 5] =
        [Channel::Status, Channel::Telemetry, Channel::Events, Channel::Ack, Channel::Desired];

    /// The topic level naming this channel.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Telemetry => "telemetry",
            Channel::Events => "events",
            Channel::Ack => "ack",
            Channel::Desired => "desired",
        }
    }

    /// Whether the device publishes on it (else the fleet does).
    pub fn from_device(self) -> bool {
        matches!(self, Channel::Status | Channel::Telemetry | Channel::Events)
    }

    /// Whether messages on it are retained by the broker.
    pub fn retained(self) -> bool {
        matches!(self, Channel::Status | Channel::Desired)
    }

    /// The largest payload accepted on it, in bytes.
    pub fn max_payload(self) -> usize {
        match self {
            Channel::Telemetry => 256 * 1024,
            Channel::Status | Channel::Events => 16 * 1024,
            Channel::Ack | Channel::Desired => 1024,
        }
    }

    fn parse(level: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == level)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `id` is a valid device id (see the module documentation).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The topic of `device_id`'s `channel`.
///
/// ```
/// use rxvision_protocol::topic::{topic, Channel};
/// assert_eq!(topic("counter-7", Channel::Telemetry).unwrap(), "rxv/v1/dev/counter-7/telemetry");
/// ```
pub fn topic(device_id: &str, channel: Channel) -> Result<String, ProtocolError> {
    if !valid_device_id(device_id) {
        return Err(ProtocolError::DeviceId(device_id.chars().take(80).collect()));
    }
    Ok(format!("{TOPIC_PREFIX}/dev/{device_id}/{channel}"))
}

/// The topic filter matching `channel` of every device (the fleet subscribes to these).
pub fn all_devices(channel: Channel) -> String {
    format!("{TOPIC_PREFIX}/dev/+/{channel}")
}

/// The device id and channel of a topic of this protocol version.
pub fn parse(topic: &str) -> Result<(String, Channel), ProtocolError> {
    let bad = || ProtocolError::Topic(topic.chars().take(200).collect());
    let rest = topic.strip_prefix(TOPIC_PREFIX).and_then(|r| r.strip_prefix("/dev/")).ok_or_else(bad)?;
    let (device_id, channel) = rest.split_once('/').ok_or_else(bad)?;
    let channel = Channel::parse(channel).ok_or_else(bad)?;
    if !valid_device_id(device_id) {
        return Err(bad());
    }
    Ok((device_id.to_string(), channel))
}
