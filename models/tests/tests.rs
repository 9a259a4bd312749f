//! Integration tests of `rxvision-models`, one binary with a module per topic.

mod bundle;
mod engines;
mod fuzz;
mod preprocess;
mod support;
