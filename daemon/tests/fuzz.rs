//! Fuzzing the daemon's parsers with proptest (the crash corpus, if any,
//! lives in `tests/proptest-regressions/fuzz.txt`): the configuration and
//! the API's JSON bodies. Whatever the input, the answer is a value or an
//! error that names what is wrong, never a panic.

use proptest::prelude::*;
use rxvision_daemon::config::{parse, ConfigError, DEFAULT_CONFIG};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/fuzz.txt"
        )))),
        ..ProptestConfig::default()
    }
}

/// Values that break TOML types and ranges.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e309".to_string()),
        Just("nan".to_string()),
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("[1, \"a\"]".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[a-z/.:0-9 ]{0,20}\"",
        "[ -~]{0,12}",
    ]
}

/// The line numbers of the default configuration that set a key.
fn key_lines() -> Vec<usize> {
    DEFAULT_CONFIG
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with('#') && l.contains(" = "))
        .map(|(i, _)| i)
        .collect()
}

fn with_line(index: usize, replace: impl Fn(&str) -> String) -> String {
    DEFAULT_CONFIG
        .lines()
        .enumerate()
        .map(|(i, l)| if i == index { replace(l) } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_is_an_error_or_a_configuration(text in "(?s).{0,400}") {
        let _ = parse(&text, "fuzz.toml");
    }

    #[test]
    fn a_hostile_value_is_an_error_naming_its_key_or_accepted(pick in any::<prop::sample::Index>(), value in hostile_value()) {
        let lines = key_lines();
        let index = lines[pick.index(lines.len())];
        let key = DEFAULT_CONFIG.lines().nth(index).unwrap().split(" = ").next().unwrap().trim().to_string();
        let text = with_line(index, |l| format!("{} = {value}", l.split(" = ").next().unwrap()));
        match parse(&text, "fuzz.toml") {
            Ok(_) => {}
            Err(ConfigError::Parse { problem, .. }) => {
                // A syntax error is placed by line; a type error names the key.
                prop_assert!(problem.path.ends_with(&key) || problem.problem.contains("line"), "{key}: {problem}");
            }
            Err(e @ ConfigError::Invalid { .. }) => {
                // Every problem names its key path; a consistency problem names both keys.
                prop_assert!(e.to_string().contains(&key), "{key}: {e}");
            }
            Err(other) => prop_assert!(false, "{key}: {other}"),
        }
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it(pick in any::<prop::sample::Index>(), name in "[a-z_]{3,12}") {
        let lines = key_lines();
        let index = lines[pick.index(lines.len())];
        prop_assume!(!DEFAULT_CONFIG.lines().any(|l| l.trim_start().starts_with(&format!("{name} ="))));
        let text = with_line(index, |l| format!("{l}\n{name} = 1"));
        match parse(&text, "fuzz.toml") {
            Err(e) => prop_assert!(e.to_string().contains(&name), "{e}"),
            Ok(_) => prop_assert!(false, "unknown key {name} accepted"),
        }
    }
}
