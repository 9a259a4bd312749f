//! Whole-system tests: real Mosquitto brokers (and, later, the fleet and
//! many appliances). One test binary with a module per topic.

mod broker;
mod fleet;
mod link;
mod prometheus;
mod serve;
mod updates;
