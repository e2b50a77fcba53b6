//! Comparing rendered span trees with the expected text of a test.

/// Asserts a rendered tree against an indented raw string literal (its common
/// indentation and first empty line removed), showing both in full on mismatch.
#[track_caller]
pub fn assert_tree(actual: &str, expected: &str) {
    let expected = unindent(expected);
    assert!(
        actual == expected,
        "trace tree differs\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

/// Asserts `actual` equals the golden file at `path`; with `MQTRACE_BLESS` set in
/// the environment, writes `actual` there first (after an intended change).
/// Returns the golden text.
#[track_caller]
pub fn assert_golden(path: &str, actual: &str) -> String {
    if std::env::var_os("MQTRACE_BLESS").is_some() {
        if let Err(e) = std::fs::write(path, actual) {
            panic!("cannot write {path}: {e}");
        }
    }
    let golden = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e} (MQTRACE_BLESS=1 writes it)"));
    assert!(
        actual == golden,
        "output differs from {path} (MQTRACE_BLESS=1 rewrites it)\n--- got\n{actual}"
    );
    golden
}

/// Removes the common indentation of a raw string literal, its leading empty lines
/// and trailing spaces; ends with exactly one newline.
pub fn unindent(s: &str) -> String {
    let lines: Vec<&str> = s.lines().skip_while(|l| l.trim().is_empty()).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for line in lines {
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::unindent;

    #[test]
    fn unindent_strips_common_indentation() {
        assert_eq!(unindent("\n    a\n      b  \n\n"), "a\n  b\n");
    }
}
