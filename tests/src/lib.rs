//! Whole-system tests and benchmarks.
