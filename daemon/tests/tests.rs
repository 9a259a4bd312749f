//! Integration tests of `rxvisiond`, one binary with a module per topic.

mod audit;
mod audit_crash;
mod camera;
mod cli;
mod scan;
mod service;
