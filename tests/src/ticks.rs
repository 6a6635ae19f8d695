//! The Linux test init's tick mode (`zygote_tick=MS`, resources/linux/init.c): its lines
//! parsed, a `zygote run` process whose stdout lines are kept with their arrival times, and
//! snapshot state files made to look older than they are.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::zygote_bin;

/// One `ZYGOTE-TICK` line: the guest's own account of its clocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The VM that printed it (`[vmN] ` prefix), if prefixed.
    pub vm: Option<u64>,
    pub seq: u64,
    /// CLOCK_MONOTONIC and CLOCK_REALTIME, ns.
    pub mono: i64,
    pub real: i64,
    /// How far CLOCK_MONOTONIC moved since the previous tick, ns.
    pub gap: i64,
    /// Whole tick periods that passed beyond the one slept.
    pub missed: i64,
    /// 32 bytes of /dev/urandom as hex (`zygote_random=1`).
    pub rand: Option<String>,
}

impl Tick {
    /// Parses `[vmN] ZYGOTE-TICK seq=.. mono=.. real=.. gap=.. missed=.. [rand=..]`.
    pub fn parse(line: &str) -> Option<Tick> {
        let (vm, rest) = match line.strip_prefix("[vm") {
            Some(rest) => {
                let (id, rest) = rest.split_once("] ")?;
                (Some(id.parse().ok()?), rest)
            }
            None => (None, line),
        };
        let fields = rest.strip_prefix("ZYGOTE-TICK ")?;
        let field = |name: &str| fields.split(' ').find_map(|f| f.strip_prefix(name)?.strip_prefix('='));
        let num = |name: &str| field(name)?.parse::<i64>().ok();
        Some(Tick {
            vm,
            seq: field("seq")?.parse().ok()?,
            mono: num("mono")?,
            real: num("real")?,
            gap: num("gap")?,
            missed: num("missed")?,
            rand: field("rand").map(str::to_string),
        })
    }
}

/// A `zygote run` process; its stdout lines with the instant each arrived.
pub struct Served {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    pub started: Instant,
}

impl Served {
    /// Spawns `zygote` with `args`, stdout piped and kept.
    pub fn spawn(args: &[&str]) -> Served {
        let started = Instant::now();
        let mut child = Command::new(zygote_bin()).args(args).stdout(Stdio::piped()).spawn().expect("spawning zygote");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Served { child, lines, started }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// The first line (at or after index `from`) that `what` accepts, with its arrival; panics
    /// with the output after `timeout` (a hang guard, not a speed bound).
    pub fn wait_for<T>(&self, from: usize, timeout: Duration, what: impl Fn(&str) -> Option<T>) -> (Instant, T) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.lines.lock().unwrap().iter().skip(from).find_map(|(t, l)| Some((*t, what(l)?))) {
                return found;
            }
            if Instant::now() > deadline {
                let text: Vec<_> = self.lines().into_iter().map(|(_, l)| l).collect();
                panic!("nothing awaited within {timeout:?}; stdout:\n{}", text.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The next tick of VM `vm` (None: unprefixed output) after line index `from`.
    pub fn next_tick(&self, from: usize, vm: Option<u64>, timeout: Duration) -> (Instant, Tick) {
        self.wait_for(from, timeout, |l| Tick::parse(l).filter(|t| t.vm == vm))
    }

    /// How many lines have arrived.
    pub fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the snapshot state file `from` to `to` with its saved clock's host real-time stamp
/// moved `secs` into the past, the header's body length and CRC32 recomputed: to every check
/// the loader makes, a snapshot taken `secs` earlier. (The stamp is the only host-time value a
/// snapshot holds; RAM files are shared by path.)
pub fn age_snapshot(from: &Path, to: &Path, secs: u64) {
    let (header, mut body) = crate::snapshot_file::read_state(from);
    // `kvm_clock_data` is saved as its 48 bytes: clock u64, flags u32, pad u32, realtime u64, ...
    let clock = body["vm"]["clock"].as_array_mut().expect("the saved clock is a byte array");
    let bytes: Vec<u8> = clock.iter().map(|b| u8::try_from(b.as_u64().expect("a byte")).expect("a byte")).collect();
    let stamp = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let aged = (stamp - secs * 1_000_000_000).to_le_bytes();
    for (slot, byte) in clock[16..24].iter_mut().zip(aged) {
        *slot = byte.into();
    }
    // Resealed as the snapshot format does it (length and checksum over header and body).
    std::fs::write(to, crate::snapshot_file::state_bytes(header, &body)).expect("writing the aged state file");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tick_lines_with_and_without_prefix() {
        let t = Tick::parse("[vm2] ZYGOTE-TICK seq=7 mono=100 real=200 gap=-3 missed=0 rand=00ff").unwrap();
        assert_eq!(
            t,
            Tick { vm: Some(2), seq: 7, mono: 100, real: 200, gap: -3, missed: 0, rand: Some("00ff".into()) }
        );
        assert_eq!(Tick::parse("ZYGOTE-TICK seq=1 mono=1 real=2 gap=3 missed=4").unwrap().vm, None);
        assert!(Tick::parse("ZYGOTE-TICK seq=1 mono=1").is_none());
        assert!(Tick::parse("[vm1] ZYGOTE-LINUX-INIT-OK").is_none());
    }
}
