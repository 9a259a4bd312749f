//! Integration tests of `rxvision-synth`, one binary with a module per topic.

mod synth;
