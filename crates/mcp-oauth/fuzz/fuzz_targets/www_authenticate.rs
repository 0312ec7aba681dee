//! Fuzz the `WWW-Authenticate` parser: it must never panic, and whatever it accepts must
//! render and parse back to the same challenges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_oauth::{BearerChallenge, parse_challenge_header};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let Ok(challenges) = parse_challenge_header(input) else { return };
    let _ = challenges.iter().find_map(BearerChallenge::from_challenge);
    let rendered = challenges.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let reparsed = parse_challenge_header(&rendered).expect("a rendered header parses");
    assert_eq!(reparsed, challenges, "round trip of {input:?} via {rendered:?}");
});
