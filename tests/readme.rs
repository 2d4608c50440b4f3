//! The README's Rust snippets are compiled: each is marked with the example that
//! contains it (`<!-- compiled: examples/....rs -->`), and every line of the
//! snippet must be a line of that example (which `cargo test` builds), or with
//! the adopter crate file it is (`<!-- adopter: build.rs -->`), which CI builds
//! from the README's text and tests (`.ci/adopter.sh`).

#[test]
fn every_rust_snippet_of_the_readme_is_in_a_compiled_example() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut checked = 0;
    for (i, line) in lines.iter().enumerate() {
        if *line != "```rust" {
            continue;
        }
        // An adopter crate's file: CI builds that crate from the README and
        // runs its test (.ci/adopter.sh).
        if i.checked_sub(1)
            .is_some_and(|j| lines[j].starts_with("<!-- adopter: "))
        {
            continue;
        }
        let marker = i
            .checked_sub(1)
            .and_then(|j| lines[j].strip_prefix("<!-- compiled: "))
            .and_then(|m| m.strip_suffix(" -->"))
            .unwrap_or_else(|| panic!("README line {}: a ```rust block without a <!-- compiled: FILE --> line before it", i + 1));
        let example = std::fs::read_to_string(format!("{root}/{marker}"))
            .unwrap_or_else(|e| panic!("README line {}: {marker}: {e}", i + 1));
        let known: std::collections::HashSet<&str> = example.lines().map(str::trim).collect();
        for (k, snippet_line) in lines[i + 1..]
            .iter()
            .take_while(|l| **l != "```")
            .enumerate()
        {
            let trimmed = snippet_line.trim();
            assert!(
                trimmed.is_empty() || known.contains(trimmed),
                "README line {}: {trimmed:?} is not a line of {marker}",
                i + 2 + k
            );
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} snippets found");
}
