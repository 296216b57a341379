//! Corpus replay and a short deterministic mutation run of one fuzz entry point, for CI
//! (stable toolchain, no libFuzzer). Included by `proxy/tests/fuzz_replay.rs` and
//! `admin/tests/fuzz_replay.rs` with `#[path]`.
//!
//! For a target it (1) runs every file of `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/`, then (2) mutates those inputs for `PGMUX_FUZZ_SECS`
//! seconds (default 5): bit flips, byte changes, inserts, deletes, duplicated ranges,
//! splices of two entries, boundary lengths (0, 3, 4, 8, 0x7fffffff, 0x80000000,
//! 0xffffffff, …) written over 4 bytes, and the target's own tokens. The PRNG is a
//! xorshift seeded from the target name, or from `PGMUX_FUZZ_SEED`, so a run is
//! reproducible. Every input runs under `catch_unwind`; a panicking input is written
//! to `fuzz/artifacts/replay/<target>/` (move it to `fuzz/regressions/<target>/` to
//! keep it as a regression test), printed in hex, and fails the test.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Inputs longer than this are cut (the seeds are small; long inputs only slow down).
const MAX_LEN: usize = 4096;

const LENGTHS: [u32; 14] = [
    0,
    1,
    3,
    4,
    5,
    7,
    8,
    12,
    255,
    10_000,
    10_001,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn read_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (!name.starts_with('.')).then(|| (name, std::fs::read(e.path()).ok()))
        })
        .filter_map(|(name, data)| Some((name, data?)))
        .collect();
    files.sort();
    files
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// A short stable name for an input (FNV-1a).
fn digest(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Runs `f` on `data`; on a panic saves the input and returns a description.
fn try_one(target: &str, f: fn(&[u8]), data: &[u8], origin: &str) -> Option<String> {
    if catch_unwind(AssertUnwindSafe(|| f(data))).is_ok() {
        return None;
    }
    let dir = fuzz_dir().join("artifacts/replay").join(target);
    let file = dir.join(format!("crash-{}", digest(data)));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&file, data))
        .map_or_else(
            |e| format!("(not saved: {e})"),
            |_| file.display().to_string(),
        );
    Some(format!(
        "{target}: panic on {origin}\n  saved as {saved}\n  input ({} bytes): {}",
        data.len(),
        hex(data)
    ))
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], tokens: &[&[u8]]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let piece = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, piece);
            }
            5 => {
                // Splice: our head, another entry's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            6 if len >= 4 => {
                let i = rng.below(len - 3);
                let v = match rng.below(3) {
                    0 => LENGTHS[rng.below(LENGTHS.len())],
                    1 => (len - i) as u32,
                    _ => ((len - i) as u32)
                        .wrapping_add(rng.below(9) as u32)
                        .wrapping_sub(4),
                };
                data[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            7 if !tokens.is_empty() => {
                let t = tokens[rng.below(tokens.len())];
                let i = rng.below(len + 1);
                data.splice(i..i, t.iter().copied());
            }
            8 if len > 0 => data.truncate(rng.below(len)),
            _ => {
                let i = rng.below(len + 1);
                data.insert(i, [0, b'\'', b'"', b';', b' ', 0xff][rng.below(6)]);
            }
        }
    }
    data.truncate(MAX_LEN);
    data
}

/// Replays `target`'s corpus and regressions through `f`, then mutates them for the
/// configured time. Panics (failing the test) listing every input that panicked.
pub fn run(target: &str, f: fn(&[u8]), tokens: &[&[u8]]) {
    let dir = fuzz_dir();
    let corpus = read_dir(&dir.join("corpus").join(target));
    let regressions = read_dir(&dir.join("regressions").join(target));
    assert!(
        !corpus.is_empty(),
        "no seed corpus in {}",
        dir.join("corpus").join(target).display()
    );
    // Panics are expected to be caught and reported here; keep the output to ours.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
    }));
    let mut failures = Vec::new();
    for (kind, files) in [("corpus", &corpus), ("regressions", &regressions)] {
        for (name, data) in files.iter() {
            failures.extend(try_one(target, f, data, &format!("{kind}/{target}/{name}")));
        }
    }

    let secs: f64 = std::env::var("PGMUX_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let seed: u64 = std::env::var("PGMUX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from_str_radix(&digest(target.as_bytes()), 16).unwrap_or(1))
        | 1;
    let inputs: Vec<Vec<u8>> = corpus
        .iter()
        .chain(&regressions)
        .map(|(_, d)| d.clone())
        .collect();
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
    let mut runs = 0u64;
    while Instant::now() < deadline && failures.len() < 10 {
        let data = mutate(&mut rng, &inputs, tokens);
        let origin = format!("mutation {runs} (PGMUX_FUZZ_SEED={seed})");
        failures.extend(try_one(target, f, &data, &origin));
        runs += 1;
    }
    std::panic::set_hook(hook);
    eprintln!(
        "{target}: {} corpus + {} regression inputs replayed, {runs} mutations in {secs}s \
         (PGMUX_FUZZ_SEED={seed})",
        corpus.len(),
        regressions.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
