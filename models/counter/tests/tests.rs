//! Integration tests of `rxvision-counter`, one binary with a module per topic.

mod fuzz;
