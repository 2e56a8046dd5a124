//! Compile tests of the macros: what must compile (and run), and what must not, with the
//! error each misuse gets. Regenerate the `.stderr` files with `TRYBUILD=overwrite` and review
//! them: each must point at the offending token and say what to write instead.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
