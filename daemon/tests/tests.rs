//! Integration tests of `rxvisiond`, one binary with a module per topic.

mod audit;
mod audit_crash;
mod audit_model;
mod audit_safety;
mod camera;
mod cli;
mod fuzz;
mod hardening;
mod in_process;
mod outbox;
mod scan;
mod service;
mod telemetry;
