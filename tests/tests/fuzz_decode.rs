//! Bounded fuzzing of the decode path (headers and payload): a mutation
//! fuzzer over valid messages, run for `CHOREO_FUZZ_SECS` seconds (default 10,
//! as in CI; longer by hand, or with cargo-fuzz in `fuzz/`). Any panic fails
//! the test and prints the input and the seed that found it
//! (`CHOREO_FUZZ_SEED` replays a run).
#![allow(missing_docs, clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use choreo_tests::fuzz::{decode_any, seeds};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that tend to break parsers, spliced over header values.
const INTERESTING: &[&str] = &[
    "",
    "0",
    "-1",
    "+1",
    "4294967296",
    "18446744073709551616",
    "1.0",
    "1e3",
    "NaN",
    " 1",
    "1 ",
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
    "2026-13-40T25:61:61Z",
    "1970-01-01T00:00:00Z",
    "application/json",
    "00-00000000000000000000000000000000-0000000000000000-00",
    "é",
    "東京",
    "\u{202e}",
    "\t",
    "\u{0}",
    "ce-id",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                input.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = input[a..b].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            5 => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 => {
                // Replace the value of one header line with an interesting one.
                let text = String::from_utf8_lossy(input).into_owned();
                let lines: Vec<&str> = text.split('\n').collect();
                let i = rng.below(lines.len());
                if let Some((name, _)) = lines[i].split_once(": ") {
                    let value = INTERESTING[rng.below(INTERESTING.len())];
                    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
                    out[i] = format!("{name}: {value}");
                    *input = out.join("\n").into_bytes();
                }
            }
            7 if len > 0 => input.truncate(rng.below(len)),
            _ => {
                // Repeat a header line (duplicate headers).
                let text = String::from_utf8_lossy(input).into_owned();
                if let Some(line) = text.lines().nth(rng.below(8)) {
                    let line = format!("{line}\n");
                    input.splice(0..0, line.into_bytes());
                }
            }
        }
    }
}

#[test]
fn the_decode_path_never_panics() {
    let secs: u64 = std::env::var("CHOREO_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("CHOREO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let mut pool = seeds();
    for s in &pool {
        decode_any(s);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    // The standard panic hook would print every caught panic.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    while Instant::now() < deadline && failure.is_none() {
        for _ in 0..256 {
            let mut input = pool[rng.below(pool.len())].clone();
            mutate(&mut rng, &mut input, &pool);
            if catch_unwind(AssertUnwindSafe(|| decode_any(&input))).is_err() {
                failure = Some(input);
                break;
            }
            runs += 1;
            // Keep some mutants as new starting points.
            if rng.below(64) == 0 && pool.len() < 512 {
                pool.push(input);
            }
        }
    }
    std::panic::set_hook(hook);
    if let Some(input) = failure {
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        panic!(
            "decode_any panicked after {runs} runs (CHOREO_FUZZ_SEED={seed}) on input {hex}\n{}",
            String::from_utf8_lossy(&input)
        );
    }
    eprintln!("fuzzed the decode path: {runs} inputs in {secs}s, seed {seed}, no panic");
    assert!(runs > 1000, "too few runs to mean anything: {runs}");
}
