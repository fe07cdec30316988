//! Deterministic fuzzing for the decoders' unit tests (test builds only): a fixed-seed
//! generator, byte-level mutations of valid inputs, and a runner that turns a panic or a
//! hang on any case into a test failure naming the input's bytes.
//!
//! Stable Rust has no coverage-guided fuzzer in the registries' reach, so the decoders are
//! fed many generated cases instead: valid encodings from the real writers, mutated by
//! bit flips, boundary integers written over length fields, truncations, insertions and
//! splices, plus raw random bytes. Each case derives from the seed and its number, so a
//! failure reproduces exactly; a crasher's bytes go into a regression test beside the
//! decoder. `CAIRN_FUZZ_CASES` scales the number of cases (default per target; CI keeps the
//! default so the run stays bounded in time).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// xorshift64*: small, deterministic, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A boundary-heavy integer: 0, 1, small, powers of two and their neighbours, the
    /// maxima of each width, or anything.
    pub fn interesting(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => 1 + self.below(16) as u64,
            2 => (1u64 << self.below(64)).wrapping_add(self.below(3) as u64).wrapping_sub(1),
            3 => u64::from(u32::MAX) - self.below(4) as u64,
            4 => u64::MAX - self.below(4) as u64,
            5 => i64::MAX as u64 - self.below(2) as u64,
            6 => self.below(1 << 16) as u64,
            _ => self.next(),
        }
    }

    /// Applies one to `max` random mutations to `data`.
    pub fn mutate(&mut self, data: &mut Vec<u8>, max: usize) {
        for _ in 0..1 + self.below(max) {
            self.mutate_once(data);
        }
    }

    fn mutate_once(&mut self, data: &mut Vec<u8>) {
        let len = data.len();
        match self.below(9) {
            // Flip one bit.
            0 if len > 0 => {
                let at = self.below(len);
                data[at] ^= 1 << self.below(8);
            }
            // Set one byte.
            1 if len > 0 => {
                let at = self.below(len);
                data[at] = self.next() as u8;
            }
            // Overwrite a 4- or 8-byte field, either endianness, with a boundary value.
            2 | 3 if len >= 8 => {
                let v = self.interesting();
                let width = if self.one_in(2) { 4 } else { 8 };
                let at = self.below(len - width + 1);
                let bytes = match (width, self.one_in(2)) {
                    (4, true) => (v as u32).to_le_bytes().to_vec(),
                    (4, false) => (v as u32).to_be_bytes().to_vec(),
                    (_, true) => v.to_le_bytes().to_vec(),
                    (_, false) => v.to_be_bytes().to_vec(),
                };
                data[at..at + width].copy_from_slice(&bytes);
            }
            // Truncate.
            4 => {
                let to = self.below(len + 1);
                data.truncate(to);
            }
            // Insert random bytes.
            5 => {
                let at = self.below(len + 1);
                let extra = self.bytes(16);
                data.splice(at..at, extra);
            }
            // Delete a range.
            6 if len > 0 => {
                let from = self.below(len);
                let to = (from + 1 + self.below(32)).min(len);
                data.drain(from..to);
            }
            // Duplicate a range elsewhere (repeated records, self-references).
            7 if len > 0 => {
                let from = self.below(len);
                let to = (from + 1 + self.below(64)).min(len);
                let piece = data[from..to].to_vec();
                let at = self.below(len + 1);
                data.splice(at..at, piece);
            }
            _ => {
                if len > 0 {
                    let at = self.below(len);
                    data[at] = 0;
                }
            }
        }
    }
}

/// The number of cases for a target: `CAIRN_FUZZ_CASES` when set, else `default`.
fn cases(default: usize) -> usize {
    std::env::var("CAIRN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Lower-case hex of `bytes`, for failure messages (a crasher's bytes to keep).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower-case hex text (a kept crasher).
pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// Describes a failing input: its hex when short, else the file it was saved to.
fn describe(name: &str, case: usize, input: &[u8]) -> String {
    if input.len() <= 256 {
        return format!("input {}", hex(input));
    }
    let path =
        std::env::temp_dir().join(format!("cairn-fuzz-{}-{case}.bin", name.replace(' ', "-")));
    match std::fs::write(&path, input) {
        Ok(()) => format!("input ({} bytes) saved to {}", input.len(), path.display()),
        Err(e) => format!("input of {} bytes (not saved: {e})", input.len()),
    }
}

/// One fuzz target: its name, seed and default number of cases, the share of cases its
/// decoder must accept (so the test shows its cases reach past the first checks, such as a
/// checksum or a magic number), and the time all cases together may take.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Names the target in failure messages and saved crasher files.
    pub name: &'static str,
    /// The base seed; each case derives its own from it and the case number.
    pub seed: u64,
    /// Cases run unless `CAIRN_FUZZ_CASES` says otherwise.
    pub cases: usize,
    /// The least share of cases `check` must accept (0.0 to 1.0).
    pub min_accepted: f64,
    /// Longer than this for all cases is a hang.
    pub limit: Duration,
}

impl Target {
    /// Runs `check` on inputs made by `generate`, on a worker thread; fails when a case
    /// panics, when all of them together take longer than the limit (a hang), naming the
    /// case and its input either way, or when `check` accepted (returned true for) too few.
    pub fn run<G, C>(self, generate: G, check: C)
    where
        G: Fn(&mut Rng) -> Vec<u8> + Send + 'static,
        C: Fn(&[u8]) -> bool + Send + 'static,
    {
        let cases = cases(self.cases);
        let accepted = run(self.name, self.seed, cases, self.limit, generate, check);
        let share = accepted as f64 / cases.max(1) as f64;
        assert!(
            share >= self.min_accepted,
            "{}: only {accepted} of {cases} inputs accepted",
            self.name
        );
    }
}

/// Runs the cases of one target; returns how many `check` accepted.
fn run<G, C>(name: &str, seed: u64, cases: usize, limit: Duration, generate: G, check: C) -> usize
where
    G: Fn(&mut Rng) -> Vec<u8> + Send + 'static,
    C: Fn(&[u8]) -> bool + Send + 'static,
{
    let current: Arc<Mutex<(usize, Vec<u8>)>> = Arc::default();
    let (tx, rx) = mpsc::channel();
    let shared = current.clone();
    std::thread::spawn(move || {
        let mut accepted = 0;
        for case in 0..cases {
            let mut rng = Rng::new(seed ^ (case as u64).wrapping_mul(0x1000_0000_01b3));
            let input = generate(&mut rng);
            *shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                (case, input.clone());
            match catch_unwind(AssertUnwindSafe(|| check(&input))) {
                Ok(ok) => accepted += usize::from(ok),
                Err(_) => {
                    let _ = tx.send(Err((case, input)));
                    return;
                }
            }
        }
        let _ = tx.send(Ok(accepted));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(accepted)) => accepted,
        Ok(Err((case, input))) => {
            panic!(
                "{name}: case {case} (seed {seed:#x}) panicked; {}",
                describe(name, case, &input)
            )
        }
        Err(_) => {
            let (case, input) =
                current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            panic!(
                "{name}: no answer within {limit:?}; case {case} (seed {seed:#x}) hangs; {}",
                describe(name, case, &input)
            )
        }
    }
}
