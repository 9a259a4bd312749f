//! Integration tests of `rxvision-protocol`, one binary with a module per topic.

mod golden;
mod payloads;
