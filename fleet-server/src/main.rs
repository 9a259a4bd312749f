//! `rxfleet`: the RxVision fleet server.
//!
//! It will aggregate appliance telemetry, detect drift, schedule retraining and
//! push signed model updates in stages (see `shared/design/SYSTEM.md`, "Fleet
//! server"). Until that issue lands the binary only reports its version and the
//! protocol it speaks, so installers can check what they deployed.

fn main() {
    println!(
        "rxfleet {} (protocol {}, topics under {}/): the fleet server is not built yet",
        env!("CARGO_PKG_VERSION"),
        rxvision_protocol::PROTOCOL_VERSION,
        rxvision_protocol::TOPIC_PREFIX
    );
}
