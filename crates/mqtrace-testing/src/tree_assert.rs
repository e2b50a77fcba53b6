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
